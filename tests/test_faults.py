"""Faults fed to the commands as a hostile or unlucky user would: each class has one answer.

Every fault is one line on stderr naming the file, option or field and what to do (exit 1,
or 2 for a bad option), no traceback; Ctrl-C says what was kept (exit 130); nothing trained
is replaced until its replacement is complete; caches notice what changed. The data is a
small Flickr8k folder generated here (coloured photos, template captions) and the encoder is
MobileNetV2 with fixed random weights, so these tests need nothing from outside.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning import data
from captioning.fileio import sha256_of
from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
THINGS = ["dog", "ball", "car", "boat"]


def tiny_flickr8k(folder, count=24):
    """A Flickr8k folder of the official layout: `count` photos, 5 template captions each."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    lines, names = [], []
    for i in range(count):
        colour, thing = list(COLOURS)[i % 4], THINGS[(i // 4) % 4]
        name = f"{1000 + i}_tiny.jpg"
        pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 20, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / name)
        names.append(name)
        lines += [f"{name}#{j}\ta {colour} {thing} is in the picture {'today' if j % 2 else ''}".strip()
                  for j in range(5)]
    (folder / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (folder / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:18]) + "\n")
    (folder / "Flickr_8k.devImages.txt").write_text("\n".join(names[18:]) + "\n")
    return folder


def train(data_dir, out, work, *more, check=True):
    return run_cli("train", "--dataset", "flickr8k", "--data-dir", data_dir, "--encoder", "mobilenet_v2",
                   "--weights", "none", "--out", out, "--cache-dir", work, "--epochs", 2,
                   "--self-critical-epochs", 0, *more, check=check)


def one_line_error(result, *words):
    """The fault answer: exit 1, one `error:` line naming what it should, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def folder_digest(folder):
    return {str(path.relative_to(folder)): sha256_of(path) for path in sorted(Path(folder).rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The generated dataset, a work folder, and a bundle trained on it through the CLI."""
    root = tmp_path_factory.mktemp("faults")
    data_dir, work = tiny_flickr8k(root / "flickr8k"), root / "work"
    train(data_dir, root / "bundle", work)
    return data_dir, work, root / "bundle"


# --- nothing valid is destroyed ------------------------------------------------------------------

def test_a_trained_bundle_is_never_overwritten_by_accident(tiny):
    data_dir, work, bundle = tiny
    before = folder_digest(bundle)
    # --epochs 0 used to train nothing and overwrite the bundle with an untrained model.
    refused = train(data_dir, bundle, work, "--epochs", 0, check=False)
    assert refused.returncode == 2 and "--epochs" in refused.stderr and "Traceback" not in refused.stderr
    one_line_error(train(data_dir, bundle, work, check=False), str(bundle), "--overwrite")
    assert folder_digest(bundle) == before


def test_overwrite_replaces_the_bundle_only_when_the_new_one_is_complete(tiny, tmp_path):
    data_dir, work, bundle = tiny
    copy = tmp_path / "bundle"
    subprocess.run(["cp", "-a", str(bundle), str(copy)], check=True)
    before = folder_digest(copy)
    # The disk fills up while the new model is written (here: a 1 MB limit on any file this
    # process writes, which model files exceed): the old bundle stays, whole.
    limited = run_limited(["train", "--dataset", "flickr8k", "--data-dir", data_dir, "--encoder", "mobilenet_v2",
                           "--weights", "none", "--out", copy, "--cache-dir", work, "--epochs", 2,
                           "--self-critical-epochs", 0, "--overwrite"], file_size=1 << 20)
    line = one_line_error(limited, "no space left")
    assert "run the same command again" in line
    assert folder_digest(copy) == before
    assert not [path for path in copy.parent.rglob("*") if path.name.endswith(".tmp")]
    # With room, the same command replaces it.
    ok = train(data_dir, copy, work, "--overwrite")
    assert "bundle:" in ok.stdout and folder_digest(copy) != before
    assert not copy.with_name("bundle.partial").exists() and not copy.with_name(".bundle.captioning-replaced").exists()


def test_a_folder_of_the_users_named_like_a_backup_is_never_touched(tiny, tmp_path):
    # `train --overwrite --out m` used to delete the user's own m.old, and a later `train --out keep`
    # renamed the user's keep.old back to keep. The backup is now a hidden folder marked as ours.
    data_dir, work, bundle = tiny
    copy = tmp_path / "m"
    subprocess.run(["cp", "-a", str(bundle), str(copy)], check=True)
    mine = tmp_path / "m.old"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own folder")
    train(data_dir, copy, work, "--overwrite")
    assert (mine / "notes.txt").read_text() == "my own folder"
    keep_old = tmp_path / "keep.old"
    subprocess.run(["cp", "-a", str(bundle), str(keep_old)], check=True)
    train(data_dir, tmp_path / "keep", work)
    assert keep_old.is_dir() and (keep_old / "bundle.json").is_file()
    # A hidden folder of that name that is not ours is refused, not deleted.
    stranger = tmp_path / ".m.captioning-replaced"
    stranger.mkdir()
    (stranger / "x").write_text("not yours")
    one_line_error(train(data_dir, copy, work, "--overwrite", check=False), str(stranger), "in the way")
    assert (stranger / "x").read_text() == "not yours"


def test_a_rerun_with_the_same_settings_reuses_the_bundle_and_a_changed_one_retrains(tiny, tmp_path):
    # What notebooks 05 and 06 do when a cell runs again: reuse=True.
    from captioning.pipeline import train_pipeline
    data_dir, work, bundle = tiny
    copy = tmp_path / "bundle"
    subprocess.run(["cp", "-a", str(bundle), str(copy)], check=True)
    before, said = folder_digest(copy), []
    options = dict(encoder="mobilenet_v2", weights="none", arch="merge", out_dir=copy, cache_dir=work, epochs=2,
                   self_critical_epochs=0, reuse=True, log=said.append)
    # The `train` command made it with these very settings: nothing is trained again.
    assert train_pipeline("flickr8k", data_dir, **options) == copy
    assert folder_digest(copy) == before and any(line.startswith(f"reusing {copy}") for line in said)
    assert not copy.with_name("bundle.partial").exists()
    # Another seed is another model: refused without overwrite, trained with it.
    with pytest.raises(ValueError, match="other settings or data.*--overwrite"):
        train_pipeline("flickr8k", data_dir, seed=1, **options)
    assert folder_digest(copy) == before and not copy.with_name("bundle.partial").exists()
    train_pipeline("flickr8k", data_dir, seed=1, overwrite=True, **options)
    record = json.loads((copy / "bundle.json").read_text())
    assert record["seed"] == record["run"]["seed"] == 1 and folder_digest(copy) != before
    # Other photos under the same names and captions are other data: not reused either.
    photos, work_copy = tmp_path / "flickr8k", tmp_path / "work"
    subprocess.run(["cp", "-a", str(data_dir), str(photos)], check=True)
    subprocess.run(["cp", "-a", str(work), str(work_copy)], check=True)
    first = sorted((photos / "images").iterdir())[0]
    Image.fromarray(255 - np.asarray(Image.open(first))).save(first)
    with pytest.raises(ValueError, match="other settings or data"):
        train_pipeline("flickr8k", photos, seed=1, **{**options, "cache_dir": work_copy})


def test_the_vocabulary_settings_of_notebook_01_flow_to_the_training_of_later_notebooks(tiny, tmp_path):
    # Notebook 01 prepares with its own min_count / max_length; 03, 05 and 06 pass
    # prepared_settings(...) on, so training uses that prepared data instead of preparing over it.
    from captioning.fileio import work_paths
    from captioning.pipeline import prepared_settings, train_pipeline
    data_dir, _, _ = tiny
    work = tmp_path / "work"
    assert prepared_settings(work, "flickr8k") == {}
    data.prepare("flickr8k", data_dir, work_paths(work, "flickr8k")["prepared"], min_count=1, max_length=6)
    assert prepared_settings(work, "flickr8k") == {"min_count": 1, "max_length": 6}
    said = []
    bundle = train_pipeline("flickr8k", data_dir, encoder="mobilenet_v2", weights="none", arch="merge",
                            out_dir=tmp_path / "bundle", cache_dir=work, epochs=1, self_critical_epochs=0,
                            log=said.append, **prepared_settings(work, "flickr8k"))
    assert any(line.startswith("reusing prepared data") for line in said), said
    record = json.loads((bundle / "bundle.json").read_text())
    assert record["max_length"] == 6 and record["training"]["min_count"] == 1


def run_limited(arguments, file_size):
    """`python -m captioning ...` with every file it writes limited to `file_size` bytes: a
    full disk, as far as the program can tell (writes fail with EFBIG)."""
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size}, {file_size}))\n"
            "from captioning.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, arguments)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_bundle_files_share_one_permission(tiny):
    modes = {path.name: path.stat().st_mode & 0o777 for path in tiny[2].iterdir() if path.is_file()}
    assert set(modes) == {"model.keras", "vocabulary.json", "bundle.json"}
    assert len(set(modes.values())) == 1, modes  # model.keras used to be 0600, the rest 0644


# --- output folders are checked before the work --------------------------------------------------

def test_outputs_that_cannot_be_written_are_refused_before_any_work(tiny, tmp_path):
    data_dir, work, bundle = tiny
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    one_line_error(run_cli("prepare", "--dataset", "flickr8k", "--data-dir", data_dir, "--out", a_file, check=False),
                   str(a_file))
    one_line_error(run_cli("features", "--dataset", "flickr8k", "--data-dir", data_dir, "--encoder", "mobilenet_v2",
                           "--weights", "none", "--out", a_file / "cache", check=False), str(a_file))
    one_line_error(train(data_dir, a_file, work, check=False), str(a_file))
    started = time.perf_counter()
    line = one_line_error(run_cli("evaluate", "--model", bundle, "--dataset", "flickr8k", "--data-dir", data_dir,
                                  "--split", "dev", "--cache-dir", work, "--out", a_file, check=False), str(a_file))
    assert "folder" in line and time.perf_counter() - started < 60
    assert not (bundle / "eval-dev").exists()


# --- interruptions -------------------------------------------------------------------------------

def test_ctrl_c_says_what_was_kept_and_the_rerun_resumes(tiny, tmp_path):
    data_dir, work, _ = tiny
    out = tmp_path / "bundle"
    command = [sys.executable, "-m", "captioning", "train", "--dataset", "flickr8k", "--data-dir", str(data_dir),
               "--encoder", "mobilenet_v2", "--weights", "none", "--out", str(out), "--cache-dir", str(work),
               "--epochs", "6", "--self-critical-epochs", "0"]
    # A shell that starts the suite in the background makes it ignore SIGINT, and children inherit
    # that; the child gets the terminal's default back, as a command typed at a prompt has it.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in process.stdout:  # Keras logs each epoch as "Epoch N/6"; three more give the signal time to land
        seen.append(line)
        if line.startswith("Epoch 3/6"):
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted: kept" in stderr and "run the same command again" in stderr
    assert not (out / "bundle.json").exists() and (out.with_name("bundle.partial") / "training" / "backup").is_dir()

    again = run_cli(*command[3:])
    assert "Epoch 1/6" not in again.stdout and "Epoch 6/6" in again.stdout  # resumed after epoch 2
    settings = json.loads((out / "bundle.json").read_text())
    history = (out / "training" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 6  # one log of all six epochs, across the interruption
    losses = [float(row.split(",")[history[0].split(",").index("val_loss")]) for row in history[1:]]
    assert settings["metrics"]["epochs_run"] == 6
    assert settings["metrics"]["best_epoch"] == int(np.argmin(losses)) + 1


def test_a_damaged_training_backup_does_not_block_the_rerun(tiny, tmp_path):
    data_dir, work, _ = tiny
    out = tmp_path / "bundle"
    backup = out.with_name("bundle.partial") / "training" / "backup"
    backup.mkdir(parents=True)
    (backup / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # a write cut short
    (backup / "training_metadata.json").write_text('{"epoch": 1}')
    result = train(data_dir, out, work)
    assert "cannot be restored" in result.stderr and "training from the first epoch" in result.stderr
    assert (out / "bundle.json").is_file()


# --- caches follow their inputs ------------------------------------------------------------------

def test_an_edited_annotation_file_is_prepared_again(tmp_path):
    data_dir = tiny_flickr8k(tmp_path / "flickr8k")
    work = tmp_path / "work"
    train(data_dir, tmp_path / "first", work)
    token_file = data_dir / "Flickr8k.token.txt"
    token_file.write_text(token_file.read_text().replace("a red dog", "a crimson dog"))
    result = train(data_dir, tmp_path / "second", work)
    assert "annotation files or the photos on disk changed" in result.stdout + result.stderr
    prepared = data.load_prepared(work / "prepared" / "flickr8k")
    assert prepared.captions["clean"].str.contains("crimson").any()


# --- inputs at the door --------------------------------------------------------------------------

@pytest.mark.parametrize("images, annotations, message", [
    ([{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], [],
     r"images\[1\].id 1 is listed twice \(also images\[0\]\)"),
    ([{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.jpg"}], [],
     r"images\[1\].file_name 'a.jpg' is listed twice"),
    ([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 7, "caption": "x"}],
     r"annotations\[0\].image_id 7 is not in 'images'"),
    ([{"id": [1], "file_name": "a.jpg"}], [], r"images\[0\].id must be an integer"),
    ([{"id": 1, "file_name": 5}], [], r"images\[0\].file_name must be text"),
    ([{"id": 1, "file_name": "a\x00.jpg"}], [], r"unsafe file name in .*images\[0\]\.file_name 'a\\x00\.jpg'"),
])
def test_annotation_integrity_names_the_entry_and_the_field(tmp_path, images, annotations, message):
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    with pytest.raises(ValueError, match=message):
        data.load_coco(path)
    if annotations:  # and from the command line, once
        one_line_error(run_cli("prepare", "--dataset", "coco", "--data-dir", tmp_path, "--out", tmp_path / "out",
                               check=False), "captions_val2017.json", "annotations[0].image_id 7")


def test_caption_output_stays_parseable_whatever_the_file_names(tiny, tmp_path):
    photo = next((tiny[0] / "images").iterdir())
    odd = [tmp_path / "tab\there.jpg", tmp_path / "new\nline.jpg", tmp_path / "back\\slash.jpg"]
    for path in odd:
        path.write_bytes(photo.read_bytes())
    missing = tmp_path / "gone\t.jpg"
    tsv = run_cli("caption", "--model", tiny[2], *odd, missing, check=False)
    lines = tsv.stdout.splitlines()
    assert tsv.returncode == 1 and len(lines) == 3 and all(line.count("\t") == 1 for line in lines)
    assert [line.split("\t")[0] for line in lines] == [
        str(tmp_path / "tab\\there.jpg"), str(tmp_path / "new\\nline.jpg"), str(tmp_path / "back\\\\slash.jpg")]
    jsonl = run_cli("caption", "--format", "jsonl", "--model", tiny[2], *odd, missing, check=False)
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert [row["path"] for row in rows] == [str(path) for path in odd + [missing]]
    assert all(row["caption"] for row in rows[:3]) and rows[3]["error"] == "missing file"
