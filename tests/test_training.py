"""Training: the masked loss and accuracy, the tf.data pipeline, learning on synthetic
captions for every architecture, repeatability, resuming, and two-device training."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402

from captioning.decoding import greedy_decode  # noqa: E402
from captioning.architectures import ARCHITECTURES, build_captioner, make_step_decoder  # noqa: E402
from captioning.evaluation import cider_d  # noqa: E402
from captioning.self_critical import self_critical, validation_cider  # noqa: E402
from captioning.training import (  # noqa: E402
    PRESETS, MaskedAccuracy, MaskedCaptionLoss, compile_captioner, fit_captioner, make_dataset, preset_settings)
from captioning.vocab import Vocabulary  # noqa: E402

# --- synthetic captions: the image features determine the caption ---------------------

TEMPLATES = [
    "a {} dog runs on the grass",
    "two {} birds sit in a tree",
    "a man rides a {} bike",
    "the {} car is parked near the road",
]
COLOURS = ["red", "blue", "green"]
FEATURE_DIM = 16


def synthetic_captions(count, seed):
    """`count` (features, caption) pairs: the features encode a template (one-hot,
    first 4 dims) and a colour (next 3), plus noise; the caption follows from both."""
    rng = np.random.default_rng(seed)
    template = rng.integers(len(TEMPLATES), size=count)
    colour = rng.integers(len(COLOURS), size=count)
    features = rng.normal(scale=0.3, size=(count, FEATURE_DIM)).astype("float32")
    features[np.arange(count), template] += 2.0
    features[np.arange(count), len(TEMPLATES) + colour] += 2.0
    captions = [TEMPLATES[t].format(COLOURS[c]) for t, c in zip(template, colour)]
    return features, captions


def synthetic_vocab():
    _, captions = synthetic_captions(200, seed=99)
    return Vocabulary.build(captions, min_count=1, max_length=10)


def synthetic_data(vocab, count, seed, batch_size=32, shuffle=True):
    features, captions = synthetic_captions(count, seed)
    sequences = vocab.encode_batch(captions)
    data = make_dataset(features, np.arange(count), sequences, batch_size=batch_size, shuffle=shuffle, seed=seed)
    return data, features, captions


def tiny_model(arch, vocab, **options):
    return build_captioner(arch, vocab_size=len(vocab), feature_shape=FEATURE_DIM, max_length=vocab.max_length,
                           embed_dim=16, units=32, dropout=0.1, **options)


def exact_match_rate(model, vocab, features, captions):
    ids = greedy_decode(make_step_decoder(model), features, start_id=vocab.start_id, end_id=vocab.end_id,
                        max_length=vocab.max_length)
    return np.mean([vocab.decode(row) == caption for row, caption in zip(ids, captions)])


def train_synthetic(arch, epochs=20, seed=0, **options):
    keras.utils.set_random_seed(seed)
    vocab = synthetic_vocab()
    train, _, _ = synthetic_data(vocab, 240, seed=1)
    model = tiny_model(arch, vocab, **options)
    history = fit_captioner(model, train, epochs=epochs, learning_rate=1e-2, patience=epochs, verbose=0)
    return model, vocab, history


# --- loss and metric -------------------------------------------------------------------

def test_masked_loss_averages_over_real_words_only():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5)).astype("float32")
    targets = np.array([[3, 2, 0, 0], [1, 4, 2, 0]], dtype="int32")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    real = [(b, t) for b in range(2) for t in range(4) if targets[b, t] != 0]
    expected = -np.mean([log_probs[b, t, targets[b, t]] for b, t in real])
    loss = float(MaskedCaptionLoss()(targets, logits))
    assert loss == pytest.approx(expected, rel=1e-5)
    # Whatever the model says at padded positions does not change the loss.
    logits[0, 3] += 100.0
    assert float(MaskedCaptionLoss()(targets, logits)) == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_mixes_in_the_uniform_distribution():
    logits = np.array([[[2.0, 0.0, -1.0, 0.5]]], dtype="float32")
    targets = np.array([[1]], dtype="int32")
    log_probs = logits[0, 0] - np.log(np.exp(logits[0, 0]).sum())
    expected = 0.9 * -log_probs[1] + 0.1 * -log_probs.mean()
    assert float(MaskedCaptionLoss(label_smoothing=0.1)(targets, logits)) == pytest.approx(expected, rel=1e-5)


def test_masked_accuracy_ignores_padding():
    targets = np.array([[3, 2, 0], [1, 0, 0]], dtype="int32")
    logits = np.zeros((2, 3, 5), dtype="float32")
    logits[0, 0, 3] = logits[0, 1, 4] = logits[1, 0, 1] = 1.0  # 2 of 3 real words right
    logits[0, 2, 0] = logits[1, 1, 0] = logits[1, 2, 0] = 1.0  # padding "right" - must not count
    metric = MaskedAccuracy()
    metric.update_state(targets, logits)
    assert float(metric.result()) == pytest.approx(2 / 3)


# --- data ------------------------------------------------------------------------------

def test_dataset_shifts_captions_and_gathers_each_images_features():
    vocab = synthetic_vocab()
    features = np.arange(3 * FEATURE_DIM, dtype="float32").reshape(3, FEATURE_DIM)
    rows = np.array([2, 0, 2, 1])
    sequences = vocab.encode_batch(["a red dog runs", "two birds", "a man", "the car"])
    data = make_dataset(features, rows, sequences, batch_size=3, shuffle=False)
    batches = list(data.as_numpy_iterator())
    assert [len(targets) for _, targets in batches] == [3, 1]
    inputs, targets = batches[0]
    np.testing.assert_array_equal(inputs["words"], sequences[:3, :-1])
    np.testing.assert_array_equal(targets, sequences[:3, 1:])
    np.testing.assert_array_equal(inputs["image"], features[rows[:3]])
    assert inputs["words"].shape[1] == vocab.max_length + 1


def test_shuffling_keeps_each_caption_with_its_image():
    vocab = synthetic_vocab()
    features, captions = synthetic_captions(50, seed=3)
    data = make_dataset(features, np.arange(50), vocab.encode_batch(captions), batch_size=50, seed=3)
    inputs, targets = next(data.as_numpy_iterator())
    order = [int(np.argmin(np.abs(features - row).sum(1))) for row in inputs["image"]]
    assert order != list(range(50))  # shuffled...
    for position, index in enumerate(order):  # ...but still paired
        assert vocab.decode(targets[position]) == captions[index]


def random_length_sequences(count, max_length, seed, vocab_size=30):
    """Encoded captions of 1..max_length random words: [<start>, words, <end>, <pad>...]."""
    rng = np.random.default_rng(seed)
    sequences = np.zeros((count, max_length + 2), dtype=np.int32)  # <pad> is 0
    for row, length in enumerate(rng.integers(1, max_length + 1, size=count)):
        sequences[row, 0], sequences[row, length + 1] = 1, 2  # <start>, <end>
        sequences[row, 1:length + 1] = rng.integers(4, vocab_size, size=length)
    return sequences


def test_length_buckets_batch_captions_of_about_one_length_cut_to_the_longest_and_lose_none():
    max_length, width, count = 12, 4, 300
    sequences = random_length_sequences(count, max_length, seed=5)
    words = (sequences != 0).sum(axis=1) - 2
    features = np.arange(count, dtype="float32")[:, None]  # each caption's feature is its row number
    data = make_dataset(features, np.arange(count), sequences, batch_size=16, seed=5, bucket_width=width)
    seen = []
    for inputs, targets in data.as_numpy_iterator():
        rows = inputs["image"][:, 0].astype(int)
        seen += rows.tolist()
        assert len(set((words[rows] - 1) // width)) == 1  # 1-4 words, 5-8 or 9-12: one bucket per batch
        steps = words[rows].max() + 1  # <start> and the words of the longest caption
        assert inputs["words"].shape == (len(rows), steps) and targets.shape == (len(rows), steps)
        np.testing.assert_array_equal(inputs["words"], sequences[rows, :steps])
        np.testing.assert_array_equal(targets, sequences[rows, 1:steps + 1])
    assert sorted(seen) == list(range(count))  # every caption once per epoch
    assert seen != sorted(seen)  # and still shuffled
    padded = next(make_dataset(features, np.arange(count), sequences, batch_size=16).as_numpy_iterator())
    assert padded[0]["words"].shape[1] == max_length + 1  # bucket_width=0: padded as before
    with pytest.raises(ValueError, match="bucket_width"):
        make_dataset(features, np.arange(count), sequences, bucket_width=-1)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_batch_cut_to_its_longest_caption_gives_the_same_logits_loss_and_gradients(arch):
    """What buckets rely on: the positions after the longest caption change nothing. The model is
    called through a graph that does not know the batch's length, as fit() calls it on buckets."""
    max_length, steps = 10, 6
    shape = (2, 2, 8) if ARCHITECTURES[arch].features == "grid" else (8,)
    keras.utils.set_random_seed(1)
    model = build_captioner(arch, vocab_size=30, feature_shape=shape, max_length=max_length, embed_dim=8, units=8,
                            dropout=0.0)
    sequences = random_length_sequences(8, steps - 1, seed=1)  # at most steps - 1 words: steps positions
    padded = np.zeros((8, max_length + 2), dtype=np.int32)
    padded[:, :steps + 1] = sequences
    image = np.random.default_rng(1).normal(size=(8, *shape)).astype("float32")
    loss_of = MaskedCaptionLoss()

    @tf.function(input_signature=[tf.TensorSpec((None, *shape)), tf.TensorSpec((None, None), tf.int32)],
                 reduce_retracing=True)
    def forward(image, sequence):
        with tf.GradientTape() as tape:
            logits = model({"image": image, "words": sequence[:, :-1]}, training=True)
            loss = loss_of(sequence[:, 1:], logits)
        return logits, loss, tape.gradient(loss, model.trainable_variables)

    cut, full = forward(image, sequences), forward(image, padded)
    assert cut[0].shape[1] == steps and full[0].shape[1] == max_length + 1
    np.testing.assert_allclose(cut[0], full[0][:, :steps], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(cut[1]), float(full[1]), rtol=1e-5)
    for variable, mine, padded_one in zip(model.trainable_variables, cut[2], full[2]):
        np.testing.assert_allclose(tf.convert_to_tensor(mine), tf.convert_to_tensor(padded_one), rtol=1e-4,
                                   atol=1e-6, err_msg=variable.path)


def write_store(folder, ids, features):
    """A finished feature store of these features, through feature_store.write_store (the real writer)."""
    from captioning.feature_store import FeatureStore, write_store
    chunk = folder / "partial" / "chunk-000000.npz"
    chunk.parent.mkdir(parents=True)
    np.savez(chunk, ids=np.array(ids, dtype=str), features=features, skipped=np.zeros((0, 3), dtype=str))
    write_store([chunk], {"feature_shape": list(features.shape[1:])}, folder, sources={})
    return FeatureStore.open(folder)


@pytest.mark.parametrize("shape", [(FEATURE_DIM,), (2, 3, 4)], ids=["pooled", "grid"])
def test_dataset_over_a_feature_store_reads_each_batch_and_equals_the_array(tmp_path, shape, monkeypatch):
    import captioning.training as training
    rng = np.random.default_rng(0)
    features = rng.normal(size=(7, *shape)).astype("float16")
    store = write_store(tmp_path / "store", [f"image-{i}" for i in range(7)], features)
    vocab = synthetic_vocab()
    _, captions = synthetic_captions(23, seed=5)
    rows, sequences, weights = rng.integers(7, size=23), vocab.encode_batch(captions), rng.normal(size=23)
    reads, read_rows = [], training.read_rows

    def counted(array, batch_rows):
        reads.append(len(batch_rows))
        return read_rows(array, batch_rows)
    monkeypatch.setattr(training, "read_rows", counted)
    for shuffle in (False, True):
        for source in (store, store.features):  # each pipeline's first epoch: the same order for one seed
            in_memory = make_dataset(features, rows, sequences, batch_size=5, shuffle=shuffle, seed=3, weights=weights)
            on_disk = make_dataset(source, rows, sequences, batch_size=5, shuffle=shuffle, seed=3, weights=weights)
            pairs = list(zip(in_memory.as_numpy_iterator(), on_disk.as_numpy_iterator(), strict=True))
            assert len(pairs) == 5
            for (inputs, targets, word_weights), (got_inputs, got_targets, got_weights) in pairs:
                assert got_inputs["image"].dtype == np.float32 and got_inputs["image"].shape[1:] == shape
                np.testing.assert_array_equal(got_inputs["image"], inputs["image"])
                np.testing.assert_array_equal(got_inputs["words"], inputs["words"])
                np.testing.assert_array_equal(got_targets, targets)
                np.testing.assert_array_equal(got_weights, word_weights)
    assert reads and max(reads) <= 5  # one batch's rows per read, never the whole store


def test_dataset_turns_the_autotuner_off_and_gives_the_batches_it_gave_with_it_on(tmp_path):
    # Off because it sometimes ran a whole epoch on one core of two (benchmarks/input_pipeline.py);
    # what must not change is the batches, epoch after epoch (the draw of every seeded run).
    rng = np.random.default_rng(1)
    grids = rng.normal(size=(9, 2, 3, 4)).astype("float16")
    store = write_store(tmp_path / "store", [f"image-{i}" for i in range(9)], grids)
    _, captions = synthetic_captions(40, seed=2)
    rows, sequences = rng.integers(9, size=40), synthetic_vocab().encode_batch(captions)
    weights = rng.normal(size=40)
    off = make_dataset(store, rows, sequences, batch_size=6, seed=4, weights=weights)
    autotune_on = tf.data.Options()
    autotune_on.autotune.enabled = True  # tf.data's default; a later with_options wins
    on = make_dataset(store, rows, sequences, batch_size=6, seed=4, weights=weights).with_options(autotune_on)
    assert off.options().autotune.enabled is False and on.options().autotune.enabled is True
    for _ in range(2):  # two epochs: the shuffle moves on between them, the same way for both
        for got, expected in zip(off.as_numpy_iterator(), on.as_numpy_iterator(), strict=True):
            for got_part, expected_part in zip(tf.nest.flatten(got), tf.nest.flatten(expected), strict=True):
                np.testing.assert_array_equal(got_part, expected_part)


def test_caption_arrays_keeps_the_features_in_the_store(tmp_path):
    import pandas as pd
    from captioning.pipeline import caption_arrays
    features = np.arange(3 * FEATURE_DIM, dtype="float16").reshape(3, FEATURE_DIM)
    store = write_store(tmp_path / "store", ["a", "b", "c"], features)
    captions = pd.DataFrame({"image_id": ["c", "a", "x", "c", "b"], "split": ["train", "train", "train", "val", "train"],
                             "clean": ["a red dog runs", "two birds", "a man", "the car", "a blue car"]})
    vocab = synthetic_vocab()
    source, rows, sequences = caption_arrays(captions, ("train",), store, vocab)
    assert source is store  # no copy: make_dataset reads each batch's rows from the memory map
    np.testing.assert_array_equal(rows, [2, 0, 1])  # "x" has no features; "c" is val
    np.testing.assert_array_equal(sequences, vocab.encode_batch(["a red dog runs", "two birds", "a blue car"]))
    inputs, _ = next(make_dataset(source, rows, sequences, batch_size=3, shuffle=False).as_numpy_iterator())
    np.testing.assert_array_equal(inputs["image"], features[[2, 0, 1]].astype("float32"))

def test_presets_and_overrides():
    assert set(PRESETS) == {"cpu-small", "gpu-full"}
    assert preset_settings("cpu-small", epochs=3)["epochs"] == 3
    assert preset_settings("cpu-small", epochs=None)["epochs"] == PRESETS["cpu-small"]["epochs"]
    with pytest.raises(ValueError, match="preset"):
        preset_settings("tpu-huge")
    with pytest.raises(ValueError, match="unknown training setting"):
        preset_settings("cpu-small", epoch=3)


# --- learning ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_learns_to_caption_held_out_images(arch):
    model, vocab, history = train_synthetic(arch)
    assert history.history["accuracy"][-1] > history.history["accuracy"][0]
    features, captions = synthetic_captions(60, seed=2)  # images the model never saw
    assert exact_match_rate(model, vocab, features, captions) >= 0.9


def test_gru_and_concat_merge_learn_too():
    model, vocab, _ = train_synthetic("merge", rnn="gru", merge_mode="concat")
    features, captions = synthetic_captions(60, seed=2)
    assert exact_match_rate(model, vocab, features, captions) >= 0.9


def test_a_seed_makes_training_repeatable():
    first = train_synthetic("merge", epochs=3, seed=5)[2].history
    second = train_synthetic("merge", epochs=3, seed=5)[2].history
    other = train_synthetic("merge", epochs=3, seed=6)[2].history
    assert first["loss"] == second["loss"]
    assert first["loss"] != other["loss"]


class StopAfter(keras.callbacks.Callback):
    """Simulates a killed run: raise at the end of an epoch."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    import captioning.training as training
    vocab = synthetic_vocab()
    train, _, _ = synthetic_data(vocab, 64, seed=1)
    val, _, _ = synthetic_data(vocab, 32, seed=2, shuffle=False)
    run_dir = tmp_path / "run"
    original = training.training_callbacks
    monkeypatch.setattr(training, "training_callbacks",
                        lambda *args, **kwargs: original(*args, **kwargs) + [StopAfter(1)])
    with pytest.raises(KeyboardInterrupt):
        fit_captioner(tiny_model("merge", vocab), train, val, epochs=4, run_dir=run_dir, verbose=0)
    assert (run_dir / "backup").is_dir() and (run_dir / "best.keras").is_file()
    monkeypatch.setattr(training, "training_callbacks", original)
    history = fit_captioner(tiny_model("merge", vocab), train, val, epochs=4, run_dir=run_dir, verbose=0)
    assert len(history.history["loss"]) == 2  # epochs 3 and 4 only
    with open(run_dir / "history.csv") as handle:
        epochs = [int(row["epoch"]) for row in csv.DictReader(handle)]
    assert epochs == [0, 1, 2, 3]
    assert not (run_dir / "backup").exists()  # removed once the run finished


# --- two devices ------------------------------------------------------------------------

DISTRIBUTED_SCRIPT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, {tests!r})
import keras
import test_training as t
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
keras.utils.set_random_seed(0)
vocab = t.synthetic_vocab()
train, _, _ = t.synthetic_data(vocab, 240, seed=1, batch_size=60)
with strategy.scope():
    model = t.tiny_model("merge", vocab)
history = t.fit_captioner(model, train, epochs=20, learning_rate=1e-2, patience=20, verbose=0)
features, captions = t.synthetic_captions(60, seed=2)
print(json.dumps({{"replicas": strategy.num_replicas_in_sync,
                  "variable_devices": sorted({{str(v.device)[-5:] for v in model.trainable_variables[0].value.values}}),
                  "loss": history.history["loss"], "exact": float(t.exact_match_rate(model, vocab, features, captions))}}))
"""


def test_training_under_mirrored_strategy_on_two_devices():
    script = DISTRIBUTED_SCRIPT.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert len(report["variable_devices"]) == 2  # each variable mirrored on both devices
    assert report["loss"][-1] < report["loss"][0] / 5
    assert report["exact"] >= 0.9


# --- self-critical fine-tuning -------------------------------------------------------------

def test_weighted_batches_carry_a_weight_for_every_target_word():
    vocab = synthetic_vocab()
    features, captions = synthetic_captions(3, seed=4)
    data = make_dataset(features, np.arange(3), vocab.encode_batch(captions), batch_size=3, shuffle=False,
                        weights=[0.5, -1.0, 2.0])
    inputs, targets, weights = next(data.as_numpy_iterator())
    assert weights.shape == targets.shape
    np.testing.assert_array_equal(weights[:, 0], [0.5, -1.0, 2.0])
    assert (weights == weights[:, :1]).all()


def test_a_zero_weight_leaves_the_model_unchanged():
    vocab = synthetic_vocab()
    features, captions = synthetic_captions(8, seed=4)
    model = tiny_model("merge", vocab)
    before = [weight.copy() for weight in model.get_weights()]
    compile_captioner(model)
    model.fit(make_dataset(features, np.arange(8), vocab.encode_batch(captions), weights=np.zeros(8)), verbose=0)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_cider_d_prefers_the_reference_caption():
    references = [["a dog runs on the grass", "a brown dog runs"], ["two birds sit in a tree"]] * 2
    scores = cider_d(references, ["a dog runs on the grass", "two birds sit in a tree",
                                  "two birds sit in a tree", "a dog runs on the grass"])
    assert scores[0] > scores[2] and scores[1] > scores[3]


def test_self_critical_raises_the_cider_of_its_own_samples():
    keras.utils.set_random_seed(0)
    vocab = synthetic_vocab()
    train, _, _ = synthetic_data(vocab, 120, seed=1)
    model = tiny_model("merge", vocab)
    fit_captioner(model, train, epochs=4, learning_rate=1e-2, verbose=0)  # half-trained on purpose
    features, captions = synthetic_captions(40, seed=3)
    val_features, val_captions = synthetic_captions(20, seed=2)
    history = self_critical(model, vocab, features, [[caption] for caption in captions], val_features,
                            [[caption] for caption in val_captions], epochs=4, samples=4, learning_rate=3e-3,
                            patience=4, log=lambda *args: None)
    assert len(history) == 4
    assert history[-1]["sample_cider"] > history[0]["sample_cider"]
    # Every epoch says where its time went (benchmarks/course.py reads it); the values are measured,
    # so only their presence and sign are asserted, never their size.
    for record in history:
        assert set(record["seconds"]) == {"sampling", "reward", "gradient", "validation"}
        assert all(seconds >= 0 for seconds in record["seconds"].values())
    final = validation_cider(make_step_decoder(model), vocab, val_features, [[c] for c in val_captions])
    assert final == pytest.approx(max(record["val_cider"] for record in history), abs=1e-3) or \
        final >= max(record["val_cider"] for record in history)


def _barely_trained_with_snapshots():
    """A barely trained tiny model whose fit() keeps a copy of the weights after every call, its
    vocabulary, those snapshots, and self_critical's data: (train features, train references,
    validation features, validation references)."""
    vocab = synthetic_vocab()
    keras.utils.set_random_seed(0)
    train, _, _ = synthetic_data(vocab, 120, seed=1)
    model = tiny_model("merge", vocab)
    fit_captioner(model, train, epochs=2, learning_rate=1e-2, verbose=0)
    snapshots, fit = [], model.fit

    def fit_and_keep(*args, **kwargs):
        result = fit(*args, **kwargs)
        snapshots.append([weight.copy() for weight in model.get_weights()])
        return result
    model.fit = fit_and_keep
    features, captions = synthetic_captions(40, seed=3)
    val_features, val_captions = synthetic_captions(20, seed=2)
    data = (features, [[caption] for caption in captions], val_features, [[caption] for caption in val_captions])
    return model, vocab, snapshots, data


def test_self_critical_can_keep_the_mean_of_the_last_epochs():
    """average_last=2 ends with the mean weights of the last two epochs, and reports its score."""
    model, vocab, snapshots, data = _barely_trained_with_snapshots()
    history = self_critical(model, vocab, *data, epochs=3, samples=4, learning_rate=3e-3,
                            average_last=2, log=lambda *args: None)
    assert [record["epoch"] for record in history] == [1, 2, 3, "mean of 2-3"] and len(snapshots) == 3
    for kept, first, second in zip(model.get_weights(), *snapshots[1:]):
        np.testing.assert_allclose(kept, (first + second) / 2, rtol=1e-6, atol=1e-7)
    final = validation_cider(make_step_decoder(model), vocab, data[2], data[3])
    assert final == pytest.approx(history[-1]["val_cider"], abs=1e-3)


def test_one_epoch_is_kept_as_it_is_without_a_mean_record():
    """With a single fine-tuning epoch there is nothing to average: the model keeps that epoch's
    weights, and the history has no 'mean of 1-1' row repeating the epoch's own."""
    model, vocab, snapshots, data = _barely_trained_with_snapshots()
    messages = []
    history = self_critical(model, vocab, *data, epochs=1, samples=4, learning_rate=3e-3,
                            average_last=5, log=messages.append)
    assert [record["epoch"] for record in history] == [1] and len(snapshots) == 1
    for kept, only in zip(model.get_weights(), snapshots[0]):
        np.testing.assert_array_equal(kept, only)
    assert any("nothing to average" in message for message in messages)


def test_a_mean_that_scores_below_the_start_is_kept_and_reported():
    """A fine-tuning so violent (learning rate 3) that it wrecks the model: the mean is still what
    averaging keeps (validation reports, it does not choose), and the log says what to do."""
    model, vocab, snapshots, data = _barely_trained_with_snapshots()
    messages = []
    history = self_critical(model, vocab, *data, epochs=2, samples=4, learning_rate=3.0,
                            average_last=2, log=messages.append)
    for kept, first, second in zip(model.get_weights(), *snapshots):
        np.testing.assert_allclose(kept, (first + second) / 2, rtol=1e-6, atol=1e-7)
    assert history[-1]["epoch"] == "mean of 1-2"
    assert any("below the starting weights" in message and "learning rate" in message for message in messages)
