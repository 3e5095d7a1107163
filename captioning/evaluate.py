"""The `evaluate` command: a bundle scored on a split; notebook 05.

    evaluate_bundle   a bundle + a held-out split -> captions, scores,
                      metrics.json and captions.json

Notebooks 05 and 06 call it for their experiments. It reads features from the
same cache `train` fills (fileio.work_paths), so a split cached before costs
the captioning only.
"""

import sys
import time
from pathlib import Path

from captioning import encoders
from captioning.data import load_dataset
from captioning.evaluation import (bleu_scores, bootstrap_intervals, coco_scores_per_image, diversity,
                                  same_caption_warning)
from captioning.features import FeatureStore, cache_features
from captioning.fileio import atomic_path, work_paths, writable_folder, write_json_atomic
from captioning.pipeline import CHUNK


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


def _evaluation_features(captioner, df, images, dataset, cache_dir):
    """Features of the split's images from the shared cache, filling the cache first if it lacks some.

    The cache folder is the one `train` and notebook 02 use, so a split that was
    cached before costs nothing. A cache holds exactly the images it was last
    asked for, so when images are missing we ask for every image of the dataset
    on disk (as `train` does), never for this split alone, which would replace
    the training features. Unreadable images are reported, not fatal. Features
    made by another encoder than the bundle's give fluent nonsense, silently:
    they are refused.
    """
    trained = captioner.settings["encoder"]
    folder = work_paths(cache_dir, dataset, trained["encoder"], trained["pooling"])["features"]
    try:
        store = FeatureStore.open(folder)
        unreadable = {image_id for image_id, _, _ in store.skipped}
        missing = [image_id for image_id in images if image_id not in store and image_id not in unreadable]
    except (FileNotFoundError, ValueError):
        missing = list(images)
    if missing:
        print(f"caching {trained['encoder']} features into {folder} ({len(missing)} images of "
              "the split were not cached)", file=sys.stderr)
        encoder = encoders.build_encoder_like(trained, where=f"{captioner.bundle_dir}/bundle.json field 'encoder'")
        cache_features(df[["image_id", "image_path"]], folder, encoder=encoder, progress=False)
    store = FeatureStore.open(folder, expect=trained)
    skipped = [{"id": image_id, "path": path, "reason": reason}
               for image_id, path, reason in store.skipped if image_id in images]
    ids = [image_id for image_id in images if image_id in store]
    return ids, store.get_many(ids), skipped


def evaluate_bundle(bundle_dir, dataset, data_dir, split, *, beam_width=3, out_dir=None, cache_dir=None,
                    karpathy_split=None, meteor=True):
    """Caption the `split` images of `dataset` with the bundle and score them; `evaluate` (notebook 05).

    References: every caption of each image on disk in `load_dataset(dataset,
    data_dir)`. Features: the shared cache under cache_dir (default data/work),
    extended with any image it lacks. Decoding: beam search of width
    `beam_width`. Writes metrics.json (scores, bootstrap intervals, diversity,
    settings) and captions.json (per image: caption, references, own scores)
    into `out_dir` (default: BUNDLE/eval-SPLIT), atomically, and returns the metrics.
    """
    from captioning.bundle import Captioner

    start = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    if not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam width must be a positive integer, got {beam_width!r}")
    out_dir = writable_folder(out_dir if out_dir else bundle_dir / f"eval-{split}", "--out folder")
    captioner = Captioner.load(bundle_dir)
    settings = captioner.settings
    if settings["dataset"] != dataset:
        print(f"note: {bundle_dir} was trained on {settings['dataset']}, evaluated here on {dataset}", file=sys.stderr)
    df = load_dataset(dataset, data_dir, karpathy_split=karpathy_split, on_disk_only=True)
    images, raw_references = _split_images(df, dataset, data_dir, split)
    ids, features, skipped = _evaluation_features(captioner, df, images, dataset, cache_dir or "data/work")
    if not ids:
        raise ValueError(f"none of the {len(images)} {split!r} images could be read: {skipped[:3]}")

    generated = []
    for first in range(0, len(ids), CHUNK):
        generated += captioner.caption_features(features[first:first + CHUNK], beam_width=beam_width)
    hypotheses = dict(zip(ids, generated))
    references = {image_id: raw_references[image_id] for image_id in ids}
    training = df.loc[df["split"].isin(settings["train_splits"]), "caption"]

    warning = same_caption_warning(generated)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    coco, per_image = coco_scores_per_image(references, hypotheses, meteor=meteor)
    metrics = {
        "bundle": str(bundle_dir), "arch": settings["arch"], "dataset": dataset, "split": split,
        "encoder": settings["encoder"]["encoder"], "beam_width": beam_width,
        "karpathy_split": str(karpathy_split) if karpathy_split else None,
        "images": len(ids), "skipped_images": skipped,
        "coco": coco, "bleu_nltk": bleu_scores(references, hypotheses),
        "intervals": bootstrap_intervals(references, hypotheses,
                                         cider_per_image={key: value["CIDEr"] for key, value in per_image.items()}),
        "diversity": diversity(hypotheses, training),
        "warnings": [warning] if warning else [],
        "tokenization": "captioning.vocab.clean_caption, space-joined, for nltk and the COCO toolkit alike",
    }
    metrics["seconds"] = round(time.perf_counter() - start, 2)

    captions = [
        {"id": image_id, "file": images[image_id][0], "path": str(images[image_id][1]),
         "caption": hypotheses[image_id], "references": references[image_id], "scores": per_image[image_id]}
        for image_id in ids
    ]
    # Both complete under temporary names before either replaces an earlier run's file.
    with atomic_path(out_dir / "metrics.json") as metrics_temp, atomic_path(out_dir / "captions.json") as captions_temp:
        write_json_atomic(captions_temp, captions)
        write_json_atomic(metrics_temp, metrics)
    metrics["out_dir"] = str(out_dir)
    return metrics
