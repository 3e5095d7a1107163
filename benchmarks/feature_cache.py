"""How much of the encoder's speed survives the whole caching job?

Measures, on the same images and batch size, in one run:
  forward      the bare encoder on tensors already decoded and in memory (the ceiling)
  end-to-end   cache_features: JPEG files on disk -> decode/resize in tf.data -> encoder ->
               float16 chunks -> consolidated store on disk
and prints their ratio. The goal is >= 0.90: the tf.data pipeline should hide
the JPEG decoding behind the network's work. Repeats alternate between the two
measurements and report medians, so that other load on the machine hurts both alike.

Runs offline: MobileNetV2 with a local weights file (--weights, or the
CAPTIONING_MOBILENET_WEIGHTS variable); `--encoder inception_v3 --weights none`
measures InceptionV3 with random weights (same cost as the real ones).

    .venv/bin/python benchmarks/feature_cache.py [--images DIR] [--count 256] [--batch-size 32]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from captioning import quiet_tensorflow  # noqa: E402

tf = quiet_tensorflow()

from captioning import encoders, images as image_io  # noqa: E402
from captioning.features import cache_features  # noqa: E402

SHARED = REPO.parent / "shared"
DEFAULT_IMAGES = SHARED / "data" / "flickr8k-sample" / "images"
DEFAULT_WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet_no_top.weights.h5"


def forward_throughput(encoder, batches):
    """Images per second of the network alone on in-memory, preprocessed batches."""
    start = time.perf_counter()
    count = 0
    for batch in batches:
        encoder.encode(batch)
        count += len(batch)
    return count / (time.perf_counter() - start)


def end_to_end_throughput(encoder, table, batch_size):
    """Images per second from JPEG files to a finished store on disk (wall clock, all included)."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        report = cache_features(table, Path(folder) / "cache", encoder=encoder, batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - start
    if report.skipped:
        print(f"note: {len(report.skipped)} unreadable images skipped, e.g. {report.skipped[0]}")
    return report.cached / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of .jpg photos")
    parser.add_argument("--count", type=int, default=256, help="how many photos to use")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--encoder", default="mobilenet_v2", choices=sorted(encoders.ENCODERS))
    parser.add_argument("--weights", default=os.environ.get("CAPTIONING_MOBILENET_WEIGHTS", str(DEFAULT_WEIGHTS)),
                        help="a .weights.h5 file, 'imagenet' (download) or 'none' (random)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    paths = sorted(Path(args.images).glob("*.jpg"))[: args.count]
    if not paths:
        sys.exit(f"no .jpg files in {args.images}: pass --images DIR")
    weights = None if args.weights == "none" else args.weights
    encoder = encoders.build_encoder(args.encoder, weights=weights)
    table = {path.stem: str(path) for path in paths}

    # Decode once into memory for the bare forward measurement (and to warm the file cache).
    errors = []
    batches = [images for _, images in image_io.iterate_batches(
        [str(path) for path in paths], encoder.image_size, encoder.preprocess, args.batch_size, errors)]
    encoder.encode(batches[0])  # trace the graph once, outside the timings
    print(f"{args.encoder} ({encoder.weights_id}), {len(paths)} images from {args.images}, "
          f"batch size {args.batch_size}, {args.repeats} repeats, {os.cpu_count()} CPUs")

    forward, end_to_end = [], []
    for repeat in range(args.repeats):
        forward.append(forward_throughput(encoder, batches))
        end_to_end.append(end_to_end_throughput(encoder, table, args.batch_size))
        print(f"  repeat {repeat + 1}: forward {forward[-1]:.1f} images/s, end-to-end {end_to_end[-1]:.1f} images/s")
    ratios = [e / f for e, f in zip(end_to_end, forward)]
    print(f"forward (in-memory tensors), median: {statistics.median(forward):.1f} images/s")
    print(f"end-to-end (JPEG on disk -> features on disk), median: {statistics.median(end_to_end):.1f} images/s")
    print(f"feature_cache_ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
