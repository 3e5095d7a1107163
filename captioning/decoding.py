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

Lengths. `max_length` is the longest caption in words. A hypothesis is
finished when it emits <end> or when it has `max_length` words (it is then
kept as it is, without <end>). Its length, for length normalisation, is the
number of tokens the model chose: its words, plus one for <end> if it has it.

Attention. A decoder whose `last_attention` holds the weights over the image
grid, (rows, L), that its last `step` used (architectures that attend) lets
greedy and beam search return, with `return_attention=True`, one row of
weights per word of the chosen caption (notebook 06).
"""

from dataclasses import dataclass

import numpy as np

from captioning.vocab import PAD_ID

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


def _repeat_rows(memory, k):
    """Each image's row k times (its beams), for an array or a list of arrays."""
    if isinstance(memory, list):
        return [np.repeat(part, k, axis=0) for part in memory]
    return np.repeat(memory, k, axis=0)


def _attention(decoder, rows):
    """The weights over the grid (rows, L) of the decoder's last step."""
    weights = getattr(decoder, "last_attention", None)
    if weights is None:
        raise ValueError("return_attention=True needs a decoder with attention weights (`last_attention`): "
                         "only the attention architecture has them")
    return np.asarray(weights, dtype=np.float32).reshape(rows, -1)


def _banned(start_id, end_id, pad_id, banned_ids):
    banned = {int(start_id), int(pad_id), *map(int, banned_ids)}
    if end_id in banned:
        raise ValueError(f"end_id {end_id} cannot be banned: captions could never finish")
    return sorted(banned)


# --- greedy ----------------------------------------------------------------------

def _word_by_word(decoder, features, choose, *, start_id, end_id, max_length, pad_id, banned_ids,
                  return_attention=False):
    """The loop that greedy and sampled decoding share: feed every image its last word,
    let `choose` pick each row's next word from the (images, vocabulary)
    log-probabilities, stop a row at <end>. Returns the captions (lists of word ids)
    and, with return_attention, one (len(ids), L) array of attention weights per image."""
    features = _check(features, start_id, end_id, max_length)
    count = len(features)
    captions, attention = [[] for _ in range(count)], [[] for _ in range(count)]
    if count == 0:
        return captions, attention
    states = [np.asarray(state) for state in decoder.initial_state(features)]
    features = _remember(decoder, features)  # once per image, not once per word
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
                  pad_id=PAD_ID, banned_ids=()):
    """Caption each image by drawing every word at random from the model (notebook 04).

    The temperature reshapes the distribution: below 1 it sharpens towards
    greedy, above 1 it flattens towards uniform. Same seed, same captions.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    random = np.random.default_rng(seed)

    def draw(log_probs):
        # The Gumbel-max trick: argmax(log p / T + Gumbel noise) is a draw from
        # softmax(log p / T), for every row at once, with no normalising.
        return (log_probs / temperature + random.gumbel(size=log_probs.shape)).argmax(axis=1)
    captions, _ = _word_by_word(decoder, features, draw, start_id=start_id, end_id=end_id, max_length=max_length,
                                pad_id=pad_id, banned_ids=banned_ids)
    return captions


# --- beam search -----------------------------------------------------------------

def _top_candidates(total, how_many):
    """Indices of the `how_many` best entries of each row, best first.

    argpartition finds them in linear time (a row has beam_width x vocabulary
    entries); only those few are then sorted, ties going to the lower index
    as np.argmax does, so that beam width 1 reproduces greedy exactly.
    """
    how_many = min(how_many, total.shape[1])
    top = np.argpartition(-total, how_many - 1, axis=1)[:, :how_many]
    values = np.take_along_axis(total, top, axis=1)
    order = np.lexsort((top, -values), axis=1)
    return np.take_along_axis(top, order, axis=1)


def _ban_repeats(total, beam_words, n):
    """Set to -inf, in place, the score of every word that would complete an
    n-gram its beam already contains. total: (images, k, vocabulary);
    beam_words: (images, k, words so far)."""
    length = beam_words.shape[2]
    if length == 0 or (n > 1 and length < n):  # too few words to repeat an n-gram
        return
    # Every earlier window of n - 1 words that equals the last n - 1 words bans
    # the word that followed it. For n = 1 the window is empty and every word
    # used so far is banned.
    context = beam_words[:, :, length - (n - 1):]                                   # (images, k, n - 1)
    windows = np.lib.stride_tricks.sliding_window_view(beam_words[:, :, :length - 1], n - 1, axis=2) \
        if n > 1 else np.zeros(beam_words.shape + (0,), dtype=beam_words.dtype)    # (images, k, W, n - 1)
    images, beams, positions = np.nonzero((windows == context[:, :, None, :]).all(axis=3))
    total[images, beams, beam_words[images, beams, positions + n - 1]] = -np.inf


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
    no_repeat_ngram = int(no_repeat_ngram)
    count, k = len(features), beam_width
    if count == 0:
        return []

    # Flatten images x beams into rows: row i * k + b is beam b of image i.
    # Every beam of an image starts from the same state; only beam 0 is live
    # at first (the others score -inf), so the first step does not yield k
    # copies of the same word.
    states = [np.repeat(np.asarray(state), k, axis=0) for state in decoder.initial_state(features)]
    row_features = _repeat_rows(_remember(decoder, features), k)  # the per-image work once, then per beam
    beam_log_probs = np.full((count, k), -np.inf)
    beam_log_probs[:, 0] = 0.0
    beam_words = np.zeros((count, k, 0), dtype=np.int64)  # the words so far, per beam
    words = np.full(count * k, start_id, dtype=np.int32)
    finished = [[] for _ in range(count)]  # per image: (score, log_prob, ids, attention)
    beam_attention = None  # (count, k, words so far, L), with return_attention
    done = np.zeros(count, dtype=bool)
    banned = _banned(start_id, end_id, pad_id, banned_ids)
    images = np.arange(count)[:, None]

    for length in range(1, int(max_length) + 1):
        log_probs, states = _step(decoder, words, states, row_features, banned)
        vocab_size = log_probs.shape[1]
        if return_attention:
            weights = _attention(decoder, count * k).reshape(count, k, -1)
            if beam_attention is None:
                beam_attention = np.zeros((count, k, 0, weights.shape[2]), dtype=np.float32)
        total = beam_log_probs[:, :, None] + log_probs.reshape(count, k, vocab_size)
        if no_repeat_ngram:
            _ban_repeats(total, beam_words, no_repeat_ngram)
        total[done] = -np.inf  # done images take no further part
        # The best 2k candidates: at most k of them end (one per beam), so at
        # least k remain to continue.
        top = _top_candidates(total.reshape(count, k * vocab_size), 2 * k)
        top_log_probs = np.take_along_axis(total.reshape(count, -1), top, axis=1)
        top_beams, top_tokens = top // vocab_size, top % vocab_size

        last_step = length == int(max_length)
        # Set aside what finishes: candidates in an image's top k that end, or,
        # at the last step, that image's top k whatever they are.
        finishing = np.isfinite(top_log_probs) & (np.arange(top.shape[1]) < k)
        if not last_step:
            finishing &= top_tokens == end_id
        for image, position in zip(*np.nonzero(finishing)):
            beam = top_beams[image, position]
            ids = beam_words[image, beam].tolist()
            token = int(top_tokens[image, position])
            attention = beam_attention[image, beam] if return_attention else None
            if token != end_id:
                ids.append(token)  # reached max_length words without <end>
                if return_attention:
                    attention = np.concatenate([attention, weights[image, beam][None]])
            log_prob = float(top_log_probs[image, position])
            finished[image].append((length_normalised(log_prob, length, length_alpha), log_prob, ids, attention))
        for image in np.flatnonzero(finishing.any(axis=1)):
            finished[image].sort(key=lambda hypothesis: -hypothesis[0])
            del finished[image][k:]  # only the best k can ever be returned
            done[image] |= len(finished[image]) >= k
        if last_step or done.all():
            break

        # The next beams: each image's k best candidates that do not end.
        # A stable sort on "ends?" moves them to the front, keeping their order.
        continuing = np.argsort(top_tokens == end_id, axis=1, kind="stable")[:, :k]
        chosen_beams = np.take_along_axis(top_beams, continuing, axis=1)
        chosen_tokens = np.take_along_axis(top_tokens, continuing, axis=1)
        beam_log_probs = np.take_along_axis(top_log_probs, continuing, axis=1)
        beam_words = np.concatenate([beam_words[images, chosen_beams], chosen_tokens[:, :, None]], axis=2)
        if return_attention:  # each new beam: its parent's weights, then this step's
            beam_attention = np.concatenate([beam_attention[images, chosen_beams],
                                             weights[images, chosen_beams][:, :, None]], axis=2)
        # Each new beam carries on from its parent's recurrent state: gather
        # the parent rows (numpy indexing, no model call).
        parent_rows = (images * k + chosen_beams).reshape(-1)
        states = [state[parent_rows] for state in states]
        words = chosen_tokens.reshape(-1).astype(np.int32)

    return [
        [Hypothesis(ids=ids, log_prob=log_prob, score=score, attention=attention)
         for score, log_prob, ids, attention in image_finished[:n_best]]
        for image_finished in finished
    ]
