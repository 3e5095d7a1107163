"""The on-disk format of a finished feature cache, and its reader.

Taught in notebooks 02 and 03. A finished cache folder holds

    features.npy    one float16 array (images, *feature_shape), rows in sorted id order
    ids.json        the image id of each row
    manifest.json   what made the features (encoder, weights_id, image_size, pooling,
                    dtype, feature_shape), how many, and which images were skipped and why

manifest.json is written last, after the other two are complete: its presence
is what "this cache is finished" means. `FeatureStore` reads the array as a
memory map: opening is instant, and the pages that training touches stay in
the OS's cache. The job that fills the folder lives in features.py.
"""

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captioning.fileio import atomic_path, read_json, write_json_atomic

FORMAT_VERSION = 1
DTYPE = "float16"  # half the disk and RAM of float32; far more precise than a captioner needs
SETTINGS = ("encoder", "weights_id", "image_size", "pooling", "mirror", "dtype", "feature_shape")


@dataclass
class CacheReport:
    """What cache_features (or merge_shards) did; `summary()` is what the `features` command prints."""

    out_dir: Path
    cached: int  # images with features in the store (or in this shard)
    skipped: list = field(default_factory=list)  # (image_id, path, reason)
    computed: int = 0  # images encoded by this call (0 when everything was cached already)
    seconds: float = 0.0

    @property
    def images_per_second(self):
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def summary(self):
        lines = [f"cached {self.cached} images in {self.out_dir} "
                 f"({self.computed} encoded now in {self.seconds:.1f} s, {self.images_per_second:.1f} images/s)"]
        lines.append(f"skipped {len(self.skipped)} images" + (":" if self.skipped else ""))
        lines += [f"  {image_id} ({path}): {reason}" for image_id, path, reason in self.skipped]
        return "\n".join(lines)


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
        manifest = read_json(out_dir / "manifest.json", "feature cache manifest")
        if expect:
            check_settings(manifest, expect, out_dir)
        ids = read_json(out_dir / manifest["ids_file"], "feature cache index")
        features = np.load(out_dir / manifest["features_file"], mmap_mode="r", allow_pickle=False)
        if features.shape != (len(ids), *manifest["feature_shape"]) or len(ids) != manifest["count"]:
            raise ValueError(f"{out_dir}: features.npy {features.shape} does not match ids.json / manifest.json")
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


def read_chunks(chunk_files):
    """Ids and skipped entries of chunk files (written by features.py), in order; features stay on disk."""
    ids, skipped = [], []
    for chunk in chunk_files:
        with np.load(chunk, allow_pickle=False) as data:
            ids += data["ids"].tolist()
            skipped += [dict(zip(("image_id", "path", "reason"), row)) for row in data["skipped"].tolist()]
    return ids, skipped


def write_store(chunk_files, job, out_dir):
    """Copy finished chunks, in order, into features.npy + ids.json, then commit manifest.json.

    Every byte written depends only on the chunks and the job description, so
    the same chunks always give the same store (what resuming and merging rely on).
    """
    out_dir = Path(out_dir)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # from here on the store reads as unfinished
    ids, skipped = read_chunks(chunk_files)
    with atomic_path(out_dir / "features.npy") as temp:
        array = np.lib.format.open_memmap(temp, mode="w+", dtype=DTYPE, shape=(len(ids), *job["feature_shape"]))
        row = 0
        for chunk in chunk_files:  # one chunk in memory at a time, however big the dataset
            with np.load(chunk, allow_pickle=False) as data:
                values = data["features"]
                array[row:row + len(values)] = values
                row += len(values)
        array.flush()
        del array
    write_json_atomic(out_dir / "ids.json", ids)
    manifest = {**job, "count": len(ids), "features_file": "features.npy", "ids_file": "ids.json",
                "skipped": skipped}
    write_json_atomic(out_dir / "manifest.json", manifest)
    shutil.rmtree(out_dir / "partial", ignore_errors=True)
    return CacheReport(out_dir, len(ids), as_tuples(skipped))
