"""The official files of the public datasets, read and checked: COCO's caption annotation JSON
(`captions_val2017.json`), Karpathy's split file (`dataset_coco.json`) and Flickr8k's token and
split files (`Flickr8k.token.txt`, `Flickr_8k.trainImages.txt`, ...). Used by data.py, which
notebook 01 teaches; notebook 01 never calls this module itself.

Each reader returns rows, tuples in the order of data.COLUMNS (image_id, file_name, image_path,
caption, split); data.py makes them the caption table. The formats' quirks stay here: the 2014
file names of Karpathy's split, the official zips' `Flicker8k_Dataset/` (sic), a caption of an
image the file does not list. Annotation files are written by people and tools that make
mistakes, so every problem we can name is a ValueError with the file, the entry and the field.
"""

import re
from pathlib import Path

from captioning.fileio import read_json, safe_join


# A bare name of these characters has no "/" and is not "." or "..", so it
# cannot leave its folder; anything else goes through fileio.safe_join, which
# resolves the path on disk (too slow to do 40,000 times for Flickr8k).
_PLAIN_NAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.+-]+$")


def _image_path(image_dir, name, source):
    if isinstance(name, str) and _PLAIN_NAME.match(name):
        return image_dir / name
    return safe_join(image_dir, name, source=source)


def _require(mapping, key, where, path):
    if not isinstance(mapping, dict) or key not in mapping:
        raise ValueError(f"{path}: {where} has no field {key!r}")
    return mapping[key]


# --- COCO ----------------------------------------------------------------------------

def coco_split_from_name(annotation_file):
    match = re.match(r"captions_([a-z]+)\d{4}", Path(annotation_file).name)
    return match.group(1) if match else "unknown"


def coco_image_dir(data_dir, split):
    """Official layout: DIR/val2017/; the shared samples keep every image in DIR/images/."""
    for candidate in (Path(data_dir) / f"{split}2017", Path(data_dir) / "images"):
        if candidate.is_dir():
            return candidate
    return Path(data_dir) / f"{split}2017"


def _identifier(value, where, path):
    """An image id as annotation files write it: an int (COCO) or a non-empty string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise ValueError(f"{path}: {where} must be an integer or a non-empty string, got {value!r:.60}")
    return str(value)


def coco_rows(annotation_file, image_dir=None, split=None):
    """The rows of an official COCO captions file (`captions_val2017.json`).

    `split` defaults to the one in the file name ("val"); `image_dir` to
    DIR/<split>2017 or DIR/images beside the `annotations/` folder. The file
    is checked at the door: image ids and file names unique, every caption's
    image listed, the required fields of the right types; a problem is a
    ValueError naming the file, the entry and the field.
    """
    annotation_file = Path(annotation_file)
    split = split or coco_split_from_name(annotation_file)
    if image_dir is None:
        image_dir = coco_image_dir(annotation_file.resolve().parent.parent, split)
    image_dir = Path(image_dir).resolve()
    data = read_json(annotation_file, "COCO annotation file")
    if not isinstance(data, dict):
        raise ValueError(f"{annotation_file}: expected a JSON object with 'images' and 'annotations'")
    images = _require(data, "images", "the top level", annotation_file)
    annotations = _require(data, "annotations", "the top level", annotation_file)
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise ValueError(f"{annotation_file}: fields 'images' and 'annotations' must be lists")

    files, names = {}, {}
    for i, image in enumerate(images):
        image_id = _identifier(_require(image, "id", f"images[{i}]", annotation_file), f"images[{i}].id",
                               annotation_file)
        name = _require(image, "file_name", f"images[{i}]", annotation_file)
        if not isinstance(name, str):
            raise ValueError(f"{annotation_file}: images[{i}].file_name must be text, got {name!r:.60}")
        if image_id in files:
            raise ValueError(f"{annotation_file}: images[{i}].id {image_id} is listed twice (also images[{names[image_id]}])")
        if name in names:
            raise ValueError(f"{annotation_file}: images[{i}].file_name {name!r} is listed twice "
                             f"(also images[{names[name]}])")
        path = _image_path(image_dir, name, f"file name in {annotation_file} images[{i}].file_name")
        files[image_id] = (path.name, str(path))  # once per image, not once per caption
        names[image_id] = names[name] = i

    rows = []
    for i, annotation in enumerate(annotations):
        image_id = _identifier(_require(annotation, "image_id", f"annotations[{i}]", annotation_file),
                               f"annotations[{i}].image_id", annotation_file)
        caption = _require(annotation, "caption", f"annotations[{i}]", annotation_file)
        caption = "" if caption is None else caption  # counted as an empty caption by the report
        if not isinstance(caption, str):
            raise ValueError(f"{annotation_file}: annotations[{i}].caption must be text, got {type(caption).__name__}")
        if image_id not in files:
            raise ValueError(f"{annotation_file}: annotations[{i}].image_id {image_id} is not in 'images' "
                             "(a caption of no listed photo: the file is damaged or was mixed with another)")
        rows.append((image_id, *files[image_id], caption, split))
    return rows


def karpathy_rows(dataset_json, image_root):
    """The rows of Karpathy's split file (`dataset_coco.json`: train/restval/val/test).

    It names 2014 files (val2014/COCO_val2014_000000391895.jpg). Users with the
    2017 images have the same photos under 12-digit names, so when the 2014
    file is absent we look for <cocoid>.jpg in train2017/, val2017/ or images/.
    """
    data = read_json(dataset_json, "Karpathy split file")
    images = _require(data, "images", "the top level", dataset_json)
    image_root = Path(image_root).resolve()
    folders_2017 = [image_root / name for name in ("train2017", "val2017", "images")]
    rows = []
    for i, image in enumerate(images):
        where = f"images[{i}]"
        name = _require(image, "filename", where, dataset_json)
        split = _require(image, "split", where, dataset_json)
        sentences = _require(image, "sentences", where, dataset_json)
        image_id = str(image.get("cocoid", Path(name).stem))
        path = safe_join(image_root, f"{image.get('filepath', '')}/{name}".lstrip("/"),
                         source=f"file name in {dataset_json} {where}")
        if not path.is_file() and "cocoid" in image:
            for folder in folders_2017:
                candidate = folder / f"{int(image['cocoid']):012d}.jpg"
                if candidate.is_file():
                    path = candidate
                    break
        for j, sentence in enumerate(sentences):
            raw = _require(sentence, "raw", f"{where}.sentences[{j}]", dataset_json)
            rows.append((image_id, path.name, str(path), raw or "", split))
    return rows


# --- Flickr8k --------------------------------------------------------------------------

def _read_lines(path):
    """Lines of a text file, with a clear error for text that is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not valid UTF-8 text ({error.reason})") from None


def flickr8k_token_file(data_dir):
    places = ["Flickr8k.token.txt", "text/Flickr8k.token.txt", "Flickr8k_text/Flickr8k.token.txt"]
    token_file = next((data_dir / name for name in places if (data_dir / name).is_file()), None)
    if token_file is None and (data_dir / "captions.txt").is_file():
        # Kaggle's copy of Flickr8k has its own layout and no split files: it is a folder of your own.
        raise FileNotFoundError(f"{data_dir} has captions.txt, the layout of Kaggle's Flickr8k (captions.txt + "
                                "Images/), not the official Flickr8k.token.txt: use --dataset csv, which reads it")
    if token_file is None:
        raise FileNotFoundError(f"Flickr8k captions file not found in {data_dir} (looked for {', '.join(places)})")
    return token_file


def flickr8k_rows(data_dir):
    """Load Flickr8k: `Flickr8k.token.txt` (img.jpg#n<TAB>caption) + the official split files.

    Accepts the layout of the official zips (text files at the top, images in
    `Flicker8k_Dataset/`, sic) and the shared sample's (text/ and images/).
    Images listed in no split file get the split "unassigned".
    """
    data_dir = Path(data_dir).resolve()
    token_file = flickr8k_token_file(data_dir)
    image_dir = next((data_dir / name for name in ("Flicker8k_Dataset", "Flickr8k_Dataset", "images")
                      if (data_dir / name).is_dir()), data_dir / "Flicker8k_Dataset")
    splits = {}
    for split in ("train", "dev", "test"):
        split_file = token_file.parent / f"Flickr_8k.{split}Images.txt"
        if split_file.is_file():
            splits.update((line.strip(), split) for line in _read_lines(split_file) if line.strip())
    rows = []
    for number, line in enumerate(_read_lines(token_file), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_sign, _ = key.partition("#")
        if not tab or not hash_sign or not name:
            raise ValueError(f"{token_file}: line {number} is not 'image.jpg#n<TAB>caption': {line[:80]!r}")
        path = _image_path(image_dir, name, f"file name in {token_file} line {number}")
        image_id = name[: -len(".jpg")] if name.endswith(".jpg") else name
        rows.append((image_id, name, str(path), caption.strip(), splits.get(name, "unassigned")))
    return rows


# --- where the files are ----------------------------------------------------------------

def coco_annotation_files(data_dir):
    """captions_{train,val}2017*.json under DIR/annotations; the official full file wins over subsets."""
    folder = Path(data_dir) / "annotations"
    chosen = []
    for split in ("train", "val"):
        exact = folder / f"captions_{split}2017.json"
        chosen += [exact] if exact.is_file() else sorted(folder.glob(f"captions_{split}2017*.json"))[:1]
    if not chosen:
        raise FileNotFoundError(f"no COCO caption files in {folder} (expected captions_train2017.json and/or "
                                "captions_val2017.json; download them with `python -m captioning.download`)")
    return chosen
