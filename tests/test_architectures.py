"""The architecture table: the four merge/inject models, their one-step decoders, and a new
architecture registered from outside the package (attention has tests/test_attention.py)."""

import numpy as np
import pytest

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402

from captioning import architectures  # noqa: E402
from captioning.architectures import ARCHITECTURES, build_captioner, make_step_decoder  # noqa: E402

VOCAB, FEATURES, LENGTH = 23, 7, 5
POOLED = [name for name, spec in ARCHITECTURES.items() if spec.features == "pooled"]


def small_model(arch, rnn="lstm", seed=1, **options):
    keras.utils.set_random_seed(seed)
    return build_captioner(arch, vocab_size=VOCAB, feature_shape=FEATURES, max_length=LENGTH,
                           embed_dim=6, units=8, rnn=rnn, dropout=0.3, **options)


def random_batch(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, FEATURES)).astype("float32")
    words = rng.integers(1, VOCAB, size=(batch, LENGTH + 1)).astype("int32")
    words[:, 0] = 1  # <start>
    return features, words


def test_the_table_holds_the_paper_s_four_and_attention():
    assert POOLED == ["merge", "par-inject", "init-inject", "pre-inject"]
    assert ARCHITECTURES["attention"].features == "grid"
    assert architectures.pooling("merge") == "avg" and architectures.pooling("attention") is None


@pytest.mark.parametrize("arch", POOLED)
def test_shapes_and_names(arch):
    model = small_model(arch)
    features, words = random_batch()
    logits = model({"image": features, "words": words})
    assert logits.shape == (4, LENGTH + 1, VOCAB)
    names = {layer.name for layer in model.layers}
    assert {"word_embedding", "decoder_rnn", "word_logits"} <= names
    assert model.name == arch.replace("-", "_") + "_captioner"


def test_architectures_put_the_image_in_different_places():
    # Merge: the RNN never sees the image, so its state does not depend on it.
    merge = small_model("merge")
    rnn_input = merge.get_layer("decoder_rnn").input
    assert rnn_input.shape[-1] == 6  # word embeddings only
    par = small_model("par-inject")
    assert par.get_layer("decoder_rnn").input.shape[-1] == 6 + 6  # word + image at every step


def test_merge_concat_is_wider_than_add():
    add = small_model("merge", merge_mode="add")
    concat = small_model("merge", merge_mode="concat")
    assert concat.get_layer("word_logits").kernel.shape == (16, VOCAB)
    assert add.get_layer("word_logits").kernel.shape == (8, VOCAB)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_captioner("transformer", vocab_size=5, feature_shape=3, max_length=4)
    with pytest.raises(ValueError, match="par-inject does not take option.*merge_mode"):
        build_captioner("par-inject", vocab_size=5, feature_shape=3, max_length=4, merge_mode="concat")
    with pytest.raises(ValueError, match="merge_mode"):
        build_captioner("merge", vocab_size=5, feature_shape=3, max_length=4, merge_mode="multiply")
    with pytest.raises(ValueError, match="not a grid"):
        build_captioner("merge", vocab_size=5, feature_shape=(7, 7, 3), max_length=4)
    with pytest.raises(ValueError, match="rnn"):
        build_captioner("merge", vocab_size=5, feature_shape=3, max_length=4, rnn="transformer")
    with pytest.raises(ValueError, match="dropout"):
        build_captioner("merge", vocab_size=5, feature_shape=3, max_length=4, dropout=1.5)


def sequence_log_probs(model, features, words):
    logits = model({"image": features, "words": words}, training=False)
    return tf.nn.log_softmax(logits).numpy()


def step_log_probs(decoder, features, words):
    states = decoder.initial_state(features)
    outputs = []
    for position in range(words.shape[1]):
        log_probs, states = decoder.step(words[:, position], states, features)
        outputs.append(log_probs)
    return np.stack(outputs, axis=1)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("arch", POOLED)
def test_step_decoder_matches_the_full_sequence_model(arch, rnn):
    model = small_model(arch, rnn=rnn)
    features, words = random_batch()
    decoder = make_step_decoder(model)
    assert decoder.vocab_size == VOCAB
    step = step_log_probs(decoder, features, words)
    full = sequence_log_probs(model, features, words)
    assert step.dtype == np.float32 and step.shape == full.shape
    np.testing.assert_allclose(step, full, atol=1e-5)
    # Each step's output is a distribution over the vocabulary.
    np.testing.assert_allclose(np.exp(step).sum(-1), 1.0, atol=1e-5)


def test_step_decoder_with_concat_merge():
    model = small_model("merge", merge_mode="concat")
    features, words = random_batch()
    np.testing.assert_allclose(step_log_probs(make_step_decoder(model), features, words),
                               sequence_log_probs(model, features, words), atol=1e-5)


@pytest.mark.parametrize("arch", ["merge", "pre-inject"])
def test_step_decoder_on_a_reloaded_model(arch, tmp_path):
    model = small_model(arch, rnn="gru")
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True, compile=False)
    features, words = random_batch()
    np.testing.assert_allclose(step_log_probs(make_step_decoder(reloaded), features, words),
                               sequence_log_probs(model, features, words), atol=1e-5)


def test_step_decoder_traces_once_for_any_batch_size():
    decoder = make_step_decoder(small_model("init-inject"))
    for batch in (1, 3, 8):
        features, words = random_batch(batch)
        states = decoder.initial_state(features)
        decoder.step(words[:, 0], states, features)
    assert decoder._step.experimental_get_tracing_count() == 1
    assert decoder._initial.experimental_get_tracing_count() == 1


def test_many_decoders_raise_no_retracing_warning():
    # A notebook that builds one decoder per model must not show TensorFlow's "triggered
    # tf.function retracing" warning: each decoder traces once, and TensorFlow must count them apart.
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf.get_logger().addHandler(handler)
    try:
        for seed in range(8):
            decoder = make_step_decoder(small_model("merge", seed=seed))
            features, words = random_batch(2)
            decoder.step(words[:, 0], decoder.initial_state(features), features)
    finally:
        tf.get_logger().removeHandler(handler)
    assert not [record for record in records if "retracing" in record.getMessage()]


def test_a_model_from_elsewhere_is_refused():
    inputs = keras.Input((3,))
    other = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="classifier")
    with pytest.raises(ValueError, match="build_captioner"):
        make_step_decoder(other)


def test_word_dropout_hides_words_only_while_training():
    from captioning.layers import WordDropout
    from captioning.vocab import START_ID, UNK_ID
    words = np.random.default_rng(0).integers(4, VOCAB, size=(400, LENGTH + 1)).astype("int32")
    words[:, 0] = START_ID
    layer = WordDropout(0.35, seed=3)
    dropped = np.asarray(layer(words, training=True))
    hidden = dropped != words
    assert (dropped[hidden] == UNK_ID).all() and not hidden[:, 0].any()  # <start> is never hidden
    assert 0.30 < hidden[:, 1:].mean() < 0.40
    np.testing.assert_array_equal(np.asarray(layer(words, training=False)), words)
    with pytest.raises(ValueError, match="word_dropout"):
        WordDropout(1.0)


@pytest.mark.parametrize("arch", ["merge", "attention"])
def test_word_dropout_changes_training_not_decoding(arch, tmp_path):
    keras.utils.set_random_seed(2)
    grid = (2, 2) if arch == "attention" else ()
    model = build_captioner(arch, vocab_size=VOCAB, feature_shape=(*grid, FEATURES), max_length=LENGTH, embed_dim=6,
                            units=8, dropout=0.0, word_dropout=0.5)
    features, words = random_batch()
    features = np.repeat(features[:, None, None, :], 4, axis=1).reshape(4, 2, 2, FEATURES) if grid else features
    inputs = {"image": features, "words": words}
    np.testing.assert_allclose(model(inputs, training=False), model(inputs, training=False))
    assert not np.allclose(model(inputs, training=True), model(inputs, training=False), atol=1e-6)
    # It survives saving, and the reloaded model's step decoder ignores it.
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    assert again.get_layer("word_dropout").rate == 0.5
    np.testing.assert_allclose(again(inputs, training=False), model(inputs, training=False), rtol=1e-5, atol=1e-6)
    decoder = make_step_decoder(again)
    log_probs, _ = decoder.step(words[:, 0], decoder.initial_state(features), features)
    np.testing.assert_allclose(log_probs, keras.ops.log_softmax(model(inputs, training=False)[:, 0]),
                               rtol=1e-4, atol=1e-5)


# --- a new architecture, from outside the package -------------------------------------

def gru_merge_layers(*, vocab_size, embed_dim, units, rnn, dropout, word_dropout):
    """A bare merge model with a GRU: what a learner writes to try an idea of their own.
    The table's contract: an Input named "image" (build_captioner makes it), and layers
    named word_embedding, decoder_rnn (a Keras RNN) and word_logits."""
    layers = [keras.layers.Embedding(vocab_size, embed_dim, name="word_embedding"),
              keras.layers.GRU(units, return_sequences=True, return_state=True, name="decoder_rnn"),
              keras.layers.Dense(units, activation="relu", name="image_projection"),
              keras.layers.Dense(vocab_size, name="word_logits")]
    return {layer.name: layer for layer in layers}


def gru_merge(layers, image, words, states):
    outputs, *states = layers["decoder_rnn"](layers["word_embedding"](words), initial_state=states)
    image_vector = keras.layers.Reshape((1, -1))(layers["image_projection"](image))
    return layers["word_logits"](keras.layers.Add()([outputs, image_vector])), states


def test_a_registered_architecture_trains_saves_reloads_and_decodes(tmp_path):
    from captioning.bundle import Captioner, save_bundle
    from captioning.training import fit_captioner
    from test_training import synthetic_captions, synthetic_data, synthetic_vocab

    architectures.register("gru-merge", architectures.Architecture(gru_merge_layers, lambda layers, image: None,
                                                                   gru_merge))
    try:
        keras.utils.set_random_seed(0)
        vocab = synthetic_vocab()
        train, _, _ = synthetic_data(vocab, 240, seed=1)
        model = build_captioner("gru-merge", vocab_size=len(vocab), feature_shape=16, max_length=vocab.max_length,
                                embed_dim=16, units=32)
        fit_captioner(model, train, epochs=20, learning_rate=1e-2, patience=20, verbose=0)
        save_bundle(tmp_path / "bundle", model, vocab, {"arch": "gru-merge", "dataset": "synthetic", "encoder": {}})
        captioner = Captioner.load(tmp_path / "bundle")
        assert captioner.model.get_layer("decoder_rnn").__class__.__name__ == "GRU"
        features, captions = synthetic_captions(40, seed=2)  # images it never saw
        written = captioner.caption_features(features, beam_width=3)
        assert np.mean([caption == truth for caption, truth in zip(written, captions)]) >= 0.9
    finally:
        del architectures.ARCHITECTURES["gru-merge"]
