"""`make demo` as the README gives it, with its defaults: COCO, downloads on, a 2,000-image
subset, InceptionV3, all six notebooks.

The bytes come from a COCO mirror on 127.0.0.1 instead of images.cocodataset.org:
the official annotation zip's layout, holding the full official captions_val2017.json
and the shared train sample's captions_train2017.json, every coco_url pointing at the
mirror, and behind it the shared sample photos. The subset asks for 2,000 photos and
the mirror has 239, so most requests answer 404, as some would for a user whose
network drops files: the run reports them and goes on with what it has. The only
other difference from a user's run is WEIGHTS=none (InceptionV3 with fixed random
weights: its ImageNet weights cannot be fetched here). Data locations point into
the test's temporary folder.
"""

import io
import json
import os
import re
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from captioning import download
from conftest import REPO, run_cli
from http_fixtures import serving

pytestmark = pytest.mark.slow


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


def make_demo(*variables, environment=None, timeout=1500):
    return subprocess.run(["make", "demo", *variables], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(environment or {})})


def _notebook_text(path):
    notebook = json.loads(Path(path).read_text(encoding="utf-8"))
    return "\n".join("".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
                     for cell in notebook["cells"] for output in cell.get("outputs", []))


def _photos_served(server):
    return sum(count for path, count in server.served.items() if path.endswith(".jpg"))


def test_make_demo_with_its_defaults_downloads_trains_captions_and_resumes(coco_mirror, tmp_path):
    server = coco_mirror
    data_dir, work_dir, runs = tmp_path / "coco", tmp_path / "work", tmp_path / "runs"
    locations = [f"DATA_DIR={data_dir}", f"WORK_DIR={work_dir}", f"RUNS={runs}", "WEIGHTS=none"]
    environment = {"CAPTIONING_COCO_URL": server.url("")}  # the documented mirror setting

    result = make_demo(*locations, environment=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    executed = sorted(path.name for path in runs.glob("*.ipynb"))
    assert [name[:2] for name in executed] == ["01", "02", "03", "04", "05", "06"]
    assert re.search(r"wall time: 01 \d+ s, .*06 \d+ s; total \d+ s", result.stdout), result.stdout[-2000:]

    # What came down: each photo the seeded subset picked that the mirror has, once; the rest 404.
    subset = {split: {image["file_name"] for image in download.choose_subset(
        data_dir / "annotations" / f"captions_{split}2017.json", size)}
        for split, size in (("train", 1600), ("val", 400))}
    available = {split: {path.split("/")[-1] for path in server.files if path.startswith(f"/{split}2017/")}
                 for split in subset}
    on_disk = {split: {path.name for path in (data_dir / f"{split}2017").glob("*.jpg")} for split in subset}
    for split in subset:
        assert on_disk[split] == subset[split] & available[split]
    downloaded = sum(map(len, on_disk.values()))
    assert downloaded > 20 and _photos_served(server) == downloaded
    notebook_01 = _notebook_text(runs / executed[0])
    reported = [int(number) for number in re.findall(r"(\d+) downloaded, 0 already there", notebook_01)]
    failed = [int(number) for number in re.findall(r"(\d+) failed", notebook_01)]
    # The subset asks for 2,000 photos (80% train2017); the train annotations list only 80.
    asked = sum(map(len, subset.values()))
    assert asked == min(80, 1600) + 400
    assert sum(reported) == downloaded and sum(failed) == asked - downloaded
    assert "HTTP 404" in notebook_01
    # The annotations as loaded: the full official val2017 file plus the train sample's 80 images.
    assert "5,080 images and 25,414 captions in the annotations" in notebook_01

    # The bundle notebook 03 trained captions new photos from the command line.
    photos = sorted((data_dir / "val2017").glob("*.jpg"))[:2]
    captioned = run_cli("caption", "--model", work_dir / "bundles" / "coco-merge", *photos)
    lines = captioned.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(photo) for photo in photos]
    assert all(line.split("\t")[1].strip() for line in lines)

    # A second run resumes: nothing is downloaded again, only the missing photos are asked for again.
    served_before = _photos_served(server)
    again = make_demo(*locations, environment=environment)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert _photos_served(server) == served_before
    assert sum(int(n) for n in re.findall(r"(\d+) downloaded", _notebook_text(runs / executed[0]))) == 0
    assert sum(len(list((data_dir / f"{split}2017").glob("*.jpg"))) for split in subset) == downloaded


def test_offline_make_demo_stops_at_once_and_says_what_to_use_instead(tmp_path):
    closed_port = _closed_port()
    started = time.perf_counter()
    result = make_demo(f"DATA_DIR={tmp_path / 'coco'}", f"WORK_DIR={tmp_path / 'work'}", f"RUNS={tmp_path / 'runs'}",
                       f"COCO_URL=http://127.0.0.1:{closed_port}", timeout=120)
    seconds = time.perf_counter() - started
    assert result.returncode != 0
    assert seconds < 60, f"took {seconds:.0f} s"
    errors = [line for line in result.stderr.splitlines() if not line.startswith("make: ***")]
    assert len(errors) == 1 and errors[0].startswith("error: make demo cannot download what it needs"), result.stderr
    assert all(setting in errors[0] for setting in ("DATA_DIR=", "DOWNLOAD=0", "WEIGHTS="))
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "coco").exists()


def _closed_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens on it once the probe is closed

