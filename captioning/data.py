"""Caption datasets -> one pandas table, a data-quality report, and prepared files (notebook 01).

Three annotation formats end up in the same table, one row per caption:

    image_id    str   COCO: str(int id), e.g. "139"; Flickr8k: file name without .jpg
    file_name   str   e.g. "000000000139.jpg"
    image_path  str   absolute path where the image is (or would be) on disk
    caption     str   the raw caption, exactly as annotated
    split       str   the dataset's own split name ("train", "val", "dev", ...)

Every later stage (features, training, evaluation) starts from this table.
The official files' formats (COCO's JSON, Flickr8k's token and split files,
Karpathy's split) are read and checked in public_data.py, a folder of your
own photos in own_data.py; this file holds the DATASETS table that picks
between them, the quality report and the prepared files. Problems we can
repair (an empty caption, a photo not on disk) are counted in the report.
"""

import collections
import dataclasses
import hashlib
import os
from pathlib import Path

import pandas as pd

from captioning import own_data, public_data
from captioning.fileio import atomic_path, read_json, sha256_of, write_json_atomic
from captioning.public_data import coco_annotation_files, coco_image_dir, coco_split_from_name, flickr8k_token_file
from captioning.vocab import Vocabulary, clean_caption

COLUMNS = ["image_id", "file_name", "image_path", "caption", "split"]


def _table(rows, attrs=None):
    df = pd.DataFrame(rows, columns=COLUMNS).astype(str)
    df.attrs.update(attrs or {})
    return df


# --- the official files (public_data.py reads them) --------------------------------------

def load_coco(annotation_file, image_dir=None, split=None):
    """An official COCO captions file (`captions_val2017.json`) as the caption table.

    `split` defaults to the one in the file name ("val"); `image_dir` to
    DIR/<split>2017 or DIR/images beside the `annotations/` folder. The file is
    checked at the door (public_data.coco_rows): a problem is a ValueError
    naming the file, the entry and the field. Notebook 01.
    """
    return _table(public_data.coco_rows(annotation_file, image_dir, split))


def load_karpathy(dataset_json, image_root):
    """Karpathy's split file (`dataset_coco.json`: train/restval/val/test) as the caption table;
    its 2014 file names are found under the 2017 ones too (public_data.karpathy_rows). Notebook 01."""
    return _table(public_data.karpathy_rows(dataset_json, image_root))


def load_flickr8k(data_dir):
    """Flickr8k (`Flickr8k.token.txt` + the official split files) as the caption table; images
    listed in no split file get the split "unassigned" (public_data.flickr8k_rows). Notebook 01."""
    return _table(public_data.flickr8k_rows(data_dir))


# --- one entry point -------------------------------------------------------------------

def _coco_sources(data_dir, karpathy_split=None):
    """(annotation files, photo folders) that a COCO table is made from."""
    folders = [Path(data_dir) / name for name in ("train2017", "val2017", "images")]
    if karpathy_split:
        folders += [Path(data_dir) / name for name in ("train2014", "val2014")]
        return [Path(karpathy_split)], folders
    return coco_annotation_files(data_dir), folders


def _flickr8k_sources(data_dir, karpathy_split=None):
    token_file = flickr8k_token_file(Path(data_dir))
    split_files = [token_file.parent / f"Flickr_8k.{split}Images.txt" for split in ("train", "dev", "test")]
    folders = [Path(data_dir) / name for name in ("Flicker8k_Dataset", "Flickr8k_Dataset", "images")]
    return [token_file, *split_files], folders


def _load_coco(data_dir, karpathy_split=None):
    if karpathy_split:
        return load_karpathy(karpathy_split, data_dir)
    parts = [load_coco(path, coco_image_dir(data_dir, coco_split_from_name(path)))
             for path in coco_annotation_files(data_dir)]
    return pd.concat(parts, ignore_index=True)


def _load_flickr8k(data_dir, karpathy_split=None):
    if karpathy_split:
        raise ValueError("a Karpathy split file is for COCO only; Flickr8k has its own split files")
    return load_flickr8k(data_dir)


def _load_own(data_dir, karpathy_split=None):
    rows, bad_rows = own_data.load_own(data_dir, karpathy_split)
    return _table(rows, {"bad_rows": bad_rows})


@dataclasses.dataclass(frozen=True)
class Dataset:
    """What the pipeline needs to know of a dataset: how to load a folder of it, its splits,
    and which files a table of it is made from (so that a changed file is never silently reused)."""
    load: object  # (data_dir, karpathy_split=None) -> the caption table
    sources: object  # (data_dir, karpathy_split=None) -> (annotation files, photo folders)
    train_splits: tuple  # what `train` learns from and the vocabulary is built from
    validation_splits: tuple  # what early stopping watches and `evaluate` scores by default


# The table of datasets: the CLI's --dataset choices and the notebooks read it.
# COCO's "restval" exists only with Karpathy's split file (dataset_coco.json).
DATASETS = {
    "coco": Dataset(_load_coco, _coco_sources, ("train", "restval"), ("val",)),
    "flickr8k": Dataset(_load_flickr8k, _flickr8k_sources, ("train",), ("dev",)),
    "csv": Dataset(_load_own, own_data.own_sources, ("train",), ("val",)),  # your own photos: own_data.py
}


def source_fingerprint(dataset, data_dir, karpathy_split=None):
    """sha256 of what a prepared table is made from: the annotation files' bytes and the names
    of the photos on disk. prepare records it; a later run reuses prepared data only when the
    fingerprint is the same, so an edited caption file or newly downloaded photos are never missed."""
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data folder not found: {data_dir}")
    files, folders = get_dataset(dataset).sources(data_dir, karpathy_split)
    digest = hashlib.sha256()
    for path in sorted(map(Path, files)):
        if path.is_file():
            digest.update(f"{path.name}\t{sha256_of(path)}\n".encode())
    for folder in folders:
        if folder.is_dir():
            names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file())
            digest.update(f"{folder.name}\n".encode() + "\n".join(names).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def get_dataset(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(dataset, data_dir, *, karpathy_split=None, on_disk_only=False):
    """Load a dataset of the table (DATASETS) from its folder into the caption table. Notebook 01.

    With on_disk_only=True, captions of images that are not on disk are dropped
    and df.attrs["dropped_images"] says how many images that was: a classroom
    downloads a subset of COCO, but the annotations list all of it.
    """
    spec = get_dataset(dataset)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder not found: {data_dir}")
    df = spec.load(data_dir, karpathy_split)
    if on_disk_only:
        df = _keep_on_disk(df, f"{dataset} in {data_dir}")
    return df


def _keep_on_disk(df, what):
    """Drop rows whose image file is missing; one directory listing per folder, not one stat per image.
    os.path, not pathlib, on the paths: pathlib takes seconds for COCO's 123,287 images."""
    paths = pd.Series(df["image_path"].unique())
    parents, names = paths.map(os.path.dirname), paths.map(os.path.basename)
    folders = {folder: set() for folder in parents.unique()}
    for folder in folders:
        if os.path.isdir(folder):
            folders[folder] = {entry.name for entry in os.scandir(folder) if entry.is_file()}
    if folders and not any(os.path.isdir(folder) for folder in folders):
        raise FileNotFoundError(f"image folder not found: {sorted(folders)[0]} (for {what})")
    present = set(paths[[name in folders[parent] for parent, name in zip(parents, names)]])
    attrs = dict(df.attrs, annotated_images=int(df["image_id"].nunique()), annotated_captions=len(df),
                 dropped_images=len(paths) - len(present))
    df = df[df["image_path"].isin(present)].reset_index(drop=True)
    df.attrs.update(attrs)
    return df


# --- report and prepared files -----------------------------------------------------------

def _word_counts(cleaned):
    """Words in each cleaned caption (words joined by single spaces): far faster than splitting 600,000."""
    return cleaned.str.count(" ") + (cleaned != "")


def quality_report(df):
    """Counts a learner should look at before training. Notebook 01.

    Images, captions per image, empty and duplicate captions (same image, same
    cleaned text), captions with non-ASCII characters, caption lengths in words.
    Uses the table's "clean" column when it has one (prepare's), else cleans.
    """
    if df.empty:
        raise ValueError("no captions to report on (is the image folder empty?)")
    per_image = df.groupby("image_id").size()
    cleaned = df["clean"] if "clean" in df else df["caption"].map(clean_caption)
    lengths = _word_counts(cleaned)
    image_and_text = pd.DataFrame({"image": df["image_id"], "text": cleaned})[cleaned != ""]
    report = {
        "images": int(df["image_id"].nunique()),
        "captions": int(len(df)),
        "captions_per_image": {
            "min": int(per_image.min()), "max": int(per_image.max()), "mean": round(float(per_image.mean()), 3),
            "histogram": {str(k): int(v) for k, v in per_image.value_counts().sort_index().items()},
        },
        "empty_captions": int((cleaned == "").sum()),
        "duplicate_captions": int(image_and_text.duplicated().sum()),
        "non_ascii_captions": int((~df["caption"].map(str.isascii)).sum()),
        "length_words": {
            "min": int(lengths.min()), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 3),
            "median": float(lengths.median()), "p95": float(lengths.quantile(0.95)),
        },
        "images_per_split": {str(k): int(v) for k, v in df.groupby("split")["image_id"].nunique().items()},
    }
    for key in ("annotated_images", "annotated_captions", "dropped_images"):
        if key in df.attrs:
            report[key] = int(df.attrs[key])
    if "bad_rows" in df.attrs:  # a captions file of your own: rows left out, by kind, with their lines
        report["bad_rows"] = {kind: {"count": len(lines), "lines": lines[:20]} for kind, lines in df.attrs["bad_rows"].items()}
    return report


@dataclasses.dataclass
class Prepared:
    """What notebook 01 hands to notebooks 02 and 03."""
    captions: pd.DataFrame
    vocab: Vocabulary
    report: dict
    out_dir: Path


def prepare(dataset, data_dir, out_dir, *, min_count=5, max_vocab=None, max_length=20, karpathy_split=None,
            on_disk_only=True):
    """Load, clean, build the vocabulary and write captions.csv, vocabulary.json, report.json. Notebook 01.

    Captions that are empty after cleaning are dropped (and counted). The
    vocabulary is built from the training split(s) only, so that words seen
    only in val/test do not leak into the model; a folder with no training
    split (e.g. the val2017 sample) uses all its captions. report.json is
    written last and records the row count and vocabulary fingerprint, so
    `load_prepared` can tell a complete folder from an interrupted one.
    """
    fingerprint = source_fingerprint(dataset, data_dir, karpathy_split)  # before reading: what we read
    df = load_dataset(dataset, data_dir, karpathy_split=karpathy_split, on_disk_only=on_disk_only)
    if df.empty:
        where = f": none of the {df.attrs.get('annotated_images', 0):,} annotated images is on disk"
        raise ValueError(f"no captions for {dataset} in {data_dir}" + (where if on_disk_only else ""))
    attrs = dict(df.attrs)
    df = df.assign(clean=df["caption"].map(clean_caption))  # once: the report reads this column too
    df.attrs.update(attrs)
    report = quality_report(df)
    if on_disk_only:
        report["images_on_disk"] = report["images"]
    df = df[df["clean"] != ""].reset_index(drop=True)
    df.attrs.update(attrs)
    report["dropped_empty_captions"] = report["empty_captions"]
    if df.empty:
        raise ValueError(f"no usable captions for {dataset} in {data_dir}: all are empty once cleaned")
    training = df[df["split"].isin(get_dataset(dataset).train_splits)]
    source = training if len(training) else df
    vocab = Vocabulary.build(source["clean"], min_count=min_count, max_size=max_vocab, max_length=max_length)
    lengths = _word_counts(df["clean"])
    counts = collections.Counter(word for caption in source["clean"] for word in caption.split())
    words = sum(counts.values())
    report.update({
        "dataset": dataset, "data_dir": str(Path(data_dir).resolve()), "rows": int(len(df)),
        "source_fingerprint": fingerprint,
        "vocabulary": {
            "size": len(vocab), "min_count": min_count, "max_size": max_vocab, "max_length": max_length,
            "built_from_splits": sorted(source["split"].unique().tolist()),
            "fingerprint": vocab.fingerprint,
            "unknown_word_rate": round(sum(n for word, n in counts.items() if word not in vocab) / max(words, 1), 4),
            "captions_cut": int((lengths > max_length).sum()),
        },
    })
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "captions.csv") as temp:
        df.to_csv(temp, index=False)
    vocab.save(out_dir / "vocabulary.json")
    write_json_atomic(out_dir / "report.json", report)
    return Prepared(df, vocab, report, out_dir)


def load_prepared(out_dir):
    """Read back what `prepare` wrote, checking that the three files belong together. Notebook 01."""
    out_dir = Path(out_dir)
    report_file = out_dir / "report.json"
    if not report_file.is_file():
        raise FileNotFoundError(f"no prepared data in {out_dir} (report.json missing): run notebook 01 "
                                "or `python -m captioning prepare` first")
    report = read_json(report_file, "prepared-data report", kind=dict)
    vocab = Vocabulary.load(out_dir / "vocabulary.json")
    csv_file = out_dir / "captions.csv"
    if not csv_file.is_file():
        raise FileNotFoundError(f"{csv_file} missing: run `prepare` again")
    captions = pd.read_csv(csv_file, dtype=str, keep_default_na=False)
    missing = [column for column in COLUMNS + ["clean"] if column not in captions.columns]
    if missing:
        raise ValueError(f"{csv_file}: missing column(s) {missing}")
    expected = report.get("vocabulary", {}).get("fingerprint")
    if expected != vocab.fingerprint or report.get("rows") != len(captions):
        raise ValueError(f"{out_dir}: captions.csv / vocabulary.json do not match report.json "
                         "(an interrupted or mixed `prepare`): run `prepare` again")
    return Prepared(captions, vocab, report, out_dir)
