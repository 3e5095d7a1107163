"""Full-sequence teacher forcing vs one-sample-per-prefix training: real word targets per second.

The prefix formulation (older tutorials) turns a caption of n words into n + 1
samples - ([<start>] -> w1), ([<start>, w1] -> w2), ... - each padded to the
full length and predicting one word. Full-sequence teacher forcing
(captioning.training) reads the caption once and predicts all n + 1 targets in
that pass. Same model dimensions for both: 2048-d image features, a 5,000-word
vocabulary, 256-d embeddings and LSTM, captions of up to 20 words.

    .venv/bin/python benchmarks/teacher_forcing.py [--batches 30]

One run (each formulation timed a few times, the fastest kept); it prints both rates and their ratio, the last line `name: value`.
"""

import argparse
import time

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

from captioning.architectures import build_captioner  # noqa: E402
from captioning.training import compile_captioner  # noqa: E402

FEATURES, VOCAB, UNITS, MAX_LENGTH = 2048, 5000, 256, 20


def random_captions(count, rng):
    """Encoded captions [<start>, words, <end>, <pad>...] with Flickr/COCO-like lengths (8-16 words)."""
    lengths = rng.integers(8, 17, size=count)
    sequences = np.zeros((count, MAX_LENGTH + 2), dtype="int32")
    for row, length in enumerate(lengths):
        sequences[row, 0] = 1
        sequences[row, 1:length + 1] = rng.integers(4, VOCAB, size=length)
        sequences[row, length + 1] = 2
    return sequences, int((lengths + 1).sum())


def prefix_model():
    """The tutorial-style model: a padded prefix in, one next word out (same layer sizes)."""
    image = keras.Input((FEATURES,), name="image")
    prefix = keras.Input((MAX_LENGTH + 1,), dtype="int32", name="prefix")
    words = keras.layers.Embedding(VOCAB, UNITS, mask_zero=True)(prefix)
    text = keras.layers.LSTM(UNITS)(keras.layers.Dropout(0.5)(words))
    picture = keras.layers.Dense(UNITS, activation="relu")(keras.layers.Dropout(0.5)(image))
    merged = keras.layers.Dropout(0.5)(keras.layers.Add()([text, picture]))
    model = keras.Model({"image": image, "prefix": prefix}, keras.layers.Dense(VOCAB)(merged))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def expand_prefixes(features, sequences):
    """One sample per (caption, position): the prefix up to it (pre-padded) -> the next word."""
    images, prefixes, targets = [], [], []
    for feature, sequence in zip(features, sequences):
        length = int(np.count_nonzero(sequence))
        for end in range(1, length):
            prefix = np.zeros(MAX_LENGTH + 1, dtype="int32")
            prefix[-end:] = sequence[:end]
            images.append(feature), prefixes.append(prefix), targets.append(sequence[end])
    return {"image": np.array(images), "prefix": np.array(prefixes)}, np.array(targets, dtype="int32")


def best_seconds(model, inputs, targets, batch_size, batches, rounds):
    """Fastest of `rounds` timings of `batches` training steps, after one untimed step
    (tracing). Other programs share this CPU: the fastest round is the least disturbed."""
    data = tf.data.Dataset.from_tensor_slices((inputs, targets)).batch(batch_size).take(batches + 1).cache()
    list(data)  # materialise before timing
    model.fit(data.take(1), verbose=0)
    timings = []
    for _ in range(rounds):
        start = time.perf_counter()
        model.fit(data.skip(1), verbose=0)
        timings.append(time.perf_counter() - start)
    return min(timings)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=15, help="timed training steps per formulation")
    parser.add_argument("--batch-size", type=int, default=64, help="captions (or prefixes) per step")
    parser.add_argument("--rounds", type=int, default=5, help="timings per formulation; the fastest counts")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)

    count = args.batch_size * (args.batches + 1)
    features = rng.normal(size=(count, FEATURES)).astype("float32")
    sequences, _ = random_captions(count, rng)
    full = compile_captioner(build_captioner("merge", vocab_size=VOCAB, feature_shape=FEATURES, max_length=MAX_LENGTH,
                                             embed_dim=UNITS, units=UNITS))
    seconds = best_seconds(full, {"image": features, "words": sequences[:, :-1]}, sequences[:, 1:],
                           args.batch_size, args.batches, args.rounds)
    timed_targets = int(np.count_nonzero(sequences[args.batch_size:, 1:]))  # real words + <end>, batches 2..
    full_rate = timed_targets / seconds

    inputs, targets = expand_prefixes(features[:count // 8], sequences[:count // 8])
    prefix_batches = min(args.batches, len(targets) // args.batch_size - 1)
    seconds = best_seconds(prefix_model(), inputs, targets, args.batch_size, prefix_batches, args.rounds)
    prefix_rate = prefix_batches * args.batch_size / seconds

    print(f"model: merge LSTM, {FEATURES}-d features, vocabulary {VOCAB}, embed/units {UNITS}, "
          f"captions up to {MAX_LENGTH} words, batch {args.batch_size}")
    print(f"full-sequence teacher forcing: {full_rate:10,.0f} word targets/s")
    print(f"one sample per prefix:         {prefix_rate:10,.0f} word targets/s")
    print(f"teacher_forcing_speedup: {full_rate / prefix_rate:.1f}")


if __name__ == "__main__":
    main()
