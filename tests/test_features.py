"""The feature store: lookup, bad images, stale caches, SIGKILL-and-resume, shards, the CLI.

All on a few real Flickr8k photos with the real ImageNet MobileNetV2 weights,
in small batches and chunks so that a handful of images spans several chunks.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from captioning import encoders
from captioning.features import FeatureStore, cache_features, merge_shards
from conftest import run_cli

REPO = Path(__file__).resolve().parent.parent


def folder_bytes(folder):
    """Every file of a store (name -> bytes), to compare stores bit for bit."""
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def photos(flickr8k_dir):
    paths = sorted((flickr8k_dir / "images").glob("*.jpg"))[:10]
    return {path.stem: str(path) for path in paths}


@pytest.fixture(scope="module")
def mobilenet(mobilenet_weights):
    return encoders.build_encoder("mobilenet_v2", weights=str(mobilenet_weights))


def test_cache_then_lookup_by_id(photos, mobilenet, tmp_path):
    report = cache_features(photos, tmp_path / "cache", encoder=mobilenet, batch_size=4, chunk_size=4,
                            progress=False)
    assert (report.cached, report.skipped, report.computed) == (10, [], 10)
    store = FeatureStore.open(tmp_path / "cache")
    assert store.ids == sorted(photos) and len(store) == 10 and store.feature_shape == (1280,)
    assert store.manifest["weights_id"] == mobilenet.weights_id and store.manifest["dtype"] == "float16"
    ids = sorted(photos)
    expected, _, _ = encoders.encode_images(mobilenet, [photos[image_id] for image_id in ids], batch_size=4)
    np.testing.assert_allclose(store.get_many(ids), expected, rtol=1e-2, atol=1e-2)
    backwards = store.get_many(ids[::-1])
    assert backwards.dtype == np.float32 and np.array_equal(backwards, store.get_many(ids)[::-1])
    assert np.array_equal(store.get(ids[3]), backwards[6])
    assert ids[0] in store and "no-such-image" not in store
    with pytest.raises(KeyError, match="not in the feature cache"):
        store.get("no-such-image")
    # Done is done: a second call, here with one row per caption, encodes nothing and changes nothing.
    before = folder_bytes(tmp_path / "cache")
    captions = pd.DataFrame({"image_id": ids * 2, "image_path": [photos[i] for i in ids] * 2, "caption": "x"})
    again = cache_features(captions, tmp_path / "cache", encoder=mobilenet, batch_size=4, chunk_size=4)
    assert (again.cached, again.computed) == (10, 0)
    assert folder_bytes(tmp_path / "cache") == before


def test_bad_images_are_skipped_and_each_named_with_its_reason(photos, mobilenet, tmp_path):
    source = Image.open(next(iter(photos.values())))
    jpeg = Path(next(iter(photos.values()))).read_bytes()
    images = tmp_path / "images"
    images.mkdir()
    source.convert("L").save(images / "gray.jpg")
    source.convert("CMYK").save(images / "cmyk.jpg")
    source.convert("RGBA").save(images / "rgba.png")
    source.save(images / "photo.tif")  # TensorFlow cannot decode TIFF: Pillow rescues it
    Image.new("RGB", (1, 1)).save(images / "pixel.png")
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    garbage = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (images / "corrupt.jpg").write_bytes(jpeg[:600] + garbage)
    (images / "notes.jpg").write_text("not a photo at all")
    names = ["gray.jpg", "cmyk.jpg", "rgba.png", "photo.tif", "pixel.png", "truncated.jpg", "corrupt.jpg",
             "notes.jpg", "missing.jpg"]
    table = {name.split(".")[0]: str(images / name) for name in names}
    report = cache_features(table, tmp_path / "cache", encoder=mobilenet, batch_size=2, chunk_size=4,
                            progress=False)
    reasons = {image_id: reason for image_id, _, reason in report.skipped}
    assert reasons == {
        "pixel": "too small: 1x1 pixels (need at least 16 on each side)",
        "truncated": "corrupt or truncated image: image file is truncated (65 bytes not processed)",
        "corrupt": "not an image (unrecognised file format)",
        "notes": "not an image (unrecognised file format)",
        "missing": "missing file",
    }
    assert {image_id: path for image_id, path, _ in report.skipped} == {key: table[key] for key in reasons}
    store = FeatureStore.open(tmp_path / "cache")
    assert store.ids == ["cmyk", "gray", "photo", "rgba"] and report.cached == 4
    assert store.skipped == report.skipped
    # The rescued and converted images are the same photo to the network.
    features = store.get_many(store.ids)
    cosines = features @ features.T / np.outer(np.linalg.norm(features, axis=1), np.linalg.norm(features, axis=1))
    assert cosines.min() > 0.8


def test_stale_cache_is_refused_and_left_alone(photos, mobilenet, mobilenet_weights, tmp_path):
    few = dict(list(photos.items())[:3])
    cache_features(few, tmp_path / "cache", encoder=mobilenet, batch_size=4, progress=False)
    before = folder_bytes(tmp_path / "cache")
    other_weights = tmp_path / "other.weights.h5"  # other bytes (a retrained or damaged file)
    data = bytearray(mobilenet_weights.read_bytes())
    data[-1] ^= 0xFF  # (the file already ends in a zero byte: setting it to zero changed nothing)
    other_weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="stale feature cache .*weights_id: cached 'sha256:"):
        cache_features(few, tmp_path / "cache", encoder="mobilenet_v2", weights=str(other_weights))
    with pytest.raises(ValueError, match="stale feature cache .*encoder: cached 'mobilenet_v2', asked 'inception_v3'"):
        cache_features(few, tmp_path / "cache", encoder="inception_v3", weights="imagenet")
    with pytest.raises(ValueError, match="pooling: cached 'avg', asked 'none'"):
        cache_features(few, tmp_path / "cache", encoder="mobilenet_v2", weights=str(mobilenet_weights), pooling=None)
    with pytest.raises(ValueError, match="mirror: cached True, asked False"):
        cache_features(few, tmp_path / "cache", encoder="mobilenet_v2", weights=str(mobilenet_weights), mirror=False)
    with pytest.raises(ValueError, match="stale feature cache"):
        FeatureStore.open(tmp_path / "cache", expect=encoders.encoder_settings("inception_v3", "imagenet"))
    assert folder_bytes(tmp_path / "cache") == before
    # Same settings, other images: the cache is rebuilt to hold exactly those.
    other = dict(list(photos.items())[3:5])
    cache_features(other, tmp_path / "cache", encoder="mobilenet_v2", weights=str(mobilenet_weights),
                   progress=False)
    assert FeatureStore.open(tmp_path / "cache").ids == sorted(other)


RUN_SCRIPT = """
import json, sys
from captioning.features import cache_features
images = json.load(open(sys.argv[1]))
report = cache_features(images, sys.argv[2], encoder="mobilenet_v2", weights=sys.argv[3],
                        batch_size=2, chunk_size=2, progress=False)
print("computed", report.computed)
"""


def test_sigkill_mid_way_then_rerun_gives_a_bit_identical_store(photos, mobilenet_weights, tmp_path):
    listing = tmp_path / "images.json"
    listing.write_text(json.dumps({**photos, "zz-missing": str(tmp_path / "missing.jpg")}))
    environment = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")

    def start(out_dir):
        return subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, listing, out_dir, mobilenet_weights],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)

    def finish(process):
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        return int(stdout.split("computed")[-1])

    assert finish(start(tmp_path / "whole")) == 10

    killed = start(tmp_path / "resumed")
    deadline = time.monotonic() + 600
    while not (tmp_path / "resumed" / "partial" / "chunk-000001.npz").exists():
        assert killed.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        FeatureStore.open(tmp_path / "resumed")
    # What a kill during an atomic write leaves behind: a temporary file, never a final one.
    (tmp_path / "resumed" / "partial" / ".chunk-000002.npz.k1ll3d.tmp").write_bytes(b"half a chunk")

    computed = finish(start(tmp_path / "resumed"))
    assert 0 < computed <= 10 - 4  # at least chunks 0 and 1 (4 images) were kept
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")
    assert not (tmp_path / "resumed" / "partial").exists()
    assert FeatureStore.open(tmp_path / "resumed").skipped[0][0] == "zz-missing"


def test_shards_merge_into_the_unsharded_store(photos, mobilenet, tmp_path):
    options = dict(encoder=mobilenet, batch_size=2, chunk_size=3, progress=False)
    cache_features(photos, tmp_path / "whole", **options)
    counts = [cache_features(photos, tmp_path / f"shard{i}", shard=(i, 3), **options).cached for i in range(3)]
    assert counts == [4, 3, 3]  # chunks {0, 3}, {1}, {2} of 3, 3, 3, 1 images
    with pytest.raises(ValueError, match="need shards 0..2 of 3 exactly once, got \\[0, 2\\]"):
        merge_shards([tmp_path / "shard0", tmp_path / "shard2"], tmp_path / "merged")
    with pytest.raises(ValueError, match="not into the shard folder"):
        merge_shards([tmp_path / f"shard{i}" for i in range(3)], tmp_path / "shard1")
    report = merge_shards([tmp_path / f"shard{i}" for i in (2, 0, 1)], tmp_path / "merged")
    assert report.cached == 10
    assert folder_bytes(tmp_path / "merged") == folder_bytes(tmp_path / "whole")


def test_features_command(photos, mobilenet_weights, tmp_path):
    """A tiny Flickr8k-shaped folder: four photos, one broken file, one image not on disk."""
    data = tmp_path / "flickr8k"
    (data / "images").mkdir(parents=True)
    (data / "text").mkdir()
    names = [Path(path).name for path in list(photos.values())[:4]]
    for name, path in zip(names, photos.values()):
        (data / "images" / name).symlink_to(path)
    (data / "images" / "broken.jpg").write_text("not a photo")
    lines = [f"{name}#0\ta caption of {name}" for name in names + ["broken.jpg", "absent.jpg"]]
    (data / "text" / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    common = ["features", "--dataset", "flickr8k", "--data-dir", data, "--encoder", "mobilenet_v2", "--batch-size", 2]
    arguments = [*common, "--out", tmp_path / "cache"]
    result = run_cli(*arguments, "--weights", mobilenet_weights)
    assert "1 images of the annotations are not on disk" in result.stdout
    assert "cached 4 images" in result.stdout and "images/s" in result.stdout
    assert "skipped 1 images:\n  broken (" in result.stdout and "not an image" in result.stdout
    assert len(FeatureStore.open(tmp_path / "cache")) == 4
    assert FeatureStore.open(tmp_path / "cache").manifest["mirror"] is True  # on unless turned off
    plain = run_cli(*common, "--out", tmp_path / "plain", "--weights", mobilenet_weights, "--no-mirror")
    assert "cached 4 images" in plain.stdout
    assert FeatureStore.open(tmp_path / "plain").manifest["mirror"] is False
    stale = run_cli(*arguments, "--weights", "imagenet", check=False)
    assert stale.returncode == 1 and "error: stale feature cache" in stale.stderr  # a fault, not usage
    bad_shard = run_cli(*arguments, "--weights", mobilenet_weights, "--shard", "1-of-2", check=False)
    assert bad_shard.returncode == 2 and "argument --shard: '1-of-2' does not look like I/N" in bad_shard.stderr
