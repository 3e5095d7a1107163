"""Shared fixtures.

Tests that need the real sample data (COCO, Flickr8k, ImageNet MobileNetV2
weights) find it through environment variables that `.ci/run` sets; without
them they skip and say which variable to set. Everything else runs on small
data that the tests make themselves.
"""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

# The notebooks' defaults are what a learner should run (the preset's 30 epochs and 10 of
# fine-tuning: the README's time table, from benchmarks/course.py, says how long). The suite
# runs the same commands with the budgets capped through the documented PARAMS setting, so
# that CI stays within minutes.
CI_EPOCHS = 2  # also the epochs of flickr8k_bundle, which notebook 03's bundle is compared with
CI_PARAMS = f"epochs={CI_EPOCHS} experiment_epochs={CI_EPOCHS}"  # the same: notebook 05 takes 03's merge model


def _shared_path(variable, what):
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{what} not available: set {variable} (as .ci/run does) to run this test")
    path = Path(value)
    if not path.exists():
        pytest.skip(f"{what} not found at {path} ({variable})")
    return path


@pytest.fixture(scope="session")
def coco_val_dir():
    """../shared/data/coco-val2017-sample: full captions_val2017.json + 159 images."""
    return _shared_path("CAPTIONING_COCO_VAL_DIR", "COCO val2017 sample")


@pytest.fixture(scope="session")
def coco_train_dir():
    """../shared/data/coco-train2017-sample: 80 train2017 images + their captions."""
    return _shared_path("CAPTIONING_COCO_TRAIN_DIR", "COCO train2017 sample")


@pytest.fixture(scope="session")
def flickr8k_dir():
    """../shared/data/flickr8k-sample: 875 images, official captions and splits."""
    return _shared_path("CAPTIONING_FLICKR8K_DIR", "Flickr8k sample")


def small_flickr8k(source, target, train=100, dev=30):
    """A Flickr8k folder of the official layout (text/ + images/) holding the first `train`
    training and `dev` dev photos of the shared sample that are on disk, with their official
    captions: the product's own loader reads it, and the whole pipeline runs in a minute."""
    text, images = Path(target) / "text", Path(target) / "images"
    text.mkdir(parents=True)
    images.mkdir()
    on_disk = {path.name for path in (source / "images").glob("*.jpg")}
    chosen = {}
    for split, count in (("train", train), ("dev", dev)):
        names = (source / "text" / f"Flickr_8k.{split}Images.txt").read_text().split()
        chosen[split] = [name for name in names if name in on_disk][:count]
        (text / f"Flickr_8k.{split}Images.txt").write_text("\n".join(chosen[split]) + "\n")
        for name in chosen[split]:
            (images / name).symlink_to(source / "images" / name)
    keep = {name for names in chosen.values() for name in names}
    lines = (source / "text" / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
    (text / "Flickr8k.token.txt").write_text(
        "\n".join(line for line in lines if line.split("#")[0] in keep) + "\n", encoding="utf-8")
    return Path(target)


@pytest.fixture(scope="session")
def flickr8k_small_dir(flickr8k_dir, tmp_path_factory):
    """100 training and 30 dev photos of the shared Flickr8k sample, in the official layout."""
    return small_flickr8k(flickr8k_dir, tmp_path_factory.mktemp("flickr8k-small") / "flickr8k")


@pytest.fixture(scope="session")
def mobilenet_weights():
    """Real ImageNet MobileNetV2 backbone weights (.weights.h5)."""
    return _shared_path("CAPTIONING_MOBILENET_WEIGHTS", "MobileNetV2 ImageNet weights")


def run_cli(*arguments, check=True, timeout=1800):
    """Run `python -m captioning ...` in a subprocess, as a user would; return the CompletedProcess."""
    import subprocess
    environment = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-m", "captioning", *map(str, arguments)],
        capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"`python -m captioning {' '.join(map(str, arguments))}` exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 serving server.files, with faults on request (http_fixtures.py)."""
    from http_fixtures import serving
    with serving() as instance:
        yield instance


@pytest.fixture(scope="session")
def flickr8k_work_dir(tmp_path_factory):
    """One work folder (prepared data + feature cache) shared by the CLI tests of a session."""
    return tmp_path_factory.mktemp("flickr8k-work")


@pytest.fixture(scope="session")
def flickr8k_bundle(flickr8k_small_dir, mobilenet_weights, flickr8k_work_dir):
    """A merge captioner trained by the suite, through the `train` CLI, on 130 photos of the
    shared Flickr8k sample with the shared MobileNetV2 weights. Few epochs: it must be real, not good."""
    bundle = flickr8k_work_dir / "bundles" / "merge"
    run_cli(
        "train", "--dataset", "flickr8k", "--data-dir", flickr8k_small_dir,
        "--encoder", "mobilenet_v2", "--weights", mobilenet_weights,
        "--arch", "merge", "--epochs", CI_EPOCHS, "--cache-dir", flickr8k_work_dir, "--out", bundle,
    )
    return bundle


def readme_blocks(language="bash"):
    """The README's ```bash blocks, each a list of commands (continuation lines joined)."""
    import re
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = []
    for body in re.findall(rf"```{language}\n(.*?)```", text, flags=re.S):
        blocks.append([line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()])
    return blocks


def shell(command, cwd, environment=None, timeout=1500):
    """Run one README line with bash, as a user types it; the venv's python comes first on PATH."""
    import subprocess
    path = f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(REPO), **(environment or {})}
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def offline_demo(flickr8k_small_dir, mobilenet_weights, tmp_path_factory):
    """The README's offline `make demo` block, run once per session on 130 photos of the
    Flickr8k sample: tests/test_readme.py checks the executed notebooks, tests/test_solutions.py
    runs the exercises' solutions on the work folder it leaves. Returns the command as run (the
    README line with the data locations filled in), its result, the work and runs folders."""
    import re
    from types import SimpleNamespace

    [command] = [block[0] for block in readme_blocks() if block[0].startswith("make demo DATASET=flickr8k")]
    command = command.replace("/data/flickr8k", str(flickr8k_small_dir))
    command = re.sub(r"WEIGHTS=/weights/\S+", f"WEIGHTS={mobilenet_weights}", command)
    root = tmp_path_factory.mktemp("offline-demo")
    work_dir, runs = root / "work", root / "runs"
    result = shell(command, REPO, {"WORK_DIR": str(work_dir), "RUNS": str(runs), "PARAMS": CI_PARAMS}, timeout=3600)
    return SimpleNamespace(command=command, result=result, work_dir=work_dir, runs=runs)


# --- running the suite on two workers (pytest-xdist, `make test`) -------------------------------
# Tests that share an expensive session fixture must run in one worker, or each worker would build
# it again; the rest go by file, so that module fixtures are built once. The longest units go first,
# so that neither worker is left with one of them at the end while the other idles.
# (item.fixturenames holds every fixture a test needs, those of its fixtures included: the trained
# flickr8k_bundle is built in flickr8k_work_dir, so its tests land in that group.)
SHARED_FIXTURE_GROUPS = {"offline_demo": "offline-demo", "flickr8k_work_dir": "flickr8k-work"}
LONGEST_FIRST = ["offline-demo", "coco-demo", "test_readme.py", "flickr8k-work", "test_multi_worker.py",
                 "test_faults.py", "test_attention.py"]


def test_group(item):
    """The xdist group of a test: its shared fixture's, its own for the default demo, else its file's."""
    for fixture, group in SHARED_FIXTURE_GROUPS.items():
        if fixture in item.fixturenames:
            return group
    if item.name.startswith("test_make_demo_with_its_defaults"):
        return "coco-demo"
    return item.path.name


test_group.__test__ = False  # a helper, not a test


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(test_group(item)))
    rank = {group: position for position, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(test_group(item), len(rank)))  # stable: file order otherwise
