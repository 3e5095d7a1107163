"""A trained captioner in one folder, safe to share and to reload (notebooks 03 and 04).

    model.keras       the Keras model (weights + architecture, no Python code)
    vocabulary.json   the words in id order
    bundle.json       arch, dataset, the encoder that made its features (its
                      settings and weights identity, as the feature cache
                      recorded them), feature shape, caption length,
                      vocabulary size and fingerprint, training settings and
                      final metrics

Why the checks. A model predicts word *ids*; the vocabulary turns them into
words. Pair a model with the vocabulary of another run (or a re-run of
`prepare` with another min_count) and every caption comes out as fluent
nonsense, with no error anywhere - a classic silent failure. So bundle.json
records the vocabulary's size and fingerprint, and loading refuses a mismatch.

Why no pickle. Unpickling runs arbitrary code, so a shared pickle is a shared
program. The vocabulary is JSON, and Keras loads the model with
safe_mode=True, which refuses serialised Python lambdas.
"""

from pathlib import Path

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402

from captioning.architectures import StepDecoder  # noqa: E402
from captioning.attention import region_grid  # noqa: E402
from captioning.fileio import atomic_path, read_json, sha256_of, write_json_atomic  # noqa: E402
from captioning.vocab import Vocabulary  # noqa: E402

FORMAT_VERSION = 1
REQUIRED = ("arch", "dataset", "encoder", "feature_shape", "max_length", "vocab_size", "vocab_fingerprint",
            "model_sha256")


def _model_sizes(model):
    """(vocabulary size the model predicts over, shape of the features it reads)."""
    logits = model.get_layer("word_logits").units
    embedding = model.get_layer("word_embedding").input_dim
    if logits != embedding:
        raise ValueError(f"model reads {embedding} word ids but predicts {logits}")
    return logits, [int(size) for size in model.get_layer("image").batch_shape[1:]]


def save_bundle(out_dir, model, vocab, settings):
    """Write model.keras, vocabulary.json and bundle.json into out_dir (notebook 03).

    All three are written completely under temporary names first, then
    renamed into place, bundle.json last: a bundle already in the folder is
    replaced only once its replacement exists. bundle.json records the sha256
    of model.keras, so a folder whose files do not belong together (a copy
    gone wrong, a save cut between two renames) is refused when loaded.
    """
    vocab_size, feature_shape = _model_sizes(model)
    if vocab_size != len(vocab):
        raise ValueError(f"model predicts over {vocab_size} words but the vocabulary has {len(vocab)}")
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "bundle.json") as settings_temp, \
            atomic_path(out_dir / "vocabulary.json") as vocab_temp, \
            atomic_path(out_dir / "model.keras", suffix=".keras") as model_temp:
        # An uncompiled copy: the optimizer's state would triple the file and is of
        # no use for captioning (training/backup keeps it for resuming).
        inference = keras.models.clone_model(model)
        inference.set_weights(model.get_weights())
        inference.save(model_temp)
        vocab.save(vocab_temp)
        record = {"format_version": FORMAT_VERSION, **settings, "feature_shape": feature_shape,
                  "max_length": vocab.max_length, "vocab_size": len(vocab), "vocab_fingerprint": vocab.fingerprint,
                  "model_sha256": sha256_of(model_temp)}
        write_json_atomic(settings_temp, record)
    return out_dir


class Captioner:
    """A loaded bundle: `.model`, `.vocab`, `.settings`, `.decoder`, and captioning methods (notebook 04)."""

    def __init__(self, model, vocab, settings, bundle_dir=None):
        self.model, self.vocab, self.settings, self.bundle_dir = model, vocab, settings, bundle_dir
        self.decoder = StepDecoder(model)

    @classmethod
    def load(cls, bundle_dir):
        bundle_dir = Path(bundle_dir)
        if not bundle_dir.is_dir():
            raise FileNotFoundError(f"bundle folder not found: {bundle_dir}")
        settings_file = bundle_dir / "bundle.json"
        settings = read_json(settings_file, "bundle settings", kind=dict)
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
        if sha256_of(model_file) != settings["model_sha256"]:
            raise ValueError(f"{model_file} is not the model {settings_file} was saved with (damaged, truncated, or "
                             "from another bundle): copy the whole bundle folder again, or train again")
        try:
            model = keras.saving.load_model(model_file, safe_mode=True, compile=False)
        except Exception as error:  # Keras raises many kinds; name the file
            raise ValueError(f"{model_file}: cannot load the Keras model ({error})") from None
        vocab_size, feature_shape = _model_sizes(model)
        if vocab_size != len(vocab):
            raise ValueError(f"{model_file} predicts over {vocab_size} words but {vocab_file} has {len(vocab)}")
        if feature_shape != settings["feature_shape"]:
            raise ValueError(f"{model_file} reads features of shape {feature_shape} but {settings_file} field "
                             f"feature_shape says {settings['feature_shape']}")
        return cls(model, vocab, settings, bundle_dir)

    def caption_ids(self, features, beam_width=3, return_attention=False, **decode_options):
        """Word ids (no specials) of the best caption for each feature row.

        Options default to bundle.json's "decoding" field (length_alpha and
        no_repeat_ngram go to beam search; greedy, beam_width=1, takes
        neither). allow_unknown=False (the default) never lets a caption
        contain <unk>: it is a placeholder for rare words, not something to
        show a reader. return_attention=True (architectures that attend)
        returns (ids, [(len(ids), L) weights per image]).
        """
        from captioning.decoding import beam_search, greedy_decode
        options = {**self.settings.get("decoding", {}), **decode_options}
        banned = list(options.pop("banned_ids", ()))
        if not options.pop("allow_unknown", False):
            banned.append(self.vocab.unk_id)
        common = dict(start_id=self.vocab.start_id, end_id=self.vocab.end_id, max_length=self.vocab.max_length,
                      return_attention=return_attention, banned_ids=banned)
        if beam_width <= 1:
            return greedy_decode(self.decoder, features, **common)
        results = beam_search(self.decoder, features, beam_width=beam_width, **common, **options)
        ids = [hypotheses[0].ids for hypotheses in results]
        return (ids, [hypotheses[0].attention for hypotheses in results]) if return_attention else ids

    def attend(self, features, beam_width=3, **decode_options):
        """For models that attend: per image, (the caption's words, their attention maps
        (words, H, W)), one map per word, to lay over the photo (notebook 06)."""
        ids, weights = self.caption_ids(features, beam_width, return_attention=True, **decode_options)
        grid = region_grid({layer.name: layer for layer in self.model.layers}, self.decoder.image_shape)
        return [([self.vocab.words[i] for i in row], maps.reshape((len(row), *grid)))
                for row, maps in zip(ids, weights)]

    def caption_features(self, features, beam_width=3, **decode_options):
        """Captions (str) for image features (N, *feature_shape); beam_width=1 is greedy."""
        return [self.vocab.decode(ids) for ids in self.caption_ids(features, beam_width, **decode_options)]

    def caption_images(self, paths, beam_width=3, batch_size=32, weights=None):
        """Caption image files -> (captions with None for unreadable images, [(path, reason)]).

        The photos go through the encoder the training features came from
        (bundle.json's "encoder"); `weights` says where its weights file is if
        it has moved (they must be the same weights).
        """
        from captioning.encoders import build_encoder_like, encode_images
        encoder = build_encoder_like(self.settings["encoder"], weights=weights,
                                     where=f"{self.bundle_dir}/bundle.json field 'encoder'")
        paths = [str(path) for path in paths]
        features, ok_indices, errors = encode_images(encoder, paths, batch_size=batch_size)
        captions = [None] * len(paths)
        if len(ok_indices):
            for index, caption in zip(ok_indices, self.caption_features(features, beam_width)):
                captions[int(index)] = caption
        return captions, errors
