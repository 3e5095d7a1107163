"""The machinery of one feature-caching job: what changed, the chunks, the lock, resuming.

features.py is what notebook 02 teaches (cache_features, merge_shards, and in its
docstring the ideas: a cache keyed on content, chunks written atomically, a job
that resumes to the very bytes of an uninterrupted one). This module is how
those ideas are carried out, and is plumbing: it stats and hashes the photos
against the records of the earlier store (sources.json), plans which photos to
encode and which rows to keep, encodes one chunk at a time into
`partial/chunk-NNNNNN.npz`, keeps the unfinished job's description in
`partial/job.json`, and holds the lock that keeps two processes out of one
folder. The finished store's format and its writer are in feature_store.py.
"""

import contextlib
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioning.feature_store import (DTYPE, FORMAT_VERSION, SETTINGS, STORE_FILES, CacheReport, as_tuples,
                                      check_settings, open_features)
from captioning.fileio import atomic_path, printable, read_json, sha256_of, write_json_atomic

CHUNK_BATCHES = 4  # batches per chunk: what a killed job can lose at most
CHUNK_BYTES = 32 << 20  # and at most about this much float16 per chunk (grids are big)
RACY_NS = 2_000_000_000  # mtimes this close to the moment they were recorded are not trusted


def image_table(images):
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
        # A name in bytes (any name on disk) becomes the str that os.listdir would give.
        image_id, path = str(image_id), os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
        if table.setdefault(image_id, path) != path:
            raise ValueError(f"image id {printable(image_id)!r} has two paths: {printable(table[image_id])} "
                             f"and {printable(path)}")
    if not table:
        raise ValueError("no images to cache")
    return sorted(table.items())


def _known_records(*files):
    """image id -> (record, trusted) from earlier sources files, later files first.

    A record's size and mtime vouch for its sha256 only if that mtime is
    older than the moment the record was written by RACY_NS: a file rewritten
    within the same tick of a coarse clock (1 or 2 s on some file systems)
    keeps its mtime, so a recent one is hashed again to be sure.
    """
    known = {}
    for path in files:
        if path is not None and path.is_file():
            written_ns = path.stat().st_mtime_ns
            for image_id, record in read_json(path, "feature cache sources").items():
                trusted = record.get("mtime_ns") is not None and record["mtime_ns"] < written_ns - RACY_NS
                known.setdefault(image_id, (record, trusted))
    return known


def _fingerprints(entries, known, rehash=False):
    """(image id -> {path, size, mtime_ns, ctime_ns, sha256} or {path, error} for a file that
    cannot be read, how many files were hashed).

    Stats every file, hashes only those whose path, size, mtime or ctime moved
    since `known` recorded them (all of them with rehash=True). The ctime is
    what catches `cp -p` or `rsync -t` over a photo: they copy the size and the
    mtime, but no program can set a file's ctime, which the system moves to
    "now" whenever the file's bytes or metadata change. Never opens anything
    but a regular file.
    """
    from captioning import images as image_io

    records, hashed = {}, 0
    for image_id, path in entries:
        info, reason = image_io.stat_photo(path)
        if reason:
            records[image_id] = {"path": path, "error": reason}
            continue
        record = {"path": path, "size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}
        old, trusted = known.get(image_id, ({}, False))
        if trusted and not rehash and "sha256" in old and all(old.get(key) == value for key, value in record.items()):
            records[image_id] = {**record, "sha256": old["sha256"]}
            continue
        hashed += 1
        try:
            records[image_id] = {**record, "sha256": sha256_of(path)}
        except OSError as error:
            records[image_id] = {"path": path, "error": f"cannot read: {error.strerror}"}
    return records, hashed


def _content(record):
    """What a record says about the file's content: its hash, or why it has none."""
    return record.get("sha256") or record.get("error")


def _digest(lines):
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogatepass")).hexdigest()


def choose_chunk_size(settings, batch_size, chunk_size):
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if chunk_size is None:
        # A few whole batches: a multiple of the batch size keeps every batch of a chunk full.
        bytes_per_batch = 2 * int(np.prod(settings["feature_shape"])) * batch_size
        return batch_size * max(1, min(CHUNK_BATCHES, CHUNK_BYTES // bytes_per_batch))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
    return chunk_size


def make_job(settings, entries, batch_size, chunk_size, work):
    """Everything that determines the bytes of the finished store. `work` says what
    this run encodes (and from which earlier store it copies the rest)."""
    return {"format": FORMAT_VERSION, **settings, "dtype": DTYPE, "images": len(entries),
            "batch_size": batch_size, "chunk_size": chunk_size, "work": work}


def _same_work(a, b):
    """Same images and settings (batch and chunk size aside)."""
    return all(a.get(key) == b.get(key) for key in ("format", *SETTINGS, "images", "work"))


@contextlib.contextmanager
def lock(out_dir):
    """Two processes writing one cache would interleave chunks, so the second waits for the first.
    Then it finds the work done and only checks it. The workers of a cluster that share one work
    folder all get there at the same moment, and refusing the second failed the whole cluster."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, trust the user
        yield
        return
    with open(out_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another process is caching features into {out_dir}: waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def remove_temporary_files(out_dir):
    """A killed job can leave the temporary file of an atomic write behind (never a final file)."""
    for folder in (out_dir, out_dir / "partial"):
        for temp in folder.glob(".*.tmp"):
            temp.unlink(missing_ok=True)


def chunk_path(folder, number):
    return Path(folder) / "partial" / f"chunk-{number:06d}.npz"


def encode_chunk(encoder, entries, job, chunk_file, progress_bar):
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


@dataclass
class Plan:
    """What a run has to do: encode `todo`, copy `reuse` from an earlier store, or nothing (`report`)."""

    records: dict  # sources.json of the finished store
    todo: list = None  # [(id, path)] to encode, sorted
    work: dict = None  # the job's "work": identifies todo and the earlier store
    reuse: tuple = None  # (store folder, ids whose rows to keep, skipped entries to keep)
    report: CacheReport = None  # the store is finished and up to date


def _plural(count, word):
    return f"{count} {word}{'' if count == 1 else 's'}"


def _stash(out_dir):
    """Move a finished store's files into partial/base (the manifest first, so that the folder
    reads as unfinished at once), where they wait until the updated store is committed.
    Run again after a kill it moves what is left; it never moves a file over one already there."""
    base = out_dir / "partial" / "base"
    base.mkdir(parents=True, exist_ok=True)
    for name in STORE_FILES:
        if (out_dir / name).exists() and not (base / name).exists():
            os.replace(out_dir / name, base / name)
    return base


def plan_update(out_dir, entries, settings, rehash=False):
    """Compare the images asked for with the store in `out_dir` (or the one an unfinished
    update of it put aside): which rows can be kept, which photos must be encoded."""
    base_dir = None
    if (out_dir / "manifest.json").is_file():
        base_dir = out_dir
    elif (out_dir / "partial" / "base" / "manifest.json").is_file():
        base_dir = _stash(out_dir)  # an update is under way (and its stash may have been cut short)
    base, base_ids, base_sources = None, [], {}
    if base_dir is not None:
        try:
            base = read_json(base_dir / "manifest.json", "feature cache manifest", kind=dict)
        except ValueError:  # cut short or overwritten, like the files it vouches for below
            base = {}
        problem = "is damaged (its manifest.json is unreadable)"
        if base:
            check_settings(base, settings, out_dir)
            problem = "was made by an older version that did not record the photos' content"
        if base.get("format") == FORMAT_VERSION:
            try:  # a store cut short (a full disk, a copy stopped half-way) is rebuilt, not read
                base_ids = read_json(base_dir / base["ids_file"], "feature cache index", kind=list)
                base_sources = read_json(base_dir / base["sources_file"], "feature cache sources", kind=dict)
                open_features(base_dir / base["features_file"], (len(base_ids), *base["feature_shape"]))
                problem = None
            except (ValueError, FileNotFoundError):
                problem = "is damaged (one of its files is missing, cut short or unreadable)"
        if problem:
            print(f"feature cache {printable(out_dir)} {problem}: encoding all {len(entries)} again")
            (base_dir / "manifest.json").unlink()  # it is rebuilt from scratch, so it must not be read meanwhile
            base = base_dir = None
            base_ids, base_sources = [], {}
    sources_file = base_dir / base["sources_file"] if base else None
    known = _known_records(out_dir / "partial" / "sources.json", sources_file)
    records, hashed = _fingerprints(entries, known, rehash)

    kept_rows, kept_skipped, todo, changed = [], [], [], []
    rows = set(base_ids)
    skipped = {entry["image_id"]: entry for entry in base["skipped"]} if base else {}
    for image_id, path in entries:
        old = base_sources.get(image_id)
        if old is not None and _content(old) == _content(records[image_id]):
            if image_id in rows:
                kept_rows.append(image_id)
                continue
            if image_id in skipped:
                kept_skipped.append({**skipped[image_id], "path": path})
                continue
        todo.append((image_id, path))
        if old is not None:
            changed.append(path)
    dropped = len(base_sources.keys() - dict(entries).keys())

    if base_dir == out_dir and not todo and not dropped:  # up to date
        shutil.rmtree(out_dir / "partial", ignore_errors=True)  # left over if killed right after a commit
        if records != base_sources or hashed:
            write_json_atomic(sources_file, records)  # new mtimes, moved files: no need to hash them again
        if kept_skipped != base["skipped"]:
            write_json_atomic(out_dir / "manifest.json", {**base, "skipped": kept_skipped})
        return Plan(records, report=CacheReport(out_dir, len(base_ids), as_tuples(kept_skipped)))
    if base is not None:
        news = len(todo) - len(changed)
        parts = [f"{_plural(len(changed), 'photo')} changed since they were cached (e.g. {printable(changed[0])})"
                 ] if changed else []
        parts += [f"{news} new"] if news else []
        parts += [f"{dropped} no longer asked for"] if dropped else []
        if parts:
            print(f"feature cache {printable(out_dir)}: {', '.join(parts)}: encoding {len(todo)}, "
                  f"keeping {len(kept_rows) + len(kept_skipped)}")
    if base_dir == out_dir:
        shutil.rmtree(out_dir / "partial", ignore_errors=True)
        base_dir = _stash(out_dir)
    lines = [f"{image_id}\t{path}\t{_content(records[image_id])}" for image_id, path in todo]
    work = {"encode": len(todo), "sha256": _digest(lines), "base": _base_id(base_dir) if base else None}
    reuse = (base_dir, kept_rows, kept_skipped) if base else None
    return Plan(records, todo, work, reuse)


def _base_id(base_dir):
    with open(base_dir / "manifest.json", "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def plan_shard(out_dir, entries, settings, shard, rehash=False):
    """A shard encodes its share of all the images, from scratch (no earlier store is reused)."""
    marker, sources_file = out_dir / "shard.json", out_dir / "partial" / "sources.json"
    records, hashed = _fingerprints(entries, _known_records(sources_file), rehash)
    lines = [f"{image_id}\t{path}\t{_content(records[image_id])}" for image_id, path in entries]
    work = {"encode": len(entries), "sha256": _digest(lines), "base": None, "shard": shard}
    if marker.is_file():
        found = read_json(marker, "finished shard marker")
        check_settings(found, settings, out_dir)
        missing = [path for path in shard_chunks(out_dir, found) if not path.is_file()]
        if missing and found.get("work") == work:
            # A chunk deleted because it was damaged (feature_store.read_chunks says to): encode it again.
            print(f"shard {printable(out_dir)}: {_plural(len(missing), 'chunk file')} missing "
                  f"(e.g. {missing[0].name}): encoding {'it' if len(missing) == 1 else 'them'} again")
        elif found.get("format") == FORMAT_VERSION and found.get("work") == work:
            if records != found["sources"]:
                write_json_atomic(marker, {**found, "sources": records})
            if hashed:
                write_json_atomic(sources_file, records)  # no need to hash them again
            return Plan(records, report=CacheReport(out_dir, found["count"], as_tuples(found["skipped"])))
        marker.unlink()  # same settings, other images (or a chunk lost): build again for these
    return Plan(records, entries, work)


def shard_chunks(folder, job):
    """The chunk files of the shard `folder`, whose finished job (shard.json) is `job`."""
    index, count = job["work"]["shard"]
    numbers = range((job["work"]["encode"] + job["chunk_size"] - 1) // job["chunk_size"])
    return [chunk_path(folder, number) for number in numbers if number % count == index]


def same_photos(a, b):
    """Two sources.json say the same photos: the same ids, paths and contents (their times aside)."""
    def photos(sources):
        return {image_id: (record.get("path"), _content(record)) for image_id, record in sources.items()}
    return photos(a) == photos(b)


def resume(out_dir, job, records):
    """The unfinished job of the same work if there is one (with its batch/chunk sizes), else a fresh one."""
    partial = out_dir / "partial"
    job_file = partial / "job.json"
    if job_file.is_file():
        previous = read_json(job_file, "unfinished feature job")
        if _same_work(previous, job):
            if (previous["batch_size"], previous["chunk_size"]) != (job["batch_size"], job["chunk_size"]):
                print(f"resuming with the unfinished job's batch size {previous['batch_size']} and chunk size "
                      f"{previous['chunk_size']}, so that the result is identical to an uninterrupted run")
            return previous
        print(f"discarding unfinished chunks in {printable(partial)}: they were made for other images or settings")
    for path in partial.glob("*"):
        if path.name != "base":  # the store being updated stays
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_json_atomic(partial / "sources.json", records)  # so that a resumed run need not hash again
    write_json_atomic(job_file, job)
    return job
