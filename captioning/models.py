"""Caption models: `merge` and the three `inject` architectures (notebook 03).

Every model here reads an image feature vector and a caption prefix
[<start>, w1, ..., wn] and predicts the next word at every position,
[w1, ..., wn, <end>], as logits over the vocabulary. Where the image enters is
the only difference between the architectures (Tanti, Gatt & Camilleri, 2018,
"Where to put the image in an image caption generator"):

    merge        the RNN reads words only; the image vector joins the RNN's
                 output just before the word classifier (add or concatenate)
    init-inject  the image becomes the RNN's initial state
    pre-inject   the image is the first "word" of the sequence
    par-inject   the image is concatenated to every word the RNN reads
    attention    the RNN looks at the image's spatial grid before every word
                 (soft attention, Xu et al. 2015): captioning/attention.py,
                 notebook 06

The layers that hold weights are created once, with readable names, by
`_make_layers`, and one function, `_wire`, connects them. We call `_wire`
twice: for the full-sequence training model, and in `make_step_decoder` for a
one-step graph that reuses the trained layers (found by name, so it also works
on a model reloaded from a .keras file). Decoding then costs one compiled call
per generated word for the whole batch.

We do not mask padding inside the model: padding only ever follows the <end>
token, and an RNN reads left to right, so the outputs at real positions never
see it. The loss and accuracy ignore padded targets instead (training.py).
"""

import functools

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

from captioning import attention  # noqa: E402

UNK_ID = 3  # vocab.py puts <unk> at id 3 (and <start> at 1)
START_ID = 1

ARCHITECTURES = ("merge", "init-inject", "pre-inject", "par-inject", "attention")
RNN_TYPES = ("lstm", "gru")
MERGE_MODES = ("add", "concat")


@keras.saving.register_keras_serializable(package="captioning")
class WordDropout(keras.layers.Layer):
    """While training, replace each input word by <unk> with probability `rate`.

    A caption model can lower its loss a long way by predicting the next word
    from the words before it alone, as a language model, and on a few
    thousand captions it learns that far better than it learns to look. Hiding
    some of the words it reads ("word dropout", Bowman et al. 2016, "Generating
    sentences from a continuous space") makes the image the more reliable
    guide. On the Flickr8k sample, rate 0.35 made no difference after teacher
    forcing alone, but after self-critical fine-tuning held-out CIDEr was
    about 0.01-0.02 higher than without it (two seeds each). <start> is never
    hidden; at decoding time the layer does nothing.
    """

    def __init__(self, rate=0.0, unk_id=UNK_ID, start_id=START_ID, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"word_dropout must be in [0, 1), got {rate!r}")
        self.rate, self.unk_id, self.start_id = float(rate), int(unk_id), int(start_id)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, words, training=False):
        if not training or self.rate == 0.0:
            return words
        ops = keras.ops
        hide = keras.random.uniform(ops.shape(words), seed=self.seed_generator) < self.rate
        hide = ops.logical_and(hide, ops.not_equal(words, self.start_id))
        return ops.where(hide, ops.full_like(words, self.unk_id), words)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "unk_id": self.unk_id, "start_id": self.start_id}


def _make_layers(arch, *, vocab_size, embed_dim, units, rnn, dropout, merge_mode, word_dropout=0.0):
    """The layers that hold weights (and the dropouts), keyed by their names."""
    dense, drop = keras.layers.Dense, keras.layers.Dropout
    layers = [
        WordDropout(word_dropout, name="word_dropout"),
        drop(dropout, name="image_dropout"),
        keras.layers.Embedding(vocab_size, embed_dim, name="word_embedding"),
        drop(dropout, name="embedding_dropout"),
        (keras.layers.LSTM if rnn == "lstm" else keras.layers.GRU)(
            units, return_sequences=True, return_state=True, name="decoder_rnn"),
        drop(dropout, name="output_dropout"),
        dense(vocab_size, name="word_logits"),
    ]
    if arch == "merge":
        layers.append(dense(units, activation="relu", name="image_projection"))
    elif arch == "par-inject":
        layers.append(dense(embed_dim, activation="relu", name="image_projection"))
    elif arch == "pre-inject":
        # Lives in the word-embedding space, so linear like an embedding row.
        layers.append(dense(embed_dim, name="image_to_embedding"))
    elif arch == "init-inject":
        # An LSTM has two states (h, c); a GRU only h. h is bounded by tanh like the RNN's own.
        layers.append(dense(units, activation="tanh", name="image_to_state_h"))
        if rnn == "lstm":
            layers.append(dense(units, name="image_to_state_c"))
    return {layer.name: layer for layer in layers}


def _wire(arch, layers, image, words, states=None, *, merge_mode="add", full_sequence=True):
    """Connect the layers: (image, words[, states]) -> (logits, new states).

    full_sequence=True builds the training graph (states come from the image or
    are zeros); False builds one decoding step whose states are inputs.
    """
    steps = words.shape[1]
    image = layers["image_dropout"](image)
    if "word_dropout" in layers:  # absent from models saved before it existed
        words = layers["word_dropout"](words)
    sequence = layers["embedding_dropout"](layers["word_embedding"](words))

    if arch == "par-inject":
        image_vector = layers["image_projection"](image)
        repeated = keras.layers.RepeatVector(steps, name="image_at_every_step")(image_vector)
        sequence = keras.layers.Concatenate(name="word_and_image")([sequence, repeated])
    if full_sequence and arch == "pre-inject":
        image_word = keras.layers.Reshape((1, -1), name="image_as_first_word")(
            layers["image_to_embedding"](image))
        sequence = keras.layers.Concatenate(axis=1, name="image_then_words")([image_word, sequence])
    if full_sequence and arch == "init-inject":
        states = [layers["image_to_state_h"](image)]
        if "image_to_state_c" in layers:
            states.append(layers["image_to_state_c"](image))

    outputs, *new_states = layers["decoder_rnn"](sequence, initial_state=states)
    if full_sequence and arch == "pre-inject":
        # The output after reading the image predicts nothing: drop it so that
        # position t again predicts word t + 1.
        outputs = keras.layers.Cropping1D((1, 0), name="skip_image_step")(outputs)

    if arch == "merge":
        image_vector = layers["image_projection"](image)
        if merge_mode == "add":
            image_vector = keras.layers.Reshape((1, -1), name="image_per_step")(image_vector)
            outputs = keras.layers.Add(name="merge_add")([outputs, image_vector])
        else:
            image_vector = keras.layers.RepeatVector(steps, name="image_per_step")(image_vector)
            outputs = keras.layers.Concatenate(name="merge_concat")([outputs, image_vector])

    logits = layers["word_logits"](layers["output_dropout"](outputs))
    return logits, new_states


def build_captioner(arch="merge", *, vocab_size, feature_dim, max_length, embed_dim=256, units=256,
                    rnn="lstm", dropout=0.5, merge_mode="add", word_dropout=0.0, grid_shape=(),
                    attention_penalty=0.0):
    """Build one of the caption models with the Functional API (notebooks 03 and 06).

    Inputs: {"image": (batch, feature_dim) float32, "words": (batch, max_length + 1) int32}.
    Output: next-word logits (batch, max_length + 1, vocab_size).
    arch="attention" reads a grid of feature vectors instead, image (batch, *grid_shape,
    feature_dim), e.g. grid_shape=(10, 10) for MobileNetV2; attention_penalty is its
    doubly stochastic regularisation (captioning/attention.py). merge_mode is merge's only.
    word_dropout hides that share of the input words while training (WordDropout).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if rnn not in RNN_TYPES:
        raise ValueError(f"rnn must be one of {RNN_TYPES}, got {rnn!r}")
    if merge_mode not in MERGE_MODES:
        raise ValueError(f"merge_mode must be one of {MERGE_MODES}, got {merge_mode!r}")
    for name, value in (("vocab_size", vocab_size), ("feature_dim", feature_dim), ("max_length", max_length),
                        ("embed_dim", embed_dim), ("units", units)):
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    grid_shape = tuple(int(size) for size in grid_shape)
    if arch == "attention":
        return attention.build_attention_captioner(
            vocab_size=vocab_size, feature_dim=feature_dim, max_length=max_length, grid_shape=grid_shape,
            embed_dim=embed_dim, units=units, rnn=rnn, dropout=dropout, word_dropout=word_dropout,
            attention_penalty=attention_penalty)
    if grid_shape:
        raise ValueError(f"{arch} reads one feature vector per image, not a grid {grid_shape}: "
                         "cache features with pooling 'avg', or use arch='attention'")

    layers = _make_layers(arch, vocab_size=vocab_size, embed_dim=embed_dim, units=units, rnn=rnn,
                          dropout=dropout, merge_mode=merge_mode, word_dropout=word_dropout)
    image = keras.Input((feature_dim,), name="image")
    words = keras.Input((max_length + 1,), dtype="int32", name="words")
    logits, _ = _wire(arch, layers, image, words, merge_mode=merge_mode)
    # The model's name records the architecture, so a reloaded model can be decoded.
    return keras.Model({"image": image, "words": words}, logits, name=arch.replace("-", "_") + "_captioner")


def architecture_of(model):
    """('merge' | 'init-inject' | ..., merge_mode) of a model built by build_captioner."""
    arch = model.name.removesuffix("_captioner").replace("_", "-")
    if arch not in ARCHITECTURES:
        raise ValueError(f"model {model.name!r} was not built by build_captioner (unknown architecture)")
    names = {layer.name for layer in model.layers}
    return arch, ("concat" if "merge_concat" in names else "add")


class StepDecoder:
    """One decoding step for a whole batch, built from a trained caption model (notebook 04).

    `initial_state(features)` gives the RNN state before the first word;
    `step(words, states, features)` feeds one word per caption and returns the
    next word's log-probabilities and the new states. Both are tf.functions
    with a fixed input signature (batch dimension None), so they are traced
    once and then cost one compiled call each, whatever the batch size.
    """

    def __init__(self, model):
        self.arch, merge_mode = architecture_of(model)
        self.model = model
        layers = {layer.name: layer for layer in model.layers}
        rnn = layers["decoder_rnn"]
        self.units = rnn.units
        self.state_count = 2 if isinstance(rnn, keras.layers.LSTM) else 1
        self.vocab_size = layers["word_logits"].units
        self.feature_dim = int(layers["image"].batch_shape[-1]) if "image" in layers else None
        if self.feature_dim is None:
            raise ValueError("caption model has no 'image' input")
        self._layers = layers

        # The one-step graph: the same layers, wired for a sequence of length 1.
        image = keras.Input((self.feature_dim,), name="image")
        word = keras.Input((1,), dtype="int32", name="word")
        states = [keras.Input((self.units,), name=f"state_{i}") for i in range(self.state_count)]
        logits, new_states = _wire(self.arch, layers, image, word, states, merge_mode=merge_mode,
                                   full_sequence=False)
        self._step_model = keras.Model([word, image, *states], [logits, *new_states], name="decoding_step")

        feature_spec = tf.TensorSpec((None, self.feature_dim), tf.float32)
        state_specs = [tf.TensorSpec((None, self.units), tf.float32)] * self.state_count
        # functools.partial, not the methods themselves: TensorFlow counts traces
        # per code object, shared by every decoder, and would warn about
        # "retracing" once a notebook has made a few decoders, although each of
        # them traces only once. A partial has no code object of its own, so it
        # is counted on its own.
        self._initial = tf.function(functools.partial(self._initial_state_graph), input_signature=[feature_spec])
        self._step = tf.function(functools.partial(self._step_graph),
                                 input_signature=[tf.TensorSpec((None,), tf.int32), state_specs, feature_spec])

    def _initial_state_graph(self, features):
        layers, batch = self._layers, tf.shape(features)[0]
        zeros = [tf.zeros((batch, self.units)) for _ in range(self.state_count)]
        if self.arch == "init-inject":
            states = [layers["image_to_state_h"](features)]
            if self.state_count == 2:
                states.append(layers["image_to_state_c"](features))
            return states
        if self.arch == "pre-inject":
            image_word = layers["image_to_embedding"](features)[:, None, :]
            _, *states = layers["decoder_rnn"](image_word, initial_state=zeros)
            return states
        return zeros

    def _step_graph(self, words, states, features):
        logits, *new_states = self._step_model([words[:, None], features, *states], training=False)
        return tf.nn.log_softmax(logits[:, 0, :]), new_states

    def initial_state(self, features):
        features = np.asarray(features, dtype=np.float32)
        return [state.numpy() for state in self._initial(features)]

    def step(self, words, states, features):
        words = np.asarray(words, dtype=np.int32).reshape(-1)
        features = np.asarray(features, dtype=np.float32)
        states = [np.asarray(state, dtype=np.float32) for state in states]
        log_probs, new_states = self._step(words, states, features)
        return log_probs.numpy(), [state.numpy() for state in new_states]


def make_step_decoder(model):
    """A StepDecoder for a model from build_captioner, freshly built or reloaded (notebook 04)."""
    if architecture_of(model)[0] == "attention":
        return attention.AttentionStepDecoder(model)
    return StepDecoder(model)
