"""The `train` command end to end (notebook 03).

    train_pipeline    prepared data -> feature cache -> teacher forcing ->
                      self-critical fine-tuning -> a saved bundle

Notebook 03 does the training steps one cell at a time; notebooks 05 and 06
call train_pipeline for their experiments (evaluate.py scores the bundles).
Every stage caches: the prepared table and the features are reused by the next
run when they were made from the same data with the same settings, so training
a second architecture or a second seed costs the training only, and evaluating
costs the captioning only.
"""

import shutil
import sys
import time
from pathlib import Path

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

from captioning import architectures, encoders  # noqa: E402
from captioning.data import get_dataset, load_prepared, prepare, source_fingerprint  # noqa: E402
from captioning.evaluation import same_caption_warning  # noqa: E402
from captioning.features import FeatureStore, cache_features  # noqa: E402
from captioning.fileio import (folder_lock, left_out_rows, read_json, replace_folder, restore_folder, work_paths,  # noqa: E402
                               save_atomically, writable_folder, write_json_atomic)
from captioning.runs import keep_teacher_forced, run_identity, take_teacher_forced, teacher_forced_folder  # noqa: E402
from captioning.training import MODEL_KEYS, fit_captioner, make_dataset, preset_settings, read_history  # noqa: E402

# Captioning in chunks keeps beam search's working memory (chunk x beam x vocabulary
# log-probabilities) small on a full 5,000-image COCO split.
CHUNK = 500


def _prepared_data(dataset, data_dir, prepared_dir, settings, karpathy_split, log):
    """The prepared data, and a note of the rows its captions file lost, as `prepare` prints it."""
    prepared = _prepare_or_reuse(dataset, data_dir, prepared_dir, settings, karpathy_split, log)
    for line in left_out_rows(prepared.report):
        print(f"note: {data_dir}: {line}", file=sys.stderr)
    return prepared


def _prepare_or_reuse(dataset, data_dir, prepared_dir, settings, karpathy_split, log):
    """Reuse the prepared folder when it was made from the same data with the same settings."""
    wanted = {"dataset": dataset, "data_dir": str(Path(data_dir).resolve()),
              "min_count": settings["min_count"], "max_length": settings["max_length"],
              "source_fingerprint": source_fingerprint(dataset, data_dir, karpathy_split)}
    try:
        prepared = load_prepared(prepared_dir)
        report, vocab_report = prepared.report, prepared.report.get("vocabulary", {})
        found = {"dataset": report.get("dataset"), "data_dir": report.get("data_dir"),
                 "min_count": vocab_report.get("min_count"), "max_length": vocab_report.get("max_length"),
                 "source_fingerprint": report.get("source_fingerprint")}
        if found == wanted:
            log(f"reusing prepared data in {prepared_dir}")
            return prepared
        changed = [key for key in wanted if found[key] != wanted[key]]
        log(f"prepared data in {prepared_dir} differs in {', '.join(changed)}"
            + (" (the annotation files or the photos on disk changed)" if "source_fingerprint" in changed else "")
            + ": preparing again")
    except (FileNotFoundError, ValueError):
        pass
    log(f"preparing {dataset} from {data_dir} into {prepared_dir}")
    return prepare(dataset, data_dir, prepared_dir, min_count=settings["min_count"],
                   max_length=settings["max_length"], karpathy_split=karpathy_split)


def _feature_store(images, features_dir, encoder, weights, pooling, log):
    """The feature cache of every image in the table. cache_features returns at once when
    the cache already holds exactly these images with this encoder, and resumes a
    half-finished one."""
    images = images.drop_duplicates("image_id")[["image_id", "image_path"]]
    log(f"feature cache: {features_dir} ({len(images)} images, {encoder})")
    report = cache_features(images, features_dir, encoder=encoder, weights=weights, pooling=pooling, progress=False)
    if report.skipped:
        log(f"  {len(report.skipped)} unreadable image(s) skipped, e.g. {report.skipped[0][1]}: "
            f"{report.skipped[0][2]}")
    if report.warning():
        print(f"warning: {report.warning()}", file=sys.stderr)
    return FeatureStore.open(features_dir)


def prepared_settings(cache_dir, dataset):
    """{min_count, max_length} of the prepared data in the work folder: what notebook 01 chose.
    Notebooks 03, 05 and 06 pass them on to the preset, so that a change made in notebook 01 is
    trained with, not prepared over again with the preset's values. {} when nothing is prepared."""
    try:
        vocabulary = load_prepared(work_paths(cache_dir, dataset)["prepared"]).report.get("vocabulary", {})
    except (FileNotFoundError, ValueError):
        return {}
    return {key: vocabulary[key] for key in ("min_count", "max_length") if vocabulary.get(key) is not None}


def caption_arrays(captions, splits, store, vocab):
    """(store, rows, sequences) for make_dataset: the captions of `splits` whose image is in
    the feature store, each with its image's row in the store, encoded with `vocab`
    (notebook 03). The features stay on disk: make_dataset reads each batch's rows."""
    part = captions[captions["split"].isin(splits) & captions["image_id"].isin(set(store.ids))]
    return store, store.rows(part["image_id"]), vocab.encode_batch(part["clean"].tolist())


def history_metrics(history, seconds=None):
    """The numbers bundle.json keeps: epochs run, the best epoch and its metrics, from a
    keras History or a run's complete log ({metric: [values]}, training.read_history)."""
    logs = getattr(history, "history", history)
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
    """bundle.json's fields. The encoder's identity comes from the feature cache's manifest,
    so that `caption` encodes new photos exactly as the training photos were."""
    encoder = {key: store.manifest[key] for key in ("weights", *encoders.IDENTITY)}
    return {"arch": arch, "dataset": dataset, "encoder": encoder, "training": settings, "metrics": metrics,
            "decoding": {"length_alpha": settings["length_alpha"], "no_repeat_ngram": settings["no_repeat_ngram"]},
            **extra}


def distinct_captions(model, vocab, val_arrays, settings, log):
    """Caption the validation photos once and say how many different captions that gave: a
    model that says the same thing about every photo is caught here, not by a user later
    (notebook 03). Returns {"photos": N, "distinct": M} for bundle.json."""
    from captioning.architectures import make_step_decoder
    from captioning.decoding import beam_search
    store, rows, _ = val_arrays
    features = store.get_many([store.ids[row] for row in np.unique(rows)[:CHUNK]])
    if not len(features):
        return None
    results = beam_search(make_step_decoder(model), features, start_id=vocab.start_id, end_id=vocab.end_id,
                          max_length=vocab.max_length, beam_width=3, banned_ids=[vocab.unk_id],
                          length_alpha=settings["length_alpha"], no_repeat_ngram=settings["no_repeat_ngram"])
    captions = [vocab.decode(hypotheses[0].ids) for hypotheses in results]
    log(f"{len(set(captions))} different captions for {len(captions)} validation photos")
    warning = same_caption_warning(captions)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return {"photos": len(captions), "distinct": len(set(captions))}


def self_critical_recipe(settings, epochs=None):
    """The arguments of `self_critical` that come from a preset's settings, as `train` passes
    them (notebook 03 passes the same): the preset's fine-tuning epochs, capped by an explicit
    teacher-forcing `epochs` (a quick run stays quick), its learning rate, batch size and length
    buckets, the decoding the validation captions are written with, and how many epochs' weights
    to average."""
    rounds = settings["self_critical_epochs"] if epochs is None else min(epochs, settings["self_critical_epochs"])
    return {"epochs": rounds, "learning_rate": settings["self_critical_learning_rate"],
            "batch_size": settings["batch_size"], "bucket_width": settings["bucket_width"],
            "length_alpha": settings["length_alpha"], "no_repeat_ngram": settings["no_repeat_ngram"],
            "average_last": settings["self_critical_average"]}


def _self_critical_phase(model, prepared, store, splits, settings, epochs, seed, log):
    """Fine-tune on CIDEr-D after teacher forcing (self_critical.py)."""
    from captioning.self_critical import references_by_image, self_critical
    train = references_by_image(prepared.captions, splits[0], store)
    val = references_by_image(prepared.captions, splits[1], store)
    return self_critical(model, prepared.vocab, *train, *val, seed=seed, log=log,
                         **self_critical_recipe(settings, epochs))


# What `train` writes into a bundle folder (`evaluate` adds eval-SPLIT folders).
BUNDLE_ENTRIES = {"bundle.json", "model.keras", "vocabulary.json", "training"}


def _bundle_folder(out_dir, overwrite):
    """Check --out before any work: a folder for a new bundle, or a trained bundle with overwrite."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")  # this run's work; a rerun resumes from it
    restore_folder(out_dir, replacement_done=staging / "bundle.json")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is a file: choose a folder for the bundle")
    if (out_dir / "bundle.json").is_file():
        # --overwrite replaces the whole folder: refuse one that holds anything a bundle does not
        # (the user's own files beside a bundle.json), which the replacement would delete.
        foreign = sorted(path.name for path in out_dir.iterdir() if path.name not in BUNDLE_ENTRIES
                         and not (path.is_dir() and path.name.startswith("eval-")))
        if foreign:
            raise ValueError(f"{out_dir} holds files that are not part of a bundle ({', '.join(foreign[:3])}"
                             f"{' ...' if len(foreign) > 3 else ''}): choose another output folder, or move them")
        if not overwrite:
            raise ValueError(f"{out_dir} holds a trained bundle: choose another output folder, or pass --overwrite "
                             "(overwrite=True) to replace it once the new one is complete")
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty and holds no bundle: choose a new or empty folder for the bundle")
    return out_dir, writable_folder(staging, "output folder")


def _worker_id(strategy):
    """None for a single process or a cluster's chief (it writes the bundle); else this worker's
    task id. Without a "chief" in TF_CONFIG, worker 0 is the chief, as TensorFlow has it."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief" or (not has_chief and resolver.task_id == 0):
        return None
    return f"{resolver.task_type}-{resolver.task_id}"


def _same_run_or_start_over(run_dir, run, log):
    """An interrupted run resumes only into a run of the very same settings and data."""
    marker = run_dir / "run.json"
    if marker.is_file() and read_json(marker, "interrupted run's settings") != run:
        log(f"{run_dir} holds an interrupted run with other settings or data: starting over")
        shutil.rmtree(run_dir, ignore_errors=True)
    write_json_atomic(marker, run)


def _teacher_forcing(model, train_data, val_data, settings, run_dir, log, started, kept=None, take_kept=False):
    """Fit by teacher forcing, or take the weights an earlier, interrupted run finished with, or
    (take_kept) the model an earlier run with the same teacher forcing kept in `kept`.
    Returns {"seconds", "steps", "history"} of the whole teacher forcing, the runs it resumed
    included (a run resumed after teacher forcing used to report the time it took to load the weights)."""
    finished, record = run_dir / "teacher_forced.weights.h5", run_dir / "teacher_forced.json"
    if finished.is_file():
        log(f"teacher forcing finished in an earlier run ({finished}): going on from its weights")
        model.load_weights(finished)
        done = read_json(record, "teacher forcing's record", kind=dict) if record.is_file() else {
            "seconds": time.perf_counter() - started}  # a run of an older version kept no record
        return dict(done, history=read_history(run_dir))
    done = take_teacher_forced(kept, model) if kept is not None and take_kept else None
    if done is not None:
        log(f"teacher forcing: taking the model kept in {kept} (trained before with the same settings and data)")
        return done
    history = fit_captioner(model, train_data, val_data, epochs=settings["epochs"],
                            learning_rate=settings["learning_rate"], label_smoothing=settings["label_smoothing"],
                            patience=settings["patience"], run_dir=run_dir)
    done = {"seconds": history.seconds if history.seconds is not None else time.perf_counter() - started,
            "steps": int(model.optimizer.iterations.numpy())}  # a MirroredVariable under a strategy
    write_json_atomic(record, done)
    save_atomically(finished, model.save_weights, ".weights.h5")  # a full disk leaves no half file
    done["history"] = read_history(run_dir)
    if kept is not None:
        try:
            keep_teacher_forced(kept, model, done)
        except OSError as error:  # keeping only saves later runs time: this run goes on without it
            print(f"note: could not keep the teacher-forced model in {kept} ({error.strerror or error}): "
                  "later runs with the same teacher forcing will train it again", file=sys.stderr)
    return done


def train_pipeline(dataset, data_dir, *, encoder, weights, arch, out_dir, epochs=None, preset="cpu-small",
                   cache_dir=None, karpathy_split=None, seed=0, strategy=None, overwrite=False, reuse=False,
                   log=print, **overrides):
    """Prepare, cache features, train and save a bundle; what `python -m captioning train` runs.

    Trains on the dataset's training splits and early-stops on its validation
    splits (data.DATASETS). Prepared data and features are cached under
    cache_dir (default data/work) and reused by the next run; an architecture
    that reads grids (attention, notebook 06) has its own feature cache. The
    run works in OUT.partial and moves the finished bundle to `out_dir`; a
    trained bundle there is replaced only with overwrite=True, and only then.
    An interrupted run, run again, resumes. With reuse=True, a bundle in
    `out_dir` that this very run made (same architecture, settings, seed,
    data, vocabulary and features: bundle.json "run") is returned as it is,
    in seconds: a notebook cell run again retrains only what changed. Two
    runs into one `out_dir` at once would share OUT.partial and undo each
    other's work: the second is refused (fileio.folder_lock).
    Returns the bundle folder. Notebook 03.
    """
    worker = _worker_id(strategy)
    options = dict(encoder=encoder, weights=weights, arch=arch, out_dir=out_dir, epochs=epochs, preset=preset,
                   cache_dir=cache_dir, karpathy_split=karpathy_split, seed=seed, strategy=strategy,
                   overwrite=overwrite, reuse=reuse, log=log, **overrides)
    if worker is not None:  # a cluster's other workers write no bundle, only their own scratch folders
        return _train_pipeline(dataset, data_dir, worker, **options)
    with folder_lock(out_dir, log=lambda line: print(line, file=sys.stderr)):
        return _train_pipeline(dataset, data_dir, worker, **options)


def _train_pipeline(dataset, data_dir, worker, *, encoder, weights, arch, out_dir, epochs, preset, cache_dir,
                    karpathy_split, seed, strategy, overwrite, reuse, log, **overrides):
    """train_pipeline's work, once this process holds `out_dir` (or is not the chief)."""
    from captioning.bundle import save_bundle
    settings = preset_settings(preset, epochs=epochs, **overrides)
    pooling = architectures.pooling(arch)
    if worker is None:
        out_dir, staging = _bundle_folder(out_dir, overwrite or reuse)
    else:  # another worker of a cluster: same work, its own scratch folder, the chief writes the bundle
        out_dir = Path(out_dir)
        staging = writable_folder(out_dir.with_name(f"{out_dir.name}.worker-{worker}.partial"), "output folder")
    paths = work_paths(cache_dir or "data/work", dataset, encoder=encoder, pooling=pooling or "none")
    prepared = _prepared_data(dataset, data_dir, paths["prepared"], settings, karpathy_split, log)
    store = _feature_store(prepared.captions, paths["features"], encoder, weights, pooling, log)

    spec = get_dataset(dataset)
    train_splits, val_splits = spec.train_splits, spec.validation_splits
    train_arrays = caption_arrays(prepared.captions, train_splits, store, prepared.vocab)
    val_arrays = caption_arrays(prepared.captions, val_splits, store, prepared.vocab)
    if len(train_arrays[1]) == 0:
        raise ValueError(f"{prepared.out_dir}: no {'/'.join(train_splits)} captions with cached features")
    log(f"training on {len(train_arrays[1])} captions, validating on {len(val_arrays[1])} "
        f"({'/'.join(val_splits)}); vocabulary {len(prepared.vocab)} words")
    if not len(val_arrays[1]):
        print(f"note: no {'/'.join(val_splits)} photos to validate on: early stopping watches the training loss, "
              "and fine-tuning keeps its last epoch (give some photos the split 'val' to validate)", file=sys.stderr)

    run = run_identity(arch, dataset, settings, seed, store, prepared.vocab)
    if worker is None and reuse and (out_dir / "bundle.json").is_file():
        same = read_json(out_dir / "bundle.json", "bundle settings", kind=dict).get("run") == run
        if (same or not overwrite) and not any(staging.iterdir()):
            staging.rmdir()  # made by _bundle_folder, and this call trains nothing
        if same:
            log(f"reusing {out_dir}: trained before with these settings and data")
            return out_dir
        if not overwrite:
            raise ValueError(f"{out_dir} holds a bundle trained with other settings or data: choose another output "
                             "folder, or pass --overwrite (overwrite=True) to replace it once the new one is complete")
    keras.utils.set_random_seed(seed)
    batch = settings["batch_size"]
    buckets = settings["bucket_width"]
    train_data = make_dataset(*train_arrays, batch_size=batch, seed=seed, bucket_width=buckets)
    val_data = make_dataset(*val_arrays, batch_size=batch, shuffle=False, bucket_width=buckets) \
        if len(val_arrays[1]) else None
    with (strategy or tf.distribute.get_strategy()).scope():
        model = architectures.build_captioner(arch, vocab_size=len(prepared.vocab), feature_shape=store.feature_shape,
                                              max_length=prepared.vocab.max_length,
                                              **{key: settings[key] for key in MODEL_KEYS})
    run_dir = staging / "training"
    _same_run_or_start_over(run_dir, run, log)
    started = time.perf_counter()
    # One process keeps its teacher-forced model for other runs (a cluster's model is its workers' together)
    alone = worker is None and (strategy is None or strategy.num_replicas_in_sync == 1)
    kept = teacher_forced_folder(paths["teacher_forced"], run) if alone else None
    done = _teacher_forcing(model, train_data, val_data, settings, run_dir, log, started, kept, take_kept=reuse)
    metrics = history_metrics(done["history"], done["seconds"])
    if "steps" in done:
        metrics["steps"] = done["steps"]  # optimizer updates: a resumed run continues the count
    if settings["self_critical_epochs"]:
        metrics["self_critical"] = _self_critical_phase(model, prepared, store, (train_splits, val_splits),
                                                        settings, epochs, seed, log)
    metrics["validation_captions"] = distinct_captions(model, prepared.vocab, val_arrays, settings, log)
    if worker is not None:
        shutil.rmtree(staging, ignore_errors=True)
        log(f"worker {worker} done; the chief writes the bundle to {out_dir}")
        return out_dir
    save_bundle(staging, model, prepared.vocab, bundle_settings(
        arch, dataset, store, settings, metrics, preset=preset, seed=seed, run=run,
        train_splits=list(train_splits), validation_splits=list(val_splits)))
    # model.keras holds the weights now; the record of teacher forcing is in bundle.json
    for leftover in ("best.keras", "teacher_forced.weights.h5", "teacher_forced.json"):
        (run_dir / leftover).unlink(missing_ok=True)
    replace_folder(staging, out_dir)
    log(f"bundle written to {out_dir} ({metrics})")
    return out_dir
