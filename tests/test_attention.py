"""The soft-attention captioner: weights that are distributions over the regions, shapes for
both encoders' grids and the regions they are pooled into, a task only attention can learn, decoding with attention weights,
the doubly stochastic penalty, a bundle round trip, and `train --arch attention` end to end."""

import json

import numpy as np
import pytest

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402

from captioning.attention import GRID_POOL, doubly_stochastic_penalty  # noqa: E402
from captioning.bundle import Captioner, save_bundle  # noqa: E402
from captioning.decoding import beam_search, greedy_decode, sample_decode  # noqa: E402
from captioning.architectures import build_captioner, make_step_decoder  # noqa: E402
from captioning.training import fit_captioner, make_dataset  # noqa: E402
from captioning.vocab import Vocabulary  # noqa: E402
from conftest import run_cli  # noqa: E402

VOCAB, LENGTH = 23, 5


def tiny_attention(grid_shape, channels, rnn="lstm", seed=1, **options):
    keras.utils.set_random_seed(seed)
    return build_captioner("attention", vocab_size=VOCAB, feature_shape=(*grid_shape, channels), max_length=LENGTH,
                           embed_dim=6, units=8, rnn=rnn, dropout=0.3, **options)


def random_inputs(grid_shape, channels, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    grids = rng.random((batch, *grid_shape, channels)).astype("float32")
    words = rng.integers(3, VOCAB, size=(batch, LENGTH + 1)).astype("int32")
    words[:, 0] = 1  # <start>
    return grids, words


def replay(decoder, grids, words):
    """Teacher-force `words` through the step decoder: (log-probs, attention) per step."""
    states = decoder.initial_state(grids)
    log_probs, weights = [], []
    for position in range(words.shape[1]):
        step_log_probs, states = decoder.step(words[:, position], states, grids)
        log_probs.append(step_log_probs)
        weights.append(decoder.last_attention)
    return np.stack(log_probs, axis=1), np.stack(weights, axis=1)


class PerWordDecoder:
    """The StepDecoder without `remember`: the decoders then hand it the features at every
    step, and it computes the regions and keys again each time (as before they were remembered)."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.attention_size = decoder.attention_size

    def initial_state(self, features):
        return self.decoder.initial_state(features)

    def step(self, words, states, features):
        assert not isinstance(features, list)
        return self.decoder.step(words, states, features)

    @property
    def last_attention(self):
        return self.decoder.last_attention


def test_remembering_each_image_once_decodes_exactly_as_recomputing_it_every_word(monkeypatch):
    model = tiny_attention((4, 4), 16)
    grids, _ = random_inputs((4, 4), 16, batch=5)
    decoder = make_step_decoder(model)
    remembered = []
    original = decoder.remember
    monkeypatch.setattr(decoder, "remember", lambda features: remembered.append(len(features)) or original(features))
    options = dict(start_id=1, end_id=2, max_length=LENGTH)
    fast = beam_search(decoder, grids, beam_width=3, n_best=2, return_attention=True, **options)
    # The compiled search computes the memory in its graph, once, before the loop over the words:
    # the image_memory model's ops are in the graph, and none of them in the loop's body.
    (search,) = decoder.compiled_searches.values()
    graph = search.get_concrete_function().graph.as_graph_def()
    assert any(node.name.startswith("image_memory") for node in graph.node)
    bodies = [function for function in graph.library.function if "while_body" in function.signature.name]
    assert bodies and not any("image_memory" in node.name for body in bodies for node in body.node_def)
    slow = beam_search(PerWordDecoder(decoder), grids, beam_width=3, n_best=2, return_attention=True, **options)
    assert remembered == [15] * len(remembered) and len(remembered) > 1  # 5 images x 3 beams, every word
    for fast_image, slow_image in zip(fast, slow):
        for a, b in zip(fast_image, slow_image):
            assert a.ids == b.ids and a.log_prob == pytest.approx(b.log_prob, abs=1e-5)
            np.testing.assert_allclose(a.attention, b.attention, atol=1e-6)
    remembered.clear()
    greedy = greedy_decode(decoder, grids, **options)
    assert remembered == [5]  # once per image, not once per word
    assert greedy == greedy_decode(PerWordDecoder(decoder), grids, **options)
    repeated = sample_decode(decoder, np.repeat(grids, 4, axis=0), seed=3, **options)
    assert repeated == sample_decode(PerWordDecoder(decoder), np.repeat(grids, 4, axis=0), seed=3, **options)
    # Four samples per image (self-critical fine-tuning's way): the image's memory is computed
    # once, not once per sample, and the draws are those of the image's row repeated four times.
    remembered.clear()
    assert sample_decode(decoder, grids, samples=4, seed=3, **options) == repeated
    assert remembered == [5]
    assert len(set(map(tuple, repeated))) > 5  # the samples of an image do differ
    # What is remembered: the projected regions and their attention keys, one row per image;
    # the 4 x 4 grid is read as 2 x 2 regions (attention.GRID_POOL), as the weights are.
    regions, keys = original(grids)
    assert regions.shape == (5, 4, 8) and keys.shape == (5, 4, 8)
    assert decoder.attention_size == 4 and fast[0][0].attention.shape[1] == 4


def test_the_remembered_regions_become_tensors_once_per_decoding_not_at_every_word(monkeypatch):
    model = tiny_attention((4, 4), 16)
    grids, _ = random_inputs((4, 4), 16, batch=4)
    decoder = make_step_decoder(model)
    passed, step = [], decoder._step
    monkeypatch.setattr(decoder, "_step",
                        lambda words, states, memory: passed.append(memory) or step(words, states, memory))
    options = dict(start_id=1, end_id=2, max_length=LENGTH)
    first = sample_decode(decoder, grids, seed=3, **options)
    steps = len(passed)
    assert steps > 1 and all(all(a is b for a, b in zip(memory, passed[0])) for memory in passed)  # the same tensors
    second = sample_decode(decoder, grids, seed=3, **options)
    assert second == first and all(a is not b for a, b in zip(passed[steps], passed[0]))  # new arrays, new tensors
    # A caller who passes the features (not remembered arrays) at every step gets the same captions.
    assert sample_decode(PerWordDecoder(decoder), grids, seed=3, **options) == first


# --- shapes and distributions -----------------------------------------------------------

@pytest.mark.parametrize("grid_shape, channels, grid_pool, regions", [
    ((8, 8), 2048, GRID_POOL, 16), ((10, 10), 1280, GRID_POOL, 25),  # the default: 2 x 2 cells per region
    ((10, 10), 1280, 1, 100), ((7, 7), 64, 2, 16)],  # every cell a region; an odd side keeps its last row
    ids=["inception_v3", "mobilenet_v2", "mobilenet_v2-every-cell", "odd-side"])
def test_encoder_grids_shapes_and_weights_that_sum_to_one(grid_shape, channels, grid_pool, regions):
    model = tiny_attention(grid_shape, channels, grid_pool=grid_pool)
    grids, words = random_inputs(grid_shape, channels)
    assert model.get_layer("image").batch_shape == (None, *grid_shape, channels)
    assert (grid_pool > 1) == any(layer.name == "grid_pooling" for layer in model.layers)
    logits = model({"image": grids, "words": words}, training=False)
    assert logits.shape == (3, LENGTH + 1, VOCAB)

    decoder = make_step_decoder(model)
    assert decoder.attention_size == regions
    flat = grids.reshape(3, int(np.prod(grid_shape)), channels)  # (N, L, C) is accepted as well as (N, H, W, C)
    log_probs, weights = replay(decoder, flat, words)
    assert weights.shape == (3, LENGTH + 1, regions)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)  # a distribution at every step
    assert (weights >= 0).all()
    # The one-step decoder reuses the trained layers: same numbers as the full-sequence model.
    np.testing.assert_allclose(log_probs, tf.nn.log_softmax(logits).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="features must have shape"):
        decoder.initial_state(grids[:, :, :, :10])


@pytest.mark.parametrize("grid_pool", [0, -2, 1.5, True, "2"])
def test_a_grid_pool_that_is_not_a_positive_integer_is_a_clear_error(grid_pool):
    with pytest.raises(ValueError, match="grid_pool must be a positive integer"):
        tiny_attention((4, 4), 16, grid_pool=grid_pool)


def test_gru_variant_and_vectors_as_a_one_location_grid():
    model = tiny_attention((), 7, rnn="gru")  # a pooled vector is a grid of one location
    grids, words = random_inputs((), 7)
    log_probs, weights = replay(make_step_decoder(model), grids, words)
    np.testing.assert_allclose(weights, 1.0)
    full = tf.nn.log_softmax(model({"image": grids, "words": words}, training=False)).numpy()
    np.testing.assert_allclose(log_probs, full, atol=1e-5)


def test_the_other_architectures_refuse_grids():
    with pytest.raises(ValueError, match="grid"):
        build_captioner("merge", vocab_size=5, feature_shape=(7, 7, 3), max_length=4)


# --- the doubly stochastic penalty ---------------------------------------------------------

def test_penalty_follows_the_formula_over_real_steps_only():
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(4), size=(2, 5)).astype("float32")  # (batch, steps, L)
    words = np.array([[1, 7, 8, 2, 0], [1, 9, 0, 0, 0]], dtype="int32")
    expected = np.mean([((1 - weights[b, words[b] != 0].sum(axis=0)) ** 2).sum() for b in range(2)])
    np.testing.assert_allclose(float(doubly_stochastic_penalty(weights, words)), expected, rtol=1e-5)
    # What the model attends to while reading padding does not count.
    changed = weights.copy()
    changed[1, 2:] = rng.dirichlet(np.ones(4), size=3)
    np.testing.assert_allclose(float(doubly_stochastic_penalty(changed, words)), expected, rtol=1e-5)


def test_penalty_is_a_training_loss_only_when_asked():
    grids, words = random_inputs((3, 3), 4)
    with_penalty = tiny_attention((3, 3), 4, attention_penalty=0.5)
    with_penalty({"image": grids, "words": words}, training=True)
    assert len(with_penalty.losses) == 1 and float(with_penalty.losses[0]) > 0
    without = tiny_attention((3, 3), 4)
    without({"image": grids, "words": words}, training=True)
    assert not without.losses


# --- learning where things are --------------------------------------------------------------

GRID, CHANNELS = 4, 16
SIDE = GRID // GRID_POOL  # the model reads 2 x 2 regions of 2 x 2 cells: the quadrants the captions name
_rng = np.random.default_rng(123)
# A CNN's feature vector says what is in a region and, through padding and
# receptive fields, a little of where the region is (Islam et al. 2020, "How
# much position information do CNNs encode?"). We model that with a fixed
# signature per location; the object is one strong vector in one region.
SIGNATURES = _rng.normal(size=(GRID * GRID, CHANNELS)).astype("float32")
OBJECT = 3.0 * _rng.normal(size=CHANNELS).astype("float32")


def where_data(count, seed):
    """Grids (count, 4, 4, C) of noise with one object; the caption names its quadrant."""
    rng = np.random.default_rng(seed)
    grids = SIGNATURES + rng.normal(scale=0.5, size=(count, GRID * GRID, CHANNELS)).astype("float32")
    cells = rng.integers(GRID * GRID, size=count)
    grids[np.arange(count), cells] += OBJECT
    captions = [f"object {'top' if cell // GRID < GRID // 2 else 'bottom'} "
                f"{'left' if cell % GRID < GRID // 2 else 'right'}" for cell in cells]
    return grids.reshape(count, GRID, GRID, CHANNELS), captions


def train_where(arch, grids, captions, vocab, epochs):
    keras.utils.set_random_seed(0)
    grid_shape = grids.shape[1:-1]
    model = build_captioner(arch, vocab_size=len(vocab), feature_shape=(*grid_shape, CHANNELS),
                            max_length=vocab.max_length, embed_dim=16, units=32, dropout=0.0)
    data = make_dataset(grids, np.arange(len(grids)), vocab.encode_batch(captions), batch_size=32, seed=0)
    fit_captioner(model, data, epochs=epochs, learning_rate=1e-2, patience=epochs, verbose=0)
    return model


def exact_match(model, vocab, grids, captions):
    ids = greedy_decode(make_step_decoder(model), grids, start_id=vocab.start_id, end_id=vocab.end_id,
                        max_length=vocab.max_length)
    return np.mean([vocab.decode(row) == caption for row, caption in zip(ids, captions)])


@pytest.fixture(scope="module")
def where():
    grids, captions = where_data(480, seed=1)
    vocab = Vocabulary.build(captions, min_count=1, max_length=4)
    model = train_where("attention", grids, captions, vocab, epochs=20)
    return model, vocab


def test_attention_learns_where_and_pooled_merge_cannot(where):
    model, vocab = where
    grids, captions = where_data(480, seed=1)
    held_out, held_out_captions = where_data(100, seed=2)
    assert exact_match(model, vocab, held_out, held_out_captions) >= 0.9
    # The same task for merge on mean-pooled features: the object adds the same
    # vector to the mean wherever it is, so the caption's location is a guess.
    merge = train_where("merge", grids.mean(axis=(1, 2)), captions, vocab, epochs=20)
    assert exact_match(merge, vocab, held_out.mean(axis=(1, 2)), held_out_captions) <= 0.5


def test_attention_looks_at_the_object_when_naming_its_place(where):
    model, vocab = where
    grids, captions = where_data(50, seed=3)
    ids, weights = greedy_decode(make_step_decoder(model), grids, start_id=vocab.start_id, end_id=vocab.end_id,
                                 max_length=vocab.max_length, return_attention=True)
    cells = np.linalg.norm(grids.reshape(50, -1, CHANNELS) - SIGNATURES, axis=-1).argmax(axis=1)
    objects = cells // GRID // GRID_POOL * SIDE + cells % GRID // GRID_POOL  # the region holding the object's cell
    assert all(len(row) == len(row_weights) for row, row_weights in zip(ids, weights))
    # While choosing "top"/"bottom" (step 1) it looks hardest at the object's region...
    assert np.mean([row_weights[1].argmax() == region for row_weights, region in zip(weights, objects)]) >= 0.8
    # ...and over both place words (steps 1-2) it gives that region more than twice the uniform 1/4.
    assert np.mean([row_weights[1:, region].mean() for row_weights, region in zip(weights, objects)]) > 2 / SIDE ** 2


# --- decoding with attention weights ----------------------------------------------------------

def test_beam_search_carries_each_hypothesis_own_weights(where):
    model, vocab = where
    decoder = make_step_decoder(model)
    grids, _ = where_data(6, seed=4)
    common = dict(start_id=vocab.start_id, end_id=vocab.end_id, max_length=vocab.max_length)
    results = beam_search(decoder, grids, beam_width=4, n_best=4, return_attention=True, **common)
    for image, hypotheses in enumerate(results):
        for hypothesis in hypotheses:
            # Replaying the hypothesis' words gives exactly the weights beam search backtracked.
            words = np.array([[vocab.start_id, *hypothesis.ids]], dtype="int32")
            _, replayed = replay(decoder, grids[image:image + 1], words)
            assert hypothesis.attention.shape == (len(hypothesis.ids), SIDE * SIDE)
            np.testing.assert_allclose(hypothesis.attention, replayed[0, :len(hypothesis.ids)], atol=1e-5)
    greedy_ids, greedy_weights = greedy_decode(decoder, grids, return_attention=True, **common)
    width_one = beam_search(decoder, grids, beam_width=1, length_alpha=0.0, return_attention=True, **common)
    for ids, weights, [best] in zip(greedy_ids, greedy_weights, width_one):
        assert best.ids == ids
        np.testing.assert_allclose(best.attention, weights, atol=1e-6)


def test_asking_a_merge_decoder_for_attention_is_a_clear_error():
    model = build_captioner("merge", vocab_size=VOCAB, feature_shape=4, max_length=LENGTH, units=8, embed_dim=6)
    with pytest.raises(ValueError, match="attention"):
        greedy_decode(make_step_decoder(model), np.ones((2, 4)), start_id=1, end_id=2, max_length=LENGTH,
                      return_attention=True)


# --- bundle ----------------------------------------------------------------------------------

def test_bundle_round_trip_in_safe_mode(where, tmp_path):
    model, vocab = where
    settings = {"arch": "attention", "dataset": "synthetic", "encoder": {"encoder": "mobilenet_v2", "pooling": "none"}}
    bundle = save_bundle(tmp_path / "bundle", model, vocab, settings)
    assert json.loads((bundle / "bundle.json").read_text())["feature_shape"] == [GRID, GRID, CHANNELS]
    captioner = Captioner.load(bundle)  # safe_mode=True inside
    grids, captions = where_data(20, seed=5)
    words = vocab.encode_batch(captions)[:, :-1]
    np.testing.assert_allclose(captioner.model({"image": grids, "words": words}, training=False),
                               model({"image": grids, "words": words}, training=False), atol=1e-6)
    # Grids as (N, H, W, C) or flattened (N, L, C): the same captions.
    assert captioner.caption_features(grids) == captioner.caption_features(grids.reshape(20, -1, CHANNELS))
    attended = captioner.attend(grids[:3], beam_width=3)
    for (words_said, maps), caption in zip(attended, captioner.caption_features(grids[:3])):
        assert " ".join(words_said) == caption
        assert maps.shape == (len(words_said), SIDE, SIDE)  # one map per word, over the regions
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        captioner.caption_features(grids.mean(axis=(1, 2)))


# --- the command line, on real data -------------------------------------------------------------

@pytest.mark.slow
def test_train_and_caption_with_attention_from_the_command_line(flickr8k_small_dir, mobilenet_weights, flickr8k_work_dir,
                                                                tmp_path):
    bundle = tmp_path / "attention"
    # The session's work folder: notebook 06 reuses the grid cache made here.
    run_cli("train", "--dataset", "flickr8k", "--data-dir", flickr8k_small_dir, "--encoder", "mobilenet_v2",
            "--weights", mobilenet_weights, "--arch", "attention", "--epochs", 1, "--self-critical-epochs", 0,
            "--cache-dir", flickr8k_work_dir, "--out", bundle)
    settings = json.loads((bundle / "bundle.json").read_text())
    assert settings["arch"] == "attention" and settings["encoder"]["pooling"] == "none"
    assert settings["feature_shape"] == [10, 10, 1280]
    assert (flickr8k_work_dir / "features" / "flickr8k-mobilenet_v2-none" / "manifest.json").is_file()
    photos = sorted((flickr8k_small_dir / "images").glob("*.jpg"))[:2]
    result = run_cli("caption", "--model", bundle, *photos)
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [path for path, _ in lines] == [str(photo) for photo in photos]
    assert all(caption.strip() for _, caption in lines)
