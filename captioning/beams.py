"""Beam search as TensorFlow ops: the one beam search of the package (notebook 04).

decoding.beam_search runs `search_ops` for `caption`, fine-tuning's validation and the
notebooks (compiled into one graph for a Keras model, eagerly for a decoder of plain Python);
export.py saves the same ops in a SavedModel or a .tflite. decoding.beam_search's docstring
states the rules; this is how they run with shapes that never change, as a compiled loop needs.
"""

import numpy as np

from captioning import quiet_tensorflow

tf = quiet_tensorflow()


def length_divisors(max_length, length_alpha):
    """length ** alpha for each length 0..max_length: the denominators of the scores, computed by
    Python so that they match decoding.length_normalised to the bit. A tensor of them is an input of
    a compiled search, not a constant in it, so that a new alpha (notebook 04's slider) does not
    trace the search again."""
    return np.array([max(length, 1) ** length_alpha for length in range(int(max_length) + 1)], dtype=np.float64)


def search_ops(initial, step, features, *, start_id, end_id, max_length, beam_width, divisors, banned_ids,
               no_repeat_ngram=0, return_attention=False, dtype=tf.float64, memory=None, locations=None):
    """beam_search's rules as TensorFlow ops, for eager use or a tf.function (export.py's).

    `initial(features)` -> states; `step(words, states, memory)` -> (log_probs
    (rows, vocabulary), attention weights (rows, L) or (rows, 0), new states),
    where memory is what the decoder computes from each image once (the
    features when None). divisors: length_divisors(max_length, length_alpha).
    banned_ids: every id never to emit (decoding._banned's list: <start>, <pad>
    and the caller's). Returns a dict of each image's k finished hypotheses,
    best first: ids (images, k, max_length) padded with 0, lengths, log_probs,
    scores (-inf in a slot no hypothesis reached) and, with return_attention,
    attention (images, k, max_length, L): `locations` is L, the regions the
    weights cover (None: every cell of the features' grid, H x W).

    What the Python of a simpler beam search grows (lists of beams, of finished
    captions) has a fixed size here, so that a compiled loop's shapes never
    change: k beams and k finished slots per image, max_length words each.
    Log-probabilities add up in `dtype` (float64; LiteRT has float32 only).
    tf.math.top_k breaks ties to the lower index: beam width 1 is greedy.
    """
    k, n, max_length = int(beam_width), int(no_repeat_ngram), int(max_length)
    count = features.shape[0] or tf.shape(features)[0]  # a fixed batch keeps every shape static (LiteRT)
    divisors = tf.cast(divisors, dtype)
    # -inf marks what cannot be chosen. The TFLite converter turns an -inf constant into the
    # lowest float, which is finite: so "possible" is "above half of that".
    impossible = tf.constant(-np.inf if dtype == tf.float64 else dtype.min, dtype)
    if not return_attention:
        locations = 0
    elif locations is None:
        locations = int(np.prod(features.shape[1:-1]))

    def possible(values):
        return values > impossible / 2

    # Rows: images x beams flattened, row i * k + b is beam b of image i.
    row_memory = tf.nest.map_structure(lambda part: tf.repeat(part, k, axis=0), features if memory is None else memory)

    def body(t, words, states, beam_log_probs, beam_words, beam_attention, finished, done):
        log_probs, weights, states = step(words, states, row_memory)
        vocab_size = int(log_probs.shape[1])
        how_many = min(2 * k, k * vocab_size)
        banned = tf.constant(np.isin(np.arange(vocab_size), banned_ids))
        log_probs = tf.where(banned, tf.cast(impossible, log_probs.dtype), log_probs)
        # Candidates: every beam's total plus every word's log-probability, (images, k, V).
        total = beam_log_probs[:, :, None] + tf.cast(tf.reshape(log_probs, (count, k, vocab_size)), dtype)
        if n:
            total = tf.where(_repeats(beam_words, t, n, vocab_size), impossible, total)
        total = tf.where(done[:, None, None], impossible, total)  # done images take no further part
        # The best 2k: at most k of them end (one per beam), so at least k remain to carry on.
        top_log_probs, top = tf.math.top_k(tf.reshape(total, (count, k * vocab_size)), how_many)
        top_beams, top_tokens = top // vocab_size, top % vocab_size
        ends = tf.equal(top_tokens, end_id)
        weights = tf.reshape(tf.cast(weights, tf.float32)[:, :locations], (count, k, locations))

        # Finished: candidates in the top k that end, or at the last step the top k as they are.
        finishing = possible(top_log_probs[:, :k]) & (ends[:, :k] | tf.equal(t + 1, max_length))
        parents = tf.gather(beam_words, top_beams[:, :k], batch_dims=1)
        parent_attention = tf.gather(beam_attention, top_beams[:, :k], batch_dims=1)
        own_attention = tf.gather(weights, top_beams[:, :k], batch_dims=1)
        new = {"scores": tf.where(finishing, top_log_probs[:, :k] / divisors[t + 1], impossible),
               "log_probs": tf.where(finishing, top_log_probs[:, :k], impossible),
               "ids": tf.where(ends[:, :k, None], parents, _at(parents, t, top_tokens[:, :k])),
               "lengths": t + tf.cast(~ends[:, :k], tf.int32),
               "attention": tf.where(ends[:, :k, None, None], parent_attention,
                                     _at(parent_attention, t, own_attention))}
        # Keep each image's best k, finished earlier first on equal scores: top_k is the stable sort.
        merged = {key: tf.concat([finished[key], new[key]], axis=1) for key in finished}
        best = tf.math.top_k(merged["scores"], k).indices
        finished = {key: tf.gather(value, best, batch_dims=1) for key, value in merged.items()}
        done |= tf.reduce_sum(tf.cast(possible(finished["scores"]), tf.int32), axis=1) >= k

        # Next beams: the k best candidates that do not end, in order. Each carries on from its
        # parent's recurrent state: the parent rows are gathered, no model call.
        continuing = tf.argsort(tf.cast(ends, tf.int32) * how_many + tf.range(how_many), axis=1)[:, :k]
        chosen_beams = tf.gather(top_beams, continuing, batch_dims=1)
        chosen_tokens = tf.gather(top_tokens, continuing, batch_dims=1)
        parent_rows = tf.reshape(tf.range(count)[:, None] * k + chosen_beams, [-1])
        return (t + 1, tf.reshape(chosen_tokens, [-1]), [tf.gather(state, parent_rows) for state in states],
                tf.gather(top_log_probs, continuing, batch_dims=1),
                _at(tf.gather(beam_words, chosen_beams, batch_dims=1), t, chosen_tokens),
                _at(tf.gather(beam_attention, chosen_beams, batch_dims=1), t,
                    tf.gather(weights, chosen_beams, batch_dims=1)), finished, done)

    # Every beam of an image starts from the same state, and only beam 0 is live at first (the
    # others score -inf), so the first step does not yield k copies of the same word.
    beam_log_probs = tf.concat([tf.zeros((count, 1), dtype), tf.fill((count, k - 1), impossible)], axis=1)
    no_words = tf.zeros((count, k, max_length), tf.int32)
    no_attention = tf.zeros((count, k, max_length, locations), tf.float32)
    finished = {"scores": tf.fill((count, k), impossible), "log_probs": tf.fill((count, k), impossible),
                "ids": no_words, "lengths": tf.zeros((count, k), tf.int32), "attention": no_attention}
    start = (tf.constant(0), tf.fill((count * k,), start_id), [tf.repeat(state, k, axis=0) for state in initial(features)],
             beam_log_probs, no_words, no_attention, finished, tf.zeros((count,), tf.bool))
    result = tf.while_loop(lambda t, *rest: (t < max_length) & ~tf.reduce_all(rest[-1]), body, start)
    finished = result[-2]
    return finished if return_attention else {key: value for key, value in finished.items() if key != "attention"}


def _shifted(words, offset):
    """words[:, :, p + offset] at position p, -1 past the end."""
    return tf.pad(words[:, :, offset:], [[0, 0], [0, 0], [0, offset]], constant_values=-1)


def _repeats(beam_words, t, n, vocab_size):
    """no_repeat_ngram as a mask: (images, k, vocabulary) True where a word would complete an
    n-gram its beam already holds. beam_words: (images, k, max_length), t words so far."""
    # The n - 1 words from position p on match the last n - 1 words: ban word p + n - 1.
    # (For n = 1 the window is empty: every word used so far is banned.)
    match = tf.broadcast_to(tf.range(tf.shape(beam_words)[2]) <= t - n, tf.shape(beam_words))
    for j in range(n - 1):
        context = tf.gather(beam_words, tf.maximum(t - (n - 1) + j, 0), axis=2)
        match &= tf.equal(_shifted(beam_words, j), context[:, :, None])
    hits = tf.where(match)  # (hits, 3): image, beam, position
    banned = tf.cast(tf.gather_nd(_shifted(beam_words, n - 1), hits), tf.int64)
    shape = tf.cast(tf.concat([tf.shape(beam_words)[:2], [vocab_size]], 0), tf.int64)
    return tf.scatter_nd(tf.concat([hits[:, :2], banned[:, None]], 1), tf.ones_like(banned, tf.int32), shape) > 0


def _at(values, t, new):
    """values (images, k, max_length, ...) with new (images, k, ...) written at position t."""
    position = tf.equal(tf.range(tf.shape(values)[2]), t)
    return tf.where(tf.reshape(position, [-1] + [1] * (len(values.shape) - 3)), tf.expand_dims(new, 2), values)
