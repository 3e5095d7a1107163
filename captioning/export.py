"""Export a trained bundle so that it captions photos without this package (notebook 04).

A bundle (bundle.py) only runs here: its encoder, vocabulary and model are
put together by this package's Python. `export_bundle` writes everything, from
the JPEG bytes to the caption string, as one TensorFlow graph:

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
                the decoder, beam search (beams.search_ops, the one
                `caption` runs) with the bundle's decoding settings,
                and the vocabulary. Plain
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
from captioning.beams import length_divisors, search_ops  # noqa: E402
from captioning.decoding import DEFAULT_LENGTH_ALPHA, _banned  # noqa: E402
from captioning.encoders import IDENTITY, build_encoder_like  # noqa: E402
from captioning.fileio import write_json_atomic  # noqa: E402

FORMATS = ("savedmodel", "litert")
MARKER = "export.json"


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

    def search(features):
        found = search_ops(decoder._initial_graph, decoder._step_graph, features, start_id=vocab.start_id,
                           end_id=vocab.end_id, max_length=vocab.max_length, beam_width=beam_width, dtype=dtype,
                           banned_ids=_banned(vocab.start_id, vocab.end_id, vocab.pad_id, banned),
                           divisors=length_divisors(vocab.max_length, options.get("length_alpha", DEFAULT_LENGTH_ALPHA)),
                           no_repeat_ngram=options.get("no_repeat_ngram", 0), memory=decoder._memory_graph(features))
        return found["ids"][:, 0], found["lengths"][:, 0], found["scores"][:, 0]  # the best of each image
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
