"""Download COCO caption annotations and a subset of images (notebook 01, `make data`).

The full COCO image archives are 18 GB; a classroom needs a few thousand
photos. So we fetch the caption annotations (one 241 MB zip, of which we keep
only captions_*.json), pick a seeded random subset of images, and download
those one by one from their `coco_url`.

Networks fail, so every download here is
  * parallel   - a thread pool; the work is waiting on the network, not the CPU,
  * resumable  - a file already complete (it decodes) is never fetched again,
                 and the annotation zip continues where it stopped (HTTP Range),
  * retried    - server errors (5xx) and dropped connections are tried again
                 after 0.5 s, 1 s, 2 s, ...; a 404 is not (it will not get better),
  * verified   - Pillow decodes each image, zipfile checks each CRC,
  * atomic     - bytes go to a hidden `.NAME.part` file that is renamed to NAME
                 only once verified, so a final name never holds half a file.
Offline, we fail after one quick connection attempt with a message that says
how to use local files instead.

Where from: the official server, or a mirror with the same layout
(`annotations/annotations_trainval2017.zip`, `train2017/NAME.jpg`,
`val2017/NAME.jpg`) named by `base_url`, the environment variable
CAPTIONING_COCO_URL, or `make demo COCO_URL=...`: for a proxy, a class's
local copy, or the tests' server on 127.0.0.1. Image URLs in the annotations
that point at the official server are rewritten to the mirror.

    python -m captioning.download --data-dir data/coco [--subset-size N] [--split both|train|val] [--base-url URL]
"""

import argparse
import concurrent.futures
import dataclasses
import http.client
import os
import random
import re
import shutil
import socket
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from captioning.fileio import atomic_path, read_json, safe_join

COCO_URL = "http://images.cocodataset.org"  # the official server
URL_VARIABLE = "CAPTIONING_COCO_URL"  # a mirror with the same layout, if set
ANNOTATIONS_PATH = "annotations/annotations_trainval2017.zip"
CAPTION_MEMBER = re.compile(r"(?:^|/)(captions_(?:train|val)2017\.json)$")
TIMEOUT = (5.0, 30.0)  # seconds: (connect, each read)
CHUNK = 1 << 16
OFFLINE_HINT = (
    "You seem to be offline. Use files you already have instead: put the COCO annotations in "
    "DATA_DIR/annotations/ and the images in DATA_DIR/val2017/ (or DATA_DIR/images/), then pass that "
    "existing folder with `--data-dir DATA_DIR` (e.g. `python -m captioning prepare --data-dir DATA_DIR ...`), "
    "or in notebook 01 set download=False and data_dir to that folder."
)


class DownloadError(OSError):
    """A download that failed; `retryable` says whether trying again could help."""

    def __init__(self, message, retryable=True):
        super().__init__(message)
        self.retryable = retryable


def coco_base_url(base_url=None):
    """The server to download COCO from: `base_url`, else $CAPTIONING_COCO_URL, else the official one."""
    base = (base_url or os.environ.get(URL_VARIABLE) or COCO_URL).rstrip("/")
    if urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).hostname:
        raise ValueError(f"COCO download URL must be http:// or https://, not {base!r} (from "
                         f"{'base_url' if base_url else URL_VARIABLE})")
    return base


def _on_mirror(url, base):
    """An image URL from the annotations, moved from the official server to `base`."""
    return base + url[len(COCO_URL):] if url.startswith(COCO_URL + "/") and base != COCO_URL else url


def check_online(url, timeout=3.0):
    """One quick TCP connection to the URL's host; ConnectionError with OFFLINE_HINT if it fails."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise ConnectionError(f"cannot reach {parts.hostname}:{port} ({error}).\n{OFFLINE_HINT}") from None


def _open(url, headers, timeout, redirects=5):
    """GET `url` with separate connect and read timeouts; follow a few redirects."""
    for _ in range(redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DownloadError(f"refusing URL {url!r}: only http:// and https:// URLs are downloaded", False)
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(parts.hostname, parts.port, timeout=timeout[0])
        connection.connect()  # under the short connect timeout ...
        connection.sock.settimeout(timeout[1])  # ... then a longer one for each read
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else "") or "/", headers=headers)
        response = connection.getresponse()
        if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
            url = urljoin(url, response.getheader("Location"))
            connection.close()
            continue
        return connection, response
    raise DownloadError(f"too many redirects for {url}", False)


def _fetch_once(url, part, timeout, resume, on_bytes):
    offset = part.stat().st_size if resume and part.is_file() else 0
    headers = {"User-Agent": "captioning-course"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    connection, response = _open(url, headers, timeout)
    try:
        if response.status == 206 and offset:
            mode = "ab"  # the server continues where the last attempt stopped
        elif response.status == 200:
            mode = "wb"
        else:
            part.unlink(missing_ok=True)
            raise DownloadError(f"HTTP {response.status} {response.reason}",
                                retryable=response.status >= 500 or response.status == 429)
        length = response.getheader("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = 0
        with open(part, mode) as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
                if on_bytes:
                    on_bytes(len(chunk))
        if expected is not None and received < expected:
            raise DownloadError(f"body cut short: received {received} of {expected} bytes")
    finally:
        connection.close()


def fetch(url, dest, *, verify=None, retries=3, backoff=0.5, timeout=TIMEOUT, resume=False, on_bytes=None):
    """Download `url` to `dest` atomically; return the number of attempts it took.

    `verify(path)` must raise if the downloaded file is damaged. With
    resume=True a partial download is kept between attempts (and runs) and
    continued with an HTTP Range request; otherwise every attempt starts over.
    Raises DownloadError naming the URL once retries are spent, or at once
    for errors that retrying cannot fix (404, a bad URL).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")
    attempt = 0
    while True:
        attempt += 1
        keep_part = resume
        try:
            _fetch_once(url, part, timeout, resume, on_bytes)
            if verify is not None:
                try:
                    verify(part)
                except Exception as error:  # whatever the decoder says, the bytes are bad
                    keep_part = False
                    raise DownloadError(f"downloaded file is damaged: {error}") from None
            os.replace(part, dest)
            return attempt
        except DownloadError as error:
            failure = error
        except (OSError, http.client.HTTPException) as error:  # timeouts, resets, refused, cut bodies
            failure = DownloadError(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
        if not keep_part:
            part.unlink(missing_ok=True)
        if not failure.retryable or attempt > retries:
            raise DownloadError(f"{url}: {failure} (after {attempt} attempt{'s' * (attempt > 1)})",
                                failure.retryable)
        time.sleep(backoff * 2 ** (attempt - 1))


def verify_image(path):
    """Raise unless Pillow can decode the whole image (a truncated JPEG raises)."""
    from PIL import Image
    with Image.open(path) as image:
        image.draft("RGB", (64, 64))  # decode JPEGs at 1/8 scale: quick, yet every byte is read
        image.load()


def image_is_complete(path):
    try:
        verify_image(path)
        return True
    except Exception:
        return False


def verify_caption_zip(path):
    """Raise unless the zip opens and its captions_*.json members pass their CRC check."""
    with zipfile.ZipFile(path) as archive:
        members = [info for info in archive.infolist() if CAPTION_MEMBER.search(info.filename)]
        if not members:
            raise ValueError(f"{path}: no captions_train2017.json / captions_val2017.json inside")
        for info in members:
            with archive.open(info) as member:  # reading to the end checks the CRC
                while member.read(CHUNK):
                    pass


def download_annotations(data_dir, url=None, *, keep_zip=False, progress=True, **fetch_options):
    """Fetch the COCO annotation zip (default: from coco_base_url()), keep only captions_*.json
    in DATA_DIR/annotations/. Notebook 01."""
    from tqdm.auto import tqdm
    data_dir = Path(data_dir)
    url = url or f"{coco_base_url()}/{ANNOTATIONS_PATH}"
    check_online(url)
    zip_path = safe_join(data_dir, Path(urlsplit(url).path).name or "annotations.zip", source="annotation URL")
    if not zip_path.is_file():
        with tqdm(unit="B", unit_scale=True, desc="annotations", disable=not progress) as bar:
            fetch(url, zip_path, verify=verify_caption_zip, resume=True, on_bytes=bar.update, **fetch_options)
    verify_caption_zip(zip_path)
    written = []
    with zipfile.ZipFile(zip_path) as archive:
        for info in archive.infolist():
            match = CAPTION_MEMBER.search(info.filename)
            if match:  # only the base name is used, so a member named ../x cannot escape
                target = safe_join(data_dir / "annotations", match.group(1), source="zip member")
                with atomic_path(target) as temp, archive.open(info) as source, open(temp, "wb") as out:
                    shutil.copyfileobj(source, out)
                written.append(target)
    if not keep_zip:
        zip_path.unlink()
    return written


def choose_subset(annotation_file, subset_size, seed=0):
    """A seeded random subset of the file's image entries.

    We shuffle all images (sorted by id first) with a fixed seed and take the
    first N, so a rerun picks the same images (and resumes), and a larger N
    keeps every image a smaller N already downloaded.
    """
    data = read_json(annotation_file, "COCO annotation file")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{annotation_file}: field 'images' is missing or not a list")
    if subset_size < 0:
        raise ValueError(f"subset_size must be at least 0, got {subset_size}")
    for i, image in enumerate(images):
        for key in ("id", "file_name", "coco_url"):
            if not isinstance(image, dict) or key not in image:
                raise ValueError(f"{annotation_file}: images[{i}] has no field {key!r}")
    ordered = sorted(images, key=lambda image: str(image["id"]))
    random.Random(seed).shuffle(ordered)
    return ordered[:subset_size]


def subset_missing(data_dir, subset_size, split="both"):
    """True when download_coco(data_dir, subset_size) would have something to fetch: the
    caption files, or fewer image files on disk than the subset asks for. A quick look
    (`make demo` asks it before starting), not a check of every file."""
    data_dir = Path(data_dir)
    splits = ("train", "val") if split == "both" else (split,)
    if not all((data_dir / "annotations" / f"captions_{name}2017.json").is_file() for name in splits):
        return True
    return sum(photos_on_disk(data_dir, name) for name in splits) < subset_size


def photos_on_disk(data_dir, split):
    """How many .jpg files DATA_DIR/<split>2017 holds (0 if unreadable): one listing, no stat per file."""
    try:
        with os.scandir(Path(data_dir) / f"{split}2017") as entries:
            return sum(entry.name.endswith(".jpg") and not entry.name.startswith(".") for entry in entries)
    except OSError:
        return 0


@dataclasses.dataclass
class DownloadReport:
    folder: Path
    downloaded: int = 0
    present: int = 0
    failed: list = dataclasses.field(default_factory=list)  # (file_name, url, reason)

    def summary(self):
        lines = [f"{self.folder}: {self.downloaded} downloaded, {self.present} already there, "
                 f"{len(self.failed)} failed"]
        lines += [f"  failed {name}: {reason}" for name, _, reason in self.failed[:20]]
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more")
        if self.failed:
            lines.append("  run the same command again to retry them; finished images are kept")
        return "\n".join(lines)


def download_images(images, image_dir, *, base_url=None, workers=8, progress=True, **fetch_options):
    """Download COCO image entries ({"file_name", "coco_url"}) into `image_dir`. Notebook 01.

    Every name and URL is checked before anything is fetched: a file name
    such as "../../x" or a file:// URL refuses the whole batch. Images already
    complete are skipped; failures are collected, not raised, so one bad URL
    does not stop the other 1,999. URLs on the official server are fetched
    from coco_base_url(base_url) instead when that is a mirror.
    """
    from tqdm.auto import tqdm
    image_dir = Path(image_dir)
    base = coco_base_url(base_url)
    jobs = []
    for i, image in enumerate(images):
        if not isinstance(image, dict) or "file_name" not in image or "coco_url" not in image:
            raise ValueError(f"image entry {i} needs the fields 'file_name' and 'coco_url', got {image!r:.100}")
        name, url = image["file_name"], _on_mirror(str(image["coco_url"]), base)
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"refusing coco_url {url!r} of {name!r}: only http:// and https:// URLs")
        jobs.append((name, url, safe_join(image_dir, name, source="coco_url file name")))
    report = DownloadReport(image_dir)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(jobs), unit="img", desc=image_dir.name, disable=not progress) as bar:
        complete = list(pool.map(lambda job: image_is_complete(job[2]), jobs))
        report.present = sum(complete)
        bar.update(report.present)
        missing = [job for job, done in zip(jobs, complete) if not done]
        if missing:
            check_online(missing[0][1])  # offline: one quick failure, not one slow failure per photo
        futures = {pool.submit(fetch, url, dest, verify=verify_image, **fetch_options): (name, url)
                   for name, url, dest in missing}
        for future in concurrent.futures.as_completed(futures):
            try:
                future.result()
                report.downloaded += 1
            except (OSError, http.client.HTTPException) as error:
                report.failed.append((*futures[future], str(error)))
                bar.set_postfix(failed=len(report.failed))
            bar.update(1)
    return report


TRAIN_SHARE = 0.8  # split="both": this share of the subset is training images, the rest val

# What make demo, make data and notebook 01 download: the course in about 45 min on two cores (scripts/estimate.py).
# More photos train better captioners; README and docs/experiments.md ("A smaller COCO subset") say what 1,800 cost.
SUBSET_SIZE = 1800


def subset_sizes(subset_size, split="both"):
    """{split: images} that download_coco(data_dir, subset_size, split=split) fetches."""
    if split not in ("train", "val", "both"):
        raise ValueError(f"split must be 'train', 'val' or 'both', got {split!r}")
    if split != "both":
        return {split: subset_size}
    train = round(subset_size * TRAIN_SHARE)
    return {"train": train, "val": subset_size - train}


def download_coco(data_dir, subset_size=SUBSET_SIZE, *, split="both", seed=0, base_url=None, workers=8,
                  progress=True, **fetch_options):
    """Annotations (if missing) + a seeded subset of images into DATA_DIR/<split>2017/. Notebook 01.

    split="both" (the default) splits `subset_size` 80/20 between train2017
    and val2017, so the notebooks have images to train on and held-out images
    to evaluate on. `base_url`: a mirror of the official server (see the top
    of this file). Returns {split: DownloadReport}.
    The caption files are only ever written whole (extracted to a temporary
    name after the zip's CRC check), so one on disk is a complete one.
    """
    sizes = subset_sizes(subset_size, split)
    data_dir, base = Path(data_dir), coco_base_url(base_url)
    files = {name: data_dir / "annotations" / f"captions_{name}2017.json" for name in sizes}
    if not all(path.is_file() for path in files.values()):
        download_annotations(data_dir, f"{base}/{ANNOTATIONS_PATH}", progress=progress, **fetch_options)
    return {name: download_images(choose_subset(files[name], size, seed), data_dir / f"{name}2017", base_url=base,
                                  workers=workers, progress=progress, **fetch_options)
            for name, size in sizes.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m captioning.download", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="e.g. data/coco")
    parser.add_argument("--subset-size", type=int, default=SUBSET_SIZE,
                        help=f"how many images to download (default {SUBSET_SIZE})")
    parser.add_argument("--split", choices=("train", "val", "both"), default="both",
                        help="both: 80%% of the subset from train2017, 20%% from val2017")
    parser.add_argument("--seed", type=int, default=0, help="which random subset (keep it to resume)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--base-url", default=None,
                        help=f"a mirror of {COCO_URL} with the same layout (default: ${URL_VARIABLE} or the official server)")
    args = parser.parse_args(argv)
    try:
        reports = download_coco(args.data_dir, args.subset_size, split=args.split, seed=args.seed,
                                base_url=args.base_url, workers=args.workers, retries=args.retries)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for report in reports.values():
        print(report.summary())
    return 1 if any(report.failed for report in reports.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
