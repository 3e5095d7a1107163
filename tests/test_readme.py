"""Every command block of the README, run as written: only data locations differ.

* `make demo` with its defaults (COCO, downloads on, a 1,800-image subset,
  InceptionV3, all six notebooks). The bytes come from a COCO mirror on
  127.0.0.1 instead of images.cocodataset.org: the official annotation zip's
  layout, holding the full official captions_val2017.json and the shared train
  sample's captions, every coco_url pointing at the mirror, and behind it the
  shared sample photos. The subset asks for 440 photos that the annotations
  list and the mirror has 94 of them, so most requests answer 404, as some
  would for a user whose network drops files: the run reports them and goes on.
  InceptionV3's ImageNet weights cannot be fetched here, so WEIGHTS=none (the
  same network with fixed random weights) comes from the environment; where
  things land (DATA_DIR, WORK_DIR, RUNS) too, and the training budgets are
  capped (PARAMS: one epoch per model). The command is `make demo`.
* The offline block, on 130 photos of the shared Flickr8k sample in the
  official layout, with the shared MobileNetV2 weights file.
* The command-line block, in a folder holding what it names: data/flickr8k,
  the weights file, photo1.jpg and photo2.jpg.

A README block that no test here runs fails the suite: add its runner.
"""

import io
import json
import re
import shlex
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from captioning import download
from conftest import CI_EPOCHS, CI_PARAMS, REPO, readme_blocks, shell
from http_fixtures import serving

pytestmark = pytest.mark.slow


def block_starting(prefix):
    [block] = [block for block in readme_blocks() if block[0].startswith(prefix)]
    return block


def ok(result):
    assert result.returncode == 0, f"{result.args}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    return result


def test_every_block_has_a_runner():
    runners = ("make demo   #", "make demo DATASET=flickr8k", "python -m captioning prepare")
    for block in readme_blocks():
        assert block[0].startswith(runners), f"README block {block[0]!r} is run by no test in tests/test_readme.py"
    assert [block[0] for block in readme_blocks("python")] == ["import tensorflow as tf"]  # run with the CLI block


# --- executed notebooks -------------------------------------------------------------------

def notebook_text(path):
    notebook = json.loads(Path(path).read_text(encoding="utf-8"))
    return "\n".join("".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
                     for cell in notebook["cells"] for output in cell.get("outputs", []))


def assert_taught(runs):
    """Six executed notebooks that teach: prose first, a plot, what to try, no traceback or TF noise."""
    executed = sorted(Path(runs).glob("*.ipynb"))
    assert [path.name[:2] for path in executed] == ["01", "02", "03", "04", "05", "06"]
    for path in executed:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        assert cells[0]["cell_type"] == "markdown", f"{path.name} starts by saying what it covers"
        assert "what to try" in "".join(cells[-1]["source"]).lower(), f"{path.name} ends with what to try"
        figures = [o for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert figures, f"{path.name} explains with at least one plot"
        text = notebook_text(path)
        assert "Traceback" not in text and "oneDNN custom operations" not in text, path.name
        # TensorFlow's C++ log lines ("E0000 00:00:1796593566.556060   17088 util.cc:131] oneDNN supports ...")
        # are noise to a learner, whatever their level: par-inject's training printed one in notebook 05.
        logged = re.findall(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+\.cc:\d+\].*$", text, flags=re.MULTILINE)
        assert not logged, f"{path.name}: {logged}"
    return executed


# --- `make demo` with its defaults, from a COCO mirror --------------------------------------

def _mirrored(annotation_file, base_url):
    """An official COCO caption file with every image's coco_url moved to the mirror."""
    data = json.loads(Path(annotation_file).read_text(encoding="utf-8"))
    for image in data["images"]:
        image["coco_url"] = image["coco_url"].replace(download.COCO_URL, base_url)
    return data


@pytest.fixture(scope="module")
def coco_mirror(coco_val_dir, coco_train_dir):
    with serving() as server:
        base = server.url("")
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
            for split, folder, name in (("val", coco_val_dir, "captions_val2017.json"),
                                        ("train", coco_train_dir, "captions_train2017_subset.json")):
                captions = _mirrored(Path(folder) / "annotations" / name, base)
                zipped.writestr(f"annotations/captions_{split}2017.json", json.dumps(captions))
                for photo in (Path(folder) / "images").glob("*.jpg"):
                    server.files[f"/{split}2017/{photo.name}"] = photo
        server.files["/" + download.ANNOTATIONS_PATH] = archive.getvalue()
        yield server


def _photos_served(server):
    return sum(count for path, count in server.served.items() if path.endswith(".jpg"))


def test_make_demo_with_its_defaults_downloads_trains_captions_and_resumes(coco_mirror, tmp_path):
    server = coco_mirror
    [demo, make_test] = block_starting("make demo   #")
    assert shlex.split(demo, comments=True) == ["make", "demo"]
    # `make test` is this suite: .ci/run runs it.
    assert shlex.split(make_test, comments=True) == ["make", "test"]
    assert "\nmake test\n" in (REPO / ".ci" / "run").read_text()

    data_dir, work_dir, runs = tmp_path / "coco", tmp_path / "work", tmp_path / "runs"
    # Random weights teach nothing, so one epoch per model checks this path as well as more would.
    environment = {"CAPTIONING_COCO_URL": server.url(""), "WEIGHTS": "none", "PARAMS": "epochs=1 experiment_epochs=1",
                   "DATA_DIR": str(data_dir), "WORK_DIR": str(work_dir), "RUNS": str(runs)}
    result = ok(shell(demo, REPO, environment, timeout=3600))
    executed = assert_taught(runs)
    assert re.search(r"wall time: 01 \d+ s, .*06 \d+ s; total \d+ s", result.stdout), result.stdout[-2000:]
    assert_05_took_03s_merge_model(executed[4], work_dir)
    sizes = download.subset_sizes(download.SUBSET_SIZE)  # SUBSET unset: the package's default subset, 80/20
    train, val = sizes["train"], sizes["val"]
    assert_estimate_said_first(result.stdout, f"on {train:,} training and {val:,} validation photos with inception_v3, "
                                              "plus the download")

    # What came down: each photo of the seeded subset that the mirror has, once; the rest 404.
    subset = {split: {image["file_name"] for image in download.choose_subset(
        data_dir / "annotations" / f"captions_{split}2017.json", size)}
        for split, size in sizes.items()}
    available = {split: {path.split("/")[-1] for path in server.files if path.startswith(f"/{split}2017/")}
                 for split in subset}
    on_disk = {split: {path.name for path in (data_dir / f"{split}2017").glob("*.jpg")} for split in subset}
    for split in subset:
        assert on_disk[split] == subset[split] & available[split]
    downloaded = sum(map(len, on_disk.values()))
    assert downloaded > 20 and _photos_served(server) == downloaded
    notebook_01 = notebook_text(executed[0])
    asked = sum(map(len, subset.values()))  # the train annotations list only 80 photos
    assert asked == 80 + val
    reported = [int(number) for number in re.findall(r"(\d+) downloaded, 0 already there", notebook_01)]
    failed = [int(number) for number in re.findall(r"(\d+) failed", notebook_01)]
    assert sum(reported) == downloaded and sum(failed) == asked - downloaded and "HTTP 404" in notebook_01
    # The annotations as loaded: the full official val2017 file plus the train sample's 80 images.
    assert "5,080 images and 25,414 captions in the annotations" in notebook_01

    # The bundle notebook 03 trained captions new photos from the command line.
    photos = sorted((data_dir / "val2017").glob("*.jpg"))[:2]
    captioned = ok(shell(f"python -m captioning caption --model {work_dir / 'bundles' / 'coco-inception_v3-merge'} "
                         + " ".join(map(str, photos)), tmp_path))
    lines = captioned.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(photo) for photo in photos]
    assert all(line.split("\t")[1].strip() for line in lines)

    # Again: nothing is downloaded twice (only the missing photos are asked for again). Downloads
    # happen in notebook 01 alone, so this run stops after it.
    served_before = _photos_served(server)
    ok(shell(" ".join(shlex.split(demo, comments=True) + ["NOTEBOOKS=01"]), REPO, environment))
    assert _photos_served(server) == served_before
    assert sum(int(n) for n in re.findall(r"(\d+) downloaded", notebook_text(runs / executed[0].name))) == 0
    assert sum(len(list((data_dir / f"{split}2017").glob("*.jpg"))) for split in subset) == downloaded


def test_offline_make_demo_stops_at_once_and_says_what_to_use_instead(tmp_path):
    [demo, _] = block_starting("make demo   #")
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    environment = {"COCO_URL": f"http://127.0.0.1:{closed_port}", "DATA_DIR": str(tmp_path / "coco"),
                   "WORK_DIR": str(tmp_path / "work"), "RUNS": str(tmp_path / "runs")}
    started = time.perf_counter()
    result = shell(demo, REPO, environment, timeout=120)
    seconds = time.perf_counter() - started
    assert result.returncode != 0 and seconds < 60, f"exit {result.returncode} after {seconds:.0f} s"
    # make adds its own "make: *** ... Error" line ("make[1]: ***" when make test runs under make)
    errors = [line for line in result.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert len(errors) == 1 and errors[0].startswith("error: make demo cannot download what it needs"), result.stderr
    assert all(setting in errors[0] for setting in ("DATA_DIR=", "DOWNLOAD=0", "WEIGHTS="))
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "coco").exists()


# --- offline, on Flickr8k --------------------------------------------------------------------

def test_offline_block_runs_the_six_notebooks_on_flickr8k(offline_demo):
    # The block runs once per session (conftest.py); tests/test_solutions.py reuses its work folder.
    [command] = block_starting("make demo DATASET=flickr8k")
    assert offline_demo.command.split()[:3] == command.split()[:3]
    result = ok(offline_demo.result)
    executed = assert_taught(offline_demo.runs)
    assert "total" in result.stdout
    assert "Kernel is running over TCP" not in result.stdout + result.stderr  # local sockets: no network noise
    assert "650 captions of 130 images" in notebook_text(executed[1])
    assert_05_took_03s_merge_model(executed[4], offline_demo.work_dir)
    assert_06_compared_with_05s_merge_model(executed[5], offline_demo.work_dir)
    assert_estimate_said_first(result.stdout, "photos with mobilenet_v2;")


def assert_estimate_said_first(stdout, *words):
    """`make demo` says how long the run will take (scripts/estimate.py) before the first notebook runs."""
    [line] = [line for line in stdout.splitlines() if line.startswith("estimate: ")]
    assert re.match(r"estimate: about \d+ min for 01 02 03 04 05 06 on ", line), line
    assert line.endswith("PARAMS change epochs, experiment_epochs: this is the defaults' time"), line
    assert stdout.index(line) < stdout.index("01_data_preparation") and all(word in line for word in words), line


def test_notebook_03_run_again_unchanged_takes_its_teacher_forced_model_and_saves_the_same_bundle(offline_demo,
                                                                                                   tmp_path):
    # A learner re-running notebook 03 with the same settings waited for the same teacher forcing again.
    import shutil

    from captioning.bundle import Captioner

    ok(offline_demo.result)
    work, runs = tmp_path / "work", tmp_path / "runs"
    shutil.copytree(offline_demo.work_dir, work)  # the session's folder stays as the demo left it
    again = ok(shell(offline_demo.command, REPO, {"WORK_DIR": str(work), "RUNS": str(runs), "PARAMS": CI_PARAMS,
                                                  "NOTEBOOKS": "03"}, timeout=1800))
    [kept] = (work / "teacher-forced").glob("*-merge-*")
    text = notebook_text(runs / "03_training.ipynb")
    assert f"taking the teacher-forced model kept in {kept}" in text and "Epoch 1/" not in text, text[-2000:]
    bundles = [folder / "bundles" / "flickr8k-mobilenet_v2-merge" for folder in (offline_demo.work_dir, work)]
    first, second = (json.loads((bundle / "bundle.json").read_text()) for bundle in bundles)
    for settings in (first, second):
        settings.pop("model_sha256", None)  # a .keras file records when it was saved
        for epoch in settings["metrics"].get("self_critical", []):
            epoch.pop("seconds", None)  # how long each fine-tuning epoch's parts took: this run's clock
    assert first == second and "03 " in again.stdout  # its training time too: the kept record's
    weights = [Captioner.load(bundle).model.get_weights() for bundle in bundles]
    assert all((a == b).all() for a, b in zip(*weights, strict=True))  # fine-tuned from it to the same bits


def assert_05_took_03s_merge_model(notebook_05, work_dir):
    """Run with notebook 03's settings (epochs = experiment_epochs), notebook 05 trains no merge model: it takes
    the teacher-forced one notebook 03 kept (tests/test_runs.py proves that writes the bundle training would)."""
    [kept] = (Path(work_dir) / "teacher-forced").glob("*-merge-*")
    text = notebook_text(notebook_05)
    assert f"merge: teacher forcing: taking the model kept in {kept}" in text, text[-3000:]
    assert not any(f"{variant}: teacher forcing: taking" in text for variant in ("init-inject", "pre-inject", "par-inject"))


def assert_06_compared_with_05s_merge_model(notebook_06, work_dir):
    """Notebook 06 trains attention by teacher forcing only, as notebook 05 trained its four architectures, and
    compares it with notebook 05's merge bundle, reused (not trained again) and scored where notebook 05 scored it."""
    merge = Path(work_dir) / "experiment" / "flickr8k-mobilenet_v2-merge"
    text = notebook_text(notebook_06)
    assert f"merge: reusing {merge}: trained before with these settings and data" in text, text[-3000:]
    assert "self-critical" not in text, text[-3000:]  # the fine-tuning's log lines
    attention = json.loads((Path(work_dir) / "bundles" / "flickr8k-mobilenet_v2-attention" / "bundle.json").read_text())
    assert "self_critical" not in attention["metrics"] and attention["training"]["self_critical_epochs"] == 0
    scored = json.loads((merge / "eval-dev" / "metrics.json").read_text())
    assert f"{scored['coco']['CIDEr']:.3f}" in text.split("merge: reusing")[-1]  # the table shows notebook 05's score


def timeless(metrics):
    """A bundle's metrics without what a clock measured, which differs run to run: teacher forcing's
    seconds and each fine-tuning epoch's "seconds" (sampling, reward, gradient steps, validation)."""
    metrics = {key: value for key, value in metrics.items() if key != "training_seconds"}
    if "self_critical" in metrics:
        metrics["self_critical"] = [{key: value for key, value in row.items() if key != "seconds"}
                                    for row in metrics["self_critical"]]
    return metrics


def test_notebook_03_saves_the_bundle_train_saves(offline_demo, flickr8k_bundle):
    """Notebook 03 follows the `train` command's recipe: run with epochs=N (CI_PARAMS) it saves the
    bundle that `train --epochs N` saves on the same photos and weights (flickr8k_bundle): the same
    settings and metrics, bit-identical weights. Its defaults are the preset's (epochs = None)."""
    from captioning.training import preset_settings

    ok(offline_demo.result)
    notebook = json.loads((offline_demo.work_dir / "bundles" / "flickr8k-mobilenet_v2-merge" / "bundle.json").read_text())
    command_line = json.loads((flickr8k_bundle / "bundle.json").read_text())
    assert notebook["training"] == command_line["training"] == preset_settings("cpu-small", epochs=CI_EPOCHS)
    assert notebook["decoding"] == {"length_alpha": 1.0, "no_repeat_ngram": 2} == command_line["decoding"]
    assert sorted(notebook) == sorted(command_line) and sorted(notebook["metrics"]) == sorted(command_line["metrics"])
    for key in set(notebook) - {"metrics", "model_sha256"}:  # a .keras file records when it was saved
        assert notebook[key] == command_line[key], key
    assert timeless(notebook["metrics"]) == timeless(command_line["metrics"])  # losses, scores, distinct captions
    from captioning.bundle import Captioner
    weights = [Captioner.load(folder).model.get_weights()
               for folder in (offline_demo.work_dir / "bundles" / "flickr8k-mobilenet_v2-merge", flickr8k_bundle)]
    assert all((a == b).all() for a, b in zip(*weights, strict=True))  # bit-identical
    # Without PARAMS the notebook's parameters are the preset's: None means "as train does".
    cells = json.loads((REPO / "notebooks" / "03_training.ipynb").read_text())["cells"]
    [parameters] = ["".join(cell["source"]) for cell in cells if "parameters" in cell["metadata"].get("tags", [])]
    assert re.search(r"^epochs = None ", parameters, re.M) and re.search(r"^self_critical_epochs = None ", parameters, re.M)


# --- the command line -----------------------------------------------------------------------

def test_command_line_block_prepares_caches_trains_captions_and_evaluates(flickr8k_small_dir, mobilenet_weights,
                                                                          tmp_path):
    commands = block_starting("python -m captioning prepare")
    weights_name = re.search(r"--weights (\S+)", " ".join(commands)).group(1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "flickr8k").symlink_to(flickr8k_small_dir)
    (tmp_path / weights_name).symlink_to(mobilenet_weights)
    photos = sorted((flickr8k_small_dir / "images").glob("*.jpg"))
    for name, photo in zip(("photo1.jpg", "photo2.jpg"), photos[-2:]):
        (tmp_path / name).write_bytes(photo.read_bytes())

    outputs = {command.split()[3]: ok(shell(command, tmp_path)).stdout for command in commands}
    assert "vocabulary" in outputs["prepare"] and "cached 130 images" in outputs["features"]
    assert (tmp_path / "bundles" / "merge" / "bundle.json").is_file()
    lines = [line.split("\t") for line in outputs["caption"].strip().splitlines()]
    assert [path for path, _ in lines] == ["photo1.jpg", "photo2.jpg"] and all(text.strip() for _, text in lines)
    metrics = json.loads(outputs["evaluate"])
    assert metrics["split"] == "dev" and metrics["images"] == 30 and metrics["coco"]["CIDEr"] > 0
    assert (tmp_path / "bundles" / "merge" / "eval-dev" / "captions.json").is_file()
    # train reused what prepare and features made: one feature cache, in the README's folder.
    assert [path.name for path in (tmp_path / "data" / "work" / "features").iterdir()] == ["flickr8k-mobilenet_v2-avg"]

    # Serving: the export command the README names, then its Python block in a Python that has
    # TensorFlow but not this package (-I ignores PYTHONPATH and the current folder, -S the
    # editable install's .pth file; site-packages is added back for TensorFlow alone).
    export = re.search(r"`(python -m captioning export [^`]+)`", (REPO / "README.md").read_text()).group(1)
    ok(shell(export, tmp_path))
    (tmp_path / "photo.jpg").write_bytes((tmp_path / "photo1.jpg").read_bytes())
    [block] = readme_blocks("python")
    setup = f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
    isolation = "try:\n    import captioning\n    sys.exit('captioning is importable')\nexcept ModuleNotFoundError:\n    pass\n"
    served = subprocess.run([sys.executable, "-I", "-S", "-c", setup + isolation + "\n".join(block)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert served.returncode == 0, served.stderr[-3000:]
    assert served.stdout.strip() == lines[0][1]  # photo.jpg is photo1.jpg: the caption `caption` printed
