"""The on-disk format of a finished feature cache, and its reader.

Taught in notebooks 02 and 03. A finished cache folder holds

    features.npy    one float16 array (images, *feature_shape), rows in sorted id order
    ids.json        the image id of each row
    sources.json    image id -> the file it was read from: {path, size, mtime_ns, sha256}
                    (sha256 of the file's bytes), or {path, error} for one that could not be
                    read; every image asked for is there, skipped ones too
    manifest.json   what made the features (encoder, weights_id, image_size, pooling,
                    dtype, feature_shape), how many, and which images were skipped and why

manifest.json is written last, after the others are complete: its presence
is what "this cache is finished" means. `FeatureStore` reads the array as a
memory map: opening is instant, and the pages that training touches stay in
the OS's cache. The job that fills the folder lives in features.py; it uses
sources.json to encode again only the photos whose content changed.
"""

import contextlib
import errno
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captioning.fileio import atomic_path, printable, read_json, write_json_atomic

FORMAT_VERSION = 2  # 2: sources.json (version 1 stores are read, and rebuilt when updated)
DTYPE = "float16"  # half the disk and RAM of float32; far more precise than a captioner needs
SETTINGS = ("encoder", "weights_id", "image_size", "pooling", "mirror", "dtype", "feature_shape")
STORE_FILES = ("manifest.json", "features.npy", "ids.json", "sources.json")  # the commit marker first


@dataclass
class CacheReport:
    """What cache_features (or merge_shards) did; `summary()` is what the `features` command prints."""

    out_dir: Path
    cached: int  # images with features in the store (or in this shard)
    skipped: list = field(default_factory=list)  # (image_id, path, reason)
    computed: int = 0  # images encoded by this call (0 when everything was cached already)
    seconds: float = 0.0
    spread: float = None  # how much the photos' features differ (feature_spread)

    @property
    def images_per_second(self):
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def warning(self):
        """None, or the alarm for features so alike that every photo will get the same caption."""
        if self.spread is None or self.spread >= SPREAD_ALARM or self.cached < 2:
            return None
        return (f"the features of the {self.cached} photos are almost the same (spread {self.spread:.3f}; about 1 "
                "is usual): every photo will get the same caption. Check the encoder's weights (WEIGHTS=none is "
                "random) and that the photos differ")

    def summary(self):
        lines = [f"cached {self.cached} images in {printable(self.out_dir)} "
                 f"({self.computed} encoded now in {self.seconds:.1f} s, {self.images_per_second:.1f} images/s)"
                 + (f"; feature spread {self.spread:.2f}" if self.spread is not None else "")]
        lines.append(f"skipped {len(self.skipped)} images" + (":" if self.skipped else ""))
        lines += [f"  {printable(image_id)} ({printable(path)}): {printable(reason)}"
                  for image_id, path, reason in self.skipped]
        if self.warning():
            lines.append(f"warning: {self.warning()}")
        return "\n".join(lines)


SPREAD_ALARM = 0.05  # below this the photos' features are almost the same


def feature_spread(features, sample=2000):
    """How much photos' features differ (notebook 02): the mean over the feature's numbers of
    their standard deviation across photos, relative to the numbers' mean size. About 1 for an
    ImageNet CNN on real photos; near 0 when every photo gives the same vector (random encoder
    weights, the wrong preprocessing, one photo copied), and then a captioner cannot tell the
    photos apart and writes the same caption for all."""
    rows = np.asarray(features[np.linspace(0, len(features) - 1, min(sample, len(features))).astype(int)],
                      dtype=np.float32).reshape(min(sample, len(features)), -1)
    size = float(np.abs(rows).mean())
    return float(rows.std(axis=0).mean() / size) if size > 0 else 0.0


class FeatureStore:
    """Read side of a finished cache: `store.get(id)`, `store.get_many(ids)`.

    Features stay on disk, memory-mapped: opening is instant and the OS keeps
    the pages that training touches in RAM. Taught in notebooks 02 and 03.
    """

    def __init__(self, out_dir, manifest, ids, features):
        self.out_dir, self.manifest, self.ids, self._features = Path(out_dir), manifest, ids, features
        self._row = {image_id: row for row, image_id in enumerate(ids)}

    @classmethod
    def open(cls, out_dir, expect=None):
        """Open a complete store; `expect` (e.g. an Encoder's settings()) must match its manifest."""
        out_dir = Path(out_dir)
        if not (out_dir / "manifest.json").is_file():
            state = "unfinished (run the caching again to resume it)" if out_dir.is_dir() else "absent"
            raise FileNotFoundError(f"no complete feature cache in {out_dir}: it is {state}")
        try:
            manifest = read_json(out_dir / "manifest.json", "feature cache manifest", kind=dict)
        except ValueError as error:  # cut short or overwritten: say what to do, not only what is wrong
            raise ValueError(f"{error}: {DAMAGED_STORE}") from None
        if expect:
            check_settings(manifest, expect, out_dir)
        ids = read_json(out_dir / manifest["ids_file"], "feature cache index")
        features = open_features(out_dir / manifest["features_file"], (len(ids), *manifest["feature_shape"]))
        if len(ids) != manifest["count"]:
            raise ValueError(f"{out_dir}: ids.json does not match manifest.json: {DAMAGED_STORE}")
        return cls(out_dir, manifest, ids, features)

    def __len__(self):
        return len(self.ids)

    def __contains__(self, image_id):
        return image_id in self._row

    @property
    def feature_shape(self):
        return tuple(self.manifest["feature_shape"])

    @property
    def features(self):
        """The whole (images, *feature_shape) float16 array, memory-mapped: nothing is read until indexed."""
        return self._features

    @property
    def skipped(self):
        """(image_id, path, reason) of every image the cache could not read."""
        return as_tuples(self.manifest["skipped"])

    def _rows(self, ids):
        missing = [image_id for image_id in ids if image_id not in self._row]
        if missing:
            raise KeyError(f"{len(missing)} image ids not in the feature cache {self.out_dir}, e.g. {missing[:3]}")
        return [self._row[image_id] for image_id in ids]

    def rows(self, ids):
        """The row of each id in `features` (int64), e.g. one per caption for make_dataset."""
        return np.array(self._rows(list(ids)), dtype=np.int64)

    def get(self, image_id):
        return np.asarray(self._features[self._rows([image_id])[0]], dtype=np.float32)

    def get_many(self, ids):
        return read_rows(self._features, self.rows(ids))


def read_rows(features, rows):
    """features[rows] as float32. Rows are read in file order, much faster on a memory map
    than in the asked order, which is then restored."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    result = np.empty((len(rows), *features.shape[1:]), dtype=np.float32)
    result[order] = features[rows[order]]
    return result


def check_settings(found, wanted, where):
    """Refuse features made by another encoder, other weights, size, pooling, mirroring or dtype."""
    different = [f"{key}: cached {found.get(key)!r}, asked {wanted[key]!r}"
                 for key in SETTINGS if key in wanted and found.get(key) != wanted[key]]
    if different:
        raise ValueError(
            f"stale feature cache in {where}: it was made with other settings ({'; '.join(different)}). "
            "Delete that folder or choose another output folder."
        )


def as_tuples(skipped):
    """Manifest entries {image_id, path, reason} -> (image_id, path, reason) tuples."""
    return [(entry["image_id"], entry["path"], entry["reason"]) for entry in skipped]


# What to do about a damaged store: the features command (train and evaluate run it too)
# rebuilds a store whose files do not hold together, encoding its photos again.
DAMAGED_STORE = ("the feature cache is damaged (cut short or overwritten): run the same command again, which "
                 "encodes its photos again, or delete the folder")


def open_features(path, shape):
    """features.npy as a read-only memory map, checked against the `shape` the manifest promises.
    A file cut short (a full disk, a copy stopped half-way) is a ValueError naming it."""
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {DAMAGED_STORE}") from None
    except (ValueError, EOFError) as error:
        raise ValueError(f"{path}: {DAMAGED_STORE} ({error})") from None
    if features.shape != tuple(shape):
        raise ValueError(f"{path} holds {features.shape[0]} rows of {features.shape[1:]}, the manifest says "
                         f"{shape[0]} of {tuple(shape[1:])}: {DAMAGED_STORE}")
    return features


@contextlib.contextmanager
def open_chunk(chunk):
    """A chunk file's arrays. A chunk is written atomically, so a damaged one was cut or changed
    afterwards (a copy between machines stopped half-way): a ValueError names it and says what to do."""
    what = ("delete it and run the `features` command that made it again (it encodes only the missing chunks), "
            "then this one")
    try:
        with np.load(chunk, allow_pickle=False) as data:
            yield data
    except FileNotFoundError:
        raise FileNotFoundError(f"{chunk} is missing: run the `features` command that made it again (it encodes "
                                "only the missing chunks), then this one") from None
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise  # a disk that cannot be read, not a damaged file
        raise ValueError(f"{chunk}: this chunk of features is damaged ({type(error).__name__}: {error}): "
                         f"{what}") from None


def read_chunks(chunk_files):
    """Ids and skipped entries of chunk files (written by features.py), in order; features stay on disk."""
    ids, skipped = [], []
    for chunk in chunk_files:
        with open_chunk(chunk) as data:
            ids += data["ids"].tolist()
            skipped += [dict(zip(("image_id", "path", "reason"), row)) for row in data["skipped"].tolist()]
    return ids, skipped


def _reserve(handle, size):
    """Make `handle`'s file `size` bytes long with every block allocated on disk.

    features.npy is written through a memory map, and a memory map writes to
    disk whenever the OS pleases: on a full disk that is a SIGBUS, which kills
    the process without a word. Allocating first turns a full disk into an
    OSError (ENOSPC) here, before a single row is copied.
    """
    try:
        os.posix_fallocate(handle.fileno(), 0, size)
        return
    except AttributeError:  # macOS and Windows have no posix_fallocate
        pass
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system without it (ZFS)
            raise
    handle.seek(0, os.SEEK_END)
    block = bytes(1 << 20)
    while handle.tell() < size:  # zeros written by hand reserve the blocks as well
        handle.write(block[:size - handle.tell()])
    handle.flush()


def _create_array(path, shape):
    """features.npy of zeros, its space reserved on disk, memory-mapped for writing."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(DTYPE)), "fortran_order": False, "shape": shape}
    with open(path, "r+b") as handle:
        np.lib.format.write_array_header_1_0(handle, header)  # the header np.save would write
        offset = handle.tell()
        _reserve(handle, offset + int(np.prod(shape)) * np.dtype(DTYPE).itemsize)
    return np.memmap(path, dtype=DTYPE, mode="r+", offset=offset, shape=shape)


def _copy_rows(base_dir, ids, array, position):
    """Copy the rows of `ids` from the finished store in `base_dir` to their places in `array`."""
    base_manifest = read_json(base_dir / "manifest.json", "feature cache manifest")
    base_row = {image_id: row for row, image_id in enumerate(read_json(base_dir / base_manifest["ids_file"]))}
    base = open_features(base_dir / base_manifest["features_file"], (len(base_row), *base_manifest["feature_shape"]))
    source = np.array([base_row[image_id] for image_id in ids], dtype=np.int64)
    target = np.array([position[image_id] for image_id in ids], dtype=np.int64)
    for start in range(0, len(ids), 1024):  # a block at a time: memory stays small however big the store
        array[target[start:start + 1024]] = base[source[start:start + 1024]]


def write_store(chunk_files, job, out_dir, sources, reuse=None):
    """Copy finished chunks (and the rows `reuse` keeps from an earlier store) into
    features.npy + ids.json + sources.json, then commit manifest.json.

    `sources`: sources.json's content. `reuse`: (folder of an earlier finished
    store, the ids whose rows to copy from it, the skipped entries to keep).
    Every byte written depends only on these and the job description, so the
    same inputs always give the same store (what resuming and merging rely on).
    """
    out_dir = Path(out_dir)
    new_ids, skipped = read_chunks(chunk_files)  # a damaged chunk is named before anything changes
    (out_dir / "manifest.json").unlink(missing_ok=True)  # from here on the store reads as unfinished
    base_dir, kept_ids, kept_skipped = reuse or (None, [], [])
    ids = sorted(kept_ids + new_ids)
    skipped = sorted(kept_skipped + skipped, key=lambda entry: entry["image_id"])
    position = {image_id: row for row, image_id in enumerate(ids)}
    with atomic_path(out_dir / "features.npy") as temp:
        array = _create_array(temp, (len(ids), *job["feature_shape"]))
        if kept_ids:
            _copy_rows(Path(base_dir), kept_ids, array, position)
        for chunk in chunk_files:  # one chunk in memory at a time, however big the dataset
            with open_chunk(chunk) as data:
                rows = np.array([position[image_id] for image_id in data["ids"].tolist()], dtype=np.int64)
                array[rows] = data["features"]
        array.flush()
        del array
    write_json_atomic(out_dir / "ids.json", ids)
    write_json_atomic(out_dir / "sources.json", sources)
    manifest = {key: value for key, value in job.items() if key != "work"}
    manifest.update({"count": len(ids), "features_file": "features.npy", "ids_file": "ids.json",
                     "sources_file": "sources.json", "skipped": skipped})
    write_json_atomic(out_dir / "manifest.json", manifest)
    shutil.rmtree(out_dir / "partial", ignore_errors=True)
    return CacheReport(out_dir, len(ids), as_tuples(skipped))
