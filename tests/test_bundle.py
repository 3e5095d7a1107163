"""Saved bundles: identical outputs after reloading, refused mismatches, no code
execution on load, and the `train` CLI end to end on the Flickr8k sample."""

import json
import zipfile

import numpy as np
import pytest

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402

from captioning.bundle import Captioner, save_bundle  # noqa: E402
from captioning.fileio import sha256_of  # noqa: E402
from captioning.vocab import Vocabulary  # noqa: E402
from test_training import FEATURE_DIM, synthetic_captions, synthetic_vocab, train_synthetic  # noqa: E402
from conftest import CI_EPOCHS  # noqa: E402

SETTINGS = {"arch": "merge", "dataset": "synthetic",
            "encoder": {"encoder": "mobilenet_v2", "weights": "imagenet", "weights_id": "imagenet", "pooling": "avg"}}


@pytest.fixture(scope="module")
def trained():
    model, vocab, _ = train_synthetic("merge", epochs=20)
    return model, vocab


@pytest.fixture
def bundle_dir(trained, tmp_path):
    model, vocab = trained
    return save_bundle(tmp_path / "bundle", model, vocab, SETTINGS)


def test_bundle_files_and_settings(bundle_dir, trained):
    assert sorted(path.name for path in bundle_dir.iterdir()) == ["bundle.json", "model.keras", "vocabulary.json"]
    settings = json.loads((bundle_dir / "bundle.json").read_text())
    vocab = trained[1]
    assert settings["vocab_size"] == len(vocab) and settings["vocab_fingerprint"] == vocab.fingerprint
    assert settings["feature_shape"] == [FEATURE_DIM] and settings["max_length"] == vocab.max_length
    assert settings["arch"] == "merge" and settings["encoder"]["weights_id"] == "imagenet"
    # No pickle anywhere: the model file is a zip of JSON config + HDF5 weights.
    names = zipfile.ZipFile(bundle_dir / "model.keras").namelist()
    assert not [name for name in names if name.endswith((".pkl", ".pickle", ".npy"))]
    assert "config.json" in names


def test_reloading_gives_identical_outputs(bundle_dir, trained):
    model, vocab = trained
    captioner = Captioner.load(bundle_dir)
    assert captioner.vocab == vocab and captioner.settings["encoder"]["encoder"] == "mobilenet_v2"
    features, captions = synthetic_captions(12, seed=7)
    words = vocab.encode_batch(captions)[:, :-1]
    before = model({"image": features, "words": words}, training=False).numpy()
    after = captioner.model({"image": features, "words": words}, training=False).numpy()
    np.testing.assert_array_equal(before, after)
    # ...and it captions: greedy and beam search both reproduce the synthetic captions.
    assert np.mean([a == b for a, b in zip(captioner.caption_features(features, beam_width=1), captions)]) >= 0.9
    assert np.mean([a == b for a, b in zip(captioner.caption_features(features, beam_width=3), captions)]) >= 0.9


def test_a_vocabulary_of_another_size_is_refused(bundle_dir):
    _, captions = synthetic_captions(50, seed=1)
    Vocabulary.build(captions + ["an extra zebra"], min_count=1, max_length=10).save(bundle_dir / "vocabulary.json")
    with pytest.raises(ValueError, match="does not belong to this model.*vocab_size"):
        Captioner.load(bundle_dir)


def test_a_reordered_vocabulary_of_the_same_size_is_refused(bundle_dir, trained):
    vocab = trained[1]
    words = vocab.words[:4] + list(reversed(vocab.words[4:]))  # same words, other ids: silent nonsense
    Vocabulary(words, max_length=vocab.max_length).save(bundle_dir / "vocabulary.json")
    with pytest.raises(ValueError, match="vocabulary.json does not belong to this model"):
        Captioner.load(bundle_dir)


def test_missing_or_broken_files_are_clear_errors(bundle_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="bundle folder not found"):
        Captioner.load(tmp_path / "nowhere")
    (bundle_dir / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="model.keras"):
        Captioner.load(bundle_dir)
    for valid_but_not_an_object in ("[]", '"merge"', "3"):  # JSON, but not bundle settings: named, not a TypeError
        (bundle_dir / "bundle.json").write_text(valid_but_not_an_object)
        with pytest.raises(ValueError, match=r"bundle.json: bundle settings must be an object \{...\}, not"):
            Captioner.load(bundle_dir)
    (bundle_dir / "bundle.json").unlink()
    with pytest.raises(FileNotFoundError, match="bundle.json"):
        Captioner.load(bundle_dir)


def test_a_model_with_python_code_is_not_run(bundle_dir):
    # A shared bundle could carry a Lambda layer with arbitrary code (and a bundle.json that
    # vouches for it); safe mode refuses it.
    inputs = keras.Input((FEATURE_DIM,), name="image")
    evil = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2, name="evil")(inputs), name="merge_captioner")
    evil.save(bundle_dir / "model.keras")
    settings = json.loads((bundle_dir / "bundle.json").read_text())
    settings["model_sha256"] = sha256_of(bundle_dir / "model.keras")
    (bundle_dir / "bundle.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="model.keras: cannot load.*safe_mode"):
        Captioner.load(bundle_dir)


def test_a_model_file_that_is_not_the_saved_one_is_refused(bundle_dir):
    data = (bundle_dir / "model.keras").read_bytes()
    (bundle_dir / "model.keras").write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(ValueError, match="model.keras is not the model .*bundle.json was saved with"):
        Captioner.load(bundle_dir)


def test_save_bundle_refuses_a_vocabulary_that_does_not_fit(trained, tmp_path):
    model, _ = trained
    small = Vocabulary.build(["a dog"], min_count=1, max_length=10)
    with pytest.raises(ValueError, match="vocabulary has"):
        save_bundle(tmp_path / "bad", model, small, SETTINGS)
    assert not (tmp_path / "bad" / "bundle.json").exists()


def test_synthetic_vocabulary_is_the_one_trained_on(trained):
    assert trained[1] == synthetic_vocab()


# --- the real thing: `python -m captioning train` on the Flickr8k sample ----------------

def test_train_cli_writes_a_bundle_that_captions_images(flickr8k_bundle, flickr8k_small_dir):
    assert {"model.keras", "vocabulary.json", "bundle.json"} <= {path.name for path in flickr8k_bundle.iterdir()}
    captioner = Captioner.load(flickr8k_bundle)
    settings = captioner.settings
    assert settings["dataset"] == "flickr8k" and settings["encoder"]["encoder"] == "mobilenet_v2"
    assert settings["arch"] == "merge" and settings["feature_shape"] == [1280]
    assert settings["train_splits"] == ["train"] and settings["validation_splits"] == ["dev"]
    assert settings["metrics"]["epochs_run"] == CI_EPOCHS and settings["encoder"]["weights_id"].startswith("sha256:")
    fine_tuning = settings["metrics"]["self_critical"]
    # --epochs caps the fine-tuning too; the preset then keeps the mean of those epochs (at most its last 5).
    assert [record["epoch"] for record in fine_tuning] == [*range(1, CI_EPOCHS + 1), f"mean of 1-{CI_EPOCHS}"]
    assert settings["decoding"]["no_repeat_ngram"] == 2  # the preset's, used by `caption` and `evaluate`
    history = (flickr8k_bundle / "training" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + CI_EPOCHS and "val_loss" in history[0]
    images = sorted((flickr8k_small_dir / "images").glob("*.jpg"))[:2]
    captions, errors = captioner.caption_images(images + [flickr8k_small_dir / "missing.jpg"], beam_width=2)
    assert len(captions) == 3 and captions[2] is None and len(errors) == 1
    assert all(isinstance(caption, str) and caption for caption in captions[:2])


class StandIn:
    """A stand-in decoder: every word has log-probability -20 unless `fill` says otherwise.
    Its state counts the words read so far; `fill(log_probs, position, features)` sets the rest."""

    def __init__(self, vocab):
        self.vocab, self.vocab_size = vocab, len(vocab)

    def initial_state(self, features):
        return [np.zeros((len(features), 1), dtype="float32")]

    def step(self, words, states, features):
        log_probs = np.full((len(words), self.vocab_size), -20.0, dtype="float32")
        self.fill(log_probs, states[0][:, 0], features)
        return log_probs, [states[0] + 1]


class PrefersUnknown(StandIn):
    """First word <unk> (else 'dog'), then <end>."""

    def fill(self, log_probs, position, features):
        first = position == 0
        log_probs[first, self.vocab.unk_id] = -0.1
        log_probs[first, self.vocab.words.index("dog")] = -2.5
        log_probs[~first, self.vocab.end_id] = 0.0


@pytest.mark.parametrize("beam_width", [1, 3])
def test_captions_never_contain_unk_unless_asked(bundle_dir, beam_width):
    captioner = Captioner.load(bundle_dir)
    captioner.decoder = PrefersUnknown(captioner.vocab)
    features = np.zeros((2, FEATURE_DIM), dtype="float32")
    assert captioner.caption_features(features, beam_width=beam_width) == ["dog", "dog"]
    assert captioner.caption_features(features, beam_width=beam_width, allow_unknown=True) == ["<unk>", "<unk>"]


class SaysDogTwice(StandIn):
    """'dog' is the likeliest first and second word ('car' the runner-up), then <end>."""

    def fill(self, log_probs, position, features):
        talking = position < 2
        log_probs[talking, self.vocab.words.index("dog")] = -0.1
        log_probs[talking, self.vocab.words.index("car")] = -2.5
        log_probs[~talking, self.vocab.end_id] = 0.0


def test_the_bundles_decoding_settings_are_used_and_can_be_overridden(trained, tmp_path):
    model, vocab = trained
    settings = dict(SETTINGS, decoding={"length_alpha": 1.0, "no_repeat_ngram": 1})
    captioner = Captioner.load(save_bundle(tmp_path / "bundle", model, vocab, settings))
    captioner.decoder = SaysDogTwice(captioner.vocab)
    features = np.zeros((2, FEATURE_DIM), dtype="float32")
    assert captioner.caption_features(features, beam_width=3) == ["dog car", "dog car"]
    assert captioner.caption_features(features, beam_width=3, no_repeat_ngram=0) == ["dog dog", "dog dog"]


def test_a_trained_model_does_not_ring_the_same_caption_alarm_and_a_blind_one_does(trained):
    from captioning.evaluation import same_caption_warning
    from captioning.training import fit_captioner, make_dataset
    from test_training import synthetic_data, tiny_model
    model, vocab = trained
    features, _ = synthetic_captions(40, seed=11)
    seeing = Captioner(model, vocab, SETTINGS)
    assert same_caption_warning(seeing.caption_features(features)) is None
    # The same captions, with features that are all alike (as from random encoder weights):
    # nothing tells the photos apart, so the model learns one caption for all.
    _, _, captions = synthetic_data(vocab, 240, seed=1)
    blind_data = make_dataset(np.ones((1, FEATURE_DIM), "float32"), np.zeros(240, "int64"), vocab.encode_batch(captions),
                              batch_size=32, seed=0)
    keras.utils.set_random_seed(0)
    blind_model = tiny_model("merge", vocab)
    fit_captioner(blind_model, blind_data, epochs=10, learning_rate=1e-2, patience=10, verbose=0)
    alike = 1 + np.random.default_rng(0).normal(0, 1e-3, size=(40, FEATURE_DIM)).astype("float32")
    warning = same_caption_warning(Captioner(blind_model, vocab, SETTINGS).caption_features(alike))
    assert warning is not None and "40 of 40 photos" in warning
