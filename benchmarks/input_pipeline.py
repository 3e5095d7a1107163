"""Teacher forcing with tf.data's autotuner on (its default) and off (make_dataset's): seconds per step.

make_dataset reads each batch's features from the feature cache on disk (a float16 memory map,
through tf.numpy_function) and turns tf.data's autotuner off. With it on, about half the epochs
of attention training on a 2-core machine ran at twice the time per step, on one core. This
script shows it: it trains the cpu-small attention model (10 x 10 x 1280 grids, MobileNetV2's at
320 px) and the merge model (1280-d vectors) one epoch at a time, the same batches through
make_dataset with the autotuner off and on, taking turns, and prints each epoch's seconds per
step and CPU seconds per wall second (2.0: both cores busy), the medians and their ratio, and
how many epochs were slow (over 1.5x the fastest). Features are random and captions random of
8-16 words (a step's cost depends on neither); the features sit in a float16 .npy file opened as
a memory map, as the cache is read in training.

    .venv/bin/python benchmarks/input_pipeline.py [--epochs 6] [--captions 3765]

3,765 captions are the Flickr8k sample's training captions (753 photos x 5): one epoch of the
default run. The last line is `name: value`: attention's median step time, autotuner on over off.
"""

import argparse
import tempfile
import time
from pathlib import Path

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import numpy as np  # noqa: E402

from captioning.architectures import build_captioner  # noqa: E402
from captioning.training import MODEL_KEYS, compile_captioner, make_dataset, preset_settings  # noqa: E402

SHAPES = {"attention": (10, 10, 1280), "merge": (1280,)}
VOCABULARY = 3000


def random_captions(count, max_length, rng):
    sequences = np.zeros((count, max_length + 2), dtype="int32")
    for row, length in enumerate(rng.integers(8, 17, size=count)):
        sequences[row, 0], sequences[row, length + 1] = 1, 2
        sequences[row, 1:length + 1] = rng.integers(4, VOCABULARY, size=length)
    return sequences


def on_disk(folder, shape, photos, rng):
    """Random float16 features in a .npy file, opened as a memory map (what the feature cache is)."""
    path = Path(folder) / f"features-{'x'.join(map(str, shape))}.npy"
    np.save(path, rng.standard_normal((photos, *shape)).astype("float16"))
    return np.load(path, mmap_mode="r")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs timed each way, taking turns")
    parser.add_argument("--captions", type=int, default=3765, help="captions per epoch (5 per photo)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    settings = preset_settings("cpu-small")
    sequences = random_captions(args.captions, settings["max_length"], rng)
    photos = -(-args.captions // 5)
    rows = np.repeat(np.arange(photos), 5)[:args.captions]
    steps = -(-args.captions // settings["batch_size"])
    autotune_on = tf.data.Options()
    autotune_on.autotune.enabled = True  # tf.data's default; a later with_options wins
    print(f"{args.captions} random captions, {steps} steps an epoch; cpu-small, batches of {settings['batch_size']}")
    ratios = {}
    with tempfile.TemporaryDirectory() as folder:
        for arch, shape in SHAPES.items():
            features = on_disk(folder, shape, photos, rng)
            model = build_captioner(arch, vocab_size=VOCABULARY, feature_shape=shape,
                                    max_length=settings["max_length"], **{key: settings[key] for key in MODEL_KEYS})
            compile_captioner(model)
            data = {name: make_dataset(features, rows, sequences, batch_size=settings["batch_size"], seed=0)
                    for name in ("off", "on")}
            data["on"] = data["on"].with_options(autotune_on)
            model.fit(data["off"].take(3), epochs=1, verbose=0)  # trace before timing
            step_seconds = {name: [] for name in data}
            for epoch in range(args.epochs):
                for name, batches in data.items():
                    wall, cpu = time.perf_counter(), time.process_time()
                    model.fit(batches, epochs=1, verbose=0)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    step_seconds[name].append(wall / steps)
                    print(f"{arch} epoch {epoch + 1}, autotuner {name}: {wall / steps:.3f} s a step, "
                          f"{cpu / wall:.2f} CPU s per s", flush=True)
            fastest = min(min(times) for times in step_seconds.values())
            median = {name: float(np.median(times)) for name, times in step_seconds.items()}
            ratios[arch] = median["on"] / median["off"]
            for name, times in step_seconds.items():
                slow = sum(time_ > 1.5 * fastest for time_ in times)
                print(f"{arch}, autotuner {name}: median {median[name]:.3f} s a step, "
                      f"{slow} of {len(times)} epochs slow")
    print(f"merge step, autotuner on / off: {ratios['merge']:.2f}")
    print(f"attention step, autotuner on / off: {ratios['attention']:.2f}")


if __name__ == "__main__":
    main()
