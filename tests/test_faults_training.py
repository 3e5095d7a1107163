"""Faults of the `train` command that test_faults.py does not cover: two runs into one folder,
a full disk while checkpoints are written, a resumed run's state, what the user made.

Same answers as there: one `error:` line naming the folder or file and what to do, exit 1, no
traceback, and nothing trained or made by the user is lost. Same tiny generated Flickr8k folder
and MobileNetV2 with fixed random weights, so nothing from outside is needed.
"""

import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest

from captioning.fileio import BACKUP_MARKER, lock_path
from captioning.training import PRESETS
from conftest import REPO, run_cli
from test_faults import folder_digest, one_line_error, tiny_flickr8k, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The generated dataset and a work folder whose prepared data and features later runs reuse."""
    root = tmp_path_factory.mktemp("faults-training")
    return tiny_flickr8k(root / "flickr8k"), root / "work"


# --- one run per output folder -------------------------------------------------------------------

def test_a_second_train_into_a_folder_in_use_is_refused_before_any_work(tiny_data, tmp_path):
    # Two `train --out same` used to both train into same.partial and both say "written", the
    # bundle left with epochs_run: 0. The second one now stops at once, naming the holder.
    data_dir, work = tiny_data
    out = tmp_path / "bundle"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom captioning.fileio import folder_lock\n"
                               f"with folder_lock({str(out)!r}):\n    print('held', flush=True)\n    sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_line_error(train(data_dir, out, work, check=False), str(out), f"process {holder.pid}", "in use")
        assert "wait" in line
        assert not out.exists() and not out.with_name("bundle.partial").exists()
        assert json.loads(lock_path(out).read_text())["pid"] == holder.pid  # the holder's lock is left alone
    finally:
        holder.communicate("", timeout=60)
    assert not lock_path(out).exists()  # released when the holder is done
    assert "bundle:" in train(data_dir, out, work).stdout
    assert (out / "bundle.json").is_file() and not lock_path(out).exists()


def test_a_lock_left_by_a_process_that_died_is_taken_over_with_a_note(tiny_data, tmp_path):
    data_dir, work = tiny_data
    out = tmp_path / "bundle"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a `train` killed with -9 leaves its lock behind
    lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    result = train(data_dir, out, work)
    assert f"took over the lock of {out} left by process {dead.pid}" in result.stderr
    assert (out / "bundle.json").is_file() and not lock_path(out).exists()


# --- a full disk while training ------------------------------------------------------------------

def run_with_full_disk(arguments, file_name):
    """`python -m captioning ...` (captioning.cli.main) in which every HDF5 dataset written into a
    file named like `file_name` fails with ENOSPC once a complete `file_name` exists: the disk
    fills up while the second epoch's backup is written over the first's. At exit it prints how
    many HDF5 files the process still holds open."""
    code = ("import errno, os, sys\n"
            "import h5py\n"
            "create = h5py.Group.create_dataset\n"
            "def full(self, *args, **kwargs):\n"
            "    path = self.file.filename\n"
            f"    if {file_name!r} in os.path.basename(path) and os.path.exists(os.path.join(os.path.dirname(path), "
            f"{file_name!r})):\n"
            "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "    return create(self, *args, **kwargs)\n"
            "h5py.Group.create_dataset = full\n"
            "from captioning.cli import main\n"
            "status = main(sys.argv[1:])\n"
            "print('open HDF5 files:', len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)), file=sys.stderr)\n"
            "sys.exit(status)\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, arguments)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_a_full_disk_while_the_backup_is_written_ends_cleanly_and_keeps_the_last_epoch(tiny_data, tmp_path):
    # Keras wrote the backup over the last one in place: the disk filling up at epoch 2 printed
    # our message, then h5py's tracebacks at exit (a segfault on a real full disk), and left half
    # a file where epoch 1's backup had been.
    data_dir, work = tiny_data
    out = tmp_path / "bundle"
    arguments = ["train", "--dataset", "flickr8k", "--data-dir", data_dir, "--encoder", "mobilenet_v2",
                 "--weights", "none", "--out", out, "--cache-dir", work, "--epochs", 3, "--self-critical-epochs", 0]
    result = run_with_full_disk(arguments, "latest.weights.h5")
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_line_error(result, "no space left", "latest.weights.h5", "run the same command again")
    assert "HDF5" not in result.stderr.replace("open HDF5 files: 0", "") and "Exception ignored" not in result.stderr
    assert "open HDF5 files: 0" in result.stderr, line
    training = out.with_name("bundle.partial") / "training"
    assert not [path.name for path in training.rglob(".*")]  # no temporary file left behind
    backed_up = json.loads((training / "backup" / "training_metadata.json").read_text())
    assert backed_up["epoch"] == 1 and backed_up["seconds"] > 0
    assert not lock_path(out).exists()
    # With room again, the same command resumes after epoch 1 from the intact backup: the
    # optimizer goes on from its state (its step count continues: Adam's moments were reset
    # before), and the training time adds the earlier run's instead of counting from zero.
    again = train(data_dir, out, work, "--epochs", 3)
    assert "Epoch 1/3" not in again.stdout and "Epoch 3/3" in again.stdout and "cannot be restored" not in again.stderr
    metrics = json.loads((out / "bundle.json").read_text())["metrics"]
    captions = int(re.search(r"training on (\d+) captions", again.stdout).group(1))
    assert metrics["epochs_run"] == 3
    assert metrics["steps"] == 3 * math.ceil(captions / PRESETS["cpu-small"]["batch_size"])
    assert metrics["training_seconds"] >= round(backed_up["seconds"], 1)


# --- what `train` reports about its data ---------------------------------------------------------

def test_train_reports_the_rows_a_captions_file_that_is_not_utf8_lost_as_prepare_does(tiny_data, tmp_path):
    # `prepare` listed the rows it left out of a captions file of your own; `train`, which
    # prepares too, said nothing, so a user who only ran `train` never learnt rows were dropped.
    data_dir, _ = tiny_data
    own = tmp_path / "own"
    own.mkdir()
    lines, splits = ["image,caption,split"], {}
    for name in (data_dir / "Flickr_8k.trainImages.txt").read_text().split():
        splits[name] = "train"
    for name in (data_dir / "Flickr_8k.devImages.txt").read_text().split():
        splits[name] = "val"
    for name in splits:
        (own / name).symlink_to(data_dir / "images" / name)
    for line in (data_dir / "Flickr8k.token.txt").read_text().splitlines():
        key, caption = line.split("\t")
        name = key.split("#")[0]
        lines.append(f"{name},{caption},{splits[name]}")
    first_bad = len(lines) + 1
    (own / "captions.csv").write_bytes(("\n".join(lines) + "\n").encode()
                                       + b"1000_tiny.jpg,a caf\xe9 in latin-1,train\n"
                                       + b"1001_tiny.jpg,na\xefve bytes,train\n")
    expected = f"left out, not utf8: 2 row(s), lines {first_bad}, {first_bad + 1}"
    prepared = run_cli("prepare", "--dataset", "csv", "--data-dir", own, "--out", tmp_path / "prepared")
    assert expected in prepared.stdout
    trained = run_cli("train", "--dataset", "csv", "--data-dir", own, "--encoder", "mobilenet_v2", "--weights", "none",
                      "--out", tmp_path / "bundle", "--cache-dir", tmp_path / "work", "--epochs", 1,
                      "--self-critical-epochs", 0)
    assert f"note: {own}: {expected}" in trained.stderr and (tmp_path / "bundle" / "bundle.json").is_file()


def test_a_rerun_after_teacher_forcing_finished_keeps_its_training_time(tiny_data, tmp_path):
    # The disk fills up when the bundle is written, after teacher forcing: the rerun takes the
    # finished weights and used to report the seconds it took to load them (0.0) as training time.
    data_dir, work = tiny_data
    out = tmp_path / "bundle"
    code = ("import errno, sys\n"
            "import captioning.bundle\n"
            "def full(out_dir, *args, **kwargs):\n"
            "    raise OSError(errno.ENOSPC, 'No space left on device', str(out_dir / 'model.keras'))\n"
            "captioning.bundle.save_bundle = full\n"
            "from captioning.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    arguments = ["train", "--dataset", "flickr8k", "--data-dir", data_dir, "--encoder", "mobilenet_v2",
                 "--weights", "none", "--out", out, "--cache-dir", work, "--epochs", 2, "--self-critical-epochs", 0]
    failed = subprocess.run([sys.executable, "-c", code, *map(str, arguments)], capture_output=True, text=True,
                            timeout=600, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    one_line_error(failed, "no space left", "model.keras")
    record = json.loads((out.with_name("bundle.partial") / "training" / "teacher_forced.json").read_text())
    assert record["seconds"] > 0
    again = train(data_dir, out, work)
    assert "teacher forcing finished in an earlier run" in again.stdout
    metrics = json.loads((out / "bundle.json").read_text())["metrics"]
    assert metrics["training_seconds"] >= round(record["seconds"], 1) and metrics["steps"] == record["steps"]


# --- what the user made is never renamed or deleted ----------------------------------------------

def test_train_never_renames_back_a_bundle_the_user_moved_away(tiny_data, tmp_path):
    # `train --overwrite --out keep` was cut after the new bundle moved in, before the old one set
    # aside was deleted; the user then renamed keep to keep.old. The next `train --out keep` put
    # the stale old bundle back under keep (and refused to train into it): it is deleted instead.
    data_dir, work = tiny_data
    mine = tmp_path / "keep.old"
    mine.mkdir()
    (mine / "bundle.json").write_text('{"arch": "merge"}')
    (mine / "notes.txt").write_text("my renamed bundle")
    before = folder_digest(mine)
    stale = tmp_path / ".keep.captioning-replaced"
    stale.mkdir()
    (stale / "bundle.json").write_text('{"arch": "merge", "stale": true}')
    (stale / BACKUP_MARKER).write_text("set aside while a new version replaced this folder\n")
    result = train(data_dir, tmp_path / "keep", work)
    assert "bundle:" in result.stdout
    assert "stale" not in (tmp_path / "keep" / "bundle.json").read_text()  # a new bundle, not the old one back
    assert folder_digest(mine) == before and not stale.exists()


def test_an_out_folder_holding_what_is_not_a_bundle_is_refused_untouched(tiny_data, tmp_path):
    data_dir, work = tiny_data
    photos = tmp_path / "photos"  # a folder of the user's, given as --out by mistake
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"\xff\xd8 not really a photo")
    project = tmp_path / "project"  # a bundle.json among the user's own files
    project.mkdir()
    (project / "bundle.json").write_text('{"arch": "merge"}')
    (project / "report.docx").write_bytes(b"the user's report")
    before = {folder: folder_digest(folder) for folder in (photos, project)}
    for extra in ((), ("--overwrite",)):
        one_line_error(train(data_dir, photos, work, *extra, check=False), str(photos), "holds no bundle")
    line = one_line_error(train(data_dir, project, work, "--overwrite", check=False), str(project), "report.docx")
    assert "not part of a bundle" in line
    assert {folder: folder_digest(folder) for folder in (photos, project)} == before
    assert not [path for path in tmp_path.iterdir() if path.name.endswith((".partial", "-lock"))]
