"""Exported captioners (captioning/export.py): the graph's beam search is decoding.beam_search,
a SavedModel captions photo bytes like `caption` with no `captioning` package in sight, the
LiteRT file runs in the real interpreter, and exports are written atomically."""

import functools
import json
import subprocess
import sys
import sysconfig
import types

import numpy as np
import pytest
from PIL import Image

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402

from captioning import cli, export  # noqa: E402
from captioning import images as image_io  # noqa: E402
from captioning.architectures import ARCHITECTURES, build_captioner  # noqa: E402
from captioning.bundle import Captioner, save_bundle  # noqa: E402
from captioning.decoding import beam_search  # noqa: E402
from captioning.encoders import build_encoder, build_encoder_like, encode_images  # noqa: E402
from conftest import run_cli  # noqa: E402
from test_training import synthetic_vocab  # noqa: E402

WITH_BAN = {"length_alpha": 1.0, "no_repeat_ngram": 2}  # the ban on: the graph must apply it as beam_search does


def untrained_captioner(arch, feature_shape, decoding=WITH_BAN, encoder=None, features=None):
    """A captioner with random weights and sharpened logits, so that its beams differ. Given
    `features`, its <end> logit is raised until its greedy captions of them have the most
    different lengths: some end at <end> early, some run to max_length."""
    keras.utils.set_random_seed(0)
    vocab = synthetic_vocab()
    model = build_captioner(arch, vocab_size=len(vocab), feature_shape=feature_shape, max_length=vocab.max_length,
                            embed_dim=16, units=32)
    logits = model.get_layer("word_logits")
    logits.kernel.assign(logits.kernel * 2.0)
    captioner = Captioner(model, vocab, {"arch": arch, "dataset": "synthetic", "decoding": decoding,
                                         "encoder": encoder.settings() if encoder else {}})
    if features is not None:
        bias, end = logits.bias.numpy(), np.eye(len(vocab), dtype="float32")[vocab.end_id]

        def lengths(extra):
            logits.bias.assign(bias + extra * end)
            return len({len(ids) for ids in captioner.caption_ids(features, beam_width=1)})
        logits.bias.assign(bias + max(np.arange(0.0, 4.0, 0.25), key=lengths) * end)
    return captioner


# --- the graph's beam search is decoding.beam_search ------------------------------------

SETTINGS = [(3, WITH_BAN), (1, WITH_BAN), (5, {"length_alpha": 0.7, "no_repeat_ngram": 1}),
            (2, {"length_alpha": 0.0, "no_repeat_ngram": 3}), (4, {"length_alpha": 2.0, "no_repeat_ngram": 0})]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_graphs_beam_search_gives_the_captions_and_scores_of_decoding(arch):
    grid = ARCHITECTURES[arch].features == "grid"
    features = np.random.default_rng(1).normal(size=(6, *((3, 3, 8) if grid else (16,)))).astype("float32")
    captioner, lengths_seen = untrained_captioner(arch, features.shape[1:], features=features), set()
    vocab = captioner.vocab
    # Every architecture with the preset and greedy; merge with other widths, alphas and n-gram bans too.
    for beam_width, decoding in SETTINGS if arch == "merge" else SETTINGS[:2]:
        captioner.settings["decoding"] = decoding  # what bundle.json would say
        # A partial, so TensorFlow counts each search's traces apart (see StepDecoder.__init__).
        search = tf.function(functools.partial(export.graph_search(captioner, beam_width)))
        ids, lengths, scores = (array.numpy() for array in search(tf.constant(features)))
        got = [row[:length].tolist() for row, length in zip(ids, lengths)]
        assert got == captioner.caption_ids(features, beam_width=beam_width), (beam_width, decoding)
        if beam_width > 1:  # the scores too, to the bit
            best = [image[0] for image in beam_search(
                captioner.decoder, features, beam_width=beam_width, start_id=vocab.start_id, end_id=vocab.end_id,
                max_length=vocab.max_length, banned_ids=[vocab.unk_id], **decoding)]
            np.testing.assert_array_equal(scores, [hypothesis.score for hypothesis in best])
        lengths_seen |= set(lengths.tolist())
    assert len(lengths_seen) > 1  # captions ending at <end> and at max_length alike


# --- a SavedModel of a grid-reading bundle (attention), in this process --------------------

def photos(folder, count=3):
    """JPEG and PNG files of several sizes, with something in them for a CNN to see."""
    random, paths = np.random.default_rng(0), []
    for index, (height, width) in enumerate([(90, 120), (200, 64), (320, 320), (50, 75)][:count]):
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[: height // 2, :, index % 3] = 255
        pixels += random.integers(0, 60, pixels.shape, dtype=np.uint8)
        path = folder / f"photo{index}.{'png' if index % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_an_attention_bundle_exports_and_captions_photo_bytes_as_caption_images(tmp_path):
    encoder = build_encoder("mobilenet_v2", weights="none", pooling=None, mirror=True)  # a fixed random grid CNN
    captioner = untrained_captioner("attention", encoder.feature_shape, encoder=encoder)
    bundle = save_bundle(tmp_path / "bundle", captioner.model, captioner.vocab, captioner.settings)
    out = export.export_bundle(bundle, tmp_path / "exported")
    record = json.loads((out / export.MARKER).read_text())
    assert record["format"] == "savedmodel" and record["beam_width"] == 3 and record["decoding"] == WITH_BAN
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging left behind

    paths = photos(tmp_path)
    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    result = serve(images=tf.constant([path.read_bytes() for path in paths]))
    features, _, errors = encode_images(encoder, paths)  # what Captioner.caption_images does
    expected = captioner.caption_features(features, beam_width=3)
    assert not errors and all(expected) and [text.decode() for text in result["captions"].numpy()] == expected
    assert result["scores"].shape == (len(paths),) and np.all(result["scores"].numpy() < 0)
    assert result["ok"].numpy().all() and not any(result["errors"].numpy())
    Image.fromarray(np.zeros((8, 40, 3), dtype=np.uint8)).save(tmp_path / "tiny.png")
    tiny = serve(images=tf.constant([(tmp_path / "tiny.png").read_bytes()]))  # as `caption` refuses it
    assert not tiny["ok"].numpy()[0] and b"smaller than 16 px" in tiny["errors"].numpy()[0]


# --- the folder: atomic, and never over someone else's files ------------------------------

def test_export_refuses_a_folder_that_is_not_a_previous_export(tmp_path, capsys):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "thesis.txt").write_text("mine")
    assert cli.main(["export", "--model", str(tmp_path / "no-bundle"), "--out", str(keep)]) == 1
    assert "not a previous export" in capsys.readouterr().err
    assert (keep / "thesis.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as usage:  # a bad option value is a usage error, checked before any work
        cli.main(["export", "--model", str(tmp_path), "--out", str(tmp_path / "x"), "--beam", "0"])
    assert usage.value.code == 2 and "--beam: 0 is out of range: use 1 to 100" in capsys.readouterr().err


def test_a_failed_export_leaves_the_previous_one_and_no_half_folder(tmp_path, monkeypatch):
    captioner = untrained_captioner("merge", (16,))
    captioner.settings["encoder"] = {"encoder": "mobilenet_v2", "weights": "none", "weights_id": "random:sha256:0",
                                     "image_size": 320, "pooling": "avg", "mirror": False, "feature_shape": [16]}
    bundle = save_bundle(tmp_path / "bundle", captioner.model, captioner.vocab, captioner.settings)
    out = tmp_path / "exported"
    # Stand-ins for the CNN and for the writer: this test is about the folder, not the graph.
    monkeypatch.setattr(export, "build_encoder_like", lambda *args, **kwargs: types.SimpleNamespace(feature_shape=(16,)))

    def fake(text):
        def write(captioner, encoder, beam_width, folder):
            (folder / "model.txt").write_text(text)
            return {}
        return write

    monkeypatch.setattr(export, "_savedmodel", fake("first"))
    export.export_bundle(bundle, out)
    monkeypatch.setattr(export, "_savedmodel", fake("second"))
    export.export_bundle(bundle, out)  # a previous export is replaced
    assert (out / "model.txt").read_text() == "second"

    def broken(captioner, encoder, beam_width, folder):
        (folder / "model.txt").write_text("half")
        raise RuntimeError("the disk is full")
    monkeypatch.setattr(export, "_savedmodel", broken)
    with pytest.raises(RuntimeError, match="disk is full"):
        export.export_bundle(bundle, out)
    assert (out / "model.txt").read_text() == "second"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bundle", "exported"]


# --- the real thing: a bundle trained by `train` on Flickr8k --------------------------------

# Runs in a Python that has TensorFlow but not this package: -I ignores PYTHONPATH and the
# current folder, -S skips site-packages' .pth files (where `pip install -e .` puts the
# package); the test passes the site-packages folder, for TensorFlow alone.
PLAIN_TENSORFLOW = """
import sys
sys.path.append(sys.argv[1])
try:
    import captioning
    sys.exit("captioning is importable from " + captioning.__file__)
except ModuleNotFoundError:
    pass
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[2]).signatures["serving_default"]
photos = [open(path, "rb").read() for path in sys.argv[3:]]
result = serve(images=tf.constant(photos))
for path, caption in zip(sys.argv[3:], result["captions"].numpy()):
    print(f"{path}\\t{caption.decode()}")
"""


@pytest.mark.slow
def test_a_trained_bundle_captions_with_plain_tensorflow_as_the_caption_command(flickr8k_bundle, flickr8k_dir,
                                                                                  tmp_path):
    out = export.export_bundle(flickr8k_bundle, tmp_path / "savedmodel")  # the litert test runs the CLI
    paths = [str(path) for path in sorted((flickr8k_dir / "images").glob("*.jpg"))[:5]]
    expected = run_cli("caption", "--model", flickr8k_bundle, "--beam", 3, *paths).stdout
    result = subprocess.run([sys.executable, "-I", "-S", "-c", PLAIN_TENSORFLOW, sysconfig.get_paths()["purelib"],
                             str(out), *paths], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == expected and len(expected.splitlines()) == 5


@pytest.mark.slow
def test_the_litert_file_runs_in_the_interpreter_and_decodes_as_the_package(flickr8k_bundle, flickr8k_dir, tmp_path):
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")
    out = tmp_path / "litert"
    assert "exported" in run_cli("export", "--model", flickr8k_bundle, "--out", out, "--format", "litert").stdout
    assert sorted(path.name for path in out.iterdir()) == ["export.json", "model.tflite", "vocabulary.json"]
    words = json.loads((out / "vocabulary.json").read_text())["words"]
    interpreter = interpreter_module.Interpreter(model_path=str(out / "model.tflite"))
    interpreter.allocate_tensors()
    (pixels_input,), outputs = interpreter.get_input_details(), interpreter.get_output_details()

    captioner = Captioner.load(flickr8k_bundle)
    encoder = build_encoder_like(captioner.settings["encoder"])
    for path in sorted((flickr8k_dir / "images").glob("*.jpg"))[:3]:
        image = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
        pixels = image_io.resize(image, encoder.image_size)[None].numpy()  # what the .tflite takes
        interpreter.set_tensor(pixels_input["index"], pixels)
        interpreter.invoke()
        ids, lengths, scores = (interpreter.get_tensor(output["index"]) for output in outputs)
        caption = " ".join(words[i] for i in ids[0, :lengths[0]])
        features = encoder.encode(encoder.preprocess(pixels))
        assert caption == captioner.caption_features(features, beam_width=3)[0]
        assert scores.shape == (1,) and scores[0] < 0
