"""Teacher forcing with length buckets vs padded batches: seconds per epoch, merge and attention.

training.make_dataset pads every batch to max_length + 1 positions unless
`bucket_width` > 0, when it batches each caption with others of about its
length and cuts the batch to its longest caption. This script trains the
cpu-small merge model (1280-d vectors, MobileNetV2's) and the attention model
(10 x 10 x 1280 grids) on the same captions both ways, taking turns, and
prints the positions the RNN reads and the time per epoch of each, and their
ratios. The captions are the Flickr8k sample's, cleaned and encoded as
`prepare` does, when the sample is beside the repository (or given with
--captions); otherwise random ones of 8-16 words. Features are random (the
step's cost does not depend on their values).

    .venv/bin/python benchmarks/buckets.py [--captions captions_subset.token.txt] [--turns 3]

The last line is `name: value`: the merge model's epoch time with buckets over without.
"""

import argparse
import time
from pathlib import Path

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import numpy as np  # noqa: E402

from captioning.architectures import build_captioner  # noqa: E402
from captioning.training import MODEL_KEYS, compile_captioner, make_dataset, preset_settings  # noqa: E402
from captioning.vocab import Vocabulary, clean_caption  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent.parent / "shared/data/flickr8k-sample/captions_subset.token.txt"
SHAPES = {"merge": (1280,), "attention": (10, 10, 1280)}


def captions(path, count, rng):
    """`count` encoded captions and the vocabulary size: from a Flickr8k token file, else random."""
    settings = preset_settings("cpu-small")
    if path is not None and Path(path).is_file():
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        texts = [clean_caption(line.split("\t", 1)[1]) for line in lines if "\t" in line]
        vocab = Vocabulary.build(texts, min_count=settings["min_count"], max_length=settings["max_length"])
        picked = rng.choice(len(texts), size=min(count, len(texts)), replace=False)
        return vocab.encode_batch([texts[i] for i in picked]), len(vocab), f"{path} ({len(picked)} captions)"
    sequences = np.zeros((count, settings["max_length"] + 2), dtype="int32")
    for row, length in enumerate(rng.integers(8, 17, size=count)):
        sequences[row, 0], sequences[row, length + 1] = 1, 2
        sequences[row, 1:length + 1] = rng.integers(4, 3000, size=length)
    return sequences, 3000, f"random captions of 8-16 words ({count})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", default=str(SAMPLE), help="a Flickr8k token file (default: the sample's)")
    parser.add_argument("--count", type=int, default=1280, help="captions per epoch (20 batches of 64)")
    parser.add_argument("--turns", type=int, default=3, help="epochs timed each way, taking turns")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sequences, vocab_size, source = captions(args.captions, args.count, rng)
    settings = preset_settings("cpu-small")
    print(f"captions: {source}; cpu-small, batches of {settings['batch_size']}")
    ratio = {}
    for arch, shape in SHAPES.items():
        model = build_captioner(arch, vocab_size=vocab_size, feature_shape=shape, max_length=settings["max_length"],
                                **{key: settings[key] for key in MODEL_KEYS})
        compile_captioner(model)
        features = rng.standard_normal((len(sequences), *shape)).astype("float32")
        data = {width: make_dataset(features, np.arange(len(sequences)), sequences, batch_size=settings["batch_size"],
                                    seed=0, bucket_width=width) for width in (0, 4)}
        positions = {width: sum(int(np.prod(inputs["words"].shape)) for inputs, _ in batches)
                     for width, batches in data.items()}
        seconds = {width: [] for width in data}
        for width, batches in data.items():  # trace both graphs before timing
            model.fit(batches, epochs=1, verbose=0)
        for _ in range(args.turns):
            for width, batches in data.items():
                start = time.perf_counter()
                model.fit(batches, epochs=1, verbose=0)
                seconds[width].append(time.perf_counter() - start)
        median = {width: float(np.median(times)) for width, times in seconds.items()}
        ratio[arch] = median[4] / median[0]
        print(f"{arch}: positions read {positions[4]:,} with buckets vs {positions[0]:,} padded "
              f"({positions[4] / positions[0]:.2f}); epoch {median[4]:.2f} s vs {median[0]:.2f} s, "
              f"median of {args.turns} ({ratio[arch]:.2f})")
    print(f"attention epoch with buckets / padded: {ratio['attention']:.2f}")
    print(f"merge epoch with buckets / padded: {ratio['merge']:.2f}")


if __name__ == "__main__":
    main()
