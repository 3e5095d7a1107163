"""Turning a trained captioner into captions: greedy, beam search and sampling.

A captioner predicts one word at a time. Decoding is the loop around it:
feed <start>, pick a word, feed that word back, and so on until <end>.
Notebook 04 teaches the three strategies here:

    greedy_decode   take the most likely word at every step
    beam_search     keep the k most likely partial captions, return the n best
    sample_decode   draw each word at random (with a temperature), for variety

All three talk to the model only through the StepDecoder protocol of
architectures.py, so they work for every architecture:

    decoder.initial_state(features)            -> states (list of arrays, one row per image)
    decoder.step(words, states, features)      -> (log_probs (rows, vocab), new states)

and, optionally, `decoder.remember(features)`: what every step needs of each
image, computed once (attention's regions and keys), which the decoders then
pass to `step` in place of the features.

and all three are *batched*: one `decoder.step` call per time step for the
whole batch - N images, or N images x k beams flattened to N*k rows - never a
model call per image per word. The older tutorials' per-image loop manages
about one caption a second on a laptop CPU; benchmarks/decoding.py measures
the difference.

Greedy and sampling are numpy loops around `step`. Beam search is written in
TensorFlow ops (beams.py), so that for a StepDecoder the whole loop runs as
one compiled graph - the graph export.py saves, so that `caption`, validation,
the notebooks and an exported model share one beam search - and a decoder of
plain Python runs the same ops eagerly.

Lengths. `max_length` is the longest caption in words. A hypothesis is
finished when it emits <end> or when it has `max_length` words (it is then
kept as it is, without <end>). Its length, for length normalisation, is the
number of tokens the model chose: its words, plus one for <end> if it has it.

Attention. A decoder whose `last_attention` holds the weights over the image's
regions, (rows, L), that its last `step` used (architectures that attend) lets
greedy and beam search return, with `return_attention=True`, one row of
weights per word of the chosen caption (notebook 06). Beam search sizes its
rows by the decoder's `attention_size` (L); a decoder without one attends over
every cell of the features' grid.
"""

import functools
from dataclasses import dataclass

import numpy as np

from captioning import quiet_tensorflow

tf = quiet_tensorflow()

from captioning.beams import length_divisors, search_ops  # noqa: E402
from captioning.vocab import PAD_ID  # noqa: E402

# The decoders never emit <pad> nor <start>: those ids get probability zero at
# every step. Callers may ban more with `banned_ids`, e.g. vocab.unk_id: a model
# trained with rare words replaced by <unk> happily predicts it, and users do
# not want to read it.

# Length normalisation: score = log_prob / length ** alpha. Log-probabilities
# only fall as a caption grows, so with alpha = 0 beam search prefers short,
# generic captions ("a dog"). alpha = 1 divides by the length (the mean
# log-prob per token), which can over-reward rambling. 0.7 sits in between,
# the value Wu et al. (2016, GNMT) found best; notebook 04 plots the effect.
DEFAULT_LENGTH_ALPHA = 0.7


@dataclass
class Hypothesis:
    """One finished caption from beam search: word ids (no specials), its total
    log-probability under the model, and its length-normalised score."""

    ids: list
    log_prob: float
    score: float
    attention: object = None  # (len(ids), L) weights over the grid, with return_attention=True


def length_normalised(log_prob, length, alpha):
    """The beam-search score: log_prob / length ** alpha (notebook 04)."""
    return float(log_prob) / (max(int(length), 1) ** alpha)


# --- shared plumbing ------------------------------------------------------------

def _check(features, start_id, end_id, max_length):
    features = np.asarray(features, dtype=np.float32)
    if features.ndim < 2:
        raise ValueError(f"features must have one row per image, got shape {features.shape}")
    if int(max_length) < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if start_id == end_id:
        raise ValueError(f"start_id and end_id must differ, both are {start_id}")
    return features


def _step(decoder, words, states, features, banned):
    """One batched model call; the banned ids (<start>, <pad>) get log-prob -inf."""
    log_probs, states = decoder.step(words.astype(np.int32), states, features)
    log_probs = np.array(log_probs, dtype=np.float32)  # a writable copy
    log_probs[:, banned] = -np.inf
    return log_probs, [np.asarray(state) for state in states]


def _remember(decoder, features):
    """What the decoder computes from each image once, before the words (StepDecoder.remember:
    attention's regions and keys), for every step to read; the features for a decoder without it."""
    remember = getattr(decoder, "remember", None)
    return remember(features) if remember is not None else features


def _repeat_rows(rows, repeats):
    """Each row `repeats` times in a row (image after image), for an array or a list of arrays."""
    if isinstance(rows, list):
        return [np.repeat(np.asarray(part), repeats, axis=0) for part in rows]
    return np.repeat(rows, repeats, axis=0)


NO_ATTENTION = ("return_attention=True needs a decoder with attention weights (`last_attention`): only the "
                "attention architecture has them")


def _attention(decoder, rows):
    """The weights over the grid (rows, L) of the decoder's last step."""
    weights = getattr(decoder, "last_attention", None)
    if weights is None:
        raise ValueError(NO_ATTENTION)
    return np.asarray(weights, dtype=np.float32).reshape(rows, -1)


def _banned(start_id, end_id, pad_id, banned_ids):
    banned = {int(start_id), int(pad_id), *map(int, banned_ids)}
    if end_id in banned:
        raise ValueError(f"end_id {end_id} cannot be banned: captions could never finish")
    return sorted(banned)


# --- greedy ----------------------------------------------------------------------

def _word_by_word(decoder, features, choose, *, start_id, end_id, max_length, pad_id, banned_ids,
                  return_attention=False, repeats=1):
    """The loop that greedy and sampled decoding share: feed every row its last word,
    let `choose` pick each row's next word from the (rows, vocabulary)
    log-probabilities, stop a row at <end>. Each image has `repeats` rows, one after
    the other. Returns the captions (lists of word ids), one per row, and, with
    return_attention, one (len(ids), L) array of attention weights per row."""
    features = _check(features, start_id, end_id, max_length)
    count = len(features) * repeats
    captions, attention = [[] for _ in range(count)], [[] for _ in range(count)]
    if count == 0:
        return captions, attention
    # Once per image, not once per word nor once per row: the initial states and what
    # the steps read of the image (attention's regions and keys), then repeated.
    states = _repeat_rows([np.asarray(state) for state in decoder.initial_state(features)], repeats)
    features = _remember(decoder, features)
    if repeats > 1:
        features = _repeat_rows(features, repeats)
    words = np.full(count, start_id, dtype=np.int32)
    finished = np.zeros(count, dtype=bool)
    banned = _banned(start_id, end_id, pad_id, banned_ids)
    for _ in range(int(max_length)):
        log_probs, states = _step(decoder, words, states, features, banned)
        weights = _attention(decoder, count) if return_attention else None
        words = np.asarray(choose(log_probs), dtype=np.int32)
        # Finished rows still ride along in the batch (a fixed batch shape
        # keeps the compiled model from retracing) but their words are ignored.
        finished |= words == end_id
        for row in np.flatnonzero(~finished):
            captions[row].append(int(words[row]))
            if return_attention:
                attention[row].append(weights[row])
        if finished.all():
            break
    if return_attention:
        locations = weights.shape[1]
        attention = [np.asarray(rows, dtype=np.float32).reshape(-1, locations) for rows in attention]
    return captions, attention


def greedy_decode(decoder, features, *, start_id, end_id, max_length, pad_id=PAD_ID, banned_ids=(),
                  return_attention=False):
    """Caption each image with the most likely word at every step (notebook 04).

    Fast and deterministic, but short-sighted: a likely first word can lead
    to an unlikely caption. Returns one list of word ids per image; with
    return_attention=True, (those lists, one (len(ids), L) array of attention
    weights per image) (notebook 06).
    """
    captions, attention = _word_by_word(decoder, features, lambda log_probs: log_probs.argmax(axis=1),
                                        start_id=start_id, end_id=end_id, max_length=max_length, pad_id=pad_id,
                                        banned_ids=banned_ids, return_attention=return_attention)
    return (captions, attention) if return_attention else captions


# --- sampling --------------------------------------------------------------------

def sample_decode(decoder, features, *, start_id, end_id, max_length, temperature=1.0, seed=None,
                  pad_id=PAD_ID, banned_ids=(), samples=1):
    """Caption each image by drawing every word at random from the model (notebook 04).

    The temperature reshapes the distribution: below 1 it sharpens towards
    greedy, above 1 it flattens towards uniform. Same seed, same captions.
    `samples` captions per image (self-critical fine-tuning draws five, notebook 03)
    come image after image; they are drawn as from the image's row repeated
    `samples` times, but what is computed from the image itself is computed once.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if int(samples) < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    random = np.random.default_rng(seed)

    def draw(log_probs):
        # The Gumbel-max trick: argmax(log p / T + Gumbel noise) is a draw from
        # softmax(log p / T), for every row at once, with no normalising.
        return (log_probs / temperature + random.gumbel(size=log_probs.shape)).argmax(axis=1)
    captions, _ = _word_by_word(decoder, features, draw, start_id=start_id, end_id=end_id, max_length=max_length,
                                pad_id=pad_id, banned_ids=banned_ids, repeats=int(samples))
    return captions


# --- beam search -----------------------------------------------------------------

def beam_search(decoder, features, *, start_id, end_id, max_length, beam_width=3,
                length_alpha=DEFAULT_LENGTH_ALPHA, n_best=1, pad_id=PAD_ID, banned_ids=(),
                return_attention=False, no_repeat_ngram=0):
    """Caption each image with beam search; return its `n_best` hypotheses, best first (notebook 04).

    At every step each of the k live partial captions ("beams") is extended
    by every word; of the k x V candidates of an image the best (by total
    log-probability) survive:
      * a candidate ending in <end> that ranks among the image's top k is
        set aside as a finished hypothesis, scored log_prob / length**alpha;
      * the best k candidates that do not end become the next step's beams.
    An image is done when it has k finished hypotheses; at `max_length` words
    the surviving beams are finished as they are. Beam width 1 is greedy.

    Stopping at k finished hypotheses is the usual rule, and it is exact only
    in the sense that nothing better could be found *among what was kept*:
    with a small k a pruned prefix may have led to a better caption, and with
    alpha > 0 a longer hypothesis may still have overtaken the finished ones.
    With k so large that nothing is ever pruned it is exhaustive, for any
    alpha (tests/test_decoding.py checks exactly that).

    no_repeat_ngram=n > 0 never lets a caption contain the same n words twice
    in a row ("a man in a blue shirt and a blue shirt" is out with n = 2 or 3):
    a small model's beam search likes to loop on a phrase it is sure of, and
    both readers and CIDEr-D dislike it. n = 1 forbids any repeated word; 0
    (the default) allows everything.

    The search itself is beams.search_ops, in TensorFlow ops: the one beam search
    of the package. A StepDecoder runs it as one compiled graph (traced once per
    set of options, then one call per batch: no Python between the words), and
    export.py saves that graph; a decoder written in plain Python (tests/test_decoding.py's)
    runs the same ops eagerly, one step at a time.

    Returns, per image, a list of `Hypothesis` sorted by score, best first.
    With return_attention=True each also has `.attention`, one row of grid
    weights per word, carried along each beam's ancestry (notebook 06).
    """
    features = _check(features, start_id, end_id, max_length)
    beam_width, n_best = int(beam_width), int(n_best)
    if beam_width < 1:
        raise ValueError(f"beam_width must be at least 1, got {beam_width}")
    if not 1 <= n_best <= beam_width:
        raise ValueError(f"n_best must be between 1 and beam_width ({beam_width}), got {n_best}")
    if length_alpha < 0:
        raise ValueError(f"length_alpha must be >= 0, got {length_alpha}")
    if int(no_repeat_ngram) < 0:
        raise ValueError(f"no_repeat_ngram must be >= 0 (0 = allow repeats), got {no_repeat_ngram}")
    if len(features) == 0:
        return []
    if return_attention and not getattr(decoder, "attends", hasattr(decoder, "last_attention")):
        raise ValueError(NO_ATTENTION)
    options = dict(start_id=int(start_id), end_id=int(end_id), max_length=int(max_length), beam_width=beam_width,
                   no_repeat_ngram=int(no_repeat_ngram), banned_ids=tuple(_banned(start_id, end_id, pad_id, banned_ids)),
                   return_attention=bool(return_attention))
    divisors = tf.constant(length_divisors(max_length, length_alpha))
    if hasattr(decoder, "compiled_searches"):  # a StepDecoder: the compiled search
        found = _compiled_search(decoder, options)(tf.constant(decoder.features(features)), divisors)
    else:
        initial, step = _python_steps(decoder)
        memory = tf.nest.map_structure(tf.constant, _remember(decoder, features))
        found = search_ops(initial, step, tf.constant(features), divisors=divisors, memory=memory,
                           locations=getattr(decoder, "attention_size", None), **options)
    found = {key: value.numpy() for key, value in found.items()}
    possible = found["scores"] > -np.inf
    return [[Hypothesis(ids=found["ids"][image, j, :length].tolist(), log_prob=float(found["log_probs"][image, j]),
                        score=float(found["scores"][image, j]),
                        attention=found["attention"][image, j, :length] if return_attention else None)
             for j, length in enumerate(found["lengths"][image, :n_best]) if possible[image, j]]
            for image in range(len(features))]


def _compiled_search(decoder, options):
    """The StepDecoder's compiled search for these options, made on first use. One per beam width
    and repeat ban (the length alpha is an input): the first call traces it (a few seconds),
    every later one is a single call, for any batch size. Kept on the decoder, so that they go
    when it goes."""
    searches = decoder.compiled_searches
    key = tuple(sorted(options.items()))
    if key not in searches:
        def search(features, divisors):
            return search_ops(decoder._initial_graph, decoder._step_graph, features, divisors=divisors,
                              memory=decoder._memory_graph(features), locations=decoder.attention_size, **options)
        # A partial, so that TensorFlow counts each search's traces apart (see StepDecoder.__init__).
        specs = [tf.TensorSpec((None, *decoder.image_shape), tf.float32),
                 tf.TensorSpec((options["max_length"] + 1,), tf.float64)]
        searches[key] = tf.function(functools.partial(search), input_signature=specs)
    return searches[key]


def _python_steps(decoder):
    """initial and step for search_ops from a decoder of plain Python (numpy in, numpy out)."""
    def initial(features):
        return [tf.constant(np.asarray(state)) for state in decoder.initial_state(features.numpy())]

    def step(words, states, memory):
        log_probs, states = decoder.step(words.numpy(), [state.numpy() for state in states],
                                         tf.nest.map_structure(lambda part: part.numpy(), memory))
        weights = getattr(decoder, "last_attention", None)
        rows = len(log_probs)
        weights = np.zeros((rows, 0)) if weights is None else np.asarray(weights, dtype=np.float32).reshape(rows, -1)
        return (tf.constant(np.asarray(log_probs, dtype=np.float32)), tf.constant(weights, tf.float32),
                [tf.constant(np.asarray(state)) for state in states])
    return initial, step
