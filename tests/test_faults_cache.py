"""Faults of the feature cache and of reading photos (issue 18): a cache keyed on the photos'
content, checkpoints that keep a killed run's work, a full disk, and files that are not photos.

A tiny convolutional encoder on small generated photos keeps these fast; what they check
does not depend on the network.
"""

import errno
import io
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning import images as image_io
from captioning.features import FeatureStore, cache_features, merge_shards

REPO = Path(__file__).resolve().parent.parent
HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


def tiny_encoder(channels=8, image_size=32):
    """A small fixed network in the Encoder interface: the same weights in every process."""
    import keras

    from captioning import encoders

    inputs = keras.Input((image_size, image_size, 3))
    hidden = keras.layers.Conv2D(channels, 3, strides=2, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(hidden))
    generator = np.random.default_rng(0)
    model.set_weights([generator.normal(0, 0.2, array.shape).astype(array.dtype) for array in model.get_weights()])
    return encoders.Encoder(name="tiny", weights_id=f"tiny:{channels}", image_size=image_size, pooling="avg",
                            feature_shape=(channels,), model=model, preprocess=lambda x: x / 127.5 - 1.0,
                            mirror=False)


def write_photo(path, seed, size=40):
    """A small JPEG that no other seed gives. Its mtime is about an hour ago, as a photo on disk
    would have, and differs from seed to seed, as a file's that was written again would."""
    generator = np.random.default_rng(seed)
    pixels = np.linspace(0, 255, size)[None, :, None] * generator.uniform(0.2, 1.0, (1, 1, 3))
    pixels = pixels + generator.normal(0, 20, (size, size, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    os.utime(path, ns=(HOUR_AGO_NS + seed, HOUR_AGO_NS + seed))
    return Path(path)


def write_photos(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    return {f"{i:03d}": str(write_photo(folder / f"{i:03d}.jpg", i)) for i in range(count)}


def cached(tiny, tmp_path, count):
    """`count` photos cached by the tiny encoder: (photos, cache folder, options, each photo's row)."""
    photos = write_photos(tmp_path / "images", count)
    cache = tmp_path / "cache"
    options = dict(encoder=tiny, batch_size=4, progress=False)
    cache_features(photos, cache, **options)
    store = FeatureStore.open(cache)
    return photos, cache, options, {image_id: store.get(image_id) for image_id in store.ids}


def folder_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def tiny():
    return tiny_encoder()


def test_a_replaced_photo_is_encoded_again_and_only_it(tiny, tmp_path, capsys, monkeypatch):
    from captioning import feature_jobs

    photos = write_photos(tmp_path / "images", 12)
    cache = tmp_path / "cache"
    options = dict(encoder=tiny, batch_size=4, progress=False)
    assert cache_features(photos, cache, **options).computed == 12
    ids = sorted(photos)
    before = FeatureStore.open(cache).get_many(ids)

    write_photo(photos["003"], seed=1000)  # another photo under the same name
    half_hour_ago = HOUR_AGO_NS + 1800 * 10**9
    os.utime(photos["005"], ns=(half_hour_ago, half_hour_ago))  # touched, the same bytes
    hashed = []
    real_sha256 = feature_jobs.sha256_of
    monkeypatch.setattr(feature_jobs, "sha256_of", lambda path: hashed.append(path) or real_sha256(path))
    capsys.readouterr()
    report = cache_features(photos, cache, **options)
    assert report.computed == 1 and report.cached == 12
    assert sorted(hashed) == [photos["003"], photos["005"]]  # the others are known by size and mtime
    said = capsys.readouterr().out
    assert said == (f"feature cache {cache}: 1 photo changed since they were cached (e.g. {photos['003']}): "
                    "encoding 1, keeping 11\n")
    after = FeatureStore.open(cache).get_many(ids)
    changed = [image_id for image_id, old, new in zip(ids, before, after) if not np.array_equal(old, new)]
    assert changed == ["003"]
    sources = json.loads((cache / "sources.json").read_text())
    assert set(sources) == set(photos) and len(sources["003"]["sha256"]) == 64
    assert sources["005"]["mtime_ns"] == half_hour_ago

    # Nothing changed since: nothing is hashed or encoded, and not a byte of the store moves.
    hashed.clear()
    unchanged = folder_bytes(cache)
    again = cache_features(photos, cache, **options)
    assert (again.computed, hashed, capsys.readouterr().out) == (0, [], "")
    assert folder_bytes(cache) == unchanged


def test_a_second_process_waits_for_the_one_caching_then_only_checks_its_work(tiny, tmp_path, capsys):
    # The workers of a cluster share one work folder and reach the feature cache at the same moment:
    # the second used to be refused ("another process is caching"), which failed the whole cluster.
    photos = write_photos(tmp_path / "photos", 6)
    out = tmp_path / "cache"
    cache_features(photos, out, encoder=tiny, batch_size=4, progress=False)
    before = folder_bytes(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pathlib import Path\nfrom captioning import feature_jobs\n"
                               f"with feature_jobs.lock(Path({str(out)!r})):\n    print('held', flush=True)\n"
                               "    sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        released = threading.Timer(3.0, lambda: (holder.stdin.write("\n"), holder.stdin.flush()))
        released.start()
        report = cache_features(photos, out, encoder=tiny, batch_size=4, progress=False)  # waits for the holder
        assert holder.wait(timeout=60) == 0  # it was let go before this call could go on
    finally:
        holder.kill()
    assert "another process is caching features into" in capsys.readouterr().err
    assert report.computed == 0 and folder_bytes(out) == before  # the work was done: only checked


def test_photos_no_longer_asked_for_are_dropped_and_deleted_ones_reported(tiny, tmp_path, capsys):
    photos, cache, options, rows = cached(tiny, tmp_path, 10)

    fewer = {image_id: path for image_id, path in photos.items() if image_id not in ("002", "007")}
    capsys.readouterr()
    report = cache_features(fewer, cache, **options)
    assert (report.computed, report.cached) == (0, 8)
    assert capsys.readouterr().out == f"feature cache {cache}: 2 no longer asked for: encoding 0, keeping 8\n"
    store = FeatureStore.open(cache)
    assert store.ids == sorted(fewer)
    assert all(np.array_equal(store.get(image_id), rows[image_id]) for image_id in store.ids)
    assert set(json.loads((cache / "sources.json").read_text())) == set(fewer)

    os.remove(fewer["004"])  # still asked for, gone from disk
    report = cache_features(fewer, cache, **options)
    assert report.computed == 0 and report.skipped == [("004", fewer["004"], "missing file")]
    assert "004" not in FeatureStore.open(cache).ids
    assert cache_features(fewer, cache, **options).computed == 0  # still missing: nothing to do
    write_photo(fewer["004"], seed=4)  # back, the same bytes: encoded again in its own batch
    report = cache_features(fewer, cache, **options)
    assert (report.computed, report.skipped) == (1, [])
    np.testing.assert_allclose(FeatureStore.open(cache).get("004"), rows["004"], rtol=1e-2, atol=1e-3)

    # A store from before content keys (format 1, no sources.json) is rebuilt, and says why.
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    (cache / "sources.json").unlink()
    capsys.readouterr()
    assert cache_features(fewer, cache, **options).computed == 8
    assert "made by an older version that did not record the photos' content" in capsys.readouterr().out


def test_a_damaged_manifest_says_what_to_do_and_the_rerun_encodes_again(tiny, tmp_path, capsys):
    photos, cache, options, rows = cached(tiny, tmp_path, 6)
    manifest = cache / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])  # cut short, as by a full disk or a copy stopped half-way

    with pytest.raises(ValueError) as caught:
        FeatureStore.open(cache)
    message = str(caught.value)
    assert str(manifest) in message and "not valid JSON" in message and "run the same command again" in message

    capsys.readouterr()
    assert cache_features(photos, cache, **options).computed == 6
    assert "is damaged (its manifest.json is unreadable): encoding all 6 again" in capsys.readouterr().out
    after = FeatureStore.open(cache)
    assert all(np.allclose(after.get(image_id), rows[image_id], rtol=1e-2, atol=1e-3) for image_id in rows)


def test_an_interrupted_update_resumes_to_the_bytes_of_an_uninterrupted_one(tiny, tmp_path, monkeypatch):
    """An update keeps its earlier store in partial/base until it commits: a run stopped while
    encoding, or while writing the store, resumes to the bytes of an uninterrupted update."""
    import shutil

    from captioning import feature_jobs, feature_store

    photos = write_photos(tmp_path / "images", 16)
    options = dict(encoder=tiny, batch_size=2, chunk_size=2, progress=False)
    cache_features(photos, tmp_path / "whole", **options)
    shutil.copytree(tmp_path / "whole", tmp_path / "stopped")
    for number, image_id in enumerate(["001", "004", "005", "009", "010", "015"]):
        write_photo(photos[image_id], seed=500 + number)
    assert cache_features(photos, tmp_path / "whole", **options).computed == 6

    encode_chunk, calls = feature_jobs.encode_chunk, []

    def stopped_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args)
        return encode_chunk(*args)

    monkeypatch.setattr(feature_jobs, "encode_chunk", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        cache_features(photos, tmp_path / "stopped", **options)
    with pytest.raises(FileNotFoundError, match="unfinished"):
        FeatureStore.open(tmp_path / "stopped")
    assert (tmp_path / "stopped" / "partial" / "base" / "features.npy").is_file()
    monkeypatch.setattr(feature_jobs, "encode_chunk", encode_chunk)

    write_json, writes = feature_store.write_json_atomic, []

    def stopped_before_the_ids(path, obj):  # features.npy is in place, the rest is not
        if Path(path).name == "ids.json" and not writes:
            writes.append(path)
            raise KeyboardInterrupt
        return write_json(path, obj)

    monkeypatch.setattr(feature_store, "write_json_atomic", stopped_before_the_ids)
    with pytest.raises(KeyboardInterrupt):
        cache_features(photos, tmp_path / "stopped", **options)
    assert (tmp_path / "stopped" / "features.npy").is_file() and not (tmp_path / "stopped" / "manifest.json").exists()

    report = cache_features(photos, tmp_path / "stopped", **options)
    assert report.computed == 0  # the three chunks were kept
    assert folder_bytes(tmp_path / "stopped") == folder_bytes(tmp_path / "whole")
    assert not (tmp_path / "stopped" / "partial").exists()


def test_shards_see_replaced_photos_and_still_merge_into_the_unsharded_store(tiny, tmp_path):
    photos = write_photos(tmp_path / "images", 10)
    options = dict(encoder=tiny, batch_size=2, chunk_size=2, progress=False)
    cache_features(photos, tmp_path / "whole", **options)
    shards = [tmp_path / "shard0", tmp_path / "shard1"]
    computed = [cache_features(photos, folder, shard=(i, 2), **options).computed for i, folder in enumerate(shards)]
    assert computed == [6, 4]  # chunks 0, 2, 4 and 1, 3 of two photos each
    assert cache_features(photos, shards[0], shard=(0, 2), **options).computed == 0
    merge_shards(shards, tmp_path / "merged")
    assert folder_bytes(tmp_path / "merged") == folder_bytes(tmp_path / "whole")

    write_photo(photos["004"], seed=400)  # in chunk 2, shard 0's
    assert cache_features(photos, shards[0], shard=(0, 2), **options).computed == 6
    with pytest.raises(ValueError, match="shard1: this shard was made with other images"):
        merge_shards(shards, tmp_path / "again")  # shard 1 saw the photo as it was
    assert cache_features(photos, shards[1], shard=(1, 2), **options).computed == 4
    merge_shards(shards, tmp_path / "again")
    merge_shards(shards, tmp_path / "again")  # the same store again: nothing else is at stake
    # A store of other photos (the one merged before 004 changed), or a folder of the user's, is not replaced.
    before = folder_bytes(tmp_path / "merged")
    with pytest.raises(ValueError, match="merged already holds a feature store of other photos"):
        merge_shards(shards, tmp_path / "merged")
    assert folder_bytes(tmp_path / "merged") == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="mine is not empty and holds no feature store"):
        merge_shards(shards, tmp_path / "mine")
    assert cache_features(photos, tmp_path / "whole", **options).computed == 1
    np.testing.assert_allclose(FeatureStore.open(tmp_path / "again").get("004"),
                               FeatureStore.open(tmp_path / "whole").get("004"), rtol=1e-2, atol=1e-3)


def huge_png(path, width, height):
    """A valid PNG of width x height black pixels that takes a few kB on disk (1 bit per pixel)."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    rows = zlib.compress(bytes(((width + 7) // 8 + 1) * height), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def test_files_that_are_not_photos_are_reported_and_the_batch_goes_on(tiny, tmp_path):
    photos = write_photos(tmp_path / "images", 4)
    folder = tmp_path / "images"
    raw = os.fsencode(folder)
    table = dict(photos)
    os.mkfifo(folder / "pipe.jpg")
    (folder / "folder.jpg").mkdir()
    huge_png(folder / "huge.png", 8000, 8000)  # 64 megapixels in 9 kB: TensorFlow would decode them all
    (folder / "notes.jpg").write_text("not a photo at all")
    cafe = write_photo(os.fsdecode(raw + b"/caf\xe9.jpg"), seed=99)  # Latin-1, not UTF-8
    broken = os.fsdecode(raw + b"/broken-\xff.jpg")
    Path(broken).write_bytes(b"\xff\xd8 half a JPEG")
    table.update({"pipe": str(folder / "pipe.jpg"), "folder": str(folder / "folder.jpg"),
                  "huge": str(folder / "huge.png"), "notes": str(folder / "notes.jpg"),
                  os.fsdecode(b"caf\xe9"): str(cafe), os.fsdecode(b"broken-\xff"): broken})

    # tf.io.read_file on a named pipe waits for a writer forever: if the cache opens it, unblock it.
    opened = threading.Event()
    stop = threading.Event()

    def watchdog():
        if stop.wait(60):
            return
        try:
            os.close(os.open(folder / "pipe.jpg", os.O_WRONLY | os.O_NONBLOCK))  # works only if a reader waits
            opened.set()
        except OSError:
            pass

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    try:
        report = cache_features(table, tmp_path / "cache", encoder=tiny, batch_size=4, progress=False)
    finally:
        stop.set()
        guard.join()
    assert not opened.is_set(), "the named pipe was opened"
    reasons = {image_id: reason for image_id, _, reason in report.skipped}
    assert reasons == {
        "pipe": "not a regular file (a named pipe)",
        "folder": "not a regular file (a folder)",
        "huge": "too large: 8000 x 8000 pixels (limit 40,000,000)",
        "notes": "not an image (unrecognised file format)",
        os.fsdecode(b"broken-\xff"): "not an image (unrecognised file format)",
    }
    store = FeatureStore.open(tmp_path / "cache")
    assert store.ids == sorted([*photos, os.fsdecode(b"caf\xe9")]) and report.cached == 5
    assert store.skipped == report.skipped  # names that are not UTF-8 survive the JSON files
    # The report prints on a strict UTF-8 stream, the bytes that are not UTF-8 escaped.
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    print(report.summary(), file=stream)
    stream.flush()
    printed = stream.buffer.getvalue().decode("utf-8")
    assert "broken-\\xff (" in printed and "broken-\\xff.jpg): not an image" in printed
    # The slow path (Pillow) keeps to the same limit, and never decodes the pixels.
    assert image_io.diagnose(folder / "huge.png", 32, tiny.preprocess) == (None, reasons["huge"])
    assert image_io.check_photo(folder / "pipe.jpg") == reasons["pipe"]


KILLED_RUN = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[3])
from captioning import feature_jobs, features
from test_faults_cache import tiny_encoder
encode_chunk, done = feature_jobs.encode_chunk, []
def killed_after_two(*args):
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(encode_chunk(*args))
    return done[-1]
feature_jobs.encode_chunk = killed_after_two
features.cache_features(json.load(open(sys.argv[1])), sys.argv[2], encoder=tiny_encoder(), batch_size=32,
                        progress=False)
"""


def subprocess_environment():
    return dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")


@pytest.mark.slow
def test_a_killed_run_of_300_photos_keeps_its_finished_chunks(tiny, tmp_path):
    photos = write_photos(tmp_path / "images", 300)
    listing = tmp_path / "images.json"
    listing.write_text(json.dumps(photos))
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, listing, tmp_path / "resumed", Path(__file__).parent],
                            capture_output=True, text=True, timeout=600, env=subprocess_environment())
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = tmp_path / "resumed" / "partial"
    assert sorted(path.name for path in partial.glob("chunk-*")) == ["chunk-000000.npz", "chunk-000001.npz"]

    report = cache_features(photos, tmp_path / "resumed", encoder=tiny, batch_size=32, progress=False)
    assert report.computed == 300 - 2 * 128  # two chunks of four batches of 32 were kept
    whole = cache_features(photos, tmp_path / "whole", encoder=tiny, batch_size=32, progress=False)
    assert whole.computed == 300
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")


FULL_DISK_RUN = """
import json, resource, signal, sys
sys.path.insert(0, sys.argv[3])
from captioning.features import cache_features
from test_faults_cache import tiny_encoder
encoder = tiny_encoder(channels=4096)
if len(sys.argv) > 4:  # a file-size limit instead of a small disk: writes past it fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), resource.RLIM_INFINITY))
try:
    cache_features(json.load(open(sys.argv[1])), sys.argv[2], encoder=encoder, batch_size=8, progress=False)
except OSError as error:
    print(json.dumps({"errno": error.errno, "filename": error.filename, "message": str(error)}))
    sys.exit(3)
"""


def fill_then_resume(photos, tmp_path, out_dir, *limit):
    """Cache 64 photos of 8 kB of features each: the two chunk files (256 kB each) fit, features.npy
    (512 kB) does not. The run must fail with an OSError naming features.npy and leave no
    final file behind; a rerun with room resumes from the chunks."""
    listing = tmp_path / "images.json"
    listing.write_text(json.dumps(photos))
    result = subprocess.run([sys.executable, "-c", FULL_DISK_RUN, listing, out_dir, Path(__file__).parent,
                             *map(str, limit)], capture_output=True, text=True, timeout=600,
                            env=subprocess_environment())
    assert result.returncode == 3, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    error = json.loads(result.stdout.splitlines()[-1])
    assert error["filename"] == str(out_dir / "features.npy") and "features.npy" in error["message"]
    left = sorted(str(path.relative_to(out_dir)) for path in out_dir.rglob("*"))
    assert left == [".lock", "partial", "partial/chunk-000000.npz", "partial/chunk-000001.npz",
                    "partial/job.json", "partial/sources.json"]
    return error


@pytest.mark.slow
def test_a_full_disk_while_writing_the_features_is_an_error_naming_the_file(tmp_path):
    photos = write_photos(tmp_path / "images", 64)
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=768k", "tmpfs", disk], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN): {error}")
    try:
        error = fill_then_resume(photos, tmp_path, disk / "cache")
        assert error["errno"] == errno.ENOSPC
        subprocess.run(["mount", "-o", "remount,size=4m", disk], check=True)
        report = cache_features(photos, disk / "cache", encoder=tiny_encoder(channels=4096), batch_size=8,
                                progress=False)
        assert (report.computed, report.cached) == (0, 64)
        assert FeatureStore.open(disk / "cache").get_many(sorted(photos)).shape == (64, 4096)
    finally:
        subprocess.run(["umount", disk], check=False)


@pytest.mark.slow
def test_a_file_size_limit_while_writing_the_features_is_an_error_naming_the_file(tmp_path):
    photos = write_photos(tmp_path / "images", 64)
    error = fill_then_resume(photos, tmp_path, tmp_path / "cache", 400_000)
    assert error["errno"] == errno.EFBIG
    report = cache_features(photos, tmp_path / "cache", encoder=tiny_encoder(channels=4096), batch_size=8,
                            progress=False)
    assert (report.computed, report.cached) == (0, 64)
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # this process was never limited


def test_photos_the_encoder_cannot_tell_apart_ring_the_same_caption_alarm(tiny, tmp_path):
    # Distinct photos give features that differ...
    distinct = cache_features(write_photos(tmp_path / "distinct", 8), tmp_path / "a", encoder=tiny, batch_size=4,
                              progress=False)
    assert distinct.spread > 0.1 and distinct.warning() is None and "warning" not in distinct.summary()
    # ...one photo under eight names (or random encoder weights) gives features that do not.
    one = write_photo(tmp_path / "one.jpg", 0)
    same = cache_features({f"{i}": str(one) for i in range(8)}, tmp_path / "b", encoder=tiny, batch_size=4,
                          progress=False)
    assert same.spread < 0.01 and "almost the same" in same.warning() and "same caption" in same.summary()
    # Said again when a finished cache is reused.
    assert cache_features({f"{i}": str(one) for i in range(8)}, tmp_path / "b", encoder=tiny, batch_size=4,
                          progress=False).warning() == same.warning()
