"""Downloads against a real HTTP server on 127.0.0.1 that serves fixture files with faults
(tests/http_fixtures.py: each path can be given a plan of "404", "500", "cut", "slow", "ok")."""

import io
import json
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning import data, download
from captioning.download import DownloadError, fetch

FAST = {"backoff": 0.01, "timeout": (2.0, 2.0)}
REPO = Path(__file__).resolve().parent.parent


def jpeg_bytes(seed, size=(40, 56)):
    """A small noisy JPEG: noise so that the compressed data is long enough to cut."""
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def no_partial_files(folder):
    return [path.name for path in Path(folder).rglob("*") if path.name.endswith(".part")]


# --- one file ----------------------------------------------------------------------------

def test_fetch_writes_verified_file(server, tmp_path):
    server.files["/a.jpg"] = jpeg_bytes(0)
    attempts = fetch(server.url("/a.jpg"), tmp_path / "a.jpg", verify=download.verify_image, **FAST)
    assert attempts == 1
    assert (tmp_path / "a.jpg").read_bytes() == server.files["/a.jpg"]
    assert no_partial_files(tmp_path) == []


def test_404_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="404") as caught:
        fetch(server.url("/missing.jpg"), tmp_path / "missing.jpg", retries=3, **FAST)
    assert not caught.value.retryable
    assert server.hits["/missing.jpg"] == 1
    assert list(tmp_path.iterdir()) == []


def test_500_then_success_is_retried_once(server, tmp_path):
    server.files["/b.jpg"] = jpeg_bytes(1)
    server.plans["/b.jpg"] = ["500"]
    attempts = fetch(server.url("/b.jpg"), tmp_path / "b.jpg", verify=download.verify_image, retries=3, **FAST)
    assert attempts == 2 and server.hits["/b.jpg"] == 2
    download.verify_image(tmp_path / "b.jpg")


def test_persistent_500_gives_up_after_the_retries(server, tmp_path):
    server.files["/c.jpg"] = jpeg_bytes(2)
    server.plans["/c.jpg"] = ["500"] * 10
    with pytest.raises(DownloadError, match="500.*after 3 attempts"):
        fetch(server.url("/c.jpg"), tmp_path / "c.jpg", retries=2, **FAST)
    assert server.hits["/c.jpg"] == 3
    assert list(tmp_path.iterdir()) == []


def test_body_cut_short_never_leaves_a_file_under_the_final_name(server, tmp_path):
    server.files["/d.jpg"] = jpeg_bytes(3)
    server.plans["/d.jpg"] = ["cut"] * 10
    with pytest.raises(DownloadError, match="cut short"):
        fetch(server.url("/d.jpg"), tmp_path / "d.jpg", verify=download.verify_image, retries=2, **FAST)
    assert server.hits["/d.jpg"] == 3
    assert list(tmp_path.iterdir()) == []  # neither d.jpg nor a leftover .d.jpg.part

    server.plans["/e.jpg"], server.files["/e.jpg"] = ["cut"], jpeg_bytes(4)
    assert fetch(server.url("/e.jpg"), tmp_path / "e.jpg", verify=download.verify_image, **FAST) == 2
    assert (tmp_path / "e.jpg").read_bytes() == server.files["/e.jpg"]


def test_slow_response_times_out_and_is_retried(server, tmp_path):
    server.files["/f.jpg"] = jpeg_bytes(5)
    server.plans["/f.jpg"] = ["slow"] * 3
    server.slow_seconds = 0.8
    options = {"backoff": 0.01, "timeout": (1.0, 0.2)}
    with pytest.raises(DownloadError, match="(?i)timed? ?out"):
        fetch(server.url("/f.jpg"), tmp_path / "f.jpg", retries=1, **options)
    assert server.hits["/f.jpg"] == 2
    assert not (tmp_path / "f.jpg").exists()
    # the third request is slow too, the fourth is not: one more retry gets the file
    assert fetch(server.url("/f.jpg"), tmp_path / "f.jpg", retries=1, **options) == 2


def test_bytes_that_do_not_decode_are_refused(server, tmp_path):
    server.files["/g.jpg"] = b"<html>not an image</html>"
    with pytest.raises(DownloadError, match="damaged"):
        fetch(server.url("/g.jpg"), tmp_path / "g.jpg", verify=download.verify_image, retries=1, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_resume_continues_a_partial_download_with_a_range_request(server, tmp_path):
    body = bytes(range(256)) * 40
    server.files["/big.bin"], server.plans["/big.bin"] = body, ["cut"]
    assert fetch(server.url("/big.bin"), tmp_path / "big.bin", resume=True, **FAST) == 2
    assert (tmp_path / "big.bin").read_bytes() == body
    assert server.ranges["/big.bin"] == [None, f"bytes={len(body) // 3}-"]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.jpg"])
def test_non_http_urls_are_refused(tmp_path, url):
    with pytest.raises(DownloadError, match="refusing URL"):
        fetch(url, tmp_path / "x.jpg", **FAST)
    assert list(tmp_path.iterdir()) == []


# --- a batch of images ---------------------------------------------------------------------

def serve_images(server, count, split="val", first_id=0):
    entries = []
    for i in range(first_id, first_id + count):
        name = f"{i:012d}.jpg"
        server.files[f"/{split}2017/{name}"] = jpeg_bytes(100 + i)
        entries.append({"id": i, "file_name": name, "coco_url": server.url(f"/{split}2017/{name}")})
    return entries


def test_download_images_resumes_and_reports_failures(server, tmp_path):
    entries = serve_images(server, 4)
    del server.files["/val2017/000000000003.jpg"]  # a 404
    server.plans["/val2017/000000000001.jpg"] = ["500"]
    first = download.download_images(entries, tmp_path, workers=3, progress=False, **FAST)
    assert (first.downloaded, first.present, len(first.failed)) == (3, 0, 1)
    assert first.failed[0][0] == "000000000003.jpg" and "404" in first.failed[0][2]
    assert "1 failed" in first.summary()

    hits_before = dict(server.hits)
    (tmp_path / "000000000002.jpg").write_bytes(server.files["/val2017/000000000002.jpg"][:500])  # damaged
    second = download.download_images(entries, tmp_path, workers=3, progress=False, **FAST)
    assert (second.downloaded, second.present, len(second.failed)) == (1, 2, 1)
    assert server.hits["/val2017/000000000000.jpg"] == hits_before["/val2017/000000000000.jpg"]
    assert server.hits["/val2017/000000000002.jpg"] == hits_before["/val2017/000000000002.jpg"] + 1
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{i:012d}.jpg" for i in range(3)]


@pytest.mark.parametrize("name", ["../escape.jpg", "/tmp/absolute.jpg", "sub/../../escape.jpg"])
def test_file_names_cannot_escape_the_data_folder(server, tmp_path, name):
    entries = serve_images(server, 2)
    entries[1]["file_name"] = name
    with pytest.raises(ValueError, match="unsafe"):
        download.download_images(entries, tmp_path / "val2017", progress=False, **FAST)
    assert sum(server.hits.values()) == 0
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "val2017").exists()


def test_offline_fails_fast_with_a_hint_about_local_files(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    entries = [{"id": i, "file_name": f"{i}.jpg", "coco_url": f"http://127.0.0.1:{port}/{i}.jpg"} for i in range(50)]
    calls = []
    real_connect = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: calls.append(a) or real_connect(*a, **k))
    with pytest.raises(ConnectionError) as caught:
        download.download_images(entries, tmp_path, progress=False)
    message = str(caught.value)
    assert "--data-dir" in message and "download=False" in message
    assert len(calls) == 1  # one quick check, not fifty retried downloads
    assert list(tmp_path.iterdir()) == []


def test_subset_is_seeded_and_grows_without_changing(tmp_path):
    annotation = tmp_path / "captions_val2017.json"
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "coco_url": f"http://x/{i}.jpg"} for i in range(40)]
    annotation.write_text(json.dumps({"images": images, "annotations": []}))
    small = [image["id"] for image in download.choose_subset(annotation, 10, seed=0)]
    assert small == [image["id"] for image in download.choose_subset(annotation, 10, seed=0)]
    assert [image["id"] for image in download.choose_subset(annotation, 20, seed=0)][:10] == small
    assert small != [image["id"] for image in download.choose_subset(annotation, 10, seed=1)]
    assert small != list(range(10))


# --- annotations + subset, end to end -------------------------------------------------------

def serve_coco(server, count=5, corrupt_zip=False):
    """A zip with captions for `count` val images (ids 0..) and 2 * count train images (ids 1000..)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for split, entries in (("val", serve_images(server, count)),
                               ("train", serve_images(server, 2 * count, "train", 1000))):
            captions = {"images": entries,
                        "annotations": [{"id": 10 * image["id"] + j, "image_id": image["id"],
                                         "caption": f"a photo number {image['id']} {j}"}
                                        for image in entries for j in range(5)]}
            archive.writestr(f"annotations/captions_{split}2017.json", json.dumps(captions))
        archive.writestr("annotations/instances_val2017.json", "{}")
    payload = bytearray(buffer.getvalue())
    if corrupt_zip:
        payload[60:70] = b"X" * 10  # inside the first member's compressed data: its CRC fails
    server.files["/annotations/annotations_trainval2017.zip"] = bytes(payload)
    return server.url("/annotations/annotations_trainval2017.zip")


def test_download_coco_fetches_annotations_and_a_subset_then_resumes(server, tmp_path):
    serve_coco(server)
    server.plans["/annotations/annotations_trainval2017.zip"] = ["cut"]
    report = download.download_coco(tmp_path, 3, split="val", base_url=server.url(""), progress=False, **FAST)["val"]
    assert (report.downloaded, report.failed) == (3, [])
    assert server.ranges["/annotations/annotations_trainval2017.zip"][1].startswith("bytes=")  # resumed
    assert sorted(path.name for path in (tmp_path / "annotations").iterdir()) == [
        "captions_train2017.json", "captions_val2017.json"]  # only the caption files are kept
    assert not (tmp_path / "annotations_trainval2017.zip").exists()
    table = data.load_dataset("coco", tmp_path, on_disk_only=True)
    assert table["image_id"].nunique() == 3 and table.attrs["dropped_images"] == 2 + 10  # 10 train images

    hits = sum(server.hits.values())
    again = download.download_coco(tmp_path, 3, split="val", base_url=server.url(""), progress=False, **FAST)["val"]
    assert (again.downloaded, again.present) == (0, 3)
    assert sum(server.hits.values()) == hits

    both = download.download_coco(tmp_path, 10, base_url=server.url(""), progress=False, **FAST)
    assert (both["train"].downloaded, both["val"].downloaded, both["val"].present) == (8, 0, 2)
    table = data.load_dataset("coco", tmp_path, on_disk_only=True)
    assert table.groupby("split")["image_id"].nunique().to_dict() == {"train": 8, "val": 3}


def test_damaged_annotation_zip_is_refused(server, tmp_path):
    serve_coco(server, corrupt_zip=True)
    with pytest.raises(DownloadError, match="damaged"):
        download.download_coco(tmp_path, 3, base_url=server.url(""), progress=False, retries=1, **FAST)
    assert not (tmp_path / "annotations").exists()
    assert list(tmp_path.iterdir()) == []


def test_module_entry_point_downloads_and_prints_a_summary(server, tmp_path):
    serve_coco(server)
    del server.files["/val2017/000000000001.jpg"]
    result = subprocess.run(
        [sys.executable, "-m", "captioning.download", "--data-dir", str(tmp_path), "--subset-size", "5",
         "--split", "val", "--base-url", server.url(""), "--retries", "0"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 1, result.stderr
    assert "4 downloaded" in result.stdout and "1 failed" in result.stdout and "000000000001.jpg" in result.stdout
    assert len(list((tmp_path / "val2017").glob("*.jpg"))) == 4


def test_a_mirror_serves_images_the_annotations_place_on_the_official_server(server, tmp_path, monkeypatch):
    entries = serve_images(server, 2)
    official = [dict(entry, coco_url=entry["coco_url"].replace(server.url(""), download.COCO_URL)) for entry in entries]
    monkeypatch.setenv(download.URL_VARIABLE, server.url(""))  # what `make demo COCO_URL=...` sets
    report = download.download_images(official, tmp_path, progress=False, **FAST)
    assert (report.downloaded, report.failed) == (2, [])
    assert server.hits["/val2017/000000000000.jpg"] == 1
    monkeypatch.setenv(download.URL_VARIABLE, "ftp://mirror.example/coco")
    with pytest.raises(ValueError, match="CAPTIONING_COCO_URL"):
        download.download_images(official, tmp_path / "other", progress=False, **FAST)
