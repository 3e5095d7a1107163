"""Export a trained bundle so that it captions photos without this package (notebook 04).

A bundle (bundle.py) only runs here: beam search is Python (decoding.py)
around a Keras step model. `export_bundle` writes everything, from the JPEG
bytes to the caption string, as one TensorFlow graph:

    savedmodel  a TensorFlow SavedModel whose `serving_default` signature takes
                a 1-D tf.string batch of encoded photos (JPEG, PNG, GIF, BMP)
                and returns {"captions": tf.string, "scores": tf.float32,
                "ok": tf.bool, "errors": tf.string}, one of each per photo:
                a photo it cannot read (not an image, damaged, under 16
                px) gets ok False, its reason, "" and a NaN score, and
                the others of the batch are captioned all the same. An
                empty batch gives empty outputs.
                In the graph: decoding and resizing the photo exactly as
                images.py does, the encoder CNN (and its mirror averaging, if used),
                the decoder, beam search in a tf.while_loop with the
                bundle's decoding settings, and the vocabulary. Plain
                TensorFlow loads it: tf.saved_model.load(DIR).signatures[
                "serving_default"](images=tf.constant([jpeg_bytes])).
    litert      model.tflite for the LiteRT interpreter (pip ai-edge-litert),
                which runs TFLite's builtin ops only. Those have no image
                decoder and no string ops, so its input is ONE photo
                already resized to S x S RGB, float32 in [0, 255]
                (images.resize; S is the encoder's image_size), and its
                outputs, in this order, are word ids (1, max_length) padded
                with 0, their count (1,) and the score (1,);
                vocabulary.json beside it turns ids into words. The
                encoder, the decoder and beam search (same rules) are in
                it, but the sums of log-probabilities are float32, not
                float64 as in decoding.py, so a near tie may break the
                other way. The outputs have no names (the converter drops
                them on the way that keeps the weights readable).

The searched caption is the one `python -m captioning caption --beam K`
prints: <pad>, <start> and <unk> banned, hypotheses finishing at <end> or at
the vocabulary's max_length, the 2k-candidate rule and tie-breaking of
decoding.beam_search, scores log_prob / length ** alpha. Beam width 1 is
greedy decoding, which (as in `caption --beam 1`) ignores no_repeat_ngram.

Each export is written in a temporary folder beside DIR and renamed into
place, so a failed export never leaves half a folder under its name; a full
disk or a folder it may not write is reported as an OSError naming DIR
(what the user gave), whether Python or TensorFlow's writer met it.
export.json in it says what it is; only a folder holding one (or an empty
folder) may be replaced.
"""

import errno
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

from captioning import quiet_tensorflow

tf = quiet_tensorflow()

from captioning import images as image_io  # noqa: E402
from captioning.bundle import Captioner  # noqa: E402
from captioning.decoding import DEFAULT_LENGTH_ALPHA, _banned  # noqa: E402
from captioning.encoders import IDENTITY, build_encoder_like  # noqa: E402
from captioning.fileio import write_json_atomic  # noqa: E402
from captioning.vocab import PAD_ID  # noqa: E402

FORMATS = ("savedmodel", "litert")
MARKER = "export.json"


# --- beam search as TensorFlow ops --------------------------------------------

def _shifted(words, offset):
    """words[:, :, p + offset] at position p, -1 past the end."""
    return tf.pad(words[:, :, offset:], [[0, 0], [0, 0], [0, offset]], constant_values=-1)


def _repeats(beam_words, t, n, vocab_size):
    """decoding._ban_repeats as a mask: (images, k, vocabulary) True where a word would
    complete an n-gram its beam already holds. beam_words: (images, k, max_length), t words so far."""
    # The n - 1 words from position p on match the last n - 1 words: ban word p + n - 1.
    match = tf.broadcast_to(tf.range(tf.shape(beam_words)[2]) <= t - n, tf.shape(beam_words))
    for j in range(n - 1):
        context = tf.gather(beam_words, tf.maximum(t - (n - 1) + j, 0), axis=2)
        match &= tf.equal(_shifted(beam_words, j), context[:, :, None])
    hits = tf.where(match)  # (hits, 3): image, beam, position
    banned = tf.cast(tf.gather_nd(_shifted(beam_words, n - 1), hits), tf.int64)
    shape = tf.cast(tf.concat([tf.shape(beam_words)[:2], [vocab_size]], 0), tf.int64)
    return tf.scatter_nd(tf.concat([hits[:, :2], banned[:, None]], 1), tf.ones_like(banned, tf.int32), shape) > 0


def _at(words, t, tokens):
    """words (images, k, max_length) with tokens (images, k) written at position t."""
    return tf.where(tf.range(tf.shape(words)[2]) == t, tokens[:, :, None], words)


def beam_search_graph(initial, step, features, *, vocab_size, start_id, end_id, max_length, beam_width=3,
                      length_alpha=DEFAULT_LENGTH_ALPHA, no_repeat_ngram=0, pad_id=PAD_ID, banned_ids=(),
                      dtype=tf.float64, memory=None):
    """decoding.beam_search (n_best=1) in TensorFlow ops, for a tf.function.

    `initial(features)` -> states; `step(words, states, features)` ->
    (log_probs float32 (rows, vocabulary), new states); with `memory` (what
    StepDecoder computes from each image once), step reads its rows instead
    of the features'. Returns the best
    hypothesis of each image: ids (N, max_length) int32 padded with 0,
    their count (N,), and scores (N,). Every array the Python version grows
    has a fixed size here (max_length words, k finished slots), so that the
    loop's shapes never change. Log-probabilities add up in `dtype`:
    float64 as numpy does (tf.math.top_k breaks ties to the lower index, as
    decoding._top_candidates does).
    """
    k, n, vocab_size, max_length = int(beam_width), int(no_repeat_ngram), int(vocab_size), int(max_length)
    how_many = min(2 * k, k * vocab_size)
    count = features.shape[0] or tf.shape(features)[0]  # a fixed batch keeps every shape static (LiteRT)
    banned = tf.constant(np.isin(np.arange(vocab_size), _banned(start_id, end_id, pad_id, banned_ids)))
    # length_normalised's divisors, computed by Python so the scores match it to the bit.
    divisors = tf.constant([max(length, 1) ** length_alpha for length in range(max_length + 1)], dtype)
    # -inf marks what cannot be chosen, as in numpy. The TFLite converter turns an -inf
    # constant into the lowest float, which is finite: so "possible" is "above half of that".
    impossible = tf.constant(-np.inf if dtype == tf.float64 else dtype.min, dtype)

    def possible(values):
        return values > impossible / 2

    # Row i * k + b is beam b of image i.
    row_features = tf.nest.map_structure(lambda part: tf.repeat(part, k, axis=0), features if memory is None else memory)

    def body(t, words, states, beam_log_probs, beam_words, finished, done):
        log_probs, states = step(words, states, row_features)
        log_probs = tf.where(banned, tf.cast(impossible, log_probs.dtype), log_probs)
        total = beam_log_probs[:, :, None] + tf.cast(tf.reshape(log_probs, (count, k, vocab_size)), dtype)
        if n:
            total = tf.where(_repeats(beam_words, t, n, vocab_size), impossible, total)
        total = tf.where(done[:, None, None], impossible, total)  # done images take no further part
        top_log_probs, top = tf.math.top_k(tf.reshape(total, (count, k * vocab_size)), how_many)
        top_beams, top_tokens = top // vocab_size, top % vocab_size
        ends = tf.equal(top_tokens, end_id)

        # Set aside what finishes: candidates in the top k that end, or at the last step the top k.
        finishing = possible(top_log_probs[:, :k]) & (ends[:, :k] | tf.equal(t + 1, max_length))
        parents = tf.gather(beam_words, top_beams[:, :k], batch_dims=1)
        new = {"scores": tf.where(finishing, top_log_probs[:, :k] / divisors[t + 1], impossible),
               "ids": tf.where(ends[:, :k, None], parents, _at(parents, t, top_tokens[:, :k])),
               "lengths": t + tf.cast(~ends[:, :k], tf.int32)}
        # Keep the best k, finished earlier first on equal scores: top_k is the stable sort.
        merged = {key: tf.concat([finished[key], new[key]], axis=1) for key in finished}
        best = tf.math.top_k(merged["scores"], k).indices
        finished = {key: tf.gather(value, best, batch_dims=1) for key, value in merged.items()}
        done |= tf.reduce_sum(tf.cast(possible(finished["scores"]), tf.int32), axis=1) >= k

        # The next beams: the k best candidates that do not end, in order.
        continuing = tf.argsort(tf.cast(ends, tf.int32) * how_many + tf.range(how_many), axis=1)[:, :k]
        chosen_beams = tf.gather(top_beams, continuing, batch_dims=1)
        chosen_tokens = tf.gather(top_tokens, continuing, batch_dims=1)
        parent_rows = tf.reshape(tf.range(count)[:, None] * k + chosen_beams, [-1])
        return (t + 1, tf.reshape(chosen_tokens, [-1]), [tf.gather(state, parent_rows) for state in states],
                tf.gather(top_log_probs, continuing, batch_dims=1),
                _at(tf.gather(beam_words, chosen_beams, batch_dims=1), t, chosen_tokens), finished, done)

    # Only beam 0 is live at first (the others score -inf): no k copies of the first word.
    beam_log_probs = tf.concat([tf.zeros((count, 1), dtype), tf.fill((count, k - 1), impossible)], axis=1)
    no_words = tf.zeros((count, k, max_length), tf.int32)
    finished = {"scores": tf.fill((count, k), impossible), "ids": no_words, "lengths": tf.zeros((count, k), tf.int32)}
    start = (tf.constant(0), tf.fill((count * k,), start_id),
             [tf.repeat(state, k, axis=0) for state in initial(features)],
             beam_log_probs, no_words, finished, tf.zeros((count,), tf.bool))
    result = tf.while_loop(lambda t, *rest: (t < max_length) & ~tf.reduce_all(rest[-1]), body, start)
    finished = result[5]
    return finished["ids"][:, 0], finished["lengths"][:, 0], finished["scores"][:, 0]


# --- the graphs we export ------------------------------------------------------

def graph_search(captioner, beam_width=3, dtype=tf.float64):
    """The exported search: features -> (ids, lengths, scores) as TensorFlow ops, with the
    bundle's decoding settings, as `caption --beam K` decodes (tests/test_export.py checks it)."""
    decoder, vocab = captioner.decoder, captioner.vocab
    # As Captioner.caption_ids: bundle.json's "decoding" options, <unk> banned unless they allow it.
    options = dict(captioner.settings.get("decoding", {}))
    banned = list(options.pop("banned_ids", ()))
    if not options.pop("allow_unknown", False):
        banned.append(vocab.unk_id)
    if beam_width == 1:
        options = {}  # greedy decoding takes neither length_alpha nor no_repeat_ngram

    def step(words, states, memory):
        log_probs, _, states = decoder._step_graph(words, states, memory)
        return log_probs, states

    def search(features):
        return beam_search_graph(decoder._initial_graph, step, features, vocab_size=decoder.vocab_size,
                                 start_id=vocab.start_id, end_id=vocab.end_id, max_length=vocab.max_length,
                                 beam_width=beam_width, pad_id=vocab.pad_id, banned_ids=banned, dtype=dtype,
                                 memory=decoder._memory_graph(features), **options)
    return search


NOT_A_PHOTO = "not a photo it can decode (JPEG, PNG, GIF or BMP), or damaged"
TOO_SMALL = f"smaller than {image_io.MIN_SIDE} px on a side"


def _read_photos(images, encoder):
    """Encoded bytes (N,) -> (ok (N,) bool, errors (N,) string, the encoder's input for the ok ones).

    A graph cannot catch an op's error, but tf.data can drop the elements whose
    decoding fails (ignore_errors): each element carries its index through, so
    the indices that come out are the photos that decoded. Size is checked after
    decoding, as images.py does, without raising: one bad photo costs only itself.
    """
    size = encoder.image_size

    def decode(index, encoded):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return index, tf.reduce_min(tf.shape(image)[:2]), image_io.resize(image, size)

    decoded = tf.data.Dataset.from_tensor_slices((tf.range(tf.size(images)), images)).map(decode).ignore_errors()
    empty = (tf.zeros((0,), tf.int32), tf.zeros((0,), tf.int32), tf.zeros((0, size, size, 3), tf.float32))
    indices, sides, pixels = decoded.batch(64).reduce(
        empty, lambda state, batch: tuple(tf.concat([old, new], 0) for old, new in zip(state, batch)))
    big_enough = sides >= image_io.MIN_SIDE
    count = tf.size(images)
    decodes = tf.scatter_nd(indices[:, None], tf.ones_like(indices, tf.bool), [count])
    ok = tf.scatter_nd(indices[:, None], big_enough, [count])
    errors = tf.where(ok, "", tf.where(decodes, TOO_SMALL, NOT_A_PHOTO))
    good = tf.boolean_mask(indices, big_enough)
    return ok, errors, good, encoder.preprocess(tf.boolean_mask(pixels, big_enough))


def _savedmodel(captioner, encoder, beam_width, out_dir):
    search, words = graph_search(captioner, beam_width, tf.float64), tf.constant(captioner.vocab.words)

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.string, name="images")])
    def serve(images):
        ok, errors, good, pixels = _read_photos(images, encoder)

        def caption():
            ids, lengths, scores = search(encoder._forward(pixels))  # the Encoder's own forward pass
            text = tf.strings.reduce_join(tf.gather(words, tf.RaggedTensor.from_tensor(ids, lengths=lengths)),
                                          axis=1, separator=" ")
            return text, tf.cast(scores, tf.float32)

        # The CNN's batch normalisation fails on a batch of no photos: with none to read, it is skipped.
        text, scores = tf.cond(tf.size(good) > 0, caption, lambda: (tf.zeros((0,), tf.string), tf.zeros((0,))))
        # Back to the order given: the photos it could not read get "" and a NaN score.
        count = tf.size(images)
        captions = tf.tensor_scatter_nd_update(tf.fill([count], ""), good[:, None], text)
        scores = tf.tensor_scatter_nd_update(tf.fill([count], np.float32(np.nan)), good[:, None], scores)
        return {"captions": captions, "scores": scores, "ok": ok, "errors": errors}

    module = tf.Module()
    # The weights the graph reads, tracked so that they are saved (as keras.export does: the
    # variables alone, not the thousands of Keras objects that hold them, which take far longer).
    module.weights, module.serve = [*encoder.model.variables, *captioner.model.variables], serve
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("WARNING")  # "INFO: Assets written to ...": noise, the temporary folder's name
    try:
        tf.saved_model.save(module, str(out_dir), signatures={"serving_default": serve})
    finally:
        logger.setLevel(level)
    return {"inputs": {"images": "(N,) string: encoded photos (JPEG, PNG, GIF or BMP)"},
            "outputs": {"captions": "(N,) string, '' where ok is false",
                        "scores": "(N,) float32: log_prob / length ** length_alpha, NaN where ok is false",
                        "ok": "(N,) bool: whether the photo could be read",
                        "errors": "(N,) string: why not, '' where ok is true"}}


def _litert(captioner, encoder, beam_width, out_dir):
    search, size = graph_search(captioner, beam_width, tf.float32), encoder.image_size

    # One photo per call: with every shape fixed, the Keras RNN's loop converts to builtins.
    @tf.function(input_signature=[tf.TensorSpec((1, size, size, 3), tf.float32, name="pixels")])
    def serve(pixels):
        return search(encoder._forward(encoder.preprocess(pixels)))  # (ids, lengths, scores), in this order

    # From the function itself, which the converter freezes (weights become constants). Through
    # a SavedModel the .tflite would keep names for its outputs, but its weights would stay
    # variables that the interpreter cannot read inside the loop ("READ_VARIABLE failed").
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # all that ai-edge-litert runs
    (out_dir / "model.tflite").write_bytes(converter.convert())
    captioner.vocab.save(out_dir / "vocabulary.json")
    return {"inputs": {"pixels": f"(1, {size}, {size}, 3) float32 in [0, 255]: one photo resized (bilinear)"},
            "outputs": {"ids": f"(1, {captioner.vocab.max_length}) int32: word ids (vocabulary.json), 0-padded",
                        "lengths": "(1,) int32: how many ids are words", "scores": "(1,) float32"}}


# --- the folder ------------------------------------------------------------------

def _check_out(out_dir):
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: export into a folder")
    if any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise ValueError(f"{out_dir} is not empty and holds no {MARKER}, so it is not a previous export: "
                         "refusing to replace it; choose a new or empty folder")


def export_bundle(bundle_dir, out_dir, format="savedmodel", beam_width=3, weights=None):
    """Write bundle_dir as a SavedModel or a LiteRT model in out_dir (see the top of the file).

    `weights`: where the encoder's weights file is, if it has moved since
    training (the same weights). Replaces out_dir only if it is empty or
    holds a previous export. Returns out_dir.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if int(beam_width) < 1:
        raise ValueError(f"beam width must be at least 1 (1 = greedy), not {beam_width}")
    out_dir = Path(out_dir).resolve()
    _check_out(out_dir)
    captioner = Captioner.load(bundle_dir)
    # The photo must be encoded as the training photos were: the bundle says how.
    settings_file, settings = Path(bundle_dir) / "bundle.json", captioner.settings["encoder"]
    missing = [key for key in ("weights", "mirror", *IDENTITY) if key not in settings]
    if missing:
        raise ValueError(f"{settings_file} field 'encoder' lacks {missing}: this bundle does not say how to encode "
                         "a photo, so it cannot be exported (bundles written by `train` do)")
    encoder = build_encoder_like(settings, weights=weights, where=f"{settings_file} field 'encoder'")
    if list(encoder.feature_shape) != list(captioner.settings["feature_shape"]):
        raise ValueError(f"{settings_file}: the encoder gives features of shape {list(encoder.feature_shape)} "
                         f"but field feature_shape says {captioner.settings['feature_shape']}")

    staging = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(4)}.tmp")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        _write(captioner, encoder, format, int(beam_width), bundle_dir, settings, staging, out_dir)
    except (OSError, tf.errors.OpError) as error:
        raise _disk_error(error, out_dir) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


# What the file system said, read from an OSError or from TensorFlow's own writer (which
# raises its errors with the C library's text in the message, not an errno).
DISK_ERRORS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
               "File too large": errno.EFBIG, "Permission denied": errno.EACCES,
               "Read-only file system": errno.EROFS}


def _disk_error(error, out_dir):
    """The error as an OSError naming out_dir, the folder the user gave, not our staging folder
    (which is gone by the time they read it); an error that is not about the disk, unchanged."""
    number = getattr(error, "errno", None) if isinstance(error, OSError) else None
    number = number or next((code for text, code in DISK_ERRORS.items() if text in str(error)), None)
    if number not in DISK_ERRORS.values():
        return error
    return OSError(number, os.strerror(number), str(out_dir))


def _write(captioner, encoder, format, beam_width, bundle_dir, settings, staging, out_dir):
    """The export in `staging`, then renamed to out_dir (a previous export steps aside first)."""
    signature = (_savedmodel if format == "savedmodel" else _litert)(captioner, encoder, beam_width, staging)
    decoding = captioner.settings.get("decoding", {}) if beam_width > 1 else {"greedy": True}
    write_json_atomic(staging / MARKER, {
        "format": format, **signature, "bundle": str(Path(bundle_dir).resolve()),
        "arch": captioner.settings["arch"], "beam_width": beam_width, "decoding": decoding,
        "encoder": settings, "vocab_fingerprint": captioner.vocab.fingerprint})
    # A previous export steps aside, the new one takes its name, then the old one goes.
    previous = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(4)}.old")
    if out_dir.exists():
        out_dir.rename(previous)
    try:
        staging.rename(out_dir)
    except OSError:
        if previous.exists():
            previous.rename(out_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)
