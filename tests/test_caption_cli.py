"""`python -m captioning caption`: captioning photo files with a bundle trained by the suite.

The bundle is the conftest `flickr8k_bundle` (trained through the `train`
command on the shared Flickr8k sample, MobileNetV2 encoder); the images are
shared Flickr8k and COCO photos, plus broken files that the test makes.
"""

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(flickr8k_dir, coco_val_dir):
    flickr = sorted((flickr8k_dir / "images").glob("*.jpg"))[:3]
    coco = sorted((coco_val_dir / "images").glob("*.jpg"))[:2]
    return flickr + coco


def vocabulary_words(bundle):
    return set(json.loads((bundle / "vocabulary.json").read_text())["words"])


def parse_lines(stdout):
    lines = [line.split("\t") for line in stdout.splitlines()]
    assert all(len(parts) == 2 for parts in lines), stdout
    return lines


def test_captions_every_readable_photo_and_reports_the_others(flickr8k_bundle, photos, tmp_path):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is not a JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photos[0].read_bytes()[:300])
    missing = tmp_path / "missing.jpg"
    arguments = [photos[0], not_an_image, *photos[1:3], missing, truncated, *photos[3:]]

    result = run_cli("caption", "--model", flickr8k_bundle, "--beam", 3, *arguments, check=False)

    assert result.returncode not in (0, 2), result.stderr  # the others captioned, then a failure status
    lines = parse_lines(result.stdout)
    assert [path for path, _ in lines] == [str(path) for path in photos], "one line per readable photo, in order"
    words = vocabulary_words(flickr8k_bundle)
    specials = {"<pad>", "<start>", "<end>"}
    for path, caption in lines:
        assert caption.strip(), f"empty caption for {path}"
        assert set(caption.split()) <= words - specials, caption
    # One clear error line per bad file, naming it.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    for bad in (not_an_image, missing, truncated):
        assert sum(str(bad) in line for line in errors) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_beam_width_option_and_bad_arguments(flickr8k_bundle, photos, tmp_path):
    greedy = run_cli("caption", "--model", flickr8k_bundle, "--beam", 1, *photos[:2])
    assert [path for path, _ in parse_lines(greedy.stdout)] == [str(path) for path in photos[:2]]

    refused = run_cli("caption", "--model", flickr8k_bundle, "--beam", 0, photos[0], check=False)
    assert refused.returncode == 2 and "--beam" in refused.stderr

    absent = run_cli("caption", "--model", tmp_path / "no-such-bundle", photos[0], check=False)
    assert absent.returncode == 1 and "no-such-bundle" in absent.stderr
    assert "Traceback" not in absent.stderr


def test_train_refuses_a_negative_number_of_fine_tuning_epochs(tmp_path):
    # Checked before any data is read, so no data is needed.
    refused = run_cli("train", "--dataset", "flickr8k", "--data-dir", tmp_path, "--out", tmp_path / "bundle",
                      "--self-critical-epochs", -1, check=False)
    assert refused.returncode == 2 and "--self-critical-epochs" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "bundle").exists()
