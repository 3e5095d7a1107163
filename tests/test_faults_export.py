"""Faults on `export` and on what it writes (captioning/export.py): a batch with a photo the
SavedModel cannot read, an empty batch, a folder it may not write, a full disk. Each ends as
tests/test_faults.py expects: the good work done, the bad named, one line, nothing half-written."""

import errno
import json
import os

import numpy as np
import pytest
from PIL import Image

from captioning import quiet_tensorflow

tf = quiet_tensorflow()

from captioning import cli, export  # noqa: E402
from captioning.bundle import save_bundle  # noqa: E402
from captioning.encoders import build_encoder, encode_images  # noqa: E402
from test_export import photos, untrained_captioner  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def merge_bundle(tmp_path_factory):
    """A merge bundle on MobileNetV2 with fixed random weights (nothing downloaded), and its encoder."""
    folder = tmp_path_factory.mktemp("merge")
    encoder = build_encoder("mobilenet_v2", weights="none", pooling="avg", mirror=False)
    captioner = untrained_captioner("merge", encoder.feature_shape, encoder=encoder)
    return save_bundle(folder / "bundle", captioner.model, captioner.vocab, captioner.settings), encoder, captioner


@pytest.fixture(scope="module")
def served(merge_bundle, tmp_path_factory):
    bundle, _, _ = merge_bundle
    out = export.export_bundle(bundle, tmp_path_factory.mktemp("export") / "savedmodel")
    return tf.saved_model.load(str(out)).signatures["serving_default"]


# --- the SavedModel's serving signature: one bad photo costs only itself ------------------------

def test_a_batch_with_a_bad_photo_captions_the_others_and_names_the_bad_one(merge_bundle, served, tmp_path):
    _, encoder, captioner = merge_bundle
    good = photos(tmp_path, count=2)
    Image.fromarray(np.zeros((8, 40, 3), dtype=np.uint8)).save(tmp_path / "tiny.png")
    batch = [good[0].read_bytes(), b"this is not a photo", good[1].read_bytes(),
             good[0].read_bytes()[:200],  # a JPEG cut short
             (tmp_path / "tiny.png").read_bytes()]
    result = {key: value.numpy() for key, value in served(images=tf.constant(batch)).items()}
    features, _, _ = encode_images(encoder, good)
    expected = captioner.caption_features(features, beam_width=3)
    assert result["ok"].tolist() == [True, False, True, False, False]
    assert [text.decode() for text in result["captions"]] == [expected[0], "", expected[1], "", ""]
    errors = [text.decode() for text in result["errors"]]
    assert errors[0] == errors[2] == "" and "not a photo" in errors[1] and "not a photo" in errors[3]
    assert "smaller than 16 px" in errors[4]
    assert np.all(result["scores"][[0, 2]] < 0) and np.isnan(result["scores"][[1, 3, 4]]).all()
    # The same good photos alone score the same: the bad ones took nothing from them.
    alone = served(images=tf.constant([path.read_bytes() for path in good]))
    np.testing.assert_array_equal(alone["scores"].numpy(), result["scores"][[0, 2]])


def test_an_empty_batch_or_only_bad_photos_give_results_of_their_size(served):
    empty = served(images=tf.constant([], tf.string))
    assert {key: value.shape for key, value in empty.items()} == {key: (0,) for key in empty}
    bad = served(images=tf.constant([b"", b"GIF89a"]))
    assert bad["ok"].numpy().tolist() == [False, False] and bad["captions"].numpy().tolist() == [b"", b""]


def test_export_json_describes_the_per_photo_outputs(served, merge_bundle, tmp_path):
    bundle, _, _ = merge_bundle
    out = export.export_bundle(bundle, tmp_path / "described", beam_width=1)
    outputs = json.loads((out / export.MARKER).read_text())["outputs"]
    assert set(outputs) == {"captions", "scores", "ok", "errors"}


# --- the folder: an unwritable place or a full disk, through the command line ---------------------

@pytest.fixture
def quick_export(merge_bundle, monkeypatch):
    """`export` with stand-ins for the CNN and the writer: these tests are about the folder.
    Returns a function that makes the writer write half a file, then fail with `error`."""
    monkeypatch.setattr(export, "build_encoder_like", lambda *args, **kwargs: merge_bundle[1])

    def failing(error):
        def write(captioner, encoder, beam_width, folder):
            (folder / "saved_model.pb").write_bytes(b"half")
            raise error
        monkeypatch.setattr(export, "_savedmodel", write)
    return failing


def export_command(bundle, out):
    return cli.main(["export", "--model", str(bundle), "--out", str(out)])


@pytest.mark.parametrize("error, words", [
    (OSError(errno.ENOSPC, "No space left on device", "saved_model.pb"), "no space left on the disk while writing"),
    (tf.errors.ResourceExhaustedError(None, None, "saved_model.pb; No space left on device"),
     "no space left on the disk while writing"),
    (tf.errors.PermissionDeniedError(None, None, "saved_model.pb; Permission denied"), "Permission denied"),
])
def test_a_full_disk_or_a_refused_write_is_one_line_naming_the_folder_and_leaves_nothing(
        merge_bundle, quick_export, tmp_path, capsys, error, words):
    quick_export(error)
    out = tmp_path / "exported"
    assert export_command(merge_bundle[0], out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0] and str(out) in err[0], err
    assert ".tmp" not in err[0] and list(tmp_path.iterdir()) == []  # no half folder, no staging left


def test_a_failed_export_over_a_previous_one_keeps_the_previous_one(merge_bundle, quick_export, tmp_path, capsys):
    out = tmp_path / "exported"
    out.mkdir()
    (out / export.MARKER).write_text("{}")
    (out / "saved_model.pb").write_bytes(b"the previous export")
    quick_export(OSError(errno.ENOSPC, "No space left on device"))
    assert export_command(merge_bundle[0], out) == 1 and "no space left" in capsys.readouterr().err
    assert (out / "saved_model.pb").read_bytes() == b"the previous export"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["exported"]


def test_an_unwritable_folder_is_one_line_naming_it(merge_bundle, quick_export, tmp_path, capsys, monkeypatch):
    quick_export(AssertionError("the writer must not be reached"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: refuse the staging folder as the kernel would refuse others
        real_mkdir = export.Path.mkdir

        def refused(self, *args, **kwargs):
            if self.parent == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)
        monkeypatch.setattr(export.Path, "mkdir", refused)
    try:
        assert export_command(merge_bundle[0], locked / "exported") == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{locked / 'exported'}: Permission denied" in err[0], err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
