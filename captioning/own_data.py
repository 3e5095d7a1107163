"""A dataset of your own: a folder of photos and a captions.csv (or captions.jsonl). Notebook 01.

    my_photos/
        captions.csv          image,caption[,split]
        beach.jpg             image paths are relative to the folder
        holiday/dog.png

One row per caption: `image` (the photo's path inside the folder), `caption`,
and optionally `split` ("train", "val" or "test"; "dev" and "validation" are
read as "val"). Without a split column every photo is assigned one by a seeded
hash of its path: 80% train, 10% val, 10% test, all captions of a photo in
the same split, and a photo added later never moves the others. captions.jsonl
holds the same fields, one JSON object per line.

Files people write by hand have mistakes. A row whose photo is missing, whose
caption is empty, whose bytes are not UTF-8, or that repeats another row word
for word is left out, counted and named (its line number) in the table's
attrs["bad_rows"], which the data-quality report shows: never silently kept,
never a reason to refuse the other rows. A file with no usable row, or
without the `image` and `caption` columns, is an error naming the file; for
photos not found it shows the first such row, the path looked at and the
likely cause (letter case, Unicode spelling, a sub-folder left out), since
"missing_image: 150" alone does not say what to fix.

Some files from elsewhere are read as they are: Kaggle's Flickr8k
(captions.txt with the header image,caption, the photos in Images/), paths
written with Windows backslashes (holiday\\dog.png), and a file saved as
UTF-16 (Excel's and Notepad's "Unicode text").
"""

import csv
import hashlib
import io
import json
import os
import unicodedata
from pathlib import Path

from captioning.fileio import safe_join

SPLIT_NAMES = {"train": "train", "val": "val", "dev": "val", "validation": "val", "test": "test"}
SHARES = (("train", 0.8), ("val", 0.9), ("test", 1.0))  # cumulative: 80/10/10
BAD_ROW_KINDS = ("missing_image", "empty_caption", "not_utf8", "duplicate", "bad_split", "unsafe_path")


def captions_file(folder):
    """The folder's captions.csv or captions.jsonl, or the captions.txt of Kaggle's Flickr8k."""
    for name in ("captions.csv", "captions.jsonl", "captions.txt"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"no captions.csv or captions.jsonl in {folder} (columns: image, caption[, split])")


def photo_folder(folder, path):
    """Where the rows' image paths start: the folder itself, or Images/ beside Kaggle's captions.txt
    (that download names the photos without the folder they are in)."""
    if path.name == "captions.txt" and (folder / "Images").is_dir():
        return folder / "Images"
    return folder


def _decode(path, raw):
    """The file's text. UTF-16 (with its byte-order mark) is decoded as such; anything else as UTF-8,
    keeping bad bytes as surrogates so that their rows can be named rather than the file refused."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise ValueError(f"{path} starts as UTF-16 text but is not: save it again as UTF-8 "
                             "(CSV UTF-8)") from None
    return raw.decode("utf-8-sig", errors="surrogateescape")


def why_missing(photo):
    """The likely reason the photo a row names is not on disk, in a few words."""
    folder = photo.parent
    while not folder.is_dir():  # the nearest folder that exists
        folder = folder.parent
    if folder != photo.parent:
        return f"there is no folder {folder / photo.relative_to(folder).parts[0]}"
    names = os.listdir(folder)
    wanted = unicodedata.normalize("NFC", photo.name)
    for name in names:
        if name != photo.name and unicodedata.normalize("NFC", name) == wanted:
            return (f"{name!r} on disk spells the name with other Unicode characters (NFD vs NFC, as macOS "
                    "writes names): rename the file or retype the name")
    for name in names:
        if name.casefold() == photo.name.casefold():
            return f"the file on disk is {name!r}: letter case matters here, write the name as on disk"
    inside = [entry.name for entry in os.scandir(folder)
              if entry.is_dir() and (Path(entry) / photo.name).is_file()]
    if inside:
        return (f"there is one in {folder / inside[0]}: write the paths from {folder} "
                f"(e.g. {inside[0]}/{photo.name})")
    return f"no such file in {folder} (image paths are relative to it)"


def seeded_split(image, seed=0):
    """train/val/test for a photo from a hash of its path: stable, whatever else is in the folder."""
    fraction = int.from_bytes(hashlib.sha256(f"{seed}:{image}".encode("utf-8", "surrogateescape")).digest()[:8],
                              "big") / 2 ** 64
    return next(split for split, upper in SHARES if fraction < upper)


def _undecodable(text):
    """True if `text` holds bytes that were not UTF-8 (decoded with surrogateescape)."""
    return any("\udc80" <= char <= "\udcff" for char in text)


def _records(path):
    """(line number, {field: text}, decodes as UTF-8) for every row of the file."""
    text = _decode(path, path.read_bytes())
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {number} is not a JSON object ({error.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}: line {number} is not a JSON object")
                yield number, {key: "" if value is None else str(value) for key, value in record.items()}, \
                    not _undecodable(line)
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"image", "caption"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{path}: the header must name the columns image and caption (and optionally split); "
                         f"missing {sorted(missing)}, found {reader.fieldnames}")
    for row in reader:
        values = " ".join(value for value in row.values() if isinstance(value, str))
        yield reader.line_num, {key: value or "" for key, value in row.items() if key}, not _undecodable(values)


def load_own(data_dir, karpathy_split=None, seed=0):
    """The caption table of a folder with captions.csv / captions.jsonl (see the top of this file)."""
    if karpathy_split:
        raise ValueError("a Karpathy split file is for COCO only")
    folder = Path(data_dir).resolve()
    path = captions_file(folder)
    base = photo_folder(folder, path)
    rows, seen, bad = [], set(), {kind: [] for kind in BAD_ROW_KINDS}
    missing = []  # (line, image, path) of the rows whose photo is not on disk
    for number, record, readable in _records(path):
        image, caption = record.get("image", "").strip(), record.get("caption", "").strip()
        if not readable:
            bad["not_utf8"].append(number)
            continue
        # A file written on Windows separates folders with "\\"; "/" means the same there, and only it here.
        image = image.replace("\\", "/")
        try:
            photo = safe_join(base, image, source=f"image in {path} line {number}")
        except ValueError:
            bad["unsafe_path"].append(number)
            continue
        split = record.get("split", "").strip().lower()
        if split and split not in SPLIT_NAMES:
            bad["bad_split"].append(number)
            continue
        if not caption:
            bad["empty_caption"].append(number)
        elif not photo.is_file():
            bad["missing_image"].append(number)
            missing.append((number, image, photo))
        elif (image, caption) in seen:
            bad["duplicate"].append(number)
        else:
            seen.add((image, caption))
            # The photo's path inside the folder, extension and all, is its id: x.jpg and x.png are two photos.
            image_id = Path(image).as_posix()
            rows.append((image_id, photo.name, str(photo), caption,
                         SPLIT_NAMES[split] if split else seeded_split(image, seed)))
    if not rows:
        example = ""
        if missing:  # the first such row says what to fix for all of them, more often than not
            number, image, photo = missing[0]
            example = f"; line {number} names {image!r}, looked for {photo}: {why_missing(photo)}"
        raise ValueError(f"{path}: no usable row (bad rows by kind: "
                         f"{ {kind: len(lines) for kind, lines in bad.items() if lines} }){example}")
    return rows, {kind: lines for kind, lines in bad.items() if lines}


def own_sources(data_dir, karpathy_split=None):
    """(annotation files, photo folders) a table of the folder is made from: the captions file,
    the folder and every folder inside it (photos may sit in sub-folders)."""
    folder = Path(data_dir)
    return [captions_file(folder)], [folder, *sorted(path for path in folder.rglob("*") if path.is_dir())]
