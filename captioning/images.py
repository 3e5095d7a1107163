"""Photos on disk -> batches of encoder-ready tensors, and a reason for every photo that fails.

Taught in notebook 02 (02_feature_caching.ipynb). The fast path is a tf.data
pipeline: read and decode in parallel (`tf.io.decode_image` with channels=3
turns grayscale, CMYK JPEG and RGBA PNG into RGB), resize, preprocess, batch
and prefetch, all in TensorFlow's C++ thread pool so that the CNN never waits
for the CPU to decode JPEGs.

Real photo collections contain broken files. tf.data stops at the first error
unless told to `ignore_errors()`, and then it drops the element without
telling us which one or why. So every element carries its index: after the
pipeline has run, the indices that never came out are the failures, and only
those few go through a slow Python path that either rescues the image with
Pillow (formats TensorFlow cannot decode, such as TIFF) or names the reason
(missing, not an image, truncated, too small).
"""

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from captioning import quiet_tensorflow

tf = quiet_tensorflow()

# An image smaller than this on either side carries no information a CNN can
# use once it is stretched to 224 or 299 pixels (a 1x1 tracking pixel, say).
MIN_SIDE = 16


def resize(image, image_size):
    """uint8 (H, W, 3) -> float32 (S, S, 3) in [0, 255].

    We squash to a square rather than crop, so that nothing at the edge of the
    photo (often the subject of the caption) is cut away. Plain bilinear, no
    antialiasing: that is how TF-slim's ImageNet training resized photos for
    these very networks, and antialiasing would cost 2 ms more per photo, as
    much as the JPEG decoding itself (10% of MobileNetV2's time on a CPU).
    """
    return tf.image.resize(image, (image_size, image_size), method="bilinear")


def _decode_graph(path, image_size, preprocess):
    """The fast path, traced into a tf.data graph: any failure raises and is dropped."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    shape = tf.shape(image)
    big_enough = tf.debugging.assert_greater_equal(tf.minimum(shape[0], shape[1]), MIN_SIDE, message="too small")
    with tf.control_dependencies([big_enough]):
        return preprocess(resize(image, image_size))


def diagnose(path, image_size, preprocess):
    """The slow path for one file the fast path dropped: (tensor, None) if Pillow can
    read it after all, otherwise (None, reason) with a reason a person can act on."""
    path = str(path)
    if not os.path.exists(path):
        return None, "missing file"
    if not os.path.isfile(path):
        return None, "not a file"
    try:
        with Image.open(path) as image:
            image.load()
            if min(image.size) < MIN_SIDE:
                width, height = image.size
                return None, f"too small: {width}x{height} pixels (need at least {MIN_SIDE} on each side)"
            pixels = np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        return None, "not an image (unrecognised file format)"
    except Image.DecompressionBombError as error:
        return None, f"too large: {error}"
    except (OSError, ValueError, SyntaxError) as error:
        return None, f"corrupt or truncated image: {error}"
    return preprocess(resize(tf.constant(pixels), image_size)), None


def image_dataset(paths, image_size, preprocess, batch_size):
    """tf.data pipeline of (indices, images) batches; failed images are silently absent.

    `deterministic=True` keeps the output order equal to the input order even
    though decoding runs in parallel, so the same list of paths always gives
    the same batches: feature values then never depend on thread timing.
    """
    indices = tf.range(len(paths), dtype=tf.int32)
    dataset = tf.data.Dataset.from_tensor_slices((indices, tf.constant([str(path) for path in paths])))
    dataset = dataset.map(
        lambda index, path: (index, _decode_graph(path, image_size, preprocess)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    )
    dataset = dataset.ignore_errors()
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def iterate_batches(paths, image_size, preprocess, batch_size, errors):
    """Yield (indices np.int32, images tf.Tensor) for every readable image of `paths`.

    First the tf.data batches, then the images only Pillow could read, in
    batches of their own. Each unreadable image is appended to `errors` as
    (index, reason). The batches depend only on `paths`, never on timing.
    """
    seen = np.zeros(len(paths), dtype=bool)
    for indices, images in image_dataset(paths, image_size, preprocess, batch_size):
        indices = indices.numpy()
        seen[indices] = True
        yield indices, images
    rescued_indices, rescued_images = [], []
    for index in np.flatnonzero(~seen):
        image, reason = diagnose(paths[index], image_size, preprocess)
        if image is None:
            errors.append((int(index), reason))
            continue
        rescued_indices.append(int(index))
        rescued_images.append(image)
        if len(rescued_images) == batch_size:
            yield np.array(rescued_indices, dtype=np.int32), tf.stack(rescued_images)
            rescued_indices, rescued_images = [], []
    if rescued_images:
        yield np.array(rescued_indices, dtype=np.int32), tf.stack(rescued_images)
