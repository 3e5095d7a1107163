"""Soft visual attention: an LSTM decoder that looks at a different part of the image
for every word (notebook 06).

Merge and inject models (models.py) see an image as one vector, the CNN's
grid averaged over all locations. Averaging keeps *what* is in the picture
but loses *where*, and it makes every word read the same summary. Xu et al.
(2015, "Show, Attend and Tell") keep the grid instead: L vectors a_1..a_L,
one per image region. Before each word the decoder scores every region against
what it has said so far (its previous hidden state h), turns the scores into
weights that sum to one, and reads their weighted average, the context z:

    e_l   = v . tanh(W_k a_l + W_q h)        additive (Bahdanau) attention
    alpha = softmax(e)                       one weight per region, sum 1
    z     = sum_l alpha_l a_l                what the decoder looks at now
    h, c  = LSTM([word embedding, z], (h, c))
    logits = W_o [h, z]

The initial state comes from the mean of the grid, as in the paper. The
weights alpha are the heat maps notebook 06 lays over the photos.

The regions are coarser than the CNN's grid. The model first averages each
GRID_POOL x GRID_POOL block of cells into one region: MobileNetV2's 10 x 10
cells (at 320 px) become 5 x 5 regions, InceptionV3's 8 x 8 become 4 x 4.
Projecting every region (1,280 or 2,048 numbers) to `units` was most of a
training step's work on a CPU: with four times fewer regions an epoch
took 0.57 of the time, and on eight seeds the model scored as well on
Flickr8k's dev photos (docs/experiments.md, "A coarser grid for attention").
The maps are coarser too; grid_pool=1 keeps every cell.

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
saved model reloads in safe mode. Like the architectures of models.py, this one
is three functions that architectures.py puts in its table (layers, start
state, wiring); its wiring also returns the attention weights, which the
decoders collect (decoding.py, `return_attention=True`).
"""

from captioning import quiet_tensorflow

quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

from captioning.layers import read_words, word_layers, write_words  # noqa: E402
from captioning.vocab import PAD_ID  # noqa: E402

GRID_POOL = 2  # cells per side of a region: each 2 x 2 block of the CNN's grid is averaged into one


@keras.saving.register_keras_serializable(package="captioning")
class AttentionDecoder(keras.layers.Layer):
    """The attending recurrence: (word embeddings, regions, states[, word ids]) ->
    (hidden states, contexts, attention weights, *final states), one row per step.

    The steps are a plain Python loop over the (short) caption length: the
    graph is unrolled once when traced, and the loop reads like the maths. A
    training batch is as long as its longest caption (training.make_dataset),
    which the graph learns only when it runs: it is then unrolled to
    `max_steps`, and the steps past the batch's length are skipped.
    """

    def __init__(self, units, attention_units=None, rnn="lstm", attention_penalty=0.0, max_steps=None, **kwargs):
        super().__init__(**kwargs)
        self.units, self.rnn = int(units), rnn
        self.attention_units = int(attention_units or units)
        self.attention_penalty = float(attention_penalty)
        self.max_steps = None if max_steps is None else int(max_steps)
        cell = keras.layers.LSTMCell if rnn == "lstm" else keras.layers.GRUCell
        self.cell = cell(self.units, name="cell")
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

    def read_word(self, word, keys, regions, states, training):
        """One step: look at the image, then read the word -> (output, context, weights, *states)."""
        weights, context = self.attend(keys, regions, states[0])
        output, states = self.cell(keras.ops.concatenate([word, context], axis=-1), states, training=training)
        return output, context, weights, *(states if isinstance(states, (list, tuple)) else [states])

    def call(self, sequence, regions, states, words=None, keys=None, training=False):
        if keys is None:  # the regions' half of the score: once per caption, not per step
            keys = self.keys(regions)
        states = list(states)
        steps, length = sequence.shape[1], keras.ops.shape(sequence)[1]  # steps: None if known only when run
        if steps is None and self.max_steps is None:
            raise ValueError("AttentionDecoder needs max_steps to read captions whose length is not fixed")
        hidden, contexts, weights = [], [], []
        for step in range(steps or self.max_steps):
            def read(step=step, states=states):
                return self.read_word(sequence[:, step], keys, regions, states, training)

            def skip(states=states):  # past the batch's last word: nothing to read, the states stay
                batch = keras.ops.shape(sequence)[0]
                return (keras.ops.zeros((batch, self.units)), keras.ops.zeros((batch, regions.shape[-1])),
                        keras.ops.zeros((batch, keras.ops.shape(regions)[1])), *states)
            output, context, step_weights, *states = read() if steps else keras.ops.cond(step < length, read, skip)
            hidden.append(output)
            contexts.append(context)
            weights.append(step_weights)
        hidden, contexts, weights = (keras.ops.stack(rows, axis=1)[:, :length] for rows in (hidden, contexts, weights))
        if training and self.attention_penalty and words is not None:
            self.add_loss(self.attention_penalty * doubly_stochastic_penalty(weights, words))
        return hidden, contexts, weights, *states

    def get_config(self):
        return {**super().get_config(), "units": self.units, "attention_units": self.attention_units,
                "rnn": self.rnn, "attention_penalty": self.attention_penalty, "max_steps": self.max_steps}


def doubly_stochastic_penalty(weights, words, pad_id=PAD_ID):
    """sum_l (1 - sum_t alpha_tl)^2 per caption, over steps whose input word is not <pad>,
    averaged over the batch. weights: (batch, steps, L); words: (batch, steps)."""
    real = keras.ops.cast(keras.ops.not_equal(words, pad_id), weights.dtype)[:, :, None]
    per_region = keras.ops.sum(weights * real, axis=1)
    return keras.ops.mean(keras.ops.sum(keras.ops.square(1.0 - per_region), axis=-1))


def attention_layers(*, vocab_size, max_length, embed_dim, units, rnn, dropout, word_dropout, attention_units=None,
                     attention_penalty=0.0, grid_pool=GRID_POOL):
    """The attention captioner's layers that hold weights (and its dropouts, and its grid pooling), keyed by
    their names. grid_pool: cells per side of a region (1: every cell of the grid is a region)."""
    if isinstance(grid_pool, bool) or not isinstance(grid_pool, (int, np.integer)) or grid_pool < 1:
        raise ValueError(f"grid_pool must be a positive integer (cells per side of a region), got {grid_pool!r}")
    dense = keras.layers.Dense
    # An odd side keeps its last row and column as regions of their own (padding "same": regions_per_side).
    pool = [lambda: keras.layers.AveragePooling2D(int(grid_pool), padding="same", name="grid_pooling")]
    image_first = (pool if grid_pool > 1 else []) + [
        # Each region to `units` numbers: a much smaller context vector and LSTM
        # input than the CNN's 1280 or 2048 channels, as in TensorFlow's tutorial.
        lambda: dense(units, activation="relu", name="grid_projection"),
        lambda: keras.layers.Dropout(dropout, name="region_dropout"),
        lambda: dense(units, activation="tanh", name="image_to_state_h"),
    ]
    image_last = [lambda: dense(units, name="image_to_state_c")] if rnn == "lstm" else []
    return word_layers(vocab_size=vocab_size, embed_dim=embed_dim, dropout=dropout, word_dropout=word_dropout,
                       image_first=image_first, image_last=image_last,
                       decoder=lambda: AttentionDecoder(units, attention_units, rnn=rnn,
                                                        attention_penalty=attention_penalty,
                                                        max_steps=max_length + 1, name="decoder_rnn"))


def as_locations(image, name="grid_locations"):
    """(batch, H, W, C) or (batch, L, C) or (batch, C) -> (batch, L, C); a vector is one location."""
    channels = image.shape[-1]
    locations = int(np.prod(image.shape[1:-1])) if len(image.shape) > 2 else 1
    return keras.layers.Reshape((locations, channels), name=name)(image)


def attention_start(layers, image):
    """The decoder's first state, from the mean of the grid, as in the paper."""
    mean = keras.layers.GlobalAveragePooling1D(name="mean_of_grid")(as_locations(image, "grid_to_average"))
    return [layers[name](mean) for name in ("image_to_state_h", "image_to_state_c") if name in layers]


def regions_per_side(cells, grid_pool=GRID_POOL):
    """Regions per side of a grid with `cells` cells per side, pooled grid_pool x grid_pool (the
    last region of an odd side holds what is left)."""
    return -(-int(cells) // int(grid_pool))


def region_grid(layers, image_shape):
    """(rows, columns) of the regions a model attends over, for a grid input of `image_shape` (H, W, C):
    the grid itself, or its blocks when the model pools it (`layers`: the model's layers by name)."""
    if len(image_shape) < 2:
        return (1,)  # one vector: one region
    if "grid_pooling" in layers and len(image_shape) == 3:
        return tuple(int(side) for side in layers["grid_pooling"].compute_output_shape((None, *image_shape))[1:3])
    return tuple(int(side) for side in image_shape[:-1])


def _regions(layers, image):
    if "grid_pooling" in layers and len(image.shape) == 4:  # none with grid_pool=1 (or saved before pooling)
        image = layers["grid_pooling"](image)
    return layers["region_dropout"](layers["grid_projection"](as_locations(image)))


def attention(layers, image, words, states):
    """(image grid, words, states) -> (logits, new states, attention weights (batch, steps, L))."""
    return attention_from_memory(layers, [_regions(layers, image), None], words, states)


def attention_memory(layers, image):
    """For decoding: what every word's step needs of the image, computed once per image: the
    projected regions and their attention keys (W_k a_l). Recomputed at every word, for every
    beam or sample, they were nearly all of a decoding step's work."""
    regions = _regions(layers, image)
    return regions, layers["decoder_rnn"].keys(regions)


def attention_from_memory(layers, memory, words, states):
    """`attention`, reading the regions and keys that attention_memory computed (keys None: the
    decoder computes them from the regions, as in training)."""
    regions, keys = memory
    given = {} if keys is None else {"keys": keys}
    hidden, contexts, weights, *states = layers["decoder_rnn"](read_words(layers, words), regions, states, words,
                                                               **given)
    # The word classifier reads what the decoder thinks and what it looks at.
    outputs = keras.layers.Concatenate(name="hidden_and_context")([hidden, contexts])
    return write_words(layers, outputs), states, weights
