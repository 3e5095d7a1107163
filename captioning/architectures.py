"""The table of caption architectures: a name -> what builds it (notebooks 03 and 06).

Every architecture is three functions (models.py and attention.py hold them):

    layers(vocab_size, embed_dim, units, rnn, dropout, word_dropout, **options) -> {name: layer}
        every layer that holds weights, created once, keyed by its name (with
        takes_max_length, also max_length: attention unrolls its loop that far);
    start(layers, image) -> the RNN's states before the first word (None: zeros);
    wire(layers, image, words, states) -> (logits, new states[, attention weights]).

`build_captioner` wires a whole caption from the start state: the training
model (teacher forcing). `StepDecoder` wires one word at a time from states
given as inputs: the decoding step, with the same trained layers found by
name, so it works as well on a model reloaded from a .keras file. The model's
name records its architecture. Nothing else in the package looks at
architecture names: adding one is three functions and one `register` call.

An architecture may add two more, for decoding only: `remember(layers, image)`
-> the tensors computed from the image alone (attention: its projected regions
and their attention keys), and `recall(layers, memory, words, states)`, its
`wire` reading those instead of the image. The decoders then do that work once
per image, not once per word and per beam or sample.
"""

import dataclasses
import functools
import inspect
import weakref
from typing import Callable

from captioning import attention, models, quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Architecture:
    layers: Callable
    start: Callable
    wire: Callable
    features: str = "pooled"  # what it reads: "pooled" (one vector per image) or "grid" (the CNN's regions)
    remember: Callable = None  # decoding: image -> what every step needs of it, computed once (None: the image)
    recall: Callable = None  # decoding: wire from what remember made (goes with remember)
    takes_max_length: bool = False  # layers() is also given max_length (Keras's RNNs need not know it)


ARCHITECTURES = {
    "merge": Architecture(models.merge_layers, models.zero_state, models.merge),
    "par-inject": Architecture(models.par_inject_layers, models.zero_state, models.par_inject),
    "init-inject": Architecture(models.init_inject_layers, models.init_inject_start, models.read_from),
    "pre-inject": Architecture(models.pre_inject_layers, models.pre_inject_start, models.read_from),
    "attention": Architecture(attention.attention_layers, attention.attention_start, attention.attention,
                              features="grid", remember=attention.attention_memory,
                              recall=attention.attention_from_memory, takes_max_length=True),
}


def register(name, architecture):
    """Add an architecture to the table (tests/test_architectures.py adds one); returns it."""
    if not isinstance(architecture, Architecture) or architecture.features not in ("pooled", "grid"):
        raise ValueError(f"register {name!r} with an Architecture whose features are 'pooled' or 'grid'")
    if (architecture.remember is None) != (architecture.recall is None):
        raise ValueError(f"register {name!r} with both remember and recall, or neither")
    ARCHITECTURES[name] = architecture
    return architecture


def get(name):
    if name not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {name!r}")
    return ARCHITECTURES[name]


def own_options(arch):
    """The options an architecture builds with when it is given none (build_captioner's `options`:
    attention's grid_pool, merge's merge_mode...), as runs.run_identity records them: a change of
    one of these defaults makes another model, which a saved run must not stand in for."""
    parameters = inspect.signature(get(arch).layers).parameters.values()
    return {parameter.name: parameter.default for parameter in parameters if parameter.default is not parameter.empty}


def pooling(arch):
    """The feature cache an architecture reads: "avg" (pooled vectors) or None (grids)."""
    return "avg" if get(arch).features == "pooled" else None


def build_captioner(arch="merge", *, vocab_size, feature_shape, max_length, embed_dim=256, units=256, rnn="lstm",
                    dropout=0.5, word_dropout=0.0, **options):
    """Build a caption model with the Functional API (notebooks 03 and 06).

    Inputs: {"image": (batch, *feature_shape) float32, "words": (batch, steps) int32}, steps up to
    max_length + 1 (a batch is as long as its longest caption: training.make_dataset);
    output: next-word logits (batch, steps, vocab_size). feature_shape is (D,) for a
    pooled vector (an int will do) or (H, W, C) for a grid. `options` are the architecture's
    own: merge_mode ("add" or "concat") for merge; attention_units, attention_penalty and grid_pool
    (cells per side of a region) for attention.
    """
    spec = get(arch)
    feature_shape = (int(feature_shape),) if np.isscalar(feature_shape) else tuple(map(int, feature_shape))
    if spec.features == "pooled" and len(feature_shape) != 1:
        raise ValueError(f"{arch} reads one feature vector per image, not a grid {feature_shape}: cache "
                         "features with pooling 'avg', or use an architecture that reads grids (attention)")
    if rnn not in models.RNN_TYPES:
        raise ValueError(f"rnn must be one of {sorted(models.RNN_TYPES)}, got {rnn!r}")
    for name, value in (("vocab_size", vocab_size), ("feature size", min(feature_shape, default=0)),
                        ("max_length", max_length), ("embed_dim", embed_dim), ("units", units)):
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    try:
        length = {"max_length": max_length} if spec.takes_max_length else {}
        layers = spec.layers(vocab_size=vocab_size, embed_dim=embed_dim, units=units, rnn=rnn, dropout=dropout,
                             word_dropout=word_dropout, **length, **options)
    except TypeError as error:  # an option another architecture takes
        raise ValueError(f"{arch} does not take option(s) {sorted(options)} ({error})") from None
    image = keras.Input(feature_shape, name="image")
    words = keras.Input((None,), dtype="int32", name="words")  # any length up to max_length + 1
    logits = spec.wire(layers, image, words, spec.start(layers, image))[0]
    return keras.Model({"image": image, "words": words}, logits, name=arch.replace("-", "_") + "_captioner")


def architecture_of(model):
    """The table's name for a model that build_captioner built (its name records it)."""
    names = {name.replace("-", "_") + "_captioner": name for name in ARCHITECTURES}
    if model.name not in names:
        raise ValueError(f"model {model.name!r} was not built by build_captioner from an architecture in the table "
                         f"({', '.join(ARCHITECTURES)})")
    return names[model.name]


class StepDecoder:
    """One decoding step for a whole batch, built from a trained caption model (notebook 04).

    `initial_state(features)` gives the RNN states before the first word;
    `step(words, states, features)` feeds one word per row and returns the next
    word's log-probabilities and the new states; after each step,
    `last_attention` holds the weights over the image's regions (rows, L)
    for architectures that attend, else None; `attention_size` is L (0 for
    the others). `remember(features)` does once what
    every step needs of the images (an architecture's `remember`: attention's
    regions and keys); `step` takes what it returns in place of the features,
    and the decoders of decoding.py pass it so. All are tf.functions with a
    fixed input signature (batch dimension None): traced once, then one
    compiled call each, whatever the batch size.
    """

    def __init__(self, model):
        spec = get(architecture_of(model))
        layers = {layer.name: layer for layer in model.layers}
        self.vocab_size = layers["word_logits"].units
        self.image_shape = tuple(int(size) for size in layers["image"].batch_shape[1:])
        state_size = layers["decoder_rnn"].cell.state_size
        self.state_sizes = list(state_size) if isinstance(state_size, (list, tuple)) else [state_size]
        self.last_attention = None
        self._cached_memory = ([], [])  # (weak references to the arrays, their tensors): see _memory_tensors
        self.compiled_searches = {}  # decoding.beam_search's compiled searches of this decoder, by options

        image = keras.Input(self.image_shape, name="image")
        word = keras.Input((1,), dtype="int32", name="word")
        states = [keras.Input((size,), name=f"state_{i}") for i, size in enumerate(self.state_sizes)]
        if spec.remember is None:  # every step reads the image itself
            self._memory_model, memory = None, [image]
            logits, new_states, *attention_weights = spec.wire(layers, image, word, states)
        else:  # every step reads what was computed from the image once
            parts = list(spec.remember(layers, image))
            self._memory_model = keras.Model(image, parts, name="image_memory")
            memory = [keras.Input(tuple(part.shape[1:]), name=f"memory_{i}") for i, part in enumerate(parts)]
            logits, new_states, *attention_weights = spec.recall(layers, memory, word, states)
        self.attends = bool(attention_weights)
        self.attention_size = int(attention_weights[0].shape[-1]) if self.attends else 0
        self._step_model = keras.Model([word, *memory, *states], [logits, *attention_weights, *new_states],
                                       name="decoding_step")
        first = spec.start(layers, image)
        self._start_model = keras.Model(image, first, name="start_state") if first is not None else None

        feature_spec = tf.TensorSpec((None, *self.image_shape), tf.float32)
        memory_specs = [tf.TensorSpec((None, *part.shape[1:]), tf.float32) for part in memory]
        state_specs = [tf.TensorSpec((None, size), tf.float32) for size in self.state_sizes]
        # functools.partial, not the methods themselves: TensorFlow counts traces
        # per code object, shared by every decoder, and would warn about
        # "retracing" once a notebook has made a few decoders, although each of
        # them traces only once. A partial is counted on its own.
        self._initial = tf.function(functools.partial(self._initial_graph), input_signature=[feature_spec])
        self._memory = tf.function(functools.partial(self._memory_graph), input_signature=[feature_spec])
        self._step = tf.function(functools.partial(self._step_graph),
                                 input_signature=[tf.TensorSpec((None,), tf.int32), state_specs, memory_specs])

    def _initial_graph(self, features):
        if self._start_model is None:
            return [tf.zeros((tf.shape(features)[0], size)) for size in self.state_sizes]
        states = self._start_model(features, training=False)
        return list(states) if isinstance(states, (list, tuple)) else [states]

    def _memory_graph(self, features):
        if self._memory_model is None:
            return [features]
        return list(self._memory_model(features, training=False))

    def _step_graph(self, words, states, memory):
        logits, *rest = self._step_model([words[:, None], *memory, *states], training=False)
        weights = rest.pop(0)[:, 0, :] if self.attends else tf.zeros((tf.shape(words)[0], 0))
        return tf.nn.log_softmax(logits[:, 0, :]), weights, rest

    def features(self, features):
        """Features as the model's image input; a grid is also accepted flattened, (N, H * W, C)."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim < 2 or features.shape[-1] != self.image_shape[-1] or \
                np.prod(features.shape[1:-1]) != np.prod(self.image_shape[:-1]) or \
                (len(self.image_shape) == 1 and features.ndim != 2):
            raise ValueError(f"features must have shape (N, {', '.join(map(str, self.image_shape))}) for this "
                             f"model, got {features.shape}")
        return features.reshape((len(features), *self.image_shape))

    def initial_state(self, features):
        return [state.numpy() for state in self._initial(self.features(features))]

    def remember(self, features):
        """What every step needs of each image, computed once: a list of arrays, one row per image
        (the features themselves for an architecture without `remember`)."""
        features = self.features(features)
        if self._memory_model is None:
            return [features]
        return [part.numpy() for part in self._memory(features)]

    def step(self, words, states, features):
        """`features`: the images' features, one row per word, or what `remember` made of them (a list)."""
        memory = self._memory_tensors(features if isinstance(features, list) else self.remember(features))
        words = np.asarray(words, dtype=np.int32).reshape(-1)
        states = [np.asarray(state, dtype=np.float32) for state in states]
        log_probs, weights, new_states = self._step(words, states, memory)
        self.last_attention = weights.numpy() if self.attends else None
        return log_probs.numpy(), [state.numpy() for state in new_states]

    def _memory_tensors(self, memory):
        """The memory's arrays as tensors, made once for the arrays a decoder passes at every step:
        copying attention's regions and keys into a tensor at every word took a third of its
        sampling time. The arrays are recognised by identity (weak references, so that this keeps
        only the tensors alive); arrays changed in place between two steps would not be seen."""
        references, tensors = self._cached_memory
        if len(references) == len(memory) and all(reference() is part for reference, part in zip(references, memory)):
            return tensors
        tensors = [tf.constant(np.asarray(part, np.float32)) for part in memory]
        try:
            self._cached_memory = ([weakref.ref(part) for part in memory], tensors)
        except TypeError:  # not numpy arrays (lists, say): converted for this step only
            pass
        return tensors


def make_step_decoder(model):
    """A StepDecoder for a model from build_captioner, freshly built or reloaded (notebook 04)."""
    return StepDecoder(model)
