"""Faults of the data a user brings and of the caches made from it (issue 30), run as users run
them: `captioning.cli.main([...])`, the very function `python -m captioning` calls.

Each fault ends in one `error:` line naming the file and what to do (exit 1, no traceback), or
just works; nothing of the user's is lost. The photos are generated here, and the encoder is
MobileNetV2 with fixed random weights (`--weights none`), so these tests need nothing from
outside.
"""

import json
import os
import shutil
import time
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from captioning import cli, feature_jobs
from captioning.features import FeatureStore
from captioning.fileio import sha256_of

HOUR_AGO_NS = time.time_ns() - 3600 * 10**9
ENCODER = ("--encoder", "mobilenet_v2", "--weights", "none")


def run(capsys, *arguments):
    """`python -m captioning ARGUMENTS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([str(argument) for argument in arguments])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(result, *words):
    """The fault answer: exit 1, one `error:` line naming what it should, no traceback."""
    code, _, err = result
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def bmp(path, seed):
    """A 40 x 32 BMP: every one is 3,894 bytes long, so one can replace another keeping its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="BMP")
    os.utime(path, ns=(HOUR_AGO_NS, HOUR_AGO_NS))  # an old photo: its size and mtime vouch for it
    return path


def own_folder(folder, count=10, extension="bmp"):
    """A dataset of your own: `count` photos, two captions each, a captions.csv naming them."""
    lines = ["image,caption,split"]
    for i in range(count):
        name = f"p{i:02d}.{extension}"
        bmp(folder / name, i) if extension == "bmp" else photo(folder / name, i)
        lines += [f"{name},a photo number {i},{'train' if i < count - 2 else 'val'}",
                  f"{name},another photo number {i},{'train' if i < count - 2 else 'val'}"]
    (folder / "captions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def photo(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def features(capsys, data_dir, out, *more):
    return run(capsys, "features", "--dataset", "csv", "--data-dir", data_dir, *ENCODER, "--out", out,
               "--batch-size", 1, *more)


def folder_digest(folder):
    return {str(path.relative_to(folder)): sha256_of(path) for path in sorted(Path(folder).rglob("*"))
            if path.is_file()}


# --- a feature cache follows the content of its photos ---------------------------------------

def test_a_photo_replaced_keeping_its_size_and_mtime_gets_new_features(tmp_path, capsys, monkeypatch):
    # `cp -p other.bmp p03.bmp`: the same size, the same mtime, other pixels. The cache used to
    # trust size and mtime and kept serving the old photo's features.
    data_dir, cache = own_folder(tmp_path / "own"), tmp_path / "cache"
    assert features(capsys, data_dir, cache)[0] == 0
    target, other = data_dir / "p03.bmp", bmp(tmp_path / "other.bmp", 99)
    kept = target.stat()
    shutil.copyfile(other, target)  # written in place, as cp does
    os.utime(target, ns=(kept.st_atime_ns, kept.st_mtime_ns))  # and the times copied back, as -p does
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (kept.st_size, kept.st_mtime_ns)

    code, out, _ = features(capsys, data_dir, cache)
    assert code == 0 and f"1 photo changed since they were cached (e.g. {target})" in out
    # Encoded again (random weights give these small photos the same features, so the record says it).
    assert "(1 encoded now" in out and len(FeatureStore.open(cache)) == 10
    assert json.loads((cache / "sources.json").read_text())["p03.bmp"]["sha256"] == sha256_of(target)

    # --rehash reads every photo again (for file systems without a change time), and finds nothing new.
    hashed = []
    real_sha256 = feature_jobs.sha256_of
    monkeypatch.setattr(feature_jobs, "sha256_of", lambda path: hashed.append(path) or real_sha256(path))
    assert features(capsys, data_dir, cache)[0] == 0 and hashed == []  # nothing moved: nothing is read
    code, out, _ = features(capsys, data_dir, cache, "--rehash")
    assert code == 0 and len(hashed) == 10 and "changed" not in out and "cached 10 images" in out


# --- a damaged cache ---------------------------------------------------------------------------

def test_a_cut_features_file_is_named_and_the_rerun_rebuilds_the_store(tmp_path, capsys):
    data_dir, cache = own_folder(tmp_path / "own"), tmp_path / "cache"
    assert features(capsys, data_dir, cache)[0] == 0
    whole = folder_digest(cache)
    os.truncate(cache / "features.npy", 300)  # a copy stopped half-way
    with pytest.raises(ValueError, match=r"features.npy: the feature cache is damaged .*run the same command again"):
        FeatureStore.open(cache)
    code, out, err = features(capsys, data_dir, cache)
    assert code == 0 and "Traceback" not in err
    assert f"feature cache {cache} is damaged" in out and "encoding all 10 again" in out
    assert folder_digest(cache) == whole  # the very store it was


def test_a_cut_shard_chunk_is_named_and_a_rerun_of_that_shard_makes_it_again(tmp_path, capsys):
    data_dir = own_folder(tmp_path / "own")
    shards = [tmp_path / "shard0", tmp_path / "shard1"]
    for index, shard in enumerate(shards):  # batch size 1: chunks of 4 photos, 0 and 2 in shard 0
        assert features(capsys, data_dir, shard, "--shard", f"{index}/2")[0] == 0
    assert run(capsys, "merge-shards", *shards, "--out", tmp_path / "whole")[0] == 0
    whole = folder_digest(tmp_path / "whole")
    chunk = shards[0] / "partial" / "chunk-000002.npz"
    os.truncate(chunk, chunk.stat().st_size // 2)  # copied between machines, cut short

    line = one_line_error(run(capsys, "merge-shards", *shards, "--out", tmp_path / "merged"),
                          str(chunk), "damaged", "delete it")
    assert "BadZipFile" in line and not (tmp_path / "merged" / "manifest.json").exists()
    chunk.unlink()
    code, out, _ = features(capsys, data_dir, shards[0], "--shard", "0/2")
    assert code == 0 and "1 chunk file missing (e.g. chunk-000002.npz): encoding it again" in out
    assert run(capsys, "merge-shards", *shards, "--out", tmp_path / "merged")[0] == 0
    assert folder_digest(tmp_path / "merged") == whole


# --- merging never replaces what is there ------------------------------------------------------

def test_merge_shards_refuses_an_out_folder_holding_a_store_of_other_photos(tmp_path, capsys):
    data_dir = own_folder(tmp_path / "own")
    other = own_folder(tmp_path / "other", count=6)
    shards = [tmp_path / "shard0", tmp_path / "shard1"]
    for index, shard in enumerate(shards):
        assert features(capsys, data_dir, shard, "--shard", f"{index}/2")[0] == 0
    mine = tmp_path / "mine"
    assert features(capsys, other, mine)[0] == 0  # the user's store of other photos
    before = folder_digest(mine)
    one_line_error(run(capsys, "merge-shards", *shards, "--out", mine),
                   str(mine), "already holds a feature store of other photos", "merge into a new folder")
    assert folder_digest(mine) == before and len(FeatureStore.open(mine)) == 6

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    one_line_error(run(capsys, "merge-shards", *shards, "--out", notes), str(notes), "not empty")
    assert sorted(path.name for path in notes.iterdir()) == ["todo.txt"]  # not even a lock file left

    # The same store again (merged before, then touched by a features run): nothing else is at stake.
    assert run(capsys, "merge-shards", *shards, "--out", tmp_path / "merged")[0] == 0
    assert features(capsys, data_dir, tmp_path / "merged")[0] == 0
    assert run(capsys, "merge-shards", *shards, "--out", tmp_path / "merged")[0] == 0


# --- a captions file of your own: no row found its photo ----------------------------------------

def prepare(capsys, data_dir, out, dataset="csv"):
    return run(capsys, "prepare", "--dataset", dataset, "--data-dir", data_dir, "--out", out, "--min-count", 1)


def test_photos_named_with_the_wrong_letter_case_are_named_with_the_file_on_disk(tmp_path, capsys):
    data_dir = own_folder(tmp_path / "own", count=3)
    csv_file = data_dir / "captions.csv"
    csv_file.write_text(csv_file.read_text().replace("p0", "P0"), encoding="utf-8")
    line = one_line_error(prepare(capsys, data_dir, tmp_path / "prepared"), str(csv_file), "no usable row",
                          "'missing_image': 6", "line 2 names 'P00.bmp'", str(data_dir / "P00.bmp"),
                          "the file on disk is 'p00.bmp'", "letter case")
    assert len(line) < 600 and not (tmp_path / "prepared" / "report.json").exists()


def test_a_name_spelled_in_other_unicode_characters_is_named_as_such(tmp_path, capsys):
    data_dir = tmp_path / "own"
    nfd = unicodedata.normalize("NFD", "café.bmp")  # as macOS writes the name
    bmp(data_dir / nfd, 1)
    (data_dir / "captions.csv").write_text(f"image,caption\n{unicodedata.normalize('NFC', 'café.bmp')},a cup\n",
                                           encoding="utf-8")
    one_line_error(prepare(capsys, data_dir, tmp_path / "prepared"), "line 2 names 'café.bmp'",
                   "other Unicode characters (NFD vs NFC", "rename the file or retype the name")


def test_paths_missing_their_sub_folder_say_where_the_photo_is(tmp_path, capsys):
    data_dir = tmp_path / "own"
    bmp(data_dir / "photos" / "a.bmp", 1)
    (data_dir / "captions.csv").write_text("image,caption\na.bmp,a photo\n", encoding="utf-8")
    one_line_error(prepare(capsys, data_dir, tmp_path / "prepared"), "line 2 names 'a.bmp'",
                   f"there is one in {data_dir / 'photos'}", "e.g. photos/a.bmp")


# --- a captions file of your own: files from elsewhere are read as they are -------------------

def test_windows_backslash_paths_find_their_photos(tmp_path, capsys):
    data_dir = tmp_path / "own"
    for i in range(3):
        bmp(data_dir / "holiday" / f"p{i}.bmp", i)
    rows = "".join(f"holiday\\p{i}.bmp,a photo number {i},train\n" for i in range(3))
    rows += "..\\own\\holiday\\p0.bmp,out of the folder and back,train\n"  # still refused: ../ by any name
    (data_dir / "captions.csv").write_text("image,caption,split\n" + rows, encoding="utf-8")
    code, out, err = prepare(capsys, data_dir, tmp_path / "prepared")
    assert code == 0 and "left out, unsafe path: 1 row(s), lines 5\n" in out and out.count("left out") == 1, err
    captions = pd.read_csv(tmp_path / "prepared" / "captions.csv", dtype=str)
    assert sorted(captions["image_id"]) == ["holiday/p0.bmp", "holiday/p1.bmp", "holiday/p2.bmp"]


def test_a_utf16_captions_file_is_read(tmp_path, capsys):
    data_dir = own_folder(tmp_path / "own", count=3)
    csv_file = data_dir / "captions.csv"
    text = csv_file.read_text(encoding="utf-8").replace("a photo number 0", "a café photo")
    csv_file.write_bytes(text.replace("\n", "\r\n").encode("utf-16"))  # Excel's "Unicode text": BOM, CRLF
    code, out, err = prepare(capsys, data_dir, tmp_path / "prepared")
    assert code == 0 and "left out" not in out, err
    captions = pd.read_csv(tmp_path / "prepared" / "captions.csv", dtype=str)
    assert len(captions) == 6 and "a café photo" in set(captions["caption"])


def kaggle_flickr8k(folder, count=3):
    """Kaggle's copy of Flickr8k: captions.txt (image,caption) at the top, the photos in Images/."""
    lines = ["image,caption"]
    for i in range(count):
        name = f"10{i}_abc.jpg"
        photo(folder / "Images" / name, i)
        lines += [f"{name},a dog runs number {i} .", f"{name},a dog plays number {i} ."]
    (folder / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_kaggle_flickr8k_works_as_a_folder_of_your_own_and_is_named_as_flickr8k(tmp_path, capsys):
    data_dir = kaggle_flickr8k(tmp_path / "flickr8k")
    one_line_error(prepare(capsys, data_dir, tmp_path / "wrong", dataset="flickr8k"), str(data_dir),
                   "Kaggle's Flickr8k", "use --dataset csv")
    assert not (tmp_path / "wrong" / "report.json").exists()
    code, out, err = prepare(capsys, data_dir, tmp_path / "prepared")
    assert code == 0 and "left out" not in out, err
    captions = pd.read_csv(tmp_path / "prepared" / "captions.csv", dtype=str)
    assert sorted(captions["image_id"].unique()) == ["100_abc.jpg", "101_abc.jpg", "102_abc.jpg"]
    assert set(captions["image_path"]) == {str((data_dir / "Images" / f"10{i}_abc.jpg").resolve()) for i in range(3)}


# --- a captions file of your own: one photo, one id --------------------------------------------

def test_x_jpg_and_x_png_in_one_folder_are_two_photos_with_two_features(tmp_path, capsys):
    data_dir = tmp_path / "own"
    photo(data_dir / "x.jpg", 1)
    photo(data_dir / "x.png", 2)
    (data_dir / "captions.csv").write_text("image,caption,split\nx.jpg,a red photo,train\nx.png,a blue photo,train\n",
                                           encoding="utf-8")
    assert prepare(capsys, data_dir, tmp_path / "prepared")[0] == 0
    captions = pd.read_csv(tmp_path / "prepared" / "captions.csv", dtype=str)
    assert dict(zip(captions["image_id"], captions["caption"])) == {"x.jpg": "a red photo", "x.png": "a blue photo"}
    code, out, _ = features(capsys, data_dir, tmp_path / "cache")
    assert code == 0 and "(2 encoded now" in out
    assert sorted(FeatureStore.open(tmp_path / "cache").ids) == ["x.jpg", "x.png"]
    sources = json.loads((tmp_path / "cache" / "sources.json").read_text())
    assert {image_id: record["sha256"] for image_id, record in sources.items()} == {
        "x.jpg": sha256_of(data_dir / "x.jpg"), "x.png": sha256_of(data_dir / "x.png")}
