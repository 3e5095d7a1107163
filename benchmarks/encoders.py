"""How fast is each encoder of the table on this machine, relative to the default?

Every encoder in `captioning.encoders.ENCODERS`, at the input size the table gives it, encodes
the same in-memory batches (random pixels: the network's cost does not depend on them, nor on
its weights, so fixed random weights stand in for ImageNet's and nothing is downloaded). The
encoders take turns, repeat after repeat, so that other load on the machine slows all of them
alike; the script prints each one's median images per second and its speed relative to the
default encoder (inception_v3).

    .venv/bin/python benchmarks/encoders.py [--images 64] [--batch-size 32] [--repeats 3] [--json PATH]

The medians and ratios also go to benchmarks/results/encoders.json (--json), the one source of the
ratio: tests/test_stated_defaults.py holds the prose to it, and scripts/estimate.py reads it to
estimate a `make demo` run with another encoder than the one the course benchmark ran.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from captioning import quiet_tensorflow  # noqa: E402

tf = quiet_tensorflow()
import numpy as np  # noqa: E402

from captioning import encoders  # noqa: E402

DEFAULT = "inception_v3"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per timing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "encoders.json"),
                        help="where to write the medians and ratios ('' for nowhere)")
    args = parser.parse_args(argv)
    load = [round(value, 2) for value in os.getloadavg()]

    built, batches = {}, {}
    for name, spec in encoders.ENCODERS.items():
        built[name] = encoders.build_encoder(name, weights="none")
        pixels = np.random.default_rng(0).uniform(-1, 1, (args.batch_size, spec.image_size, spec.image_size, 3))
        batches[name] = pixels.astype(np.float32)
        built[name].encode(batches[name][:2])  # trace once, outside the timings
    print(f"{', '.join(f'{name} at {spec.image_size} px' for name, spec in encoders.ENCODERS.items())}; "
          f"{args.images} images per timing, batch size {args.batch_size}, {args.repeats} repeats, "
          f"{os.cpu_count()} CPUs")

    rates = {name: [] for name in built}
    steps = max(1, args.images // args.batch_size)
    for repeat in range(args.repeats):
        for name, encoder in built.items():
            start = time.perf_counter()
            for _ in range(steps):
                encoder.encode(batches[name])
            rates[name].append(steps * args.batch_size / (time.perf_counter() - start))
        print(f"  repeat {repeat + 1}: " + ", ".join(f"{name} {rates[name][-1]:.1f} images/s" for name in built))
    for name in built:
        print(f"{name}: median {statistics.median(rates[name]):.1f} images/s")
    ratios = {}
    for name in built:
        if name != DEFAULT:
            ratios[name] = statistics.median(a / b for a, b in zip(rates[name], rates[DEFAULT]))
            print(f"{name}_speed_vs_{DEFAULT}: {ratios[name]:.2f}")
    if args.json:
        from captioning.fileio import write_json_atomic
        write_json_atomic(args.json, {
            "what": "images per second of each encoder, random pixels and weights, taking turns (benchmarks/encoders.py)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "load_average_at_start": load,
            "images": args.images, "batch_size": args.batch_size, "repeats": args.repeats,
            "median_images_per_second": {name: round(statistics.median(rates[name]), 2) for name in built},
            f"speed_vs_{DEFAULT}": {name: round(ratio, 3) for name, ratio in ratios.items()}})


if __name__ == "__main__":
    main()
