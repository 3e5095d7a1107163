"""Pretrained CNN encoders: a photo in, a feature vector (or grid) out.

Taught in notebook 02 (02_feature_caching.ipynb). A captioner never trains
its image encoder here: an ImageNet classifier with its classification head
cut off already turns a photo into 1,280 or 2,048 numbers that describe
what is in it, and computing those once (see features.py) makes training the
language model fast.

The table ENCODERS lists each network with the input size and
`preprocess_input` it was trained with (feeding one network the other's
preprocessing silently hurts quality):

    inception_v3   299 px, 2048-d pooled or an 8x8x2048 grid     (the default; ~6 GFLOPs)
    mobilenet_v2   320 px, 1280-d pooled or a 10x10x1280 grid

MobileNetV2 at 320 px encodes about 2.9 times as fast as InceptionV3 on a 2-core CPU
(benchmarks/encoders.py measures it; benchmarks/README.md has the run).

MobileNetV2 learned ImageNet from 224 px photos, but it is all convolutions,
so it reads a larger photo as well, and on the Flickr8k sample the finer
detail of 320 px gave better captions (docs/experiments.md).

`pooling="avg"` averages the grid into one vector (for merge/inject models);
`pooling=None` keeps the grid, for attention models that look at regions.

`mirror=True` encodes every photo twice, as it is and flipped left to right,
and averages the two (a grid's mirrored half is flipped back first, so each
cell still describes the same place): test-time augmentation, at twice the
encoding cost. It is on by default, as part of the `cpu-small` recipe that
passed the paired rule over eight seeds (docs/experiments.md).

What identifies features (IDENTITY: the network, its weights, input size,
pooling, mirroring) travels as one dict, from the feature cache's manifest
into a bundle's bundle.json, so that a new photo is encoded exactly as the
training photos were (`build_encoder_like`).
"""

import hashlib
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402  (after quiet_tensorflow, on purpose)

from captioning import images as image_io  # noqa: E402
from captioning.fileio import sha256_of  # noqa: E402


@dataclass(frozen=True)
class EncoderSpec:
    application: str  # class name in keras.applications
    module: str  # keras.applications submodule holding its preprocess_input
    image_size: int
    grid: int  # side of the spatial feature grid at image_size
    channels: int  # feature depth
    imagenet_file: str  # the no-top ImageNet weights file Keras downloads into ~/.keras/models


ENCODERS = {
    "inception_v3": EncoderSpec("InceptionV3", "inception_v3", 299, 8, 2048,
                                "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    # 320 px: see the top of the file. Keras loads its 224 px weights for any other size.
    "mobilenet_v2": EncoderSpec("MobileNetV2", "mobilenet_v2", 320, 10, 1280,
                                "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
}

IDENTITY = ("encoder", "weights_id", "image_size", "pooling", "mirror", "feature_shape")
MIRROR = True  # the default; see the top of the file

# Downloading ImageNet weights must not hang a class on a dead network:
# give up on a silent connection after this many seconds.
DOWNLOAD_TIMEOUT_S = 30


def _spec(name):
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}: choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name]


def _pooling(pooling):
    if pooling in (None, "none"):
        return None
    if pooling != "avg":
        raise ValueError(f"pooling must be 'avg' or None (the spatial grid), not {pooling!r}")
    return "avg"


def _weights_file(weights):
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (--weights takes 'imagenet' or the path of a local .weights.h5 file)"
        )
    return path


def _file_id(path):
    """A weights file's identity: the start of its sha256. Its content, not its name: two
    different files called the same never share a feature cache, and the same file copied
    under another name is still the same weights."""
    return f"sha256:{sha256_of(path)[:16]}"


def encoder_settings(name="inception_v3", weights="imagenet", pooling="avg", mirror=MIRROR):
    """What identifies an encoder's features, computed without building the network.

    The feature cache compares these with its manifest, so that a finished
    cache is reused (or found stale) in a second, even offline. Returns None
    for random weights (weights=None), which only a built model can identify.
    """
    spec, pooling = _spec(name), _pooling(pooling)
    if weights is None or weights == "none":
        return None
    weights_id = "imagenet" if weights == "imagenet" else _file_id(_weights_file(weights))
    shape = (spec.channels,) if pooling == "avg" else (spec.grid, spec.grid, spec.channels)
    source = "imagenet" if weights == "imagenet" else str(Path(weights).resolve())
    return {"encoder": name, "weights": source, "weights_id": weights_id, "image_size": spec.image_size,
            "pooling": pooling or "none", "mirror": bool(mirror), "feature_shape": list(shape)}


@dataclass
class Encoder:
    """A built encoder. `encode(images)` takes a batch already passed through `preprocess`."""

    name: str
    weights_id: str
    image_size: int
    pooling: str | None
    feature_shape: tuple
    model: keras.Model
    preprocess: Callable
    weights: str = "none"  # "imagenet", the weights file's absolute path, or "none" (random)
    mirror: bool = MIRROR  # average each photo's features with its left-right mirror image's
    _forward: Callable = field(init=False, repr=False)

    def __post_init__(self):
        def forward(batch):
            features = self.model(batch, training=False)
            if not self.mirror:
                return features
            mirrored = self.model(tf.reverse(batch, axis=[2]), training=False)  # axis 2: image width
            if len(features.shape) == 4:  # a grid: put each mirrored cell back in its place
                mirrored = tf.reverse(mirrored, axis=[2])
            return (features + mirrored) / 2.0

        # One traced graph for every batch size (the batch dimension is None),
        # instead of Keras's predict() machinery per call.
        signature = [tf.TensorSpec((None, self.image_size, self.image_size, 3), tf.float32)]
        self._forward = tf.function(forward, input_signature=signature)

    def encode(self, images):
        """(N, S, S, 3) preprocessed float32 -> np.ndarray float32 (N, *feature_shape)."""
        return self._forward(tf.convert_to_tensor(images, tf.float32)).numpy()

    def settings(self):
        """The manifest fields that identify these features (see encoder_settings)."""
        return {"encoder": self.name, "weights": self.weights, "weights_id": self.weights_id, "image_size": self.image_size,
                "pooling": self.pooling or "none", "mirror": self.mirror, "feature_shape": list(self.feature_shape)}


def _download_imagenet(build, name):
    """Build with Keras's ImageNet weights, turning a failed download into a clear error."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with warnings.catch_warnings():
            # MobileNetV2 at 320 px: Keras says it loads the 224 px weights, which is the plan.
            warnings.filterwarnings("ignore", message="`input_shape` is undefined or non-square")
            return build("imagenet")
    except Exception as error:  # Keras wraps network failures in a bare Exception
        text = str(error)
        if "URL fetch failure" not in text and not isinstance(error, (OSError, TimeoutError)):
            raise
        raise ValueError(
            f"could not download the ImageNet weights for {name} ({text.strip()[:200]}). "
            "Offline? Fetch the no-top .weights.h5 file on a machine that is online and pass its path "
            "with --weights PATH (in Python: weights=PATH)."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _seeded_random_weights(model, seed=0):
    """Give every kernel Keras's default (Glorot-uniform) values from one fixed seed.

    weights="none" is the same architecture without ImageNet: for tests and
    offline runs of the whole pipeline. The network built to cache features
    and the one built later to caption a new photo must then be the *same*
    random network, or the features would not match. Keras draws initial
    values from global random state that notebooks and tests also use, so we
    redraw the kernels from our own generator; the other weights (biases,
    batch-norm statistics) start as constants anyway.
    """
    generator = np.random.default_rng(seed)
    values = []
    for array in model.get_weights():
        if array.ndim >= 2:
            receptive_field = int(np.prod(array.shape[:-2]))
            fan_in, fan_out = array.shape[-2] * receptive_field, array.shape[-1] * receptive_field
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            array = generator.uniform(-limit, limit, array.shape).astype(array.dtype)
        values.append(array)
    model.set_weights(values)


def build_encoder(name="inception_v3", weights="imagenet", pooling="avg", mirror=MIRROR):
    """Build a headless ImageNet CNN: weights "imagenet" (Keras downloads them once into
    ~/.keras/models), the path of a local .weights.h5 file, or None / "none" (random but
    the same on every build: for tests and offline runs).
    mirror=True averages each photo's features with its mirror image's (see the top of this file).

    Taught in notebook 02.
    """
    spec, pooling = _spec(name), _pooling(pooling)
    application = getattr(keras.applications, spec.application)
    module = getattr(keras.applications, spec.module)

    def build(model_weights):
        return application(include_top=False, weights=model_weights, pooling=pooling,
                           input_shape=(spec.image_size, spec.image_size, 3))

    source = "none"
    if weights == "imagenet":
        model, weights_id, source = _download_imagenet(build, name), "imagenet", "imagenet"
    elif weights is None or weights == "none":
        model = build(None)
        _seeded_random_weights(model)
        digest = hashlib.sha256()
        for array in model.get_weights():
            digest.update(np.ascontiguousarray(array).tobytes())
        weights_id = f"random:sha256:{digest.hexdigest()[:16]}"
    else:
        path = _weights_file(weights)
        model = build(None)
        try:
            model.load_weights(path)
        except Exception as error:  # h5py/Keras raise many types for a wrong or damaged file
            raise ValueError(f"{path}: cannot load these weights into {name} (no top): {error}") from None
        weights_id, source = _file_id(path), str(path.resolve())
    return Encoder(weights=source, name=name, weights_id=weights_id, image_size=spec.image_size, pooling=pooling,
                   feature_shape=tuple(model.output_shape[1:]), model=model, preprocess=module.preprocess_input,
                   mirror=bool(mirror))


def build_encoder_like(settings, weights=None, where="the encoder settings"):
    """Build the encoder that `settings` (a feature cache's manifest, a bundle's "encoder")
    describe, its weights from where they say or from `weights` (the same file moved). Raises
    ValueError naming `where` when the weights found are not the ones recorded."""
    encoder = build_encoder(settings["encoder"], weights=weights or settings["weights"],
                            pooling=settings["pooling"], mirror=settings["mirror"])
    found = encoder.settings()
    different = [f"{key} {found[key]!r} != {settings[key]!r}" for key in IDENTITY if found[key] != settings[key]]
    if different:
        raise ValueError(f"encoder weights {weights or settings['weights']!r} are not the ones recorded in {where} "
                         f"({'; '.join(different)}): pass the weights file the features were made with")
    return encoder


def encode_images(encoder, paths, batch_size=32):
    """Features of arbitrary photos (what `caption` uses); unreadable files are reported, not fatal.

    Returns (features float32 (N_ok, *feature_shape), ok_indices, errors) where
    ok_indices are positions in `paths` (ascending) and errors a list of
    (path, reason). Taught in notebook 02.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    paths = [str(path) for path in paths]
    features = np.zeros((len(paths), *encoder.feature_shape), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    failures = []
    for indices, batch in image_io.iterate_batches(paths, encoder.image_size, encoder.preprocess,
                                                   batch_size, failures):
        features[indices] = encoder.encode(batch)
        ok[indices] = True
    ok_indices = np.flatnonzero(ok)
    errors = [(paths[index], reason) for index, reason in sorted(failures)]
    return features[ok_indices], ok_indices.tolist(), errors
