"""Layers that every caption architecture shares (notebooks 03 and 06).

They are registered with Keras under the package name "captioning", so a saved
model that uses them reloads in safe mode (no Python code is deserialised).
"""

from captioning import quiet_tensorflow

quiet_tensorflow()
import keras  # noqa: E402

from captioning.vocab import START_ID, UNK_ID  # noqa: E402


@keras.saving.register_keras_serializable(package="captioning")
class WordDropout(keras.layers.Layer):
    """While training, replace each input word by <unk> with probability `rate`.

    A caption model can lower its loss a long way by predicting the next word
    from the words before it alone, as a language model, and on a few thousand
    captions it learns that far better than it learns to look. Hiding some of
    the words it reads ("word dropout", Bowman et al. 2016, "Generating
    sentences from a continuous space") makes the image the more reliable
    guide. <start> is never hidden; at decoding time the layer does nothing.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"word_dropout must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, words, training=False):
        if not training or self.rate == 0.0:
            return words
        ops = keras.ops
        hide = keras.random.uniform(ops.shape(words), seed=self.seed_generator) < self.rate
        hide = ops.logical_and(hide, ops.not_equal(words, START_ID))
        return ops.where(hide, ops.full_like(words, UNK_ID), words)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


@keras.saving.register_keras_serializable(package="captioning")
class RepeatPerStep(keras.layers.Layer):
    """(vector (batch, D), sequence (batch, steps, ...)) -> the vector at every step, (batch, steps, D).

    Keras's RepeatVector wants the number of steps when the model is built; a batch here is as
    long as its longest caption (training.make_dataset), so the steps are read from the sequence.
    broadcast_to, not tile: the same numbers forward and back, but tile's gradient made TensorFlow
    log an "E0000 ... oneDNN supports DT_INT32 only" line in the middle of par-inject's training.
    """

    def call(self, vector, sequence):
        batch, steps = keras.ops.shape(sequence)[0], keras.ops.shape(sequence)[1]
        return keras.ops.broadcast_to(keras.ops.expand_dims(vector, 1), (batch, steps, vector.shape[-1]))

    def compute_output_shape(self, vector_shape, sequence_shape):
        return (vector_shape[0], sequence_shape[1], vector_shape[-1])


def word_layers(*, vocab_size, embed_dim, dropout, word_dropout, decoder, image_first=(), image_last=()):
    """Every layer of a caption model that holds weights or draws random numbers, as {name: layer}:
    the word layers all architectures share, the architecture's `decoder` (its RNN) and its image
    layers, each given as a function that makes it.

    They are made in one fixed order, because each layer takes its initial weights (a dropout, its
    seed) from the seeded random stream as it is made: word dropout, the image layers that come
    first, the embedding and its dropout, the decoder, the output dropout, the word classifier, the
    image layers that come last. That is the order of the code before the architecture table, so a
    seed gives the very model it gave there (docs/experiments.md: what a seed number means).
    """
    made = [WordDropout(word_dropout, name="word_dropout")]
    made += [make() for make in image_first]
    made += [keras.layers.Embedding(vocab_size, embed_dim, name="word_embedding")]
    made += [keras.layers.Dropout(dropout, name="embedding_dropout")]
    made += [decoder()]
    made += [keras.layers.Dropout(dropout, name="output_dropout")]
    made += [keras.layers.Dense(vocab_size, name="word_logits")]
    made += [make() for make in image_last]
    return {layer.name: layer for layer in made}


def read_words(layers, words):
    """Word ids (batch, steps) -> embeddings (batch, steps, embed_dim), with word and embedding dropout."""
    return layers["embedding_dropout"](layers["word_embedding"](layers["word_dropout"](words)))


def write_words(layers, outputs):
    """What the decoder computed at each step -> next-word logits over the vocabulary."""
    return layers["word_logits"](layers["output_dropout"](outputs))
