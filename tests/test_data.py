"""Loading COCO / Karpathy / Flickr8k annotations, the quality report, prepare and load_prepared.

Small hand-made folders test the formats and every kind of bad input; the
shared real samples (via conftest's fixtures) test the numbers a learner sees.
"""

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from captioning import data
from conftest import run_cli


def make_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "gray").save(path)


def write_coco(root, images, annotations, split="val", on_disk=()):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"captions_{split}2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    for image in images:
        if image["id"] in on_disk:
            make_image(root / f"{split}2017" / image["file_name"])
    return path


def coco_images(count):
    return [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(1, count + 1)]


@pytest.fixture
def coco_dir(tmp_path):
    """Three val images (two on disk), 2 captions each."""
    annotations = [{"image_id": i, "caption": f"A dog number {i}, take {j}."} for i in (1, 2, 3) for j in (1, 2)]
    write_coco(tmp_path, coco_images(3), annotations, on_disk={1, 2})
    return tmp_path


def test_load_coco_gives_one_row_per_caption(coco_dir):
    df = data.load_coco(coco_dir / "annotations" / "captions_val2017.json")
    assert list(df.columns) == data.COLUMNS and len(df) == 6
    assert df["image_id"].tolist() == ["1", "1", "2", "2", "3", "3"]
    assert set(df["split"]) == {"val"}
    first = df.iloc[0]
    assert first["file_name"] == "000000000001.jpg" and first["caption"] == "A dog number 1, take 1."
    assert Path(first["image_path"]).is_absolute() and Path(first["image_path"]).is_file()


def test_on_disk_only_drops_missing_images_and_counts_them(coco_dir):
    everything = data.load_dataset("coco", coco_dir)
    on_disk = data.load_dataset("coco", coco_dir, on_disk_only=True)
    assert everything["image_id"].nunique() == 3 and on_disk["image_id"].nunique() == 2
    assert on_disk.attrs["dropped_images"] == 1 and on_disk.attrs["annotated_captions"] == 6
    report = data.quality_report(on_disk)
    assert (report["images"], report["captions"], report["dropped_images"]) == (2, 4, 1)


def test_shared_sample_layout_with_an_images_folder(tmp_path):
    write_coco(tmp_path, coco_images(2), [{"image_id": 1, "caption": "a cat"}, {"image_id": 2, "caption": "a dog"}])
    make_image(tmp_path / "images" / "000000000002.jpg")
    df = data.load_dataset("coco", tmp_path, on_disk_only=True)
    assert df["image_id"].tolist() == ["2"] and Path(df["image_path"][0]).parent.name == "images"


def test_missing_image_folder_is_a_clear_error(tmp_path):
    write_coco(tmp_path, coco_images(1), [{"image_id": 1, "caption": "a cat"}])
    with pytest.raises(FileNotFoundError, match="image folder not found: .*val2017"):
        data.load_dataset("coco", tmp_path, on_disk_only=True)
    with pytest.raises(FileNotFoundError, match="no COCO caption files"):
        data.load_dataset("coco", tmp_path / "annotations")
    (tmp_path / "val2017").mkdir()  # the folder exists but holds none of the images
    with pytest.raises(ValueError, match="none of the 1 annotated images is on disk"):
        data.prepare("coco", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ('{"images": [', "not valid JSON"),
    ('{"annotations": []}', "top level has no field 'images'"),
    ('{"images": [{"id": 1}], "annotations": []}', r"images\[0\] has no field 'file_name'"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}',
     r"annotations\[0\] has no field 'caption'"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": 5}]}',
     r"annotations\[0\].caption must be text"),
    ('{"images": [{"id": 1, "file_name": "../../etc/passwd"}], "annotations": []}', "unsafe"),
    ('{"images": [{"id": 1, "file_name": "/etc/passwd"}], "annotations": []}', "unsafe"),
])
def test_bad_coco_files_name_the_file_and_the_field(tmp_path, content, message):
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        data.load_coco(path)
    assert "captions_val2017.json" in str(caught.value)


def test_non_utf8_annotation_file_is_a_clear_error(tmp_path):
    path = tmp_path / "captions_val2017.json"
    path.write_bytes('{"images": [], "annotations": [{"caption": "caf\u00e9"}]}'.encode("latin-1"))
    with pytest.raises(ValueError, match="captions_val2017.json.*not valid UTF-8"):
        data.load_coco(path)


def test_empty_captions_are_counted_then_dropped_by_prepare(tmp_path):
    annotations = [{"image_id": 1, "caption": c} for c in ("A dog.", "", None, "!!!", "a dog")]
    annotations += [{"image_id": 2, "caption": "Un caf\u00e9 noir"}]
    write_coco(tmp_path, coco_images(2), annotations, on_disk={1, 2})
    report = data.quality_report(data.load_dataset("coco", tmp_path))
    assert report["empty_captions"] == 3 and report["duplicate_captions"] == 1 and report["non_ascii_captions"] == 1
    assert report["captions_per_image"] == {"min": 1, "max": 5, "mean": 3.0, "histogram": {"1": 1, "5": 1}}
    prepared = data.prepare("coco", tmp_path, tmp_path / "out", min_count=1)
    assert len(prepared.captions) == 3 and prepared.report["dropped_empty_captions"] == 3
    assert prepared.captions["clean"].tolist() == ["a dog", "a dog", "un café noir"]


def test_quality_report_lengths_and_splits():
    df = pd.DataFrame({"image_id": ["1", "1", "2"], "file_name": "x", "image_path": "x",
                       "caption": ["one two", "one two three four", "a b c d e f"], "split": ["train", "train", "val"]})
    report = data.quality_report(df)
    assert report["length_words"]["min"] == 2 and report["length_words"]["max"] == 6
    assert report["length_words"]["mean"] == 4.0 and report["images_per_split"] == {"train": 1, "val": 1}


def write_flickr(root, lines, splits):
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, names in splits.items():
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")


def test_flickr8k_official_layout_splits_and_ids(tmp_path):
    lines = [f"{name}.jpg#{n}\t{name} caption {n} ." for name in ("100_a", "200_b", "300_c") for n in range(2)]
    write_flickr(tmp_path, lines, {"train": ["100_a.jpg"], "dev": ["200_b.jpg"], "test": []})
    make_image(tmp_path / "Flicker8k_Dataset" / "100_a.jpg")
    df = data.load_flickr8k(tmp_path)
    assert len(df) == 6 and df["image_id"].unique().tolist() == ["100_a", "200_b", "300_c"]
    splits = df.groupby("image_id")["split"].first().to_dict()
    assert splits == {"100_a": "train", "200_b": "dev", "300_c": "unassigned"}
    assert df["caption"][0] == "100_a caption 0 ."
    on_disk = data.load_dataset("flickr8k", tmp_path, on_disk_only=True)
    assert on_disk["image_id"].unique().tolist() == ["100_a"] and on_disk.attrs["dropped_images"] == 2


@pytest.mark.parametrize("line, message", [
    ("100_a.jpg#0 no tab here", "line 2 is not"),
    ("100_a.jpg\tno hash", "line 2 is not"),
    ("../../secret.jpg#0\tescape", "unsafe"),
])
def test_bad_flickr8k_lines_name_the_file_and_line(tmp_path, line, message):
    write_flickr(tmp_path, ["100_a.jpg#0\tfine", line], {})
    with pytest.raises(ValueError, match=message) as caught:
        data.load_flickr8k(tmp_path)
    assert "Flickr8k.token.txt" in str(caught.value)


def test_non_utf8_flickr8k_text_names_the_line(tmp_path):
    write_flickr(tmp_path, ["100_a.jpg#0\tfine"], {})
    with open(tmp_path / "Flickr8k.token.txt", "ab") as handle:
        handle.write("100_a.jpg#1\tcaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="Flickr8k.token.txt: line 2 is not valid UTF-8"):
        data.load_flickr8k(tmp_path)


def test_karpathy_split_file_finds_2017_file_names(tmp_path):
    split_file = tmp_path / "dataset_coco.json"
    entries = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": split,
                "sentences": [{"raw": f"Raw caption {i}.", "tokens": []}]}
               for i, split in ((5, "train"), (6, "restval"), (7, "test"))]
    split_file.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    make_image(tmp_path / "val2014" / "COCO_val2014_000000000005.jpg")
    make_image(tmp_path / "train2017" / "000000000006.jpg")
    df = data.load_dataset("coco", tmp_path, karpathy_split=split_file, on_disk_only=True)
    assert df[["image_id", "split"]].values.tolist() == [["5", "train"], ["6", "restval"]]
    assert df["file_name"].tolist() == ["COCO_val2014_000000000005.jpg", "000000000006.jpg"]
    assert df.attrs["dropped_images"] == 1


def test_prepare_writes_three_files_and_load_prepared_reads_them_back(tmp_path):
    lines = [f"{i}_x.jpg#{n}\tA {word} dog runs fast ." for i, word in enumerate(["red", "red", "blue"])
             for n in range(3)]
    write_flickr(tmp_path, lines, {"train": ["0_x.jpg", "1_x.jpg"], "test": ["2_x.jpg"]})
    for i in range(3):
        make_image(tmp_path / "Flicker8k_Dataset" / f"{i}_x.jpg")
    out = tmp_path / "prepared"
    prepared = data.prepare("flickr8k", tmp_path, out, min_count=1, max_length=4)
    assert sorted(path.name for path in out.iterdir()) == ["captions.csv", "report.json", "vocabulary.json"]
    assert "blue" not in prepared.vocab and "red" in prepared.vocab  # built from the training split only
    assert prepared.report["vocabulary"]["built_from_splits"] == ["train"]
    assert prepared.report["vocabulary"]["captions_cut"] == 9 and prepared.report["images_on_disk"] == 3
    loaded = data.load_prepared(out)
    assert loaded.vocab == prepared.vocab and loaded.report == prepared.report
    assert loaded.captions["image_id"].tolist()[:3] == ["0_x"] * 3
    pd.testing.assert_frame_equal(loaded.captions, prepared.captions, check_dtype=False)

    other = data.prepare("flickr8k", tmp_path, tmp_path / "other", min_count=1, max_vocab=6)
    other.vocab.save(out / "vocabulary.json")  # a half-updated folder must not load silently
    with pytest.raises(ValueError, match="do not match report.json"):
        data.load_prepared(out)
    with pytest.raises(FileNotFoundError, match="run notebook 01"):
        data.load_prepared(tmp_path / "nowhere")


def test_unknown_dataset_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("imagenet", tmp_path)
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        data.load_dataset("coco", tmp_path / "absent")


# --- the shared real data ---------------------------------------------------------------------

def test_full_official_val2017_annotations(coco_val_dir):
    df = data.load_dataset("coco", coco_val_dir)
    report = data.quality_report(df)
    assert (report["images"], report["captions"]) == (5000, 25014)
    assert report["captions_per_image"]["min"] >= 5  # a caption of no listed image is an error (load_coco)
    on_disk = data.load_dataset("coco", coco_val_dir, on_disk_only=True)
    assert on_disk["image_id"].nunique() == 159 and on_disk.attrs["dropped_images"] == 5000 - 159


def test_flickr8k_sample(flickr8k_dir):
    df = data.load_dataset("flickr8k", flickr8k_dir, on_disk_only=True)
    report = data.quality_report(df)
    assert report["images"] == 875 and report["captions"] == 875 * 5
    assert report["images_per_split"] == {"dev": 113, "train": 753, "unassigned": 9}


def test_prepare_command_prints_the_numbers(coco_val_dir, tmp_path):
    result = run_cli("prepare", "--dataset", "coco", "--data-dir", coco_val_dir, "--out", tmp_path / "out")
    assert "5,000 images, 25,014 captions" in result.stdout
    assert "images found on disk: 159" in result.stdout
    assert data.load_prepared(tmp_path / "out").captions["image_id"].nunique() == 159
    failed = run_cli("prepare", "--dataset", "coco", "--data-dir", tmp_path / "absent", "--out", tmp_path / "x",
                     check=False)
    # A missing folder is a fault of the environment (exit 1), not of the command's usage (exit 2).
    assert failed.returncode == 1 and "data folder not found" in failed.stderr
