"""Faults of the `train` command that test_faults.py does not cover: two runs into one folder,
a full disk while checkpoints are written, a resumed run's state, what the user made.

Same answers as there: one `error:` line naming the folder or file and what to do, exit 1, no
traceback, and nothing trained or made by the user is lost. Same tiny generated Flickr8k folder
and MobileNetV2 with fixed random weights, so nothing from outside is needed.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from captioning.fileio import lock_path
from conftest import REPO
from test_faults import one_line_error, tiny_flickr8k, train

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
