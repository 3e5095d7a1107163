"""Soft visual attention: an LSTM decoder that looks at a different part of the image
for every word (notebook 06).

Merge and inject models (models.py) see an image as one vector, the CNN's
grid averaged over all locations. Averaging keeps *what* is in the picture
but loses *where*, and it makes every word read the same summary. Xu et al.
(2015, "Show, Attend and Tell") keep the grid instead: L = H x W vectors
a_1..a_L, one per image region (7 x 7 x 1280 for MobileNetV2, 8 x 8 x 2048
for InceptionV3). Before each word the decoder scores every region against
what it has said so far (its previous hidden state h), turns the scores into
weights that sum to one, and reads their weighted average, the context z:

    e_l   = v . tanh(W_k a_l + W_q h)        additive (Bahdanau) attention
    alpha = softmax(e)                       one weight per region, sum 1
    z     = sum_l alpha_l a_l                what the decoder looks at now
    h, c  = LSTM([word embedding, z], (h, c))
    logits = W_o [h, z]

The initial state comes from the mean of the grid, as in the paper. The
weights alpha are the heat maps notebook 06 lays over the photos.

Doubly stochastic regularisation (optional, `attention_penalty` = lambda).
Softmax makes each step's weights sum to one over the regions; the paper
also nudges each region's weights to sum to about one over the words, so
that the decoder looks at every part of the image at some point:

    lambda * sum_l (1 - sum_t alpha_tl) ** 2        per caption, averaged over the batch

We sum over real steps only: the steps whose input word is not <pad>. That
includes the step that reads <end> (its prediction is not trained, being
padding), which is one step too many, but it needs no knowledge of the end
id inside the model.

`AttentionDecoder` is one registered Keras layer holding the recurrence, so a
saved model reloads in safe mode, and `AttentionStepDecoder` rewires the same
trained layers for one word at a time (the StepDecoder protocol of models.py).
"""

import functools

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

PAD_ID = 0  # vocab.py puts <pad> at id 0


@keras.saving.register_keras_serializable(package="captioning")
class AttentionDecoder(keras.layers.Layer):
    """The attending recurrence: (word embeddings, regions, states[, word ids]) ->
    (hidden states, contexts, attention weights, *final states), one row per step.

    The steps are a plain Python loop over the (fixed, short) caption length:
    the graph is unrolled once when traced, and the loop reads like the maths.
    """

    def __init__(self, units, attention_units=None, rnn="lstm", attention_penalty=0.0, **kwargs):
        super().__init__(**kwargs)
        self.units, self.rnn = int(units), rnn
        self.attention_units = int(attention_units or units)
        self.attention_penalty = float(attention_penalty)
        cell = keras.layers.LSTMCell if rnn == "lstm" else keras.layers.GRUCell
        self.cell = cell(self.units, name="cell")
        self.state_count = 2 if rnn == "lstm" else 1
        self.keys = keras.layers.Dense(self.attention_units, use_bias=False, name="attention_keys")
        self.query = keras.layers.Dense(self.attention_units, name="attention_query")
        self.score = keras.layers.Dense(1, use_bias=False, name="attention_score")

    def build(self, sequence_shape, regions_shape, states_shape, words_shape=None):
        region_dim = regions_shape[-1]
        self.keys.build(regions_shape)
        self.query.build((None, self.units))
        self.score.build((None, None, self.attention_units))
        self.cell.build((None, sequence_shape[-1] + region_dim))

    def attend(self, keys, regions, hidden):
        """Weights over the regions (batch, L) and the context they give (batch, region_dim)."""
        scores = self.score(keras.ops.tanh(keys + self.query(hidden)[:, None, :]))[:, :, 0]
        # softmax over the regions, written out (keras.ops.softmax warns about a grid of one location)
        weights = keras.ops.exp(scores - keras.ops.logsumexp(scores, axis=-1, keepdims=True))
        return weights, keras.ops.sum(weights[:, :, None] * regions, axis=1)

    def call(self, sequence, regions, states, words=None, training=False):
        keys = self.keys(regions)  # the regions' half of the score: once per caption, not per step
        states = list(states)
        hidden, contexts, weights = [], [], []
        for step in range(sequence.shape[1]):
            step_weights, context = self.attend(keys, regions, states[0])
            step_input = keras.ops.concatenate([sequence[:, step], context], axis=-1)
            output, states = self.cell(step_input, states, training=training)
            states = list(states) if isinstance(states, (list, tuple)) else [states]
            hidden.append(output)
            contexts.append(context)
            weights.append(step_weights)
        hidden, contexts, weights = (keras.ops.stack(rows, axis=1) for rows in (hidden, contexts, weights))
        if training and self.attention_penalty and words is not None:
            self.add_loss(self.attention_penalty * doubly_stochastic_penalty(weights, words))
        return hidden, contexts, weights, *states

    def get_config(self):
        return {**super().get_config(), "units": self.units, "attention_units": self.attention_units,
                "rnn": self.rnn, "attention_penalty": self.attention_penalty}


def doubly_stochastic_penalty(weights, words, pad_id=PAD_ID):
    """sum_l (1 - sum_t alpha_tl)^2 per caption, over steps whose input word is not <pad>,
    averaged over the batch. weights: (batch, steps, L); words: (batch, steps)."""
    real = keras.ops.cast(keras.ops.not_equal(words, pad_id), weights.dtype)[:, :, None]
    per_region = keras.ops.sum(weights * real, axis=1)
    return keras.ops.mean(keras.ops.sum(keras.ops.square(1.0 - per_region), axis=-1))


def make_layers(*, vocab_size, embed_dim, units, rnn, dropout, word_dropout=0.0, attention_units=None,
                attention_penalty=0.0):
    """The layers that hold weights (and the dropouts), keyed by their names."""
    from captioning.models import WordDropout  # models.py imports this module
    dense, drop = keras.layers.Dense, keras.layers.Dropout
    layers = [
        WordDropout(word_dropout, name="word_dropout"),
        # Each region to `units` numbers: a much smaller context vector and LSTM
        # input than the CNN's 1280 or 2048 channels, as in TensorFlow's tutorial.
        dense(units, activation="relu", name="grid_projection"),
        drop(dropout, name="region_dropout"),
        dense(units, activation="tanh", name="image_to_state_h"),
        keras.layers.Embedding(vocab_size, embed_dim, name="word_embedding"),
        drop(dropout, name="embedding_dropout"),
        AttentionDecoder(units, attention_units, rnn=rnn, attention_penalty=attention_penalty,
                         name="decoder_rnn"),
        drop(dropout, name="output_dropout"),
        dense(vocab_size, name="word_logits"),
    ]
    if rnn == "lstm":
        layers.append(dense(units, name="image_to_state_c"))
    return {layer.name: layer for layer in layers}


def initial_states(layers, grid):
    """The decoder's first state from the mean of the grid (batch, L, C)."""
    mean = keras.layers.GlobalAveragePooling1D(name="mean_of_grid")(grid)
    states = [layers["image_to_state_h"](mean)]
    if "image_to_state_c" in layers:
        states.append(layers["image_to_state_c"](mean))
    return states


def as_locations(image):
    """(batch, H, W, C) or (batch, L, C) or (batch, C) -> (batch, L, C); a vector is one location."""
    channels = image.shape[-1]
    locations = int(np.prod(image.shape[1:-1])) if len(image.shape) > 2 else 1
    return keras.layers.Reshape((locations, channels), name="grid_locations")(image)


def wire(layers, image, words, states=None):
    """Connect the layers: (image, words[, states]) -> (logits, attention weights, new states).

    Without states (training), they come from the image; with states, this is
    one decoding step whose states are inputs.
    """
    grid = as_locations(image)
    if states is None:
        states = initial_states(layers, grid)
    regions = layers["region_dropout"](layers["grid_projection"](grid))
    read = layers["word_dropout"](words) if "word_dropout" in layers else words  # absent in older models
    sequence = layers["embedding_dropout"](layers["word_embedding"](read))
    hidden, contexts, weights, *new_states = layers["decoder_rnn"](sequence, regions, states, words)
    # The word classifier reads what the decoder thinks and what it looks at.
    outputs = keras.layers.Concatenate(name="hidden_and_context")([hidden, contexts])
    logits = layers["word_logits"](layers["output_dropout"](outputs))
    return logits, weights, new_states


def build_attention_captioner(*, vocab_size, feature_dim, max_length, grid_shape=(), embed_dim=256, units=256,
                              rnn="lstm", dropout=0.5, word_dropout=0.0, attention_units=None,
                              attention_penalty=0.0):
    """The attention captioner (build_captioner(arch="attention") calls this; notebook 06).

    Inputs: {"image": (batch, *grid_shape, feature_dim) float32, e.g. (batch, 10, 10, 1280),
    "words": (batch, max_length + 1) int32}. Output: logits (batch, max_length + 1, vocab_size).
    """
    layers = make_layers(vocab_size=vocab_size, embed_dim=embed_dim, units=units, rnn=rnn, dropout=dropout,
                         word_dropout=word_dropout, attention_units=attention_units, attention_penalty=attention_penalty)
    image = keras.Input((*grid_shape, feature_dim), name="image")
    words = keras.Input((max_length + 1,), dtype="int32", name="words")
    logits, _, _ = wire(layers, image, words)
    return keras.Model({"image": image, "words": words}, logits, name="attention_captioner")


class AttentionStepDecoder:
    """One decoding step of an attention captioner for a whole batch (notebooks 04 and 06).

    The StepDecoder protocol of models.py, plus `last_attention`: the weights
    (batch, L) the last `step` used, which the decoders collect when asked
    for `return_attention=True`. Features are grids, (N, H, W, C) or (N, L, C).
    """

    def __init__(self, model):
        layers = {layer.name: layer for layer in model.layers}
        rnn = layers["decoder_rnn"]
        self.model, self.units, self.state_count = model, rnn.units, rnn.state_count
        self.vocab_size = layers["word_logits"].units
        self.image_shape = tuple(int(size) for size in layers["image"].batch_shape[1:])
        self.feature_dim = self.image_shape[-1]
        self.locations = int(np.prod(self.image_shape[:-1]))
        self.last_attention = None

        image = keras.Input(self.image_shape, name="image")
        word = keras.Input((1,), dtype="int32", name="word")
        states = [keras.Input((self.units,), name=f"state_{i}") for i in range(self.state_count)]
        logits, weights, new_states = wire(layers, image, word, states)
        self._step_model = keras.Model([word, image, *states], [logits, weights, *new_states],
                                       name="attention_decoding_step")
        self._initial_model = keras.Model(image, initial_states(layers, as_locations(image)),
                                          name="attention_initial_state")

        feature_spec = tf.TensorSpec((None, *self.image_shape), tf.float32)
        state_specs = [tf.TensorSpec((None, self.units), tf.float32)] * self.state_count

        # Partials, each counted on its own by TensorFlow's retracing warning (see models.StepDecoder).
        self._initial = tf.function(functools.partial(self._initial_graph), input_signature=[feature_spec])
        self._step = tf.function(functools.partial(self._step_graph),
                                 input_signature=[tf.TensorSpec((None,), tf.int32), state_specs, feature_spec])

    def _initial_graph(self, features):
        return self._initial_model(features, training=False)

    def _step_graph(self, words, states, features):
        logits, weights, *new_states = self._step_model([words[:, None], features, *states], training=False)
        return tf.nn.log_softmax(logits[:, 0, :]), weights[:, 0, :], new_states

    def grids(self, features):
        """Features as the model's image input: (N, L, C) and (N, H, W, C) are both accepted."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim < 2 or features.shape[-1] != self.feature_dim or \
                int(np.prod(features.shape[1:-1])) != self.locations:
            raise ValueError(f"features must be grids of {self.locations} locations x {self.feature_dim} "
                             f"channels, shape (N, {', '.join(map(str, self.image_shape))}); "
                             f"got {features.shape}")
        return features.reshape((len(features), *self.image_shape))

    def initial_state(self, features):
        states = self._initial(self.grids(features))
        return [state.numpy() for state in (states if isinstance(states, (list, tuple)) else [states])]

    def step(self, words, states, features):
        words = np.asarray(words, dtype=np.int32).reshape(-1)
        states = [np.asarray(state, dtype=np.float32) for state in states]
        log_probs, weights, new_states = self._step(words, states, self.grids(features))
        self.last_attention = weights.numpy()
        return log_probs.numpy(), [state.numpy() for state in new_states]
