"""Evaluate a trained bundle on a held-out split: caption every image, score, write the run's files.

Taught in notebook 05_evaluation.ipynb and run by `python -m captioning evaluate`.
The metrics themselves live in `captioning.evaluation`; this module is the
plumbing around them: which images, which features, which references, and the
two files a run leaves behind:

    metrics.json    the scores, the diversity numbers and the settings of the run
    captions.json   one entry per image: id, file, generated caption, its
                    references and its own scores (to find the best and worst)

Both are written atomically, so an interrupted evaluation never leaves a
half-written file that a later notebook would read as a result.
"""

import sys
import time
from pathlib import Path

from captioning.evaluation import bleu_scores, bootstrap_intervals, coco_scores_per_image, diversity
from captioning.fileio import work_paths, write_json_atomic

# Captioning in chunks keeps beam search's working memory (chunk x beam x vocabulary
# log-probabilities) small on a full 5,000-image COCO split.
CHUNK = 500
TRAINING_SPLITS = ("train", "restval")  # for bundles that do not record their training splits


def _split_images(df, dataset, data_dir, split):
    """{image id: (file name, absolute path)} and {image id: [raw references]} of one split."""
    rows = df[df["split"] == split]
    if rows.empty:
        available = sorted(df["split"].unique())
        raise ValueError(f"split {split!r} has no images on disk for {dataset} in {data_dir} "
                         f"(splits with images: {', '.join(available) or 'none'})")
    images, references = {}, {}
    for row in rows.itertuples(index=False):
        images[row.image_id] = (row.file_name, row.image_path)
        references.setdefault(row.image_id, []).append(row.caption)
    return images, references


def _features(captioner, df, images, dataset, cache_dir):
    """Features of the split's images from the shared cache, filling the cache first if it lacks some.

    The cache folder is the one `train` and notebook 02 use, so a split that was
    cached before costs nothing. A cache holds exactly the images it was last
    asked for, so when images are missing we ask for every image of the dataset
    on disk (as `train` does), never for this split alone, which would replace
    the training features. Unreadable images are reported, not fatal.
    """
    from captioning.features import FeatureStore, cache_features

    settings = captioner.settings
    folder = work_paths(cache_dir, dataset, settings["encoder"], settings.get("pooling") or "none")["features"]
    try:
        store = FeatureStore.open(folder)
        unreadable = {image_id for image_id, _, _ in store.skipped}
        missing = [image_id for image_id in images if image_id not in store and image_id not in unreadable]
    except (FileNotFoundError, ValueError):
        missing = list(images)
    if missing:
        print(f"caching {settings['encoder']} features into {folder} ({len(missing)} images of "
              "the split were not cached)", file=sys.stderr)
        cache_features(df[["image_id", "image_path"]], folder, encoder=settings["encoder"],
                       weights=settings["weights"], pooling=settings.get("pooling"),
                       mirror=settings.get("mirror", False), progress=False)
        store = FeatureStore.open(folder)
    _check_same_encoder(store, settings, folder)
    skipped = [{"id": image_id, "path": path, "reason": reason}
               for image_id, path, reason in store.skipped if image_id in images]
    ids = [image_id for image_id in images if image_id in store]
    return ids, store.get_many(ids), skipped


def _check_same_encoder(store, settings, folder):
    """Features from other CNN weights than the bundle was trained on give fluent
    nonsense, silently: refuse them. Mirrored and plain features differ less, but
    still differ from what the model learned on: refuse those too."""
    cached, trained = store.manifest.get("weights_id"), settings.get("weights_id")
    if cached and trained and cached != trained:
        raise ValueError(f"{folder}: features were cached with weights {cached!r} but the bundle was trained "
                         f"on features from {trained!r}; pass another --cache-dir or delete that cache")
    cached, trained = bool(store.manifest.get("mirror", False)), bool(settings.get("mirror", False))
    if cached != trained:
        raise ValueError(f"{folder}: features were cached with mirror={cached} but the bundle was trained on "
                         f"features with mirror={trained} (bundle.json field 'mirror'); pass another "
                         "--cache-dir or delete that cache")


def evaluate_bundle(bundle_dir, dataset, data_dir, split, *, beam_width=3, out_dir=None, cache_dir=None,
                    karpathy_split=None, meteor=True):
    """Caption the `split` images of `dataset` with the bundle and score them (notebook 05).

    References: every caption of each image in `load_dataset(dataset, data_dir)`
    (images not on disk are left out); for COCO, `karpathy_split` (the path of
    dataset_coco.json) gives Karpathy's train/restval/val/test splits. Features: the cache under
    `work_paths(cache_dir, dataset, encoder, pooling)["features"]` (default
    cache_dir: data/work), extended with any image it lacks. Decoding: beam
    search of width `beam_width`. Writes metrics.json and captions.json into
    `out_dir` (default: BUNDLE/eval-SPLIT) and returns the metrics dict.
    """
    from captioning.bundle import Captioner
    from captioning.data import load_dataset

    start = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    if not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam width must be a positive integer, got {beam_width!r}")
    captioner = Captioner.load(bundle_dir)
    settings = captioner.settings
    if settings.get("dataset") not in (None, dataset):
        print(f"note: {bundle_dir} was trained on {settings['dataset']}, evaluated here on {dataset}",
              file=sys.stderr)
    df = load_dataset(dataset, data_dir, karpathy_split=karpathy_split, on_disk_only=True)
    images, raw_references = _split_images(df, dataset, data_dir, split)
    ids, features, skipped = _features(captioner, df, images, dataset, cache_dir or "data/work")
    if not ids:
        raise ValueError(f"none of the {len(images)} {split!r} images could be read: {skipped[:3]}")

    generated = []
    for first in range(0, len(ids), CHUNK):
        generated += captioner.caption_features(features[first:first + CHUNK], beam_width=beam_width)
    hypotheses = dict(zip(ids, generated))
    references = {image_id: raw_references[image_id] for image_id in ids}
    training = df.loc[df["split"].isin(settings.get("train_splits") or TRAINING_SPLITS), "caption"]

    coco, per_image = coco_scores_per_image(references, hypotheses, meteor=meteor)
    metrics = {
        "bundle": str(bundle_dir), "arch": settings.get("arch"), "dataset": dataset, "split": split,
        "encoder": settings.get("encoder"), "beam_width": beam_width,
        "karpathy_split": str(karpathy_split) if karpathy_split else None,
        "images": len(ids), "skipped_images": skipped,
        "coco": coco, "bleu_nltk": bleu_scores(references, hypotheses),
        "intervals": bootstrap_intervals(references, hypotheses,
                                         cider_per_image={key: value["CIDEr"] for key, value in per_image.items()}),
        "diversity": diversity(hypotheses, training),
        "tokenization": "captioning.vocab.clean_caption, space-joined, for nltk and the COCO toolkit alike",
    }
    metrics["seconds"] = round(time.perf_counter() - start, 2)

    out_dir = Path(out_dir) if out_dir else bundle_dir / f"eval-{split}"
    captions = [
        {"id": image_id, "file": images[image_id][0], "path": str(images[image_id][1]),
         "caption": hypotheses[image_id], "references": references[image_id], "scores": per_image[image_id]}
        for image_id in ids
    ]
    write_json_atomic(out_dir / "captions.json", captions)
    write_json_atomic(out_dir / "metrics.json", metrics)
    metrics["out_dir"] = str(out_dir)
    return metrics
