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

Before either path, every file is checked at the door, cheaply and in Python
(`check_photo`): it must exist and be a regular file (tf.io.read_file on a
named pipe waits forever for a writer; on a device it never ends), and its
header must announce at most MAX_PIXELS pixels, because tf.io.decode_image has
no limit: a 20 kB PNG can announce 8,000 x 8,000 pixels and take 200 MB to
decode. Only the header is read (Pillow's Image.open is lazy), so the check
costs a fraction of a millisecond. The slow path applies the same limit.

File names are bytes on disk and need not be UTF-8. Python shows the bytes
that are not as lone surrogates (os.fsdecode); tf.data gets the bytes
themselves (os.fsencode), so every name on disk can be read, and reasons are
made printable (fileio.printable) wherever they quote a name.
"""

import os
import stat
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from captioning import quiet_tensorflow
from captioning.fileio import printable

tf = quiet_tensorflow()

# An image smaller than this on either side carries no information a CNN can
# use once it is stretched to 224 or 299 pixels (a 1x1 tracking pixel, say).
MIN_SIDE = 16

# The most pixels a photo may have: 40 megapixels is more than any camera a
# learner owns (a 7,700 x 5,200 frame), and decodes into 120 MB of RGB.
MAX_PIXELS = 40_000_000

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


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


def stat_photo(path):
    """(os.stat_result, None) for a regular file, else (None, the reason it cannot be a photo).

    Opens nothing: only the metadata is read, so a named pipe or a device is
    refused without ever blocking on it.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None, "missing file"
    except OSError as error:  # no permission on a folder, a name too long, a loop of links...
        return None, f"cannot read: {error.strerror}"
    except ValueError as error:  # a NUL byte: no file on disk can have that name
        return None, f"not a valid file name: {error}"
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for is_kind, name in _KINDS if is_kind(info.st_mode)), "a special file")
        return None, f"not a regular file ({kind})"
    return info, None


def _too_large(width, height):
    if width * height > MAX_PIXELS:
        return f"too large: {width} x {height} pixels (limit {MAX_PIXELS:,})"
    return None


def check_photo(path):
    """None if `path` may be a photo, else the reason it cannot be: what the door checks.

    A regular file whose header announces at most MAX_PIXELS pixels passes. A
    header Pillow cannot read passes too: deciding that is the decoders' job,
    and they report it with a better reason.
    """
    _, reason = stat_photo(path)
    if reason:
        return reason
    try:
        handle = open(path, "rb")
    except OSError as error:
        return f"cannot read: {error.strerror}"
    with handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we refuse those ourselves
        try:
            with Image.open(handle) as image:  # lazy: parses the header, decodes nothing
                return _too_large(*image.size)
        except Image.DecompressionBombError:  # so big that Pillow will not even open it
            return f"too large: over {2 * Image.MAX_IMAGE_PIXELS:,} pixels (limit {MAX_PIXELS:,})"
        except Exception:  # not a format Pillow knows, or a damaged header: let the decoders judge
            return None


def diagnose(path, image_size, preprocess):
    """The slow path for one file the fast path dropped: (tensor, None) if Pillow can
    read it after all, otherwise (None, reason) with a reason a person can act on."""
    reason = check_photo(path)
    if reason:
        return None, reason
    try:
        with Image.open(path) as image:
            width, height = image.size
            if min(width, height) < MIN_SIDE:
                return None, f"too small: {width}x{height} pixels (need at least {MIN_SIDE} on each side)"
            reason = _too_large(width, height)  # checked at the door, but this path must never decode more
            if reason:
                return None, reason
            image.load()
            pixels = np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        return None, "not an image (unrecognised file format)"
    except Image.DecompressionBombError as error:
        return None, f"too large: {error}"
    except (OSError, ValueError, SyntaxError) as error:
        return None, f"corrupt or truncated image: {printable(error)}"
    return preprocess(resize(tf.constant(pixels), image_size)), None


def image_dataset(paths, image_size, preprocess, batch_size, indices=None):
    """tf.data pipeline of (indices, images) batches; failed images are silently absent.

    `indices` (default 0, 1, 2, ...) is what each path is called in the
    batches. Paths go in as bytes, so that names that are not UTF-8 work.
    `deterministic=True` keeps the output order equal to the input order even
    though decoding runs in parallel, so the same list of paths always gives
    the same batches: feature values then never depend on thread timing.
    """
    indices = tf.constant(range(len(paths)) if indices is None else indices, dtype=tf.int32)
    names = tf.constant([os.fsencode(path) for path in paths], dtype=tf.string)
    dataset = tf.data.Dataset.from_tensor_slices((indices, names))
    dataset = dataset.map(
        lambda index, path: (index, _decode_graph(path, image_size, preprocess)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    )
    dataset = dataset.ignore_errors()
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def iterate_batches(paths, image_size, preprocess, batch_size, errors):
    """Yield (indices np.int32, images tf.Tensor) for every readable image of `paths`.

    First the door (check_photo), then the tf.data batches of the files that
    passed it, then the images only Pillow could read, in batches of their own.
    Each unreadable image is appended to `errors` as (index, reason). The
    batches depend only on `paths` and the files, never on timing.
    """
    done = np.zeros(len(paths), dtype=bool)
    passed = []
    for index, path in enumerate(paths):
        reason = check_photo(path)
        if reason:
            errors.append((index, reason))
            done[index] = True
        else:
            passed.append(index)
    if passed:
        for indices, images in image_dataset([paths[i] for i in passed], image_size, preprocess, batch_size,
                                             indices=passed):
            indices = indices.numpy()
            done[indices] = True
            yield indices, images
    rescued_indices, rescued_images = [], []
    for index in np.flatnonzero(~done):
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
