"""Caching CNN features once, resumably: the job that fills a feature store.

Taught in notebook 02 (02_feature_caching.ipynb). Encoding 120,000 COCO
photos takes hours on a CPU, so we do it once and never lose the work:

* A cache is keyed on content. For every image it records the file's path,
  size, mtime, ctime and sha256 (sources.json). A run stats every image,
  hashes again only those whose path, size or times moved, and encodes only
  the photos whose content changed or that are new; the rows of the others
  are copied from the store as it was. Images no longer asked for are
  dropped: a cache holds exactly what it was last asked. A photo replaced at
  the same path is never served with its old features, and the run says so
  in one line. The ctime is what notices a replacement that kept the size and
  the mtime (`cp -p`, `rsync -t`): no program can set it. The trade: reading
  every photo on every run would cost as much as a minute per 10,000 photos,
  so a file system whose ctime does not move on a write (Windows reports the
  creation time; some network and FAT drives keep none) is trusted on size and
  mtime alone. There, `cache_features(..., rehash=True)` (`features --rehash`)
  reads every photo once to check its content.
* The images to encode are sorted by id and cut into chunks of a few batches
  (128 photos at batch 32). Each chunk is encoded in the same batches every
  time and written to `partial/chunk-NNNNNN.npz` through a temporary file and
  a rename: a chunk file is complete or absent. A job killed at any moment
  (even SIGKILL) and run again skips the finished chunks and recomputes the
  others exactly as an uninterrupted run would, losing at most one chunk.
  Why so strict? A CNN's float results depend slightly on the batch they were
  computed in (other kernels for other batch sizes), so "the same features"
  are only bit-identical if the whole batch is the same.
* The batch and chunk sizes of an unfinished job are kept in
  `partial/job.json`; a resumed run uses them whatever it is asked, so that
  it ends with the very bytes an uninterrupted run would have written. While
  a store is being updated its previous files wait in `partial/base/`.
* When every chunk exists they are copied, with the rows kept, into one
  float16 array whose space is reserved first (a full disk is an error that
  names the file, not a crash), and the manifest is written last
  (feature_store.py): the store is then complete.
* A finished store made with other settings (encoder, weights, size, pooling,
  mirroring) is refused with a clear error, never reused or overwritten:
  delete it or pick another folder.
* Scale-out: `shard=(i, n)` encodes chunks i, i+n, i+2n, ... of all the
  images into its own folder; `merge_shards` assembles the chunks of all n
  folders into a store byte-identical to an unsharded run from scratch.

Bad images are skipped, and each is named with its reason in the report and
in the manifest. A rerun retries one only if its file changed.
"""

import time
from pathlib import Path

from captioning import feature_jobs as jobs
from captioning.feature_store import (DTYPE, FORMAT_VERSION, SETTINGS, STORE_FILES, CacheReport,  # noqa: F401
                                      FeatureStore, as_tuples, check_settings, feature_spread, read_chunks,
                                      write_store)
from captioning.fileio import read_json, write_json_atomic

__all__ = ["CacheReport", "FeatureStore", "cache_features", "merge_shards"]


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


def cache_features(images, out_dir, *, encoder="inception_v3", weights="imagenet", pooling="avg", mirror=None,
                   batch_size=32, shard=None, progress=True, chunk_size=None, rehash=False):
    """Encode every image once into the store at `out_dir`, keeping whatever is already there
    for photos that did not change, and resuming an unfinished run.

    `images`: a DataFrame with image_id/image_path columns or a dict id -> path.
    `encoder`: a name (built with `weights`, `pooling` and `mirror`, None: encoders.MIRROR) or an Encoder
    already built.
    `shard=(i, n)`: only this machine's share, to be combined with merge_shards.
    `chunk_size`: images per checkpoint (default: 4 batches; keep it a multiple of batch_size).
    `rehash=True`: read every photo to check its content, not only those whose size or times moved.
    Returns a CacheReport (`computed`: how many photos this call encoded); read the store with
    FeatureStore.open(out_dir). Taught in notebook 02.
    """
    from tqdm.auto import tqdm

    from captioning import encoders

    mirror = encoders.MIRROR if mirror is None else mirror
    entries = jobs.image_table(images)
    if shard is not None:
        shard = [int(shard[0]), int(shard[1])]
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (i, n) with 0 <= i < n, not {tuple(shard)}")
    settings, built = _encoder_settings(encoder, weights, pooling, mirror)
    chunk_size = jobs.choose_chunk_size(settings, batch_size, chunk_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with jobs.lock(out_dir):
        jobs.remove_temporary_files(out_dir)
        if shard is None:
            plan = jobs.plan_update(out_dir, entries, settings, rehash)
        else:
            plan = jobs.plan_shard(out_dir, entries, settings, shard, rehash)
        if plan.report is not None:
            return _with_spread(plan.report) if shard is None else plan.report
        job = jobs.resume(out_dir, jobs.make_job(settings, entries, batch_size, chunk_size, plan.work),
                          plan.records)
        size = job["chunk_size"]
        chunks = {number: plan.todo[start:start + size] for number, start in enumerate(range(0, len(plan.todo), size))
                  if shard is None or number % shard[1] == shard[0]}
        todo = [number for number in chunks if not jobs.chunk_path(out_dir, number).is_file()]
        total = sum(len(chunk) for chunk in chunks.values())
        left = sum(len(chunks[number]) for number in todo)
        start, computed = time.perf_counter(), 0
        if todo:
            built = built or encoders.build_encoder(encoder, weights, pooling, mirror)
            with tqdm(total=total, initial=total - left, unit="img", disable=not progress, smoothing=0.1) as bar:
                for number in todo:
                    computed += jobs.encode_chunk(built, chunks[number], job, jobs.chunk_path(out_dir, number),
                                                  bar)
        seconds = time.perf_counter() - start
        chunk_files = [jobs.chunk_path(out_dir, number) for number in chunks]
        if shard is None:
            report = write_store(chunk_files, job, out_dir, plan.records, plan.reuse)
        else:
            ids, skipped = read_chunks(chunk_files)
            write_json_atomic(out_dir / "shard.json", {**job, "count": len(ids), "skipped": skipped,
                                                       "sources": plan.records})
            report = CacheReport(out_dir, len(ids), as_tuples(skipped))
    report.computed, report.seconds = computed, seconds
    return _with_spread(report) if shard is None else report


def _with_spread(report):
    """The report with the spread of the store's features: the "same caption" alarm, rung early."""
    if report.cached:
        report.spread = feature_spread(FeatureStore.open(report.out_dir).features)
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

    def same(marker):  # the same job but for the shard index
        return all(marker.get(key) == first.get(key) for key in ("format", *SETTINGS, "images", "batch_size",
                                                                  "chunk_size")) and \
            {**marker["work"], "shard": None} == {**first["work"], "shard": None}

    for folder, marker in shards:
        if not same(marker):
            raise ValueError(f"{folder}: this shard was made with other images or settings than {shards[0][0]}")
    count = first["work"]["shard"][1]
    found = sorted(marker["work"]["shard"][0] for _, marker in shards)
    if found != list(range(count)):
        raise ValueError(f"need shards 0..{count - 1} of {count} exactly once, got {found}")
    out_dir = Path(out_dir)
    if any(out_dir.resolve() == folder.resolve() for folder, _ in shards):
        raise ValueError(f"merge into a new folder, not into the shard folder {out_dir}")
    job = {key: value for key, value in first.items() if key not in ("count", "skipped", "sources")}
    chunk_files = [chunk for folder, marker in shards for chunk in jobs.shard_chunks(folder, marker)]
    chunk_files.sort(key=lambda path: path.name)  # chunk-NNNNNN: the order of an unsharded run
    _refuse_other_store(out_dir, job, first["sources"])  # before the lock file is made in a folder of the user's
    out_dir.mkdir(parents=True, exist_ok=True)
    with jobs.lock(out_dir):
        _refuse_other_store(out_dir, job, first["sources"])
        return write_store(chunk_files, job, out_dir, first["sources"])


def _refuse_other_store(out_dir, job, sources):
    """merge_shards writes only into a new or empty folder, or over the very store it would write:
    a store of other photos or settings, or a folder of something else, is the user's to delete."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file: merge into a new or empty folder")
    if (out_dir / "manifest.json").is_file():
        manifest = read_json(out_dir / "manifest.json", "feature cache manifest", kind=dict)
        same = all(manifest.get(key) == job.get(key) for key in SETTINGS) and jobs.same_photos(
            read_json(out_dir / manifest.get("sources_file", "sources.json"), "feature cache sources", kind=dict),
            sources)
        if not same:
            raise ValueError(f"{out_dir} already holds a feature store of other photos or other settings, which "
                             "merging would replace: merge into a new folder (or delete that store yourself if you "
                             "no longer need it)")
    elif any(path.name != ".lock" for path in out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty and holds no feature store: merge into a new or empty folder")
