"""Merge and the three inject architectures (notebook 03).

Every model here reads an image feature vector and a caption prefix
[<start>, w1, ..., wn] and predicts the next word at every position,
[w1, ..., wn, <end>], as logits over the vocabulary. Where the image enters is
the only difference between them (Tanti, Gatt & Camilleri, 2018, "Where to
put the image in an image caption generator"):

    merge        the RNN reads words only; the image vector joins the RNN's
                 output just before the word classifier
    par-inject   the image is concatenated to every word the RNN reads
    init-inject  the image becomes the RNN's initial state
    pre-inject   the image is the first "word" the RNN reads

Each architecture is three small functions, which architectures.py puts in its
table: `*_layers` creates the layers that hold weights, once, with readable
names; a `start` function gives the RNN's state before the first word (None:
zeros); a `wire` function reads words from a given state on. The training
model wires the whole caption from the start state; the decoders wire one
word at a time from the state they carry, with the same trained layers.

So pre-inject's "image as the first word" is its start state: the RNN's state
after reading the image, from which it then reads <start>, w1, ... That is the
same computation as one RNN pass over [image, <start>, w1, ...] with the
first output dropped.

We do not mask padding inside the model: padding only ever follows <end>,
and an RNN reads left to right, so the outputs at real positions never see
it. The loss and the accuracy ignore padded targets instead (training.py).
"""

from captioning import quiet_tensorflow

quiet_tensorflow()
import keras  # noqa: E402

from captioning.layers import RepeatPerStep, read_words, word_layers, write_words  # noqa: E402

RNN_TYPES = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}
MERGE_MODES = ("add", "concat")


def rnn_layers(*, vocab_size, embed_dim, units, rnn, dropout, word_dropout, image_last=()):
    """What all four share: the word layers, the RNN, and dropout on the image vector; then
    `image_last`, the architecture's own image layers (functions that make them)."""
    return word_layers(vocab_size=vocab_size, embed_dim=embed_dim, dropout=dropout, word_dropout=word_dropout,
                       image_first=[lambda: keras.layers.Dropout(dropout, name="image_dropout")],
                       decoder=lambda: RNN_TYPES[rnn](units, return_sequences=True, return_state=True,
                                                      name="decoder_rnn"),
                       image_last=image_last)


def zero_state(layers, image):
    """Merge and par-inject start from zeros: the image enters elsewhere."""
    return None


def read_from(layers, image, words, states):
    """Init- and pre-inject: the image is already in the state, the RNN reads words only."""
    outputs, *states = layers["decoder_rnn"](read_words(layers, words), initial_state=states)
    return write_words(layers, outputs), states


# --- merge -------------------------------------------------------------------------

def merge_layers(*, merge_mode="add", units, **options):
    if merge_mode not in MERGE_MODES:
        raise ValueError(f"merge_mode must be one of {MERGE_MODES}, got {merge_mode!r}")
    combine = keras.layers.Add(name="merge_add") if merge_mode == "add" else \
        keras.layers.Concatenate(name="merge_concat")  # no weights: where it is made does not matter
    projection = lambda: keras.layers.Dense(units, activation="relu", name="image_projection")  # noqa: E731
    return {**rnn_layers(units=units, image_last=[projection], **options), combine.name: combine}


def merge(layers, image, words, states):
    outputs, *states = layers["decoder_rnn"](read_words(layers, words), initial_state=states)
    image_vector = layers["image_projection"](layers["image_dropout"](image))
    if "merge_add" in layers:  # one vector, added at every step (broadcast)
        image_vector = keras.layers.Reshape((1, -1), name="image_per_step")(image_vector)
        return write_words(layers, layers["merge_add"]([outputs, image_vector])), states
    image_vector = RepeatPerStep(name="image_per_step")(image_vector, outputs)
    return write_words(layers, layers["merge_concat"]([outputs, image_vector])), states


# --- par-inject ----------------------------------------------------------------------

def par_inject_layers(*, embed_dim, **options):
    projection = lambda: keras.layers.Dense(embed_dim, activation="relu", name="image_projection")  # noqa: E731
    return rnn_layers(embed_dim=embed_dim, image_last=[projection], **options)


def par_inject(layers, image, words, states):
    sequence = read_words(layers, words)
    image_vector = layers["image_projection"](layers["image_dropout"](image))
    repeated = RepeatPerStep(name="image_at_every_step")(image_vector, sequence)
    sequence = keras.layers.Concatenate(name="word_and_image")([sequence, repeated])
    outputs, *states = layers["decoder_rnn"](sequence, initial_state=states)
    return write_words(layers, outputs), states


# --- init-inject ---------------------------------------------------------------------

def init_inject_layers(*, units, rnn, **options):
    # An LSTM has two states (h, c), a GRU only h. h is bounded by tanh like the RNN's own.
    states = [lambda: keras.layers.Dense(units, activation="tanh", name="image_to_state_h")]
    if rnn == "lstm":
        states.append(lambda: keras.layers.Dense(units, name="image_to_state_c"))
    return rnn_layers(units=units, rnn=rnn, image_last=states, **options)


def init_inject_start(layers, image):
    image = layers["image_dropout"](image)
    return [layers[name](image) for name in ("image_to_state_h", "image_to_state_c") if name in layers]


# --- pre-inject ----------------------------------------------------------------------

def pre_inject_layers(*, embed_dim, **options):
    # Lives in the word-embedding space, so linear like an embedding row.
    word = lambda: keras.layers.Dense(embed_dim, name="image_to_embedding")  # noqa: E731
    return rnn_layers(embed_dim=embed_dim, image_last=[word], **options)


def pre_inject_start(layers, image):
    image_word = layers["image_to_embedding"](layers["image_dropout"](image))
    _, *states = layers["decoder_rnn"](keras.layers.Reshape((1, -1), name="image_as_first_word")(image_word))
    return states
