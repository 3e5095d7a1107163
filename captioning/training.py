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
"""

from pathlib import Path

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

PAD_ID = 0  # vocab.py puts <pad> at id 0

# What a learner changes first. `cpu-small` trains the Flickr8k sample on a
# laptop CPU in minutes; it is heavily regularised because 753 training
# images are very few. Its values were chosen by CIDEr on held-out images: the
# dev split and 113 training images set aside (so that the number is not the
# one early stopping picked), two seeds each. What helped:
#   * the encoder's 320 px mirrored features (+0.03, encoders.py);
#   * self-critical fine-tuning (+0.03 to +0.04), keeping the mean weights of
#     its last 5 epochs rather than the best-scoring one (6 runs: BLEU-4
#     +0.004 on average, higher in 4; CIDEr-D the same; and the validation
#     score is no longer the maximum of 10 noisy ones; self_critical.py);
#   * word dropout 0.35 (+0.01 to +0.02, after fine-tuning only);
#   * in beam search: never emitting <unk>, length_alpha 1.0, and
#     no_repeat_ngram 2 (no pair of words twice: CIDEr-D rose for all 8
#     models tried, by 0.01 on average; BLEU-4 barely moved).
# What did not: 60 epochs instead of 30 (word dropout keeps the validation
# loss falling slowly until about epoch 40), 20 self-critical epochs, 10
# samples per image instead of 5, a reward that adds BLEU-4 to CIDEr-D,
# label smoothing, 128 or 512 units, a hidden output layer, feature
# normalisation, min_count 3 or 8, and the inject variants. Nor, in the
# fine-tuning (4 seeds, 226 held-out images): a learning rate of 1e-4 or 2e-5
# (-0.01 and -0.02 CIDEr-D), switching dropout off (-0.02), keeping word
# dropout on, or 16 epochs averaging the last 8. Training on random crops
# (four 80% corners besides the whole photo) raised teacher-forced CIDEr-D
# by 0.01-0.02, and nothing was left of it after fine-tuning. Averaging the
# predictions of two fine-tuned models (an ensemble) moved dev CIDEr-D by
# -0.016 to +0.022 over 6 pairs (+0.006 on average), for twice the training.
# Nor, after fine-tuning (226 held-out images, mean CIDEr-D change over
# seeds): an output layer tied to the word embedding (-0.012, 2 seeds),
# concatenating the image instead of adding it (-0.019, 2), a cosine
# learning-rate decay (-0.011, 2), a GRU (-0.015, 4), a moving average of the
# teacher-forced weights (+0.001 and BLEU-4 -0.006, 4), and features averaged
# over five views, the whole photo and its four 80% corners (-0.004, 4; +0.013
# on the first two seeds: a two-seed gain had to hold on two more). Nor more
# text: pretraining the language side on the 29,435 captions of the official
# train split's images (most without photos here) lowered the validation loss
# from 2.87 to 2.72 and CIDEr-D from 0.39 to 0.31 (2 seeds: a better language
# model that looks less at the photo); mixing those captions into training
# (-0.017, 1 seed) or keeping only their word embeddings (-0.03, 1) did not
# help either, nor batches of 32 (-0.02, 1). Nor, on the 113 dev images with
# this preset as `train` runs it (4 seeds; it scored CIDEr-D 0.395, from 0.385
# to 0.408, and BLEU-4 0.167): word dropout 0.5 (CIDEr-D -0.001, BLEU-4 -0.001),
# 448 px features (-0.043, 2 seeds; encoders.py), or the grid's maximum beside
# its mean (2,560 numbers, the maxima scaled to the means' size: CIDEr-D -0.010,
# lower for 3 seeds; BLEU-4 +0.012, higher for 3: a trade, not a gain).
# Seeds alone move CIDEr by +-0.03 on 113 images.
# `gpu-full` is for COCO (~118k images); its values are untested here.
PRESETS = {
    "cpu-small": dict(embed_dim=256, units=256, rnn="lstm", dropout=0.5, merge_mode="add",
                      word_dropout=0.35, batch_size=64, learning_rate=1e-3, epochs=30, patience=4, label_smoothing=0.0,
                      min_count=5, max_length=20, length_alpha=1.0, no_repeat_ngram=2, guidance=0.0,
                      self_critical_epochs=10, self_critical_learning_rate=5e-5, self_critical_average=5),
    "gpu-full": dict(embed_dim=512, units=512, rnn="lstm", dropout=0.5, merge_mode="add",
                     word_dropout=0.0, batch_size=256, learning_rate=5e-4, epochs=30, patience=3, label_smoothing=0.0,
                     min_count=5, max_length=20, length_alpha=0.7, no_repeat_ngram=0, guidance=0.0,
                     self_critical_epochs=10, self_critical_learning_rate=5e-5, self_critical_average=0),
}
MODEL_KEYS = ("embed_dim", "units", "rnn", "dropout", "merge_mode", "word_dropout")


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
    cache's float16 (attention's grids are 49 vectors each): make_dataset casts per batch."""
    distinct, rows = np.unique(np.asarray(image_ids, dtype=str), return_inverse=True)
    features = np.empty((len(distinct), *store.feature_shape), dtype=np.float16)
    for first in range(0, len(distinct), chunk):
        features[first:first + chunk] = store.get_many(list(distinct[first:first + chunk]))
    return features, rows.astype(np.int64)


def make_dataset(features, rows, sequences, *, batch_size=64, shuffle=True, seed=0, weights=None):
    """A tf.data pipeline of ({"image", "words"}, targets) batches (notebook 03).

    `sequences` are encoded captions (N, max_length + 2): [<start>, words, <end>, <pad>...].
    The model reads sequence[:-1] and must predict sequence[1:]. Features are
    stored once per image and gathered per batch, so a caption costs an index,
    not a copy of its image vector. Features may be vectors (N, D) or grids
    (N, H, W, C), float32 or the cache's float16 (cast per batch). With one
    weight per caption, batches also carry it for every target word (the loss
    multiplies each word's loss by it: self_critical.py).
    """
    features = np.asarray(features)
    sequences = np.asarray(sequences, dtype=np.int32)
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) != len(sequences):
        raise ValueError(f"{len(rows)} feature rows for {len(sequences)} captions")
    if len(rows) == 0:
        raise ValueError("no captions to make a dataset from")

    if features.dtype == np.float16:
        # float16 stays in numpy: TensorFlow's CPU float16 kernels are slow and log a oneDNN error.
        def images(batch_rows):
            batch = tf.numpy_function(lambda rows: features[rows].astype(np.float32), [batch_rows], tf.float32)
            return tf.ensure_shape(batch, (None, *features.shape[1:]))
    else:
        table = tf.constant(features.astype(np.float32, copy=False))

        def images(batch_rows):
            return tf.gather(table, batch_rows)

    @tf.autograph.experimental.do_not_convert  # plain tensor code: nothing for AutoGraph to rewrite
    def to_model_inputs(batch_rows, batch_sequences, *batch_weights):
        inputs, targets = {"image": images(batch_rows), "words": batch_sequences[:, :-1]}, batch_sequences[:, 1:]
        if not batch_weights:
            return inputs, targets
        return inputs, targets, tf.repeat(batch_weights[0][:, None], tf.shape(targets)[1], axis=1)

    columns = (rows, sequences) if weights is None else (rows, sequences, np.asarray(weights, dtype=np.float32))
    data = tf.data.Dataset.from_tensor_slices(columns)
    if shuffle:
        data = data.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    return (data.batch(batch_size)
            .map(to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


# --- fit ------------------------------------------------------------------------

def compile_captioner(model, *, learning_rate=1e-3, label_smoothing=0.0):
    """Adam, the masked loss and the masked accuracy, inside the model's tf.distribute scope."""
    with model.distribute_strategy.scope():
        model.compile(optimizer=keras.optimizers.Adam(learning_rate, clipnorm=5.0),
                      loss=MaskedCaptionLoss(label_smoothing), metrics=[MaskedAccuracy()])
    return model


def training_callbacks(run_dir, *, patience=4, monitor="val_loss", tensorboard=False):
    """Best-model checkpoint, early stopping, CSV log, resumable backup (+ TensorBoard)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [
        # Resuming: if this run is killed, running it again continues from the
        # last finished epoch instead of epoch 1. Keras deletes the backup when
        # training ends normally.
        keras.callbacks.BackupAndRestore(str(run_dir / "backup")),
        keras.callbacks.ModelCheckpoint(str(run_dir / "best.keras"), monitor=monitor, save_best_only=True),
        keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True),
        # Append only when resuming, so that a new run starts a new log.
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=(run_dir / "backup").exists()),
    ]
    if tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "logs")))
    return callbacks


def fit_captioner(model, train_data, validation_data=None, *, epochs=30, learning_rate=1e-3,
                  label_smoothing=0.0, patience=4, run_dir=None, tensorboard=False, verbose=2):
    """Compile and fit a caption model (notebook 03) -> keras History.

    Build the model inside `strategy.scope()` to train on several devices; the
    datasets are then split across them by Keras. With a run_dir, the usual
    callbacks are attached (see training_callbacks); early stopping watches the
    validation loss when there is validation data and restores the best weights.
    """
    compile_captioner(model, learning_rate=learning_rate, label_smoothing=label_smoothing)
    monitor = "val_loss" if validation_data is not None else "loss"
    callbacks = []
    if run_dir is not None:
        callbacks = training_callbacks(run_dir, patience=patience, monitor=monitor, tensorboard=tensorboard)
    else:
        callbacks = [keras.callbacks.EarlyStopping(monitor=monitor, patience=patience,
                                                   restore_best_weights=True)]
    # shuffle=False: make_dataset already shuffles, once per epoch, with its seed.
    return model.fit(train_data, validation_data=validation_data, epochs=epochs, callbacks=callbacks,
                     shuffle=False, verbose=verbose)
