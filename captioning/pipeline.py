"""The `train` command end to end: prepared data -> feature cache -> teacher forcing ->
self-critical fine-tuning -> a saved bundle (notebook 03 does the same steps one cell
at a time; notebooks 05 and 06 call train_pipeline for their experiments).

Every stage caches: the prepared table and the features are reused by the next
run when they were made from the same data with the same settings, so training
a second architecture (notebook 05) or a second seed costs the training only.
"""

import time
from pathlib import Path

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

from captioning.models import build_captioner  # noqa: E402
from captioning.training import (MODEL_KEYS, fit_captioner, gather_features, make_dataset,  # noqa: E402
                                 preset_settings)


def split_names(dataset, karpathy_split=None):
    """(training splits, validation splits) for each dataset's official splits."""
    if dataset == "flickr8k":
        return ("train",), ("dev",)
    if dataset == "coco":
        return (("train", "restval"), ("val",)) if karpathy_split else (("train",), ("val",))
    raise ValueError(f"dataset must be 'coco' or 'flickr8k', got {dataset!r}")


def _prepared_data(dataset, data_dir, prepared_dir, settings, karpathy_split, log):
    """Reuse the prepared folder when it was made from the same data with the same settings."""
    from captioning.data import load_prepared, prepare
    wanted = {"dataset": dataset, "data_dir": str(Path(data_dir).resolve()),
              "min_count": settings["min_count"], "max_length": settings["max_length"],
              "karpathy": bool(karpathy_split)}
    try:
        prepared = load_prepared(prepared_dir)
        report, vocab_report = prepared.report, prepared.report.get("vocabulary", {})
        found = {"dataset": report.get("dataset"), "data_dir": report.get("data_dir"),
                 "min_count": vocab_report.get("min_count"), "max_length": vocab_report.get("max_length"),
                 "karpathy": "restval" in set(prepared.captions["split"])}
        if found == wanted:
            log(f"reusing prepared data in {prepared_dir}")
            return prepared
        log(f"prepared data in {prepared_dir} has other settings ({found}); preparing again")
    except (FileNotFoundError, ValueError):
        pass
    log(f"preparing {dataset} from {data_dir} into {prepared_dir}")
    return prepare(dataset, data_dir, prepared_dir, min_count=settings["min_count"],
                   max_length=settings["max_length"], karpathy_split=karpathy_split)


def _feature_store(captions, features_dir, encoder, weights, log, pooling="avg"):
    """The feature cache of every image in the table. cache_features returns at once when
    the cache already holds exactly these images with this encoder, and resumes a
    half-finished one."""
    from captioning.features import FeatureStore, cache_features
    images = captions.drop_duplicates("image_id")[["image_id", "image_path"]]
    log(f"feature cache: {features_dir} ({len(images)} images, {encoder})")
    report = cache_features(images, features_dir, encoder=encoder, weights=weights, pooling=pooling)
    if report.skipped:
        log(f"  {len(report.skipped)} unreadable image(s) skipped, e.g. {report.skipped[0][1]}: "
            f"{report.skipped[0][2]}")
    return FeatureStore.open(features_dir)


def caption_arrays(captions, splits, store, vocab):
    """(features, rows, sequences) for make_dataset: the captions of `splits` whose
    image is in the feature store, encoded with `vocab` (notebook 03)."""
    part = captions[captions["split"].isin(splits) & captions["image_id"].isin(set(store.ids))]
    features, rows = gather_features(store, part["image_id"].tolist())
    return features, rows, vocab.encode_batch(part["clean"].tolist())


def history_metrics(history, seconds=None):
    """The numbers bundle.json keeps: epochs run, the best epoch and its metrics."""
    logs = history.history
    metrics = {"epochs_run": len(logs.get("loss", []))}
    if seconds is not None:
        metrics["training_seconds"] = round(seconds, 1)
    monitor = "val_loss" if logs.get("val_loss") else "loss"
    if logs.get(monitor):
        best = int(np.argmin(logs[monitor]))
        metrics["best_epoch"] = best + 1
        metrics.update({name: round(float(values[best]), 4) for name, values in logs.items()})
    return metrics


def bundle_settings(arch, dataset, store, settings, metrics, **extra):
    """bundle.json's fields: the encoder's identity comes from the feature cache's manifest,
    so that `caption` encodes new photos exactly as the training images were."""
    manifest = store.manifest
    return {"arch": arch, "dataset": dataset, "encoder": manifest["encoder"], "weights": manifest["weights"],
            "weights_id": manifest["weights_id"], "pooling": manifest.get("pooling", "avg"),
            "image_size": manifest.get("image_size"), "mirror": manifest.get("mirror", False),
            "training": settings, "metrics": metrics,
            "decoding": {"length_alpha": settings["length_alpha"], "no_repeat_ngram": settings["no_repeat_ngram"],
                         "guidance": settings["guidance"]},
            **extra}


def _self_critical_phase(model, prepared, store, splits, settings, epochs, seed, log):
    """Fine-tune on CIDEr-D after teacher forcing (self_critical.py); an explicit `epochs` caps it too."""
    from captioning.self_critical import references_by_image, self_critical
    rounds = settings["self_critical_epochs"] if epochs is None else min(epochs, settings["self_critical_epochs"])
    train = references_by_image(prepared.captions, splits[0], store)
    val = references_by_image(prepared.captions, splits[1], store)
    return self_critical(model, prepared.vocab, *train, *val, epochs=rounds, seed=seed, log=log,
                         learning_rate=settings["self_critical_learning_rate"], batch_size=settings["batch_size"],
                         length_alpha=settings["length_alpha"], no_repeat_ngram=settings["no_repeat_ngram"],
                         average_last=settings["self_critical_average"])


def train_pipeline(dataset, data_dir, *, encoder, weights, arch, out_dir, epochs=None, preset="cpu-small",
                   cache_dir=None, karpathy_split=None, seed=0, strategy=None, log=print, **overrides):
    """Prepare, cache features, train and save a bundle; what `python -m captioning train` runs.

    Flickr8k trains on the official train split and early-stops on dev; COCO
    on train2017 / val2017, or Karpathy's train+restval / val with karpathy_split.
    Prepared data and features are cached under cache_dir (default data/work)
    and reused by the next run. Returns the bundle folder. Notebook 03.
    arch="attention" trains on the spatial grids (pooling "none", their own cache folder; notebook 06).
    """
    from captioning.bundle import save_bundle
    from captioning.fileio import work_paths
    settings = preset_settings(preset, epochs=epochs, **overrides)
    pooling = "none" if arch == "attention" else "avg"  # attention looks at the grid
    paths = work_paths(cache_dir or "data/work", dataset, encoder=encoder, pooling=pooling)
    prepared = _prepared_data(dataset, data_dir, paths["prepared"], settings, karpathy_split, log)
    store = _feature_store(prepared.captions, paths["features"], encoder, weights, log,
                           pooling=None if pooling == "none" else pooling)

    train_splits, val_splits = split_names(dataset, karpathy_split)
    train_arrays = caption_arrays(prepared.captions, train_splits, store, prepared.vocab)
    val_arrays = caption_arrays(prepared.captions, val_splits, store, prepared.vocab)
    if len(train_arrays[1]) == 0:
        raise ValueError(f"{prepared.out_dir}: no {'/'.join(train_splits)} captions with cached features")
    log(f"training on {len(train_arrays[1])} captions, validating on {len(val_arrays[1])} "
        f"({'/'.join(val_splits)}); vocabulary {len(prepared.vocab)} words")

    keras.utils.set_random_seed(seed)
    batch = settings["batch_size"]
    train_data = make_dataset(*train_arrays, batch_size=batch, seed=seed)
    val_data = make_dataset(*val_arrays, batch_size=batch, shuffle=False) if len(val_arrays[1]) else None
    with (strategy or tf.distribute.get_strategy()).scope():
        model = build_captioner(arch, vocab_size=len(prepared.vocab), feature_dim=store.feature_shape[-1],
                                grid_shape=store.feature_shape[:-1], max_length=prepared.vocab.max_length,
                                **{key: settings[key] for key in MODEL_KEYS})
    out_dir = Path(out_dir)
    run_dir = out_dir / "training"
    started = time.perf_counter()
    history = fit_captioner(model, train_data, val_data, epochs=settings["epochs"],
                            learning_rate=settings["learning_rate"], label_smoothing=settings["label_smoothing"],
                            patience=settings["patience"], run_dir=run_dir)
    metrics = history_metrics(history, time.perf_counter() - started)
    if settings["self_critical_epochs"] and len(val_arrays[1]):
        metrics["self_critical"] = _self_critical_phase(model, prepared, store, (train_splits, val_splits),
                                                        settings, epochs, seed, log)
    save_bundle(out_dir, model, prepared.vocab, bundle_settings(
        arch, dataset, store, settings, metrics, preset=preset, seed=seed,
        train_splits=list(train_splits), validation_splits=list(val_splits)))
    (run_dir / "best.keras").unlink(missing_ok=True)  # the bundle's model.keras holds the same weights
    log(f"bundle written to {out_dir} ({metrics})")
    return out_dir
