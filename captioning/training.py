"""Training a captioner: tf.data pipelines, a masked loss, fit() with the callbacks
people expect, and presets (notebook 03). pipeline.py chains prepare -> features ->
train -> bundle into the `train` command.

Full-sequence teacher forcing. Older tutorials expand every caption into one
sample per prefix ("a" -> "dog", "a dog" -> "runs", ...) and predict one word
per sample, which re-reads the same prefix up to 20 times. Here one caption is
one sample: the model reads [<start>, w1, ..., wn] and predicts [w1, ..., wn,
<end>] at every position in a single pass (benchmarks/teacher_forcing.py
measures the difference). Captions are padded to one length, so the loss and
the accuracy average over real words only: a model that predicts <pad> after
<end> has learned nothing worth rewarding.

Length buckets (`bucket_width`). Padding is not free: the RNN reads every
position of a batch, real word or <pad>, and Flickr8k's captions average 12
words in batches padded to 21 positions. make_dataset can group captions of
similar length and cut each batch to its longest caption, so that a batch of
short captions takes a short step. The loss is the same per batch; what changes is which captions share one.
This is sequence bucketing, tf.data's `bucket_by_sequence_length`. It is off
in the presets: on eight paired seeds, buckets 4 words wide trained no better
merge captioner, and on four an attention captioner lower on every seed
(docs/experiments.md, "Length buckets"); the course's rule keeps only what
does better. benchmarks/buckets.py measures what they save.
"""

import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

from captioning.feature_store import FeatureStore, read_rows  # noqa: E402
from captioning.fileio import save_atomically, write_text_atomic  # noqa: E402
from captioning.interrupts import StopBetweenSteps, between_steps  # noqa: E402
from captioning.vocab import PAD_ID  # noqa: E402

# What a learner changes first. `cpu-small` trains the Flickr8k sample on a
# laptop CPU in minutes; 753 training images are very few, so it is heavily
# regularised (dropout 0.5). Each value was chosen by CIDEr-D on held-out
# images; docs/experiments.md records what was tried, kept and dropped.
# A change stays in `cpu-small` when its mean gain over eight seeds, each seed
# trained with and without it, is more than twice its standard error. The recipe
# of b16f1ae passed against the one that had dropped its extras: word dropout
# 0.35, features averaged with the mirror image (encoders.MIRROR), the mean of
# the last 5 fine-tuning epochs' weights, and no repeated pair of words in beam
# search (docs/experiments.md, "Quality after the architecture table").
# Length buckets (bucket_width 4) read about 0.6 of the positions but did not
# pass that rule for merge, and cost attention 0.025 CIDEr-D on four seeds
# (docs/experiments.md, "Length buckets"): both presets pad.
# `gpu-full` is for COCO (~118k images) on a GPU; its values are untested here.
PRESETS = {
    "cpu-small": dict(embed_dim=256, units=256, rnn="lstm", dropout=0.5, word_dropout=0.35,
                      batch_size=64, learning_rate=1e-3, epochs=30, patience=4, label_smoothing=0.0,
                      min_count=5, max_length=20, length_alpha=1.0, no_repeat_ngram=2, bucket_width=0,
                      self_critical_epochs=10, self_critical_learning_rate=5e-5, self_critical_average=5),
    "gpu-full": dict(embed_dim=512, units=512, rnn="lstm", dropout=0.5, word_dropout=0.0,
                     batch_size=256, learning_rate=5e-4, epochs=30, patience=3, label_smoothing=0.0,
                     min_count=5, max_length=20, length_alpha=0.7, no_repeat_ngram=0, bucket_width=0,
                     self_critical_epochs=10, self_critical_learning_rate=5e-5, self_critical_average=0),
}
MODEL_KEYS = ("embed_dim", "units", "rnn", "dropout", "word_dropout")  # the preset values build_captioner takes


def preset_settings(preset="cpu-small", **overrides):
    """A copy of a preset with some values replaced (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    settings = dict(PRESETS[preset])
    unknown = set(overrides) - set(settings)
    if unknown:
        raise ValueError(f"unknown training setting(s) {sorted(unknown)}; known: {sorted(settings)}")
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return settings


# --- the loss and the metric ----------------------------------------------------

@keras.saving.register_keras_serializable(package="captioning")
class MaskedCaptionLoss(keras.losses.Loss):
    """Cross-entropy from logits, averaged over the non-padding target words.

    With label_smoothing = e the target distribution is (1 - e) on the true
    word plus e spread evenly over the vocabulary, which keeps a small-data
    model from becoming over-confident.
    """

    def __init__(self, label_smoothing=0.0, pad_id=PAD_ID, name="masked_caption_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)
        self.pad_id = int(pad_id)

    def call(self, y_true, y_pred):
        ops = keras.ops
        y_true = ops.cast(y_true, "int32")
        mask = ops.cast(ops.not_equal(y_true, self.pad_id), y_pred.dtype)
        # The fused softmax + cross-entropy kernel: never materialises the
        # (batch, length, vocabulary) log-probabilities.
        loss = ops.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        if self.label_smoothing:
            # -mean_k log p_k = logsumexp(logits) - mean(logits): the uniform part of the target.
            uniform = ops.logsumexp(y_pred, axis=-1) - ops.mean(y_pred, axis=-1)
            loss = (1.0 - self.label_smoothing) * loss + self.label_smoothing * uniform
        # Keras averages what we return over all (caption, position) cells and
        # then over the devices of a tf.distribute strategy. Scaling the real
        # words up by cells / real words turns that average into the mean over
        # real words only (not over captions, and not over padding).
        return ops.divide_no_nan(loss * mask, ops.mean(mask))

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing, "pad_id": self.pad_id}


@keras.saving.register_keras_serializable(package="captioning")
class MaskedAccuracy(keras.metrics.Metric):
    """Share of real (non-padding) target words that the model ranks first."""

    def __init__(self, pad_id=PAD_ID, name="accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pad_id = int(pad_id)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        ops = keras.ops
        y_true = ops.cast(y_true, "int32")
        mask = ops.cast(ops.not_equal(y_true, self.pad_id), "float32")
        hits = ops.cast(ops.equal(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), y_true), "float32")
        self.correct.assign_add(ops.sum(hits * mask))
        self.total.assign_add(ops.sum(mask))

    def result(self):
        return self.correct / keras.ops.maximum(self.total, 1.0)

    def reset_state(self):
        self.correct.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "pad_id": self.pad_id}


# --- data -----------------------------------------------------------------------------

def gather_features(store, image_ids, chunk=256):
    """Load each distinct image's features once: -> (features (M, *shape), rows (N,)) with
    features[rows[i]] belonging to image_ids[i] (five captions share one image). They keep the
    cache's float16 (attention's grids are 64 or 100 vectors each): make_dataset casts per batch."""
    distinct, rows = np.unique(np.asarray(image_ids, dtype=str), return_inverse=True)
    features = np.empty((len(distinct), *store.feature_shape), dtype=np.float16)
    for first in range(0, len(distinct), chunk):
        features[first:first + chunk] = store.get_many(list(distinct[first:first + chunk]))
    return features, rows.astype(np.int64)


def bucket_boundaries(max_length, bucket_width):
    """Where make_dataset's length buckets start, in tokens (<start>, words, <end>): with width
    4, captions of 1-4 words share batches, 5-8 words others, and so on up to max_length."""
    return list(range(bucket_width + 3, max_length + 3, bucket_width))


def make_dataset(features, rows, sequences, *, batch_size=64, shuffle=True, seed=0, weights=None, bucket_width=0):
    """A tf.data pipeline of ({"image", "words"}, targets) batches (notebook 03).

    `sequences` are encoded captions (N, max_length + 2): [<start>, words, <end>, <pad>...].
    The model reads sequence[:-1] and must predict sequence[1:]. Features are
    stored once per image and gathered per batch, so a caption costs an index,
    not a copy of its image vector. Features may be vectors (N, D) or grids
    (N, H, W, C), float32 or the cache's float16 (cast per batch). They may also
    stay on disk: a FeatureStore or its memory map (store.features), with rows
    from store.rows(ids) (what pipeline.caption_arrays gives); each batch's rows
    are then read from the file as the batch is made, so memory does not grow
    with the store (all of COCO's 8x8x2048 grids are 32 GB). With one
    weight per caption, batches also carry it for every target word (the loss
    multiplies each word's loss by it: self_critical.py).

    bucket_width=w > 0 batches captions with others of about their length (1-w
    words, w+1-2w words, ...; tf.data's bucket_by_sequence_length) and cuts every
    batch to its longest caption. 0 pads every batch to max_length + 1 positions.
    """
    if isinstance(features, FeatureStore):
        features = features.features
    on_disk = isinstance(features, np.memmap)
    features = features if on_disk else np.asarray(features)
    sequences = np.asarray(sequences, dtype=np.int32)
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) != len(sequences):
        raise ValueError(f"{len(rows)} feature rows for {len(sequences)} captions")
    if len(rows) == 0:
        raise ValueError("no captions to make a dataset from")
    if int(bucket_width) < 0:
        raise ValueError(f"bucket_width must be >= 0 (0 = no length buckets), got {bucket_width}")

    if on_disk or features.dtype == np.float16:
        # float16 stays in numpy: TensorFlow's CPU float16 kernels are slow and log a oneDNN error.
        def read(batch_rows):
            return read_rows(features, batch_rows) if on_disk else features[batch_rows].astype(np.float32)

        def images(batch_rows):
            batch = tf.numpy_function(read, [batch_rows], tf.float32)
            return tf.ensure_shape(batch, (None, *features.shape[1:]))
    else:
        table = tf.constant(features.astype(np.float32, copy=False))

        def images(batch_rows):
            return tf.gather(table, batch_rows)

    @tf.autograph.experimental.do_not_convert  # plain tensor code: nothing for AutoGraph to rewrite
    def to_model_inputs(batch_rows, batch_sequences, *batch_weights):
        if bucket_width:  # up to the batch's longest caption: what follows is <pad> in every row
            batch_sequences = batch_sequences[:, :tf.reduce_max(real_tokens(batch_sequences, axis=1))]
        inputs, targets = {"image": images(batch_rows), "words": batch_sequences[:, :-1]}, batch_sequences[:, 1:]
        if not batch_weights:
            return inputs, targets
        return inputs, targets, tf.repeat(batch_weights[0][:, None], tf.shape(targets)[1], axis=1)

    columns = (rows, sequences) if weights is None else (rows, sequences, np.asarray(weights, dtype=np.float32))
    data = tf.data.Dataset.from_tensor_slices(columns)
    if shuffle:
        data = data.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    if bucket_width:
        boundaries = bucket_boundaries(sequences.shape[1] - 2, int(bucket_width))
        data = data.bucket_by_sequence_length(lambda row, sequence, *weight: real_tokens(sequence), boundaries,
                                              [batch_size] * (len(boundaries) + 1))
    else:
        data = data.batch(batch_size)
    # tf.data's autotuner, on by default, sometimes left a whole epoch of attention training on
    # one core of two: 0.69 s a step instead of 0.35, in about half the epochs on two 2-core
    # machines (benchmarks/input_pipeline.py). Off, AUTOTUNE below means tf.data's fixed
    # defaults; the batches are the same, and no epoch was slow.
    options = tf.data.Options()
    options.autotune.enabled = False
    return (data
            .map(to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE)
            .with_options(options))


def real_tokens(sequences, axis=None):
    """How many tokens of an encoded caption (or of each, along `axis`) are not <pad>."""
    return tf.math.count_nonzero(tf.not_equal(sequences, PAD_ID), axis=axis, dtype=tf.int32)


# --- fit ------------------------------------------------------------------------

def compile_captioner(model, *, learning_rate=1e-3, label_smoothing=0.0):
    """Adam, the masked loss and the masked accuracy, inside the model's tf.distribute scope."""
    with model.distribute_strategy.scope():
        model.compile(optimizer=keras.optimizers.Adam(learning_rate, clipnorm=5.0),
                      loss=MaskedCaptionLoss(label_smoothing), metrics=[MaskedAccuracy()])
    return model


def read_history(run_dir):
    """{metric: [value per epoch]} from a run's history.csv: every epoch of the run, also
    across interruptions (the CSV log appends when a run resumes). {} if there is none."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # Keras writes "NA" for a metric an epoch did not have (val_* when there is no validation data).
    columns = {key: [row[key] for row in rows] for key in (rows[0] if rows else {}) if key != "epoch"}
    return {key: [float("nan") if value in ("NA", "", None) else float(value) for value in values]
            for key, values in columns.items() if any(value not in ("NA", "", None) for value in values)}


class AtomicCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint writing best.keras under a temporary name, renamed when complete."""

    def _save_model(self, epoch, batch, logs):
        final = self.filepath

        def save(temp):
            self.filepath = str(temp)
            try:
                super(AtomicCheckpoint, self)._save_model(epoch, batch, logs)
            finally:
                self.filepath = final
        save_atomically(final, save, ".keras")


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore, except that a backup it cannot restore (damaged by a kill
    mid-write or a full disk, or made by a model with other settings) never blocks a rerun:
    it is moved aside with a one-line warning, and training starts from its first epoch."""

    def __init__(self, backup_dir, csv_logger, checkpoint):
        super().__init__(str(backup_dir))
        self.csv_logger, self.checkpoint = csv_logger, checkpoint

    def on_train_begin(self, logs=None):
        # The backup holds the optimizer's state (Adam's moments, its step count) and Keras loads
        # it into the optimizer, which it builds for that. We build it first, to keep a copy of its
        # fresh state: a backup that fails half-way through loading is undone for the optimizer
        # too, not only for the weights.
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            with self.model.distribute_strategy.scope():
                optimizer.build(self.model.trainable_variables)
        initial = self.model.get_weights()
        initial_optimizer = [variable.numpy() for variable in optimizer.variables] if optimizer else []
        self.started, self.earlier_seconds = time.perf_counter(), 0.0
        try:
            super().on_train_begin(logs)
            if Path(self._training_metadata_path).is_file():  # resumed: the time the earlier runs trained
                metadata = json.loads(Path(self._training_metadata_path).read_text(encoding="utf-8"))
                self.earlier_seconds = float(metadata.get("seconds", 0.0))
            return
        except Exception as error:  # h5py, json and Keras raise many kinds for one bad folder
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        self.model.set_weights(initial)
        for variable, value in zip(optimizer.variables if optimizer else [], initial_optimizer):
            variable.assign(value)
        self.earlier_seconds = 0.0
        self.model._initial_epoch = None
        aside = Path(self.backup_dir).with_name("backup.unusable")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(self.backup_dir, aside)
        self.csv_logger.append, self.checkpoint.best = False, None
        print(f"warning: the training backup in {self.backup_dir} cannot be restored ({reason[:200]}); "
              f"moved to {aside.name}, training from the first epoch", file=sys.stderr)

    def _save_model(self):
        # Keras writes the backup in place: a full disk at epoch 5 would leave half a file where
        # epoch 4's backup was. Each file is written whole under a temporary name, then renamed,
        # the weights first, so the epoch in training_metadata.json always has its weights.
        Path(self.backup_dir).mkdir(parents=True, exist_ok=True)
        save_atomically(self._weights_path, lambda temp: self.model.save_weights(temp, overwrite=True), ".weights.h5")
        write_text_atomic(self._training_metadata_path, json.dumps({
            "epoch": self._current_epoch, "batch": self._last_batch_seen,
            "seconds": self.earlier_seconds + time.perf_counter() - self.started}))

    def seconds(self):
        """Training time so far, the runs this one resumed included."""
        return self.earlier_seconds + time.perf_counter() - self.started


def training_callbacks(run_dir, *, patience=4, monitor="val_loss", tensorboard=False):
    """Resumable backup, best-model checkpoint, early stopping, CSV log (+ TensorBoard).

    If this run is killed, running it again continues from the last finished
    epoch instead of epoch 1 (Keras deletes the backup when training ends
    normally); the log then appends, and the checkpoint only replaces the best
    model of the earlier epochs with a better one.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    earlier = read_history(run_dir) if (run_dir / "backup").is_dir() else {}
    csv_logger = keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=bool(earlier))
    checkpoint = AtomicCheckpoint(str(run_dir / "best.keras"), monitor=monitor, save_best_only=True,
                                  initial_value_threshold=min(earlier.get(monitor, []), default=None))
    callbacks = [
        ResumableBackup(run_dir / "backup", csv_logger, checkpoint),  # first: it decides whether we resume
        checkpoint,
        keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True),
        csv_logger,
    ]
    if tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "logs")))
    return callbacks


def fit_captioner(model, train_data, validation_data=None, *, epochs=30, learning_rate=1e-3,
                  label_smoothing=0.0, patience=4, run_dir=None, tensorboard=False, verbose=2):
    """Compile and fit a caption model (notebook 03) -> keras History (of this call's epochs;
    `read_history(run_dir)` has every epoch of a run that was interrupted and resumed).

    Build the model inside `strategy.scope()` to train on several devices; the
    datasets are then split across them by Keras. With a run_dir, the usual
    callbacks are attached (see training_callbacks); early stopping watches the
    validation loss when there is validation data, and the model ends with the
    best weights of the whole run.
    """
    compile_captioner(model, learning_rate=learning_rate, label_smoothing=label_smoothing)
    monitor = "val_loss" if validation_data is not None else "loss"
    if run_dir is None:
        callbacks = [keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True)]
    else:
        callbacks = training_callbacks(run_dir, patience=patience, monitor=monitor, tensorboard=tensorboard)
    # shuffle=False: make_dataset already shuffles, once per epoch, with its seed.
    with between_steps():  # Ctrl-C stops after a step, not inside one (interrupts.py)
        history = model.fit(train_data, validation_data=validation_data, epochs=epochs,
                            callbacks=[*callbacks, StopBetweenSteps()], shuffle=False, verbose=verbose)
    # The seconds of the whole run, across interruptions (pipeline.py records them in bundle.json).
    history.seconds = next((callback.seconds() for callback in callbacks if isinstance(callback, ResumableBackup)),
                           None)
    best = Path(run_dir) / "best.keras" if run_dir is not None else None
    if best is not None and best.is_file() and len(history.epoch) < len(read_history(run_dir).get(monitor, [])):
        # Resumed: early stopping only saw the epochs since; the checkpoint saw them all.
        model.set_weights(keras.saving.load_model(best, compile=False, safe_mode=True).get_weights())
    return history
