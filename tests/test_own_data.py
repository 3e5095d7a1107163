"""A dataset of your own (`--dataset csv`): a folder of photos with captions.csv or captions.jsonl."""

import csv
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from captioning import data, own_data
from conftest import run_cli


def write_csv(folder, rows, header=("image", "caption", "split")):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return folder / "captions.csv"


def photo(path, colour=(200, 40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 40, 3), colour, dtype=np.uint8)).save(path)
    return path


def test_flickr8k_written_as_a_csv_folder_prepares_the_same_captions(flickr8k_small_dir, tmp_path):
    table = data.load_dataset("flickr8k", flickr8k_small_dir, on_disk_only=True)
    own = tmp_path / "own"
    (own / "images").mkdir(parents=True)
    for path in sorted(set(table["image_path"])):
        (own / "images" / path.split("/")[-1]).symlink_to(path)
    write_csv(own, [(f"images/{row.file_name}", row.caption, row.split) for row in table.itertuples()])

    flickr = data.prepare("flickr8k", flickr8k_small_dir, tmp_path / "prepared-flickr8k")
    mine = data.prepare("csv", own, tmp_path / "prepared-csv")
    columns = ["file_name", "caption", "clean"]
    assert sorted(map(tuple, flickr.captions[columns].values)) == sorted(map(tuple, mine.captions[columns].values))
    # Flickr8k's "dev" is read as "val", the name every dataset of your own uses.
    assert sorted(flickr.captions["split"].replace("dev", "val")) == sorted(mine.captions["split"])
    assert flickr.vocab == mine.vocab and mine.report["bad_rows"] == {}


def test_bad_rows_are_counted_and_named_the_good_ones_kept(tmp_path):
    folder = tmp_path / "own"
    photo(folder / "a.jpg"), photo(folder / "sub" / "b.png")
    path = write_csv(folder, [
        ("a.jpg", "a red square", "train"),         # line 2: kept
        ("sub/b.png", "a red square again", ""),     # line 3: kept, split by the seeded rule
        ("gone.jpg", "a photo not there", "train"),  # line 4: missing image
        ("a.jpg", "   ", "train"),                   # line 5: empty caption
        ("a.jpg", "a red square", "train"),          # line 6: duplicate of line 2
        ("a.jpg", "another caption", "holdout"),     # line 7: unknown split
        ("../a.jpg", "outside the folder", "train"), # line 8: unsafe path
    ])
    path.write_bytes(path.read_bytes() + b"a.jpg,caf\xe9 latin-1 text,train\n")  # line 9: not UTF-8
    table = data.load_dataset("csv", folder)
    assert len(table) == 2 and set(table["file_name"]) == {"a.jpg", "b.png"}
    report = data.quality_report(table)
    assert {kind: entry["lines"] for kind, entry in report["bad_rows"].items()} == {
        "missing_image": [4], "empty_caption": [5], "duplicate": [6], "bad_split": [7], "unsafe_path": [8],
        "not_utf8": [9]}


def test_without_a_split_column_each_photo_keeps_one_seeded_split(tmp_path):
    folder = tmp_path / "own"
    names = [f"p{i:03d}.jpg" for i in range(300)]
    for name in names[:2]:
        photo(folder / name)
    splits = {name: own_data.seeded_split(name) for name in names}
    shares = Counter(splits.values())
    assert 0.7 < shares["train"] / 300 < 0.9 and shares["val"] > 15 and shares["test"] > 15
    assert splits == {name: own_data.seeded_split(name) for name in reversed(names)}  # order does not matter
    write_csv(folder, [(name, f"caption {j} of {name}") for name in names[:2] for j in range(3)],
              header=("image", "caption"))
    table = data.load_dataset("csv", folder)
    assert table.groupby("image_id")["split"].nunique().max() == 1
    assert dict(zip(table["file_name"], table["split"])) == {name: splits[name] for name in names[:2]}


def test_jsonl_and_clear_errors(tmp_path):
    folder = tmp_path / "own"
    photo(folder / "a.jpg")
    (folder / "captions.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "a red square", "split": "dev"})
                                          + "\n")
    table = data.load_dataset("csv", folder)
    assert table[["file_name", "caption", "split"]].values.tolist() == [["a.jpg", "a red square", "val"]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no captions.csv or captions.jsonl"):
        data.load_dataset("csv", tmp_path / "empty")
    write_csv(tmp_path / "wrong", [("a.jpg", "x")], header=("file", "text"))
    with pytest.raises(ValueError, match="must name the columns image and caption"):
        data.load_dataset("csv", tmp_path / "wrong")


@pytest.mark.slow
def test_every_command_works_on_a_folder_of_your_own(tmp_path):
    """prepare -> features -> train -> caption -> evaluate, as a new user would, on 40 photos."""
    folder = tmp_path / "own"
    colours = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210), "yellow": (220, 210, 40)}
    rows = []
    for i in range(40):
        name, colour = f"photos/{i:02d}.jpg", list(colours)[i % 4]
        photo(folder / name, colours[colour])
        rows += [(name, f"a {colour} square on a {ground} background") for ground in ("plain", "dark", "light")]
    write_csv(folder, rows, header=("image", "caption"))
    work, bundle = tmp_path / "work", tmp_path / "bundle"
    common = ["--dataset", "csv", "--data-dir", folder]
    encoder = ["--encoder", "mobilenet_v2", "--weights", "none"]
    prepared = run_cli("prepare", *common, "--out", work / "prepared" / "csv", "--min-count", 1)
    assert "kept: 40 images, 120 captions" in prepared.stdout
    run_cli("features", *common, *encoder, "--out", work / "features" / "csv-mobilenet_v2-avg")
    run_cli("train", *common, *encoder, "--out", bundle, "--cache-dir", work, "--epochs", 2,
            "--self-critical-epochs", 0)
    captioned = run_cli("caption", "--model", bundle, folder / "photos" / "00.jpg")
    assert captioned.stdout.startswith(str(folder / "photos" / "00.jpg") + "\t")
    metrics = json.loads(run_cli("evaluate", "--model", bundle, *common, "--split", "val", "--cache-dir",
                                 work).stdout)
    assert metrics["split"] == "val" and metrics["images"] == sum(
        own_data.seeded_split(f"photos/{i:02d}.jpg") == "val" for i in range(40))


def test_a_dataset_without_validation_photos_trains_and_says_what_it_left_out(tmp_path):
    # Every photo in `train`: no split to validate on. It used to train, then fail with
    # "could not convert string to float: 'NA'" (the log's empty validation columns).
    folder = tmp_path / "own"
    colours = [(220, 30, 30), (30, 200, 60), (40, 60, 220)]
    rows = []
    for i in range(9):
        photo(folder / f"p{i}.jpg", colours[i % 3])
        rows += [(f"p{i}.jpg", f"a {['red', 'green', 'blue'][i % 3]} square number {j}", "train") for j in range(3)]
    write_csv(folder, rows)
    result = run_cli("train", "--dataset", "csv", "--data-dir", folder, "--encoder", "mobilenet_v2", "--weights",
                     "none", "--out", tmp_path / "bundle", "--cache-dir", tmp_path / "work", "--epochs", 2)
    assert "note: no val photos to validate on: early stopping watches the training loss" in result.stderr
    settings = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert settings["metrics"]["epochs_run"] == 2 and "val_loss" not in settings["metrics"]
    # fine-tuned all the same: two epochs, then the preset keeps their mean
    assert [record["epoch"] for record in settings["metrics"]["self_critical"]] == [1, 2, "mean of 1-2"]


def test_two_photos_with_one_name_and_two_extensions_are_two_photos(tmp_path):
    folder = tmp_path / "own"
    photo(folder / "x.jpg", (200, 40, 40)), photo(folder / "x.png", (40, 40, 200))
    write_csv(folder, [("x.jpg", "a red square", "train"), ("x.png", "a blue square", "train")])
    table = data.load_dataset("csv", folder)
    assert sorted(table["image_id"]) == ["x.jpg", "x.png"]
    assert dict(zip(table["image_id"], table["caption"])) == {"x.jpg": "a red square", "x.png": "a blue square"}
