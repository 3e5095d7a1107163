"""Correctness of greedy, beam search and sampling (captioning/decoding.py).

Most tests use a tiny numpy recurrent model that implements the StepDecoder
protocol with random weights: its next-word distribution depends on the
image and on the whole caption so far, so beam bookkeeping mistakes (a state
gathered from the wrong parent, a word appended to the wrong beam) change
the answers. One test at the end runs a real Keras captioner.
"""

import itertools

import numpy as np
import pytest

from captioning.decoding import Hypothesis, beam_search, greedy_decode, length_normalised, sample_decode

PAD, START, END = 0, 1, 2


def log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class TinyRNN:
    """A numpy StepDecoder: h' = tanh(h W + embed[word] + x F), log p = log_softmax(h' O).

    `sharpness` scales the output logits: large values make the model confident.
    Every step call is recorded, to check batching."""

    def __init__(self, vocab_size, feature_dim=5, hidden=8, seed=0, sharpness=3.0, bias=None):
        random = np.random.default_rng(seed)
        self.vocab_size = vocab_size
        self.recurrent = random.normal(0, 0.6, (hidden, hidden))
        self.embed = random.normal(0, 1.0, (vocab_size, hidden))
        self.image = random.normal(0, 1.0, (feature_dim, hidden))
        self.output = random.normal(0, sharpness / np.sqrt(hidden), (hidden, vocab_size))
        self.bias = np.zeros(vocab_size) if bias is None else np.asarray(bias, dtype=float)
        self.calls = []

    def initial_state(self, features):
        return [np.tanh(np.asarray(features) @ self.image)]

    def step(self, words, states, features):
        self.calls.append(len(words))
        hidden = np.tanh(states[0] @ self.recurrent + self.embed[words] + np.asarray(features) @ self.image)
        return log_softmax(hidden @ self.output + self.bias).astype(np.float32), [hidden]


def sequence_log_prob(decoder, feature, ids, max_length):
    """Score one caption by feeding it word by word (teacher forcing), one image at a time.
    A caption shorter than max_length ended with <end>; one of max_length words did not."""
    states = decoder.initial_state(feature[None])
    inputs = [START] + list(ids)
    targets = list(ids) + ([END] if len(ids) < max_length else [])
    total = 0.0
    for word, target in zip(inputs, targets):
        log_probs, states = decoder.step(np.array([word], dtype=np.int32), states, feature[None])
        total += float(log_probs[0, target])
    return total


def all_captions(words, max_length):
    """Every caption the decoders can produce: up to max_length - 1 words followed by <end>,
    or exactly max_length words (finished by reaching the limit)."""
    for length in range(max_length + 1):
        yield from (list(caption) for caption in itertools.product(words, repeat=length))


def number_of_tokens(ids, max_length):
    return len(ids) + (1 if len(ids) < max_length else 0)


@pytest.fixture
def features():
    return np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)


@pytest.mark.parametrize("alpha", [0.0, 0.7, 2.0])
def test_beam_width_one_is_greedy(features, alpha):
    decoder = TinyRNN(vocab_size=12, sharpness=1.5)
    for max_length in (1, 3, 9):
        greedy = greedy_decode(decoder, features, start_id=START, end_id=END, max_length=max_length)
        beams = beam_search(decoder, features, start_id=START, end_id=END, max_length=max_length,
                            beam_width=1, length_alpha=alpha)
        assert [image[0].ids for image in beams] == greedy
    # The random model must produce a mix of ended and cut-off captions, or the test proves little.
    assert len({len(caption) for caption in greedy}) > 1


@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.5])
def test_beams_are_sorted_and_scored_honestly(features, alpha):
    decoder = TinyRNN(vocab_size=15, sharpness=2.0, seed=3)
    max_length = 7
    results = beam_search(decoder, features, start_id=START, end_id=END, max_length=max_length,
                          beam_width=5, length_alpha=alpha, n_best=5)
    assert len(results) == len(features)
    for feature, hypotheses in zip(features, results):
        assert len(hypotheses) == 5
        scores = [hypothesis.score for hypothesis in hypotheses]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(hypothesis.ids) for hypothesis in hypotheses}) == 5, "duplicate hypotheses"
        for hypothesis in hypotheses:
            assert isinstance(hypothesis, Hypothesis)
            assert 0 < len(hypothesis.ids) + 1 and len(hypothesis.ids) <= max_length
            # The bookkeeping agrees with scoring the caption from scratch.
            expected = sequence_log_prob(decoder, feature, hypothesis.ids, max_length)
            assert hypothesis.log_prob == pytest.approx(expected, abs=1e-4)
            tokens = number_of_tokens(hypothesis.ids, max_length)
            assert hypothesis.score == pytest.approx(hypothesis.log_prob / tokens ** alpha, abs=1e-5)


# Exhaustive search. Beam search prunes, so "beam search finds the best caption"
# is only true when nothing is ever pruned: each step an image has (live beams) x
# (content words + <end>) candidates, and k must be at least that many at every
# step but the last (where everything finishes and all candidates have the same
# length, so keeping the top k by log-prob keeps the top k by score too). Under
# that condition the result must equal brute-force enumeration for every length
# exponent alpha - including alpha > 0, where the early stop at k finished
# hypotheses could otherwise miss a longer, better-normalised caption.
#   3 content words, max_length 2: 4 candidates at step 1, so k = vocabulary size (6) is exhaustive.
#   2 content words, max_length 4: up to 4 x 3 = 12 candidates at step 3, so k = 12.
@pytest.mark.parametrize("content_words, max_length, beam_width", [(3, 2, 6), (2, 4, 12)])
@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.5])
def test_beam_search_matches_exhaustive_enumeration(features, content_words, max_length, beam_width, alpha):
    vocab_size = 3 + content_words  # <pad>, <start>, <end>, then the words
    words = range(3, vocab_size)
    for seed in range(3):
        decoder = TinyRNN(vocab_size=vocab_size, seed=seed, sharpness=1.0)
        results = beam_search(decoder, features, start_id=START, end_id=END, max_length=max_length,
                              beam_width=beam_width, length_alpha=alpha, n_best=beam_width)
        for feature, hypotheses in zip(features, results):
            scored = []
            for ids in all_captions(words, max_length):
                log_prob = sequence_log_prob(decoder, feature, ids, max_length)
                scored.append((length_normalised(log_prob, number_of_tokens(ids, max_length), alpha), ids))
            scored.sort(key=lambda item: -item[0])
            best = scored[:beam_width]
            assert [hypothesis.ids for hypothesis in hypotheses] == [ids for _, ids in best]
            assert [hypothesis.score for hypothesis in hypotheses] == pytest.approx([s for s, _ in best], abs=1e-5)


def repeats_an_ngram(ids, n):
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_is_exhaustive_search_over_the_allowed_captions(features, n):
    """The same exhaustive check, restricted to the captions without a repeated n-gram:
    banning repeats must remove exactly those, and not disturb the ranking of the rest."""
    words, max_length, beam_width, alpha = range(3, 5), 4, 12, 0.7
    for seed in range(3):
        decoder = TinyRNN(vocab_size=5, seed=seed, sharpness=1.0)
        results = beam_search(decoder, features, start_id=START, end_id=END, max_length=max_length,
                              beam_width=beam_width, length_alpha=alpha, n_best=4, no_repeat_ngram=n)
        for feature, hypotheses in zip(features, results):
            scored = sorted(((length_normalised(sequence_log_prob(decoder, feature, ids, max_length),
                                                number_of_tokens(ids, max_length), alpha), ids)
                             for ids in all_captions(words, max_length) if not repeats_an_ngram(ids, n)),
                            key=lambda item: -item[0])
            assert [hypothesis.ids for hypothesis in hypotheses] == [ids for _, ids in scored[:4]]


def test_no_repeat_ngram_stops_a_model_that_loops(features):
    # A model that strongly prefers to say word 3 then 4 then 3 then 4 ...
    decoder = TinyRNN(vocab_size=8, seed=9, sharpness=0.3)
    loop = decoder.step
    def looping_step(words, states, features):
        log_probs, states = loop(words, states, features)
        favourite = np.where(words == 3, 4, 3)
        log_probs = log_probs.copy()
        log_probs[np.arange(len(words)), favourite] += 5.0
        log_probs[:, END] -= 5.0
        return log_softmax(log_probs), states

    decoder.step = looping_step
    options = dict(start_id=START, end_id=END, max_length=8, beam_width=3, n_best=3)
    plain = [h.ids for image in beam_search(decoder, features, **options) for h in image]
    assert all(repeats_an_ngram(ids, 2) for ids in plain), "the model must loop for this test to mean anything"
    for n in (1, 2, 3):
        for image in beam_search(decoder, features, no_repeat_ngram=n, **options):
            assert all(not repeats_an_ngram(h.ids, n) for h in image)
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        beam_search(decoder, features, no_repeat_ngram=-1, **options)


def test_length_normalisation_changes_the_winner(features):
    """Without normalisation, beam search favours short captions; a larger alpha lengthens them.
    (Guards against an alpha that is accepted but ignored.)"""
    decoder = TinyRNN(vocab_size=10, seed=5, sharpness=1.0)
    mean_length = {}
    for alpha in (0.0, 2.0):
        results = beam_search(decoder, features, start_id=START, end_id=END, max_length=8,
                              beam_width=8, length_alpha=alpha)
        mean_length[alpha] = np.mean([len(image[0].ids) for image in results])
    assert mean_length[2.0] > mean_length[0.0]


def test_captions_never_contain_special_ids(features):
    # A model that loves <pad> and <start> and often says <end>: the decoders must still never emit them.
    bias = np.zeros(9)
    bias[[PAD, START]] = 8.0
    bias[END] = 1.0
    decoder = TinyRNN(vocab_size=9, seed=2, bias=bias)
    outputs = greedy_decode(decoder, features, start_id=START, end_id=END, max_length=6)
    outputs += sample_decode(decoder, features, start_id=START, end_id=END, max_length=6, seed=0)
    outputs += sample_decode(decoder, features, start_id=START, end_id=END, max_length=6, temperature=5.0, seed=0)
    for image in beam_search(decoder, features, start_id=START, end_id=END, max_length=6,
                             beam_width=4, n_best=4):
        outputs += [hypothesis.ids for hypothesis in image]
    assert any(len(ids) < 6 for ids in outputs), "the model never ended a caption: weak test"
    for ids in outputs:
        assert len(ids) <= 6
        assert not {PAD, START, END} & set(ids), ids


def test_banned_ids_are_never_emitted(features):
    decoder = TinyRNN(vocab_size=9, seed=2)
    options = dict(start_id=START, end_id=END, max_length=6)
    emitted = [word for ids in greedy_decode(decoder, features, **options) for word in ids]
    assert emitted, "the model must say something for this test to mean anything"
    favourite = int(np.bincount(emitted).argmax())
    outputs = greedy_decode(decoder, features, banned_ids=[favourite], **options)
    outputs += sample_decode(decoder, features, banned_ids=[favourite], seed=0, **options)
    outputs += [h.ids for image in beam_search(decoder, features, banned_ids=[favourite], beam_width=3, n_best=3,
                                               **options) for h in image]
    assert all(favourite not in ids for ids in outputs)
    with pytest.raises(ValueError, match="end_id"):
        greedy_decode(decoder, features, banned_ids=[END], **options)


def test_batched_results_equal_one_image_at_a_time(features):
    decoder = TinyRNN(vocab_size=14, seed=4, sharpness=2.0)
    options = dict(start_id=START, end_id=END, max_length=8)
    greedy = greedy_decode(decoder, features, **options)
    beams = beam_search(decoder, features, beam_width=4, n_best=3, **options)
    for index in range(len(features)):
        one = features[index:index + 1]
        assert greedy_decode(decoder, one, **options) == [greedy[index]]
        alone = beam_search(decoder, one, beam_width=4, n_best=3, **options)[0]
        assert [h.ids for h in alone] == [h.ids for h in beams[index]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in beams[index]], abs=1e-5)


def test_one_model_call_per_step_for_the_whole_batch(features):
    decoder = TinyRNN(vocab_size=11, seed=6)
    beam_search(decoder, features, start_id=START, end_id=END, max_length=5, beam_width=3)
    assert 1 <= len(decoder.calls) <= 5
    assert set(decoder.calls) == {len(features) * 3}
    decoder.calls.clear()
    greedy_decode(decoder, features, start_id=START, end_id=END, max_length=5)
    assert 1 <= len(decoder.calls) <= 5 and set(decoder.calls) == {len(features)}


def test_finished_captions_stop_growing(features):
    # <end> is by far the likeliest token after the first word, so captions have one word.
    bias = np.zeros(10)
    bias[END] = 6.0
    decoder = TinyRNN(vocab_size=10, seed=7, bias=bias, sharpness=0.5)
    captions = greedy_decode(decoder, features, start_id=START, end_id=END, max_length=12)
    assert all(len(caption) == 0 for caption in captions)
    assert len(decoder.calls) == 1, "decoding went on after every caption had ended"


def test_sampling_is_seeded_and_follows_the_temperature(features):
    decoder = TinyRNN(vocab_size=12, seed=8, sharpness=1.0)
    options = dict(start_id=START, end_id=END, max_length=6)
    first = sample_decode(decoder, features, seed=11, **options)
    assert sample_decode(decoder, features, seed=11, **options) == first
    assert any(sample_decode(decoder, features, seed=seed, **options) != first for seed in (12, 13))
    # samples=3: three captions per image, image after image, drawn as from each row repeated three times.
    three = sample_decode(decoder, features, samples=3, seed=11, **options)
    assert three == sample_decode(decoder, np.repeat(features, 3, axis=0), seed=11, **options)
    assert len(three) == 3 * len(features) and three[0::3] != three[1::3]
    # Temperature -> 0 is greedy.
    assert sample_decode(decoder, features, temperature=1e-4, seed=0, **options) == greedy_decode(
        decoder, features, **options)
    # At temperature 1 the first words follow the model's own distribution.
    many = np.repeat(features[:1], 4000, axis=0)
    drawn = sample_decode(decoder, many, seed=0, start_id=START, end_id=END, max_length=1)
    first_words = np.array([caption[0] if caption else END for caption in drawn])
    log_probs, _ = decoder.step(np.array([START]), decoder.initial_state(features[:1]), features[:1])
    probabilities = np.exp(log_probs[0, 2:]) / np.exp(log_probs[0, 2:]).sum()  # without <pad>, <start>
    observed = np.bincount(first_words, minlength=12)[2:] / len(first_words)
    assert np.abs(observed - probabilities).max() < 0.03


def test_bad_arguments_are_refused(features):
    decoder = TinyRNN(vocab_size=8)
    options = dict(start_id=START, end_id=END, max_length=4)
    with pytest.raises(ValueError, match="n_best"):
        beam_search(decoder, features, beam_width=2, n_best=3, **options)
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(decoder, features, beam_width=0, **options)
    with pytest.raises(ValueError, match="temperature"):
        sample_decode(decoder, features, temperature=0, **options)
    with pytest.raises(ValueError, match="samples"):
        sample_decode(decoder, features, samples=0, **options)
    with pytest.raises(ValueError, match="max_length"):
        greedy_decode(decoder, features, start_id=START, end_id=END, max_length=0)
    assert beam_search(decoder, features[:0], **options) == []


@pytest.mark.slow
def test_with_a_real_keras_captioner():
    """build_captioner + make_step_decoder: beam 1 is greedy, and beam scores match the full
    model's own log-probabilities of the chosen captions (teacher forcing through model())."""
    models = pytest.importorskip("captioning.architectures")
    vocab_size, feature_dim, max_length = 30, 16, 6
    model = models.build_captioner("merge", vocab_size=vocab_size, feature_shape=feature_dim,
                                   max_length=max_length, embed_dim=16, units=16, dropout=0.0)
    decoder = models.make_step_decoder(model)
    images = np.random.default_rng(0).normal(size=(4, feature_dim)).astype(np.float32)
    options = dict(start_id=START, end_id=END, max_length=max_length)
    greedy = greedy_decode(decoder, images, **options)
    assert [image[0].ids for image in beam_search(decoder, images, beam_width=1, **options)] == greedy
    beams = beam_search(decoder, images, beam_width=3, n_best=3, **options)
    for image, hypotheses in zip(images, beams):
        for hypothesis in hypotheses:
            ids = hypothesis.ids
            targets = ids + ([END] if len(ids) < max_length else [])
            words = np.full((1, max_length + 1), PAD, dtype=np.int32)
            words[0, :len(ids) + 1] = [START] + ids
            logits = np.asarray(model({"image": image[None], "words": words}, training=False))[0]
            full = log_softmax(logits.astype(np.float64))
            expected = sum(full[position, target] for position, target in enumerate(targets))
            assert hypothesis.log_prob == pytest.approx(expected, abs=1e-3)
