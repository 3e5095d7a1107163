"""Encoders: registry, weights handling (local file, offline ImageNet, random), and encode_images
on real photos with the real ImageNet MobileNetV2 weights."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning import encoders

REPO = Path(__file__).resolve().parent.parent


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def mobilenet(mobilenet_weights):
    return encoders.build_encoder("mobilenet_v2", weights=str(mobilenet_weights))


@pytest.fixture(scope="module")
def photos(flickr8k_dir):
    return sorted((flickr8k_dir / "images").glob("*.jpg"))[:6]


def test_settings_are_known_without_building_a_network(mobilenet_weights, tmp_path):
    settings = encoders.encoder_settings("mobilenet_v2", str(mobilenet_weights), pooling=None)
    assert settings["image_size"] == 320 and settings["feature_shape"] == [10, 10, 1280]
    assert settings["mirror"] is True  # on by default (docs/experiments.md)
    assert settings["weights_id"].startswith("sha256:")
    assert encoders.encoder_settings("inception_v3", "imagenet")["feature_shape"] == [2048]
    # Same name, different bytes: a different identity, so a cache cannot mix them up.
    copy = tmp_path / mobilenet_weights.name
    data = bytearray(mobilenet_weights.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert encoders.encoder_settings("mobilenet_v2", str(copy))["weights_id"] != settings["weights_id"]
    # Same bytes, another name: the same weights (identity is content, not the file name).
    renamed = tmp_path / "renamed.weights.h5"
    renamed.write_bytes(mobilenet_weights.read_bytes())
    assert encoders.encoder_settings("mobilenet_v2", str(renamed))["weights_id"] == settings["weights_id"]
    with pytest.raises(ValueError, match="unknown encoder 'resnet'"):
        encoders.encoder_settings("resnet")
    with pytest.raises(ValueError, match="pooling"):
        encoders.encoder_settings("mobilenet_v2", pooling="max")


def test_inception_v3_shapes_with_random_weights():
    pooled = encoders.build_encoder("inception_v3", weights=None)
    assert (pooled.image_size, pooled.feature_shape) == (299, (2048,))
    assert pooled.weights_id.startswith("random:sha256:")
    images = np.random.default_rng(0).uniform(0, 255, (2, 299, 299, 3)).astype(np.float32)
    features = pooled.encode(pooled.preprocess(images.copy()))
    assert features.shape == (2, 2048) and features.dtype == np.float32 and np.isfinite(features).all()
    grid = encoders.build_encoder("inception_v3", weights=None, pooling=None)
    assert grid.feature_shape == (8, 8, 2048)
    assert grid.encode(grid.preprocess(images[:1].copy())).shape == (1, 8, 8, 2048)
    # "Random" is one fixed network: built again (to caption a new photo), it gives the
    # features that were cached, whatever the global random state is by then.
    np.random.seed(123)
    again = encoders.build_encoder("inception_v3", weights="none")
    assert again.weights_id == pooled.weights_id == grid.weights_id
    np.testing.assert_array_equal(again.encode(again.preprocess(images.copy())), features)


def test_missing_and_damaged_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found.*--weights"):
        encoders.build_encoder("mobilenet_v2", weights=str(tmp_path / "nope.weights.h5"))
    damaged = tmp_path / "damaged.weights.h5"
    damaged.write_bytes(b"not an HDF5 file")
    with pytest.raises(ValueError, match="damaged.weights.h5: cannot load these weights into mobilenet_v2"):
        encoders.build_encoder("mobilenet_v2", weights=str(damaged))


def test_imagenet_offline_fails_fast_naming_the_weights_option(tmp_path):
    """No network (name resolution fails) and an empty Keras cache: a clear error, not a hang."""
    script = (
        "import socket\n"
        "def offline(*args, **kwargs): raise socket.gaierror(-2, 'Name or service not known')\n"
        "socket.getaddrinfo = offline\n"
        "from captioning import encoders\n"
        "try:\n"
        "    encoders.build_encoder('mobilenet_v2', weights='imagenet')\n"
        "except ValueError as error:\n"
        "    print('ERROR:', error)\n"
    )
    environment = dict(os.environ, KERAS_HOME=str(tmp_path / "keras"), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=environment)
    assert "ERROR: could not download the ImageNet weights for mobilenet_v2" in result.stdout, result.stderr
    assert "--weights PATH" in result.stdout


def test_encode_images_on_real_photos_reports_bad_files(mobilenet, photos, tmp_path):
    gray = tmp_path / "gray.jpg"
    Image.open(photos[0]).convert("L").save(gray)
    cmyk = tmp_path / "cmyk.jpg"
    Image.open(photos[0]).convert("CMYK").save(cmyk)
    rgba = tmp_path / "rgba.png"
    Image.open(photos[0]).convert("RGBA").save(rgba)
    broken = tmp_path / "broken.jpg"
    broken.write_text("this is not a photo")
    paths = [photos[0], broken, gray, cmyk, rgba, tmp_path / "missing.jpg", *photos[1:]]
    features, ok_indices, errors = encoders.encode_images(mobilenet, paths, batch_size=4)
    assert ok_indices == [0, 2, 3, 4] + list(range(6, len(paths)))
    assert features.shape == (len(ok_indices), 1280) and features.dtype == np.float32
    assert errors == [(str(broken), "not an image (unrecognised file format)"),
                      (str(tmp_path / "missing.jpg"), "missing file")]
    original, variants, others = features[0], features[1:4], features[4:]
    # The colour variants of one photo are that photo; other photos are not.
    for variant in variants:
        assert cosine(original, variant) > 0.8
    closest_other = max(cosine(original, other) for other in others)
    assert min(cosine(original, variant) for variant in variants) > closest_other


def test_pipeline_matches_a_plain_keras_forward_pass(mobilenet_weights, photos):
    """Our tf.data decode + resize + preprocess feeds the network what the plain recipe does
    (Pillow decoding, bilinear resize as in TF-slim's ImageNet training, Keras's preprocess_input),
    and clearly not what a forgotten preprocess_input would."""
    import keras
    import tensorflow as tf
    reference = keras.applications.MobileNetV2(include_top=False, weights=str(mobilenet_weights),
                                               pooling="avg", input_shape=(320, 320, 3))
    pixels = np.stack([tf.image.resize(np.asarray(Image.open(path).convert("RGB")), (320, 320)).numpy()
                       for path in photos[:3]])
    expected = reference.predict(keras.applications.mobilenet_v2.preprocess_input(pixels.copy()), verbose=0)
    unpreprocessed = reference.predict(pixels, verbose=0)
    plain = encoders.build_encoder("mobilenet_v2", weights=str(mobilenet_weights), mirror=False)
    features, _, _ = encoders.encode_images(plain, photos[:3], batch_size=3)
    for ours, theirs, wrong in zip(features, expected, unpreprocessed):
        assert cosine(ours, theirs) > 0.99
        assert cosine(ours, wrong) < cosine(ours, theirs) - 0.05


def test_mirror_averages_each_photo_with_its_mirror_image(mobilenet_weights):
    import dataclasses
    plain = encoders.build_encoder("mobilenet_v2", weights=str(mobilenet_weights), pooling=None, mirror=False)
    mirrored = dataclasses.replace(plain, mirror=True)  # the same network, mirroring on
    assert (plain.settings()["mirror"], mirrored.settings()["mirror"]) == (False, True)
    images = plain.preprocess(np.random.default_rng(1).uniform(0, 255, (2, 320, 320, 3)).astype(np.float32))
    flipped = images[:, :, ::-1, :].copy()
    # A grid's mirrored half is flipped back, so that cell (i, j) still describes one place.
    expected = (plain.encode(images) + plain.encode(flipped)[:, :, ::-1, :]) / 2
    np.testing.assert_allclose(mirrored.encode(images), expected, rtol=1e-4, atol=1e-5)
    difference = np.abs(mirrored.encode(images) - plain.encode(images)).mean()
    assert difference > 0.05 * np.abs(plain.encode(images)).mean()
    # A photo and its mirror image get the same mirrored features (as vectors after pooling).
    np.testing.assert_allclose(mirrored.encode(flipped).mean(axis=(1, 2)), mirrored.encode(images).mean(axis=(1, 2)),
                               rtol=1e-4, atol=1e-5)
    assert encoders.build_encoder("mobilenet_v2", weights=None).mirror  # on by default
    assert encoders.encoder_settings("inception_v3", "imagenet", mirror=False)["mirror"] is False
