"""Caching CNN features once, resumably: the job that fills a feature store.

Taught in notebook 02 (02_feature_caching.ipynb). Encoding 120,000 COCO
photos takes hours on a CPU, so we do it once and never lose the work:

* Image ids are sorted and cut into fixed-size chunks. Each chunk is encoded
  in the same batches every time and written to `partial/chunk-NNNNNN.npz`
  through a temporary file and a rename: a chunk file is complete or absent.
  A job killed at any moment (even SIGKILL) and run again skips the finished
  chunks and recomputes the others exactly as an uninterrupted run would.
  Why so strict? A CNN's float results depend slightly on the batch they were
  computed in (other kernels for other batch sizes), so "the same features"
  are only bit-identical if the whole batch is the same.
* The batch and chunk sizes of an unfinished job are kept in
  `partial/job.json`; a resumed run uses them whatever it is asked, so that
  it ends with the very bytes an uninterrupted run would have written.
* When every chunk exists they are copied into one float16 array, and the
  manifest is written last (feature_store.py): the store is then complete.
* A finished store made with other settings (encoder, weights, size, pooling)
  is refused with a clear error, never reused or overwritten: delete it or
  pick another folder. A finished store of the same settings but other images
  is rebuilt for the new images: a cache holds exactly what it was last asked.
* Scale-out: `shard=(i, n)` encodes chunks i, i+n, i+2n, ... into its own
  folder; `merge_shards` assembles the chunks of all n folders into a store
  byte-identical to an unsharded run.

Bad images are skipped, and each is named with its reason in the report and
in the manifest. A rerun does not retry them (they are part of the chunks).
"""

import contextlib
import hashlib
import shutil
import time
from pathlib import Path

import numpy as np

from captioning.feature_store import (DTYPE, FORMAT_VERSION, SETTINGS, CacheReport, FeatureStore,  # noqa: F401
                                      as_tuples, check_settings, read_chunks, write_store)
from captioning.fileio import atomic_path, read_json, write_json_atomic


def _image_table(images):
    """A DataFrame (image_id, image_path; one row per caption is fine) or a dict -> sorted [(id, path)]."""
    if isinstance(images, dict):
        pairs = images.items()
    else:
        for column in ("image_id", "image_path"):
            if column not in images:
                raise ValueError(f"images table has no {column!r} column (columns: {list(images.columns)})")
        pairs = zip(images["image_id"], images["image_path"])
    table = {}
    for image_id, path in pairs:
        image_id, path = str(image_id), str(path)
        if table.setdefault(image_id, path) != path:
            raise ValueError(f"image id {image_id!r} has two paths: {table[image_id]} and {path}")
    if not table:
        raise ValueError("no images to cache")
    return sorted(table.items())


def _make_job(settings, entries, batch_size, chunk_size):
    """Everything that determines the bytes of the finished store."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if chunk_size is None:
        # About 32 MB of float16 per chunk: 1024 pooled vectors, fewer grids.
        bytes_per_image = 2 * int(np.prod(settings["feature_shape"]))
        chunk_size = max(batch_size, min(1024, (32 << 20) // bytes_per_image))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
    listing = "\n".join(f"{image_id}\t{path}" for image_id, path in entries).encode()
    return {"format": FORMAT_VERSION, **settings, "dtype": DTYPE, "images": len(entries),
            "images_sha256": hashlib.sha256(listing).hexdigest(), "batch_size": batch_size, "chunk_size": chunk_size}


def _same_work(a, b):
    """Same images and settings (batch and chunk size aside)."""
    return all(a.get(key) == b.get(key) for key in ("format", *SETTINGS, "images", "images_sha256"))


@contextlib.contextmanager
def _lock(out_dir):
    """Two processes writing one cache would interleave chunks; refuse the second."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, trust the user
        yield
        return
    with open(out_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another process is caching features into {out_dir}") from None
        yield


def _remove_temporary_files(out_dir):
    """A killed job can leave the temporary file of an atomic write behind (never a final file)."""
    for folder in (out_dir, out_dir / "partial"):
        for temp in folder.glob(".*.tmp"):
            temp.unlink(missing_ok=True)


def _chunk_path(folder, number):
    return Path(folder) / "partial" / f"chunk-{number:06d}.npz"


def _encode_chunk(encoder, entries, job, chunk_file, progress_bar):
    """Encode one chunk and write it atomically; return how many images it encoded."""
    from captioning import images as image_io

    features = np.zeros((len(entries), *job["feature_shape"]), dtype=DTYPE)
    ok = np.zeros(len(entries), dtype=bool)
    failures = []
    for indices, batch in image_io.iterate_batches([path for _, path in entries], encoder.image_size,
                                                   encoder.preprocess, job["batch_size"], failures):
        values = encoder.encode(batch).astype(DTYPE)
        if not np.isfinite(values).all():
            raise ValueError(f"the encoder produced values too large for {DTYPE} in {chunk_file.name}")
        features[indices], ok[indices] = values, True
        progress_bar.update(len(indices))
    progress_bar.update(len(failures))
    skipped = [[*entries[index], reason] for index, reason in sorted(failures)]
    with atomic_path(chunk_file) as temp, open(temp, "wb") as handle:
        np.savez(handle, ids=np.array([entries[i][0] for i in np.flatnonzero(ok)], dtype=str),
                 features=features[ok], skipped=np.array(skipped, dtype=str).reshape(-1, 3))
    return int(ok.sum())


def _finished(out_dir, job, shard):
    """The report of a finished store (or shard) of this very work; None if there is work to do."""
    marker = out_dir / ("manifest.json" if shard is None else "shard.json")
    if not marker.is_file():
        return None
    found = read_json(marker, "feature cache manifest")
    check_settings(found, job, out_dir)
    if not _same_work(found, job) or found.get("shard") != shard:
        marker.unlink()  # same settings, other images: build again for these
        return None
    if shard is None:
        shutil.rmtree(out_dir / "partial", ignore_errors=True)  # left over if killed right after the commit
    return CacheReport(out_dir, found["count"], as_tuples(found["skipped"]))


def _resume(out_dir, job):
    """The unfinished job of the same work if there is one (with its batch/chunk sizes), else a fresh one."""
    job_file = out_dir / "partial" / "job.json"
    if job_file.is_file():
        previous = read_json(job_file, "unfinished feature job")
        if _same_work(previous, job):
            if (previous["batch_size"], previous["chunk_size"]) != (job["batch_size"], job["chunk_size"]):
                print(f"resuming with the unfinished job's batch size {previous['batch_size']} and chunk size "
                      f"{previous['chunk_size']}, so that the result is identical to an uninterrupted run")
            return previous
        print(f"discarding unfinished chunks in {job_file.parent}: they were made for other images or settings")
    shutil.rmtree(out_dir / "partial", ignore_errors=True)
    write_json_atomic(job_file, job)
    return job


def _encoder_settings(encoder, weights, pooling, mirror):
    """(settings, built encoder or None). Building is skipped when a name and weights identify it."""
    from captioning import encoders

    if isinstance(encoder, encoders.Encoder):
        return encoder.settings(), encoder
    settings = encoders.encoder_settings(encoder, weights, pooling, mirror)
    if settings is not None:
        return settings, None
    built = encoders.build_encoder(encoder, weights, pooling, mirror)  # random weights: only values identify them
    return built.settings(), built


def cache_features(images, out_dir, *, encoder="inception_v3", weights="imagenet", pooling="avg", mirror=True,
                   batch_size=32, shard=None, progress=True, chunk_size=None):
    """Encode every image once into the store at `out_dir`, resuming whatever is already there.

    `images`: a DataFrame with image_id/image_path columns or a dict id -> path.
    `encoder`: a name (built with `weights`, `pooling` and `mirror`) or an Encoder already built.
    `shard=(i, n)`: only this machine's share, to be combined with merge_shards.
    Returns a CacheReport; read the store with FeatureStore.open(out_dir). Taught in notebook 02.
    """
    from tqdm.auto import tqdm

    from captioning import encoders

    entries = _image_table(images)
    if shard is not None:
        shard = [int(shard[0]), int(shard[1])]
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (i, n) with 0 <= i < n, not {tuple(shard)}")
    settings, built = _encoder_settings(encoder, weights, pooling, mirror)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _lock(out_dir):
        _remove_temporary_files(out_dir)
        job = _make_job(settings, entries, batch_size, chunk_size)
        report = _finished(out_dir, job, shard)
        if report is not None:
            return report
        job = _resume(out_dir, job)
        size = job["chunk_size"]
        chunks = {number: entries[start:start + size] for number, start in enumerate(range(0, len(entries), size))
                  if shard is None or number % shard[1] == shard[0]}
        todo = [number for number in chunks if not _chunk_path(out_dir, number).is_file()]
        total = sum(len(chunk) for chunk in chunks.values())
        left = sum(len(chunks[number]) for number in todo)
        start, computed = time.perf_counter(), 0
        if todo:
            built = built or encoders.build_encoder(encoder, weights, pooling, mirror)
            with tqdm(total=total, initial=total - left, unit="img", disable=not progress, smoothing=0.1) as bar:
                for number in todo:
                    computed += _encode_chunk(built, chunks[number], job, _chunk_path(out_dir, number), bar)
        seconds = time.perf_counter() - start
        chunk_files = [_chunk_path(out_dir, number) for number in chunks]
        if shard is None:
            report = write_store(chunk_files, job, out_dir)
        else:
            ids, skipped = read_chunks(chunk_files)
            write_json_atomic(out_dir / "shard.json", {**job, "shard": shard, "count": len(ids), "skipped": skipped})
            report = CacheReport(out_dir, len(ids), as_tuples(skipped))
    report.computed, report.seconds = computed, seconds
    return report


def merge_shards(shard_dirs, out_dir):
    """Combine the folders of `cache_features(..., shard=(i, n))`, one per i, into one store at
    `out_dir`, byte-identical to an unsharded run. The shard folders are left as they are.
    Taught in notebook 02."""
    shards = [(Path(folder), read_json(Path(folder) / "shard.json", "finished shard marker"))
              for folder in shard_dirs]
    if not shards:
        raise ValueError("merge_shards needs at least one shard folder")
    first = shards[0][1]
    for folder, marker in shards:
        if not _same_work(marker, first) or (marker["batch_size"], marker["chunk_size"]) != \
                (first["batch_size"], first["chunk_size"]):
            raise ValueError(f"{folder}: this shard was made with other images or settings than {shards[0][0]}")
    count = first["shard"][1]
    found = sorted(marker["shard"][0] for _, marker in shards)
    if found != list(range(count)):
        raise ValueError(f"need shards 0..{count - 1} of {count} exactly once, got {found}")
    out_dir = Path(out_dir)
    if any(out_dir.resolve() == folder.resolve() for folder, _ in shards):
        raise ValueError(f"merge into a new folder, not into the shard folder {out_dir}")
    owner = {marker["shard"][0]: folder for folder, marker in shards}
    job = {key: value for key, value in first.items() if key not in ("shard", "count", "skipped")}
    chunk_files = [_chunk_path(owner[number % count], number)
                   for number in range((job["images"] + job["chunk_size"] - 1) // job["chunk_size"])]
    out_dir.mkdir(parents=True, exist_ok=True)
    with _lock(out_dir):
        if (out_dir / "manifest.json").is_file():
            check_settings(read_json(out_dir / "manifest.json", "feature cache manifest"), job, out_dir)
        return write_store(chunk_files, job, out_dir)
