"""How time and memory grow with the data, up to all of COCO (123,287 images, 616,767 captions).

Every run so far used at most 5,000 annotated images. This one makes COCO's
real shape from the real val2017 captions: its 5,000 images and 25,014
captions replicated with new ids and file names into captions_train2017.json
(118,287 images) and captions_val2017.json (5,000), with an empty file per
image in train2017/ and val2017/ (prepare's default keeps only images on
disk, and only lists the folders: it never opens a photo). Feature stores are
written in feature_store.py's format (features.npy float16 + ids.json +
manifest.json with InceptionV3's settings), filled with random float16 of
InceptionV3's shapes (one random block, repeated). Stages:

  prepare    captioning.data.prepare at 1/4 of COCO and at all of it
  pooled     what `train` does for merge before its first epoch, at 1/4 and all
             of COCO: load_prepared, caption_arrays over a pooled store (2048-d),
             make_dataset; then, on all of COCO, timed training steps of the
             merge model with the cpu-small preset's sizes (embedding and LSTM
             256, batch 64) -> steps/s and one epoch extrapolated
  grid       the attention architecture's input pipeline over grid stores
             (8x8x2048) of N and 4N training images: caption_arrays,
             make_dataset, one whole epoch of batches, and a few training steps

Each stage runs in its own process, which reports its wall times and its peak
memory, from /proc/self/status (Linux): peak RSS (VmHWM: everything resident,
including the pages of memory-mapped stores, which the OS can drop again) and
peak anonymous memory (RssAnon, sampled every 10 ms: what the process itself
allocated and cannot give back). prepare's and pooled training's goals are on
the peak RSS; the grid pipeline's on the anonymous peak, since one epoch
touches every page of the store, which the OS keeps cached while RAM is free.
prepare is single-threaded, so its CPU time is printed too: on a shared
machine it is about what an idle one's wall time would be. The last line is
`name: value`: the grid pipeline's anonymous-memory growth from N to 4N
images (1.0: it does not grow).

    .venv/bin/python benchmarks/scale.py [--annotations PATH] [--grid-images 1000] [--steps 20]

Goals (2-core CPU): full-COCO prepare <= 30 s and <= 2 GB; training memory
<= 4 GB with the 123k-image pooled store; the grid pipeline's memory
independent of the number of images; every stage O(N).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_ANNOTATIONS = REPO.parent / "shared/data/coco-val2017-sample/annotations/captions_val2017.json"
COCO_IMAGES, VAL_IMAGES = 123_287, 5_000  # train2017 + val2017
GRID_SHAPE, POOLED_SHAPE = (8, 8, 2048), (2048,)  # InceptionV3 at 299 px
GIB = 1 << 30


# --- measuring one stage in its own process ---------------------------------------------

class PeakMemory:
    """Peak RSS (VmHWM) and peak anonymous memory (RssAnon, sampled) of this process, from /proc/self/status.

    Not getrusage's ru_maxrss: Linux carries the parent's peak over into a child across
    fork and exec, so a child of a big parent would report the parent's peak."""

    def __init__(self, interval=0.01):
        self.anon, self._stop = self._status("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise ValueError(f"no {field} in /proc/self/status")

    def _watch(self, interval):
        while not self._stop.wait(interval):
            self.anon = max(self.anon, self._status("RssAnon"))

    def peaks(self):
        self.anon = max(self.anon, self._status("RssAnon"))
        return {"rss_peak": self._status("VmHWM"), "anon_peak": self.anon}


def run_stage(*arguments):
    """Run `scale.py --stage ...` in a child process; return the JSON it prints last."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, __file__, "--stage", *map(str, arguments)], capture_output=True,
                            text=True, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"stage {arguments[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def stage_prepare(data_dir, out_dir):
    from captioning.data import prepare
    memory = PeakMemory()
    start, cpu = time.perf_counter(), time.process_time()
    prepared = prepare("coco", data_dir, out_dir)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "captions": prepared.report["rows"],
            "images": prepared.report["images"], "vocabulary": len(prepared.vocab), **memory.peaks()}


class _BatchClock:
    """Wall time at the end of every training batch (a Keras callback built lazily, after TF is imported)."""

    @staticmethod
    def make():
        import keras

        class Clock(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.begin, self.ends = time.perf_counter(), []

            def on_train_batch_end(self, batch, logs=None):
                self.ends.append(time.perf_counter())
        return Clock()


def _train_steps(arch, store, arrays, vocab, steps, batch_size):
    """Build the architecture with the cpu-small preset's sizes and fit `steps` + 1 batches;
    -> (seconds to the first batch's end, steps/s over the others)."""
    from captioning.architectures import build_captioner
    from captioning.training import MODEL_KEYS, PRESETS, compile_captioner, make_dataset
    settings = PRESETS["cpu-small"]
    model = build_captioner(arch, vocab_size=len(vocab), feature_shape=store.feature_shape, max_length=vocab.max_length,
                            **{key: settings[key] for key in MODEL_KEYS})
    compile_captioner(model, learning_rate=settings["learning_rate"])
    clock = _BatchClock.make()
    model.fit(make_dataset(*arrays, batch_size=batch_size, seed=0).take(steps + 1), epochs=1, verbose=0,
              shuffle=False, callbacks=[clock])
    return clock.ends[0] - clock.begin, steps / (clock.ends[-1] - clock.ends[0])


def stage_pooled(prepared_dir, store_dir, steps):
    from captioning import quiet_tensorflow
    quiet_tensorflow()
    from captioning.data import load_prepared, get_dataset
    from captioning.feature_store import FeatureStore
    from captioning.pipeline import caption_arrays
    from captioning.training import PRESETS, make_dataset
    memory = PeakMemory()
    baseline = memory.peaks()["anon_peak"]
    times = {}
    start = time.perf_counter()
    prepared = load_prepared(prepared_dir)
    times["load_prepared"] = time.perf_counter() - start
    start = time.perf_counter()
    store = FeatureStore.open(store_dir)
    times["open_store"] = time.perf_counter() - start
    start = time.perf_counter()
    arrays = caption_arrays(prepared.captions, get_dataset("coco").train_splits, store, prepared.vocab)
    times["caption_arrays"] = time.perf_counter() - start
    batch_size = PRESETS["cpu-small"]["batch_size"]
    start = time.perf_counter()
    batches = iter(make_dataset(*arrays, batch_size=batch_size, seed=0))
    next(batches)
    times["first_batch"] = time.perf_counter() - start  # mostly filling the shuffle buffer, once per epoch
    start = time.perf_counter()
    for _ in range(200):
        next(batches)
    times["input_batches_per_second"] = 200 / (time.perf_counter() - start)
    del batches
    captions = len(arrays[1])
    before_training = {key + "_before_training": value for key, value in memory.peaks().items()}
    if steps:  # steps/s do not depend on the data's size: timed on all of COCO only
        first, rate = _train_steps("merge", store, arrays, prepared.vocab, steps, batch_size)
        times.update(first_batch_seconds=first, steps_per_second=rate, epoch_hours=captions / batch_size / rate / 3600)
    return {"captions": captions, "images": len(store), "vocabulary": len(prepared.vocab), **times,
            "anon_after_imports": baseline, **before_training, **memory.peaks()}


def stage_grid(prepared_dir, store_dir, steps):
    from captioning import quiet_tensorflow
    quiet_tensorflow()
    from captioning.data import load_prepared, get_dataset
    from captioning.feature_store import FeatureStore
    from captioning.pipeline import caption_arrays
    from captioning.training import PRESETS, make_dataset
    prepared = load_prepared(prepared_dir)  # not timed: the same 617k-caption table whatever N
    memory = PeakMemory()
    baseline = memory.peaks()["anon_peak"]
    times = {}
    start = time.perf_counter()
    store = FeatureStore.open(store_dir)
    arrays = caption_arrays(prepared.captions, get_dataset("coco").train_splits, store, prepared.vocab)
    data = make_dataset(*arrays, batch_size=PRESETS["cpu-small"]["batch_size"], seed=0)
    times["caption_arrays_and_dataset"] = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    for _ in data:
        pass
    times["input_epoch"], times["input_epoch_cpu"] = time.perf_counter() - start, time.process_time() - cpu
    first, rate = _train_steps("attention", store, arrays, prepared.vocab, steps, PRESETS["cpu-small"]["batch_size"])
    return {"captions": len(arrays[1]), "images": len(store), **times, "steps_per_second": rate,
            "anon_after_imports": baseline, **memory.peaks()}


STAGES = {"prepare": stage_prepare, "pooled": stage_pooled, "grid": stage_grid}


# --- synthetic COCO ----------------------------------------------------------------------

def make_coco(annotations, folder, images):
    """captions_{train,val}2017.json of `images` images (5,000 of them val) made by replicating the
    real val2017 images and their captions with new ids; an empty file per image. -> (all ids, train ids)."""
    data = json.loads(Path(annotations).read_text(encoding="utf-8"))
    by_image = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
    sources = sorted(data["images"], key=lambda image: image["id"])
    (folder / "annotations").mkdir(parents=True)
    all_ids, train_ids, annotation_id = [], [], 0
    for split, first, count in (("val", 0, min(VAL_IMAGES, images)), ("train", VAL_IMAGES, images - VAL_IMAGES)):
        image_dir = folder / f"{split}2017"
        image_dir.mkdir()
        entries, captions = [], []
        for number in range(first, first + count):
            source = sources[number % len(sources)]
            image_id = (number // len(sources)) * 1_000_000 + source["id"]  # COCO ids are < 1,000,000
            name = f"{image_id:012d}.jpg"
            entries.append({**source, "id": image_id, "file_name": name})
            for caption in by_image.get(source["id"], []):
                annotation_id += 1
                captions.append({"image_id": image_id, "id": annotation_id, "caption": caption})
            (image_dir / name).touch()
            all_ids.append(str(image_id))
            if split == "train":
                train_ids.append(str(image_id))
        content = {key: data[key] for key in ("info", "licenses") if key in data}
        with open(folder / "annotations" / f"captions_{split}2017.json", "w", encoding="utf-8") as handle:
            json.dump({**content, "images": entries, "annotations": captions}, handle)
    return all_ids, sorted(train_ids)


def write_random_store(folder, ids, feature_shape, pooling):
    """A finished store as feature_store.write_store leaves it, of random float16 values."""
    from captioning.encoders import encoder_settings
    from captioning.feature_store import DTYPE, FORMAT_VERSION
    from captioning.fileio import write_json_atomic
    ids = sorted(ids)
    folder.mkdir(parents=True)
    block = np.random.default_rng(0).standard_normal((256, *feature_shape), dtype=np.float32).astype(DTYPE)
    array = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=DTYPE, shape=(len(ids), *feature_shape))
    for row in range(0, len(ids), len(block)):
        array[row:row + len(block)] = block[:len(ids) - row]
    array.flush()
    del array
    write_json_atomic(folder / "ids.json", ids)
    job = {"format": FORMAT_VERSION, **encoder_settings("inception_v3", "imagenet", pooling), "dtype": DTYPE,
           "images": len(ids), "batch_size": 32, "chunk_size": 1024}
    write_json_atomic(folder / "manifest.json", {**job, "count": len(ids), "features_file": "features.npy",
                                                 "ids_file": "ids.json", "skipped": []})


# --- the report --------------------------------------------------------------------------

def gib(value):
    return f"{value / GIB:5.2f} GB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", default=DEFAULT_ANNOTATIONS, help="the real captions_val2017.json")
    parser.add_argument("--images", type=int, default=COCO_IMAGES, help="images of the full-size run (all of COCO)")
    parser.add_argument("--grid-images", type=int, default=1000, help="N: training images of the smaller grid store")
    parser.add_argument("--steps", type=int, default=20, help="timed merge training steps (after one untimed)")
    parser.add_argument("--attention-steps", type=int, default=3, help="timed attention training steps")
    parser.add_argument("--folder", help="work folder (default: a temporary one, deleted at the end)")
    parser.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)  # internal: run one stage, print JSON
    args = parser.parse_args()
    if not args.stage and args.images // 4 <= VAL_IMAGES:
        parser.error(f"--images must be more than {4 * VAL_IMAGES:,}: a quarter of them are {VAL_IMAGES:,} val "
                     "images and some training ones")
    if args.stage:
        name, *rest = args.stage
        print(json.dumps(STAGES[name](*[int(value) if value.isdigit() else value for value in rest])))
        return

    with tempfile.TemporaryDirectory(dir=args.folder) as work:
        work = Path(work)
        sizes = {"1/4": args.images // 4, "all": args.images}
        started = time.perf_counter()
        train_ids = {}
        for label, images in sizes.items():
            base = work / label.replace("/", "-")
            all_ids, train_ids[label] = make_coco(args.annotations, base / "coco", images)
            write_random_store(base / "pooled", all_ids, POOLED_SHAPE, "avg")
        grids = {"N": args.grid_images, "4N": 4 * args.grid_images}
        for label, images in grids.items():
            write_random_store(work / f"grid-{label}", train_ids["all"][:images], GRID_SHAPE, None)
        print(f"synthetic COCO made in {time.perf_counter() - started:.0f} s (not measured) from {args.annotations}")

        prepare, pooled = {}, {}
        for label in sizes:
            base = work / label.replace("/", "-")
            prepare[label] = run_stage("prepare", base / "coco", base / "prepared")
            pooled[label] = run_stage("pooled", base / "prepared", base / "pooled", args.steps if label == "all" else 0)
        grid = {label: run_stage("grid", work / "all" / "prepared", work / f"grid-{label}", args.attention_steps)
                for label in grids}

    print("\nprepare (captioning.data.prepare; images on disk as empty files):")
    for label, result in prepare.items():
        print(f"  {label:>4} of COCO: {result['images']:7,} images, {result['captions']:7,} captions -> "
              f"vocabulary {result['vocabulary']:,}: {result['seconds']:5.1f} s ({result['cpu_seconds']:5.1f} s CPU), "
              f"RSS peak {gib(result['rss_peak'])}, anon peak {gib(result['anon_peak'])}")
    print("\npooled training (load_prepared + caption_arrays + make_dataset; merge, cpu-small sizes, batch 64):")
    for label, result in pooled.items():
        print(f"  {label:>4} of COCO: {result['images']:7,} images, {result['captions']:7,} training captions: "
              f"load_prepared {result['load_prepared']:4.1f} s, open store {result['open_store']:4.1f} s, "
              f"caption_arrays {result['caption_arrays']:4.1f} s;\n{'':16}input: first batch {result['first_batch']:4.1f} s, "
              f"then {result['input_batches_per_second']:4.0f} batches/s; " + (
                  f"training: first step {result['first_batch_seconds']:4.1f} s, then {result['steps_per_second']:4.2f} "
                  f"steps/s -> one epoch {result['epoch_hours']:4.1f} h" if "steps_per_second" in result else
                  "training not timed here") + f";\n{'':16}RSS peak {gib(result['rss_peak'])}, anon peak "
              f"{gib(result['anon_peak'])} ({gib(result['anon_after_imports'])} after imports, "
              f"{gib(result['anon_peak_before_training'])} before training)")
    print(f"\ngrid training input (attention, {'x'.join(map(str, GRID_SHAPE))} float16 = "
          f"{np.prod(GRID_SHAPE) * 2 // 1024} KB per image; one epoch of batches of 64, "
          f"then {args.attention_steps} training steps):")
    for label, result in grid.items():
        print(f"  {label:>2} = {result['images']:6,} images, {result['captions']:6,} captions: "
              f"caption_arrays + make_dataset {result['caption_arrays_and_dataset']:5.1f} s, "
              f"epoch of batches {result['input_epoch']:5.1f} s ({result['input_epoch_cpu']:5.1f} s CPU), "
              f"{result['steps_per_second']:4.2f} steps/s;\n{'':16}"
              f"RSS peak {gib(result['rss_peak'])}, anon peak {gib(result['anon_peak'])} "
              f"({gib(result['anon_after_imports'])} after imports)")

    def ratio(results, key, small, big):
        return results[big][key] / results[small][key]
    print("\ngrowth (4x the images):")
    print(f"  prepare:          time {ratio(prepare, 'seconds', '1/4', 'all'):4.2f}x "
          f"(CPU {ratio(prepare, 'cpu_seconds', '1/4', 'all'):4.2f}x), RSS peak {ratio(prepare, 'rss_peak', '1/4', 'all'):4.2f}x")
    print(f"  pooled training:  caption_arrays {ratio(pooled, 'caption_arrays', '1/4', 'all'):4.2f}x, "
          f"first batch {ratio(pooled, 'first_batch', '1/4', 'all'):4.2f}x, "
          f"before training: RSS peak {ratio(pooled, 'rss_peak_before_training', '1/4', 'all'):4.2f}x, "
          f"anon peak {ratio(pooled, 'anon_peak_before_training', '1/4', 'all'):4.2f}x")
    print(f"  grid training:    caption_arrays + make_dataset "
          f"{ratio(grid, 'caption_arrays_and_dataset', 'N', '4N'):4.2f}x, epoch of batches "
          f"{ratio(grid, 'input_epoch', 'N', '4N'):4.2f}x, RSS peak {ratio(grid, 'rss_peak', 'N', '4N'):4.2f}x, "
          f"anon peak {ratio(grid, 'anon_peak', 'N', '4N'):4.2f}x")
    full_prepare, full_pooled = prepare["all"], pooled["all"]
    print(f"goals: full-COCO prepare {full_prepare['seconds']:.1f} s (<= 30; {full_prepare['cpu_seconds']:.1f} s CPU) "
          f"and {gib(full_prepare['rss_peak']).strip()} (<= 2 GB); pooled training {gib(full_pooled['rss_peak']).strip()} "
          f"(<= 4 GB); grid memory growth {ratio(grid, 'anon_peak', 'N', '4N'):.2f}x (about 1)")
    print(f"grid_memory_growth_4x: {ratio(grid, 'anon_peak', 'N', '4N'):.2f}")


if __name__ == "__main__":
    main()
