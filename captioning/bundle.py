"""A trained captioner in one folder, safe to share and to reload (notebooks 03 and 04).

    model.keras       the Keras model (weights + architecture, no Python code)
    vocabulary.json   the words in id order
    bundle.json       arch, dataset, encoder and its weights identity, feature
                      size, caption length, vocabulary size and fingerprint,
                      training settings and final metrics

Why the checks. A model predicts word *ids*; the vocabulary turns them into
words. Pair a model with the vocabulary of another run (or a re-run of
`prepare` with another min_count) and every caption comes out as fluent
nonsense, with no error anywhere - a classic silent failure. So bundle.json
records the vocabulary's size and fingerprint, and loading refuses a mismatch.

Why no pickle. Unpickling runs arbitrary code, so a shared pickle is a shared
program. The vocabulary is JSON, and Keras loads the model with
safe_mode=True, which refuses serialised Python lambdas.
"""

import os
import tempfile
from pathlib import Path

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

from captioning import training  # noqa: E402,F401  (registers the custom loss and metric)
from captioning.fileio import read_json, write_json_atomic  # noqa: E402
from captioning.models import make_step_decoder  # noqa: E402
from captioning.vocab import Vocabulary  # noqa: E402

FORMAT_VERSION = 1
REQUIRED = ("arch", "dataset", "encoder", "weights", "pooling", "feature_dim", "max_length",
            "vocab_size", "vocab_fingerprint")


def _model_sizes(model):
    """(vocabulary size the model predicts over, feature size it reads)."""
    logits = model.get_layer("word_logits").units
    embedding = model.get_layer("word_embedding").input_dim
    if logits != embedding:
        raise ValueError(f"model reads {embedding} word ids but predicts {logits}")
    return logits, int(model.get_layer("image").batch_shape[-1])


def save_bundle(out_dir, model, vocab, settings):
    """Write model.keras, vocabulary.json and bundle.json into out_dir (notebook 03).

    Each file is written beside its final name and renamed into place, and
    bundle.json comes last, so a folder with a bundle.json is complete.
    """
    vocab_size, feature_dim = _model_sizes(model)
    if vocab_size != len(vocab):
        raise ValueError(f"model predicts over {vocab_size} words but the vocabulary has {len(vocab)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bundle.json").unlink(missing_ok=True)  # the folder is incomplete until we finish

    # Keras insists on a .keras suffix, so the temporary name keeps it.
    handle, temp_name = tempfile.mkstemp(prefix=".model.", suffix=".keras", dir=out_dir)
    os.close(handle)
    try:
        # Save an uncompiled copy: the optimizer's state would triple the file
        # and is of no use for captioning (BackupAndRestore keeps it for resuming).
        inference = keras.models.clone_model(model)
        inference.set_weights(model.get_weights())
        inference.save(temp_name)
        os.replace(temp_name, out_dir / "model.keras")
    finally:
        Path(temp_name).unlink(missing_ok=True)
    vocab.save(out_dir / "vocabulary.json")

    record = {"format_version": FORMAT_VERSION, **settings, "feature_dim": feature_dim,
              "max_length": vocab.max_length, "vocab_size": len(vocab), "vocab_fingerprint": vocab.fingerprint}
    write_json_atomic(out_dir / "bundle.json", record)
    return out_dir


class Captioner:
    """A loaded bundle: `.model`, `.vocab`, `.settings`, `.decoder`, and captioning methods (notebook 04)."""

    def __init__(self, model, vocab, settings, bundle_dir=None):
        self.model, self.vocab, self.settings, self.bundle_dir = model, vocab, settings, bundle_dir
        self.decoder = make_step_decoder(model)

    @classmethod
    def load(cls, bundle_dir):
        bundle_dir = Path(bundle_dir)
        if not bundle_dir.is_dir():
            raise FileNotFoundError(f"bundle folder not found: {bundle_dir}")
        settings_file = bundle_dir / "bundle.json"
        settings = read_json(settings_file, "bundle settings")
        missing = [key for key in REQUIRED if key not in settings]
        if missing:
            raise ValueError(f"{settings_file}: missing field(s) {missing}")
        vocab = Vocabulary.load(bundle_dir / "vocabulary.json")
        vocab_file = bundle_dir / "vocabulary.json"
        if len(vocab) != settings["vocab_size"] or vocab.fingerprint != settings["vocab_fingerprint"]:
            raise ValueError(
                f"{vocab_file} does not belong to this model: it has {len(vocab)} words "
                f"(fingerprint {vocab.fingerprint[:12]}), but {settings_file} field vocab_size/vocab_fingerprint "
                f"says {settings['vocab_size']} words ({str(settings['vocab_fingerprint'])[:12]}). "
                "Use the vocabulary.json saved with the model.")
        model_file = bundle_dir / "model.keras"
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file} not found: the bundle is incomplete")
        try:
            model = keras.saving.load_model(model_file, safe_mode=True, compile=False)
        except Exception as error:  # Keras raises many kinds; name the file
            raise ValueError(f"{model_file}: cannot load the Keras model ({error})") from None
        vocab_size, feature_dim = _model_sizes(model)
        if vocab_size != len(vocab):
            raise ValueError(f"{model_file} predicts over {vocab_size} words but {vocab_file} has {len(vocab)}")
        if feature_dim != settings["feature_dim"]:
            raise ValueError(f"{model_file} reads {feature_dim}-d features but {settings_file} field "
                             f"feature_dim says {settings['feature_dim']}")
        return cls(model, vocab, settings, bundle_dir)

    def model_features(self, features):
        """Features shaped as the model's image input: (N, feature_dim) vectors, or for
        attention grids (N, H, W, C), also accepted flattened as (N, H * W, C)."""
        features = np.asarray(features, dtype=np.float32)
        shape = tuple(int(size) for size in self.model.get_layer("image").batch_shape[1:])
        if features.ndim < 2 or features.shape[-1] != shape[-1] or \
                np.prod(features.shape[1:-1]) != np.prod(shape[:-1]) or (len(shape) == 1 and features.ndim != 2):
            raise ValueError(f"features must have shape (N, {', '.join(map(str, shape))}) for this "
                             f"{self.settings['arch']} model, got {features.shape}")
        return features.reshape((len(features), *shape))

    def caption_ids(self, features, beam_width=3, return_attention=False, **decode_options):
        """Word ids (no specials) of the best caption for each feature row.

        Options default to bundle.json's "decoding" field (length_alpha and
        no_repeat_ngram go to beam search; greedy, beam_width=1, takes neither;
        guidance goes to both). allow_unknown=False
        (the default) never lets a caption contain <unk>: it is a placeholder
        for rare words, not something to show a reader. guidance=g > 0 decodes
        with (1 + g) * log p(word | image) - g * log p(word | no image) (see
        _Guided). return_attention=True (attention models) returns
        (ids, [(len(ids), L) weights per image]).
        """
        from captioning.decoding import beam_search, greedy_decode
        features = self.model_features(features)
        options = {**self.settings.get("decoding", {}), **decode_options}
        banned = list(options.pop("banned_ids", ()))
        if not options.pop("allow_unknown", False):
            banned.append(self.vocab.unk_id)
        guidance = float(options.pop("guidance", 0.0))
        decoder = _Guided(self.decoder, guidance) if guidance else self.decoder
        common = dict(start_id=self.vocab.start_id, end_id=self.vocab.end_id, max_length=self.vocab.max_length,
                      return_attention=return_attention, banned_ids=banned)
        if beam_width <= 1:
            return greedy_decode(decoder, features, **common)
        results = beam_search(decoder, features, beam_width=beam_width, **common, **options)
        ids = [hypotheses[0].ids for hypotheses in results]
        return (ids, [hypotheses[0].attention for hypotheses in results]) if return_attention else ids

    def attend(self, features, beam_width=3, **decode_options):
        """For attention models: per image, (the caption's words, their attention maps
        (words, H, W)), one map per word, to lay over the photo (notebook 06)."""
        ids, weights = self.caption_ids(features, beam_width, return_attention=True, **decode_options)
        grid = tuple(self.model.get_layer("image").batch_shape[1:-1]) or (1,)
        return [([self.vocab.words[i] for i in row], maps.reshape((len(row), *grid)))
                for row, maps in zip(ids, weights)]

    def caption_features(self, features, beam_width=3, **decode_options):
        """Captions (str) for image features (N, feature_dim), or grids for attention; beam_width=1 is greedy."""
        return [self.vocab.decode(ids) for ids in self.caption_ids(features, beam_width, **decode_options)]

    def caption_images(self, paths, beam_width=3, batch_size=32, weights=None):
        """Caption image files -> (captions with None for unreadable images, [(path, reason)]).

        The images go through the same encoder as in training (bundle.json);
        `weights` overrides where its weights are found (e.g. another path to
        the same file), and must give the same weights identity.
        """
        from captioning.encoders import build_encoder, encode_images
        # Bundles from before mirrored features existed say nothing about them: they were not mirrored.
        encoder = build_encoder(self.settings["encoder"], weights=weights or self.settings["weights"],
                                pooling=self.settings["pooling"], mirror=self.settings.get("mirror", False))
        expected = self.settings.get("weights_id")
        if expected and encoder.weights_id != expected:
            raise ValueError(f"encoder weights {weights or self.settings['weights']!r} are not the ones this "
                             f"model was trained with (weights_id {encoder.weights_id} != {expected} "
                             f"in {self.bundle_dir}/bundle.json)")
        trained_size = self.settings.get("image_size", encoder.image_size)
        if encoder.image_size != trained_size:
            raise ValueError(f"this model was trained on features of {trained_size} px photos ({self.bundle_dir}/"
                             f"bundle.json field image_size) but {encoder.name} now encodes {encoder.image_size} px "
                             "photos: train the model again")
        paths = [str(path) for path in paths]
        features, ok_indices, errors = encode_images(encoder, paths, batch_size=batch_size)
        captions = [None] * len(paths)
        if len(ok_indices):
            for index, caption in zip(ok_indices, self.caption_features(features, beam_width)):
                captions[int(index)] = caption
        return captions, errors


class _Guided:
    """A StepDecoder that leans away from what the model would say without the image.

    A small captioner learns a strong language prior: "a man in a blue shirt
    is standing" fits many photos. Running the model a second time on an
    all-zero image estimates that prior, and decoding with
    (1 + g) * log p(word | image) - g * log p(word | no image), renormalised,
    favours the words this image makes more likely (the "guidance" trick of
    diffusion models, or a pointwise mutual information bonus).
    """

    def __init__(self, decoder, guidance):
        self.decoder, self.guidance, self.vocab_size = decoder, float(guidance), decoder.vocab_size
        self.last_attention = None

    def initial_state(self, features):
        return [*self.decoder.initial_state(features), *self.decoder.initial_state(np.zeros_like(features))]

    def step(self, words, states, features):
        half = len(states) // 2
        log_probs, image_states = self.decoder.step(words, states[:half], features)
        self.last_attention = getattr(self.decoder, "last_attention", None)
        prior, prior_states = self.decoder.step(words, states[half:], np.zeros_like(features))
        mixed = (1.0 + self.guidance) * np.asarray(log_probs) - self.guidance * np.asarray(prior)
        mixed -= np.logaddexp.reduce(mixed, axis=1, keepdims=True)
        return mixed.astype(np.float32), [*image_states, *prior_states]
