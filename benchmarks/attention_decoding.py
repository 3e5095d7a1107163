"""Attention decoding: each image's regions and keys computed once (StepDecoder.remember) vs at every word.

An attention decoder scores every region of the grid before every word. The regions' projection
and their attention keys depend on the image alone; computed at every word, for every sample of
self-critical fine-tuning (5 per photo) or every beam, they were nearly all of a step's work. This
script samples captions (as fine-tuning does: 5 per photo) and decodes with beam search (one
compiled graph either way, beams.py) on the same attention model both ways, taking turns, and
prints the median times and their ratios. Both ways must give the same captions. The model has
the cpu-small preset's sizes and the grid of the default encoder (InceptionV3: 8 x 8 x 2048;
`--grid 10 --channels 1280` for MobileNetV2), with fixed random weights and its caption length
capped, so that every caption runs to max_length: the same work for both.

    .venv/bin/python benchmarks/attention_decoding.py [--images 64] [--repeats 3]
"""

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captioning import quiet_tensorflow  # noqa: E402

tf = quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

from captioning.architectures import build_captioner, make_step_decoder  # noqa: E402
from captioning.beams import length_divisors, search_ops  # noqa: E402
from captioning.decoding import DEFAULT_LENGTH_ALPHA, _banned, beam_search, sample_decode  # noqa: E402
from captioning.training import PRESETS  # noqa: E402


class EveryWord:
    """The decoder without `remember`: sampling hands it the grids at every step."""

    def __init__(self, decoder):
        self.decoder = decoder

    def initial_state(self, features):
        return self.decoder.initial_state(features)

    def step(self, words, states, features):
        return self.decoder.step(words, states, features)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    preset = PRESETS["cpu-small"]
    keras.utils.set_random_seed(0)
    model = build_captioner("attention", vocab_size=args.vocab, feature_shape=(args.grid, args.grid, args.channels),
                            max_length=args.max_length, embed_dim=preset["embed_dim"], units=preset["units"])
    decoder = make_step_decoder(model)
    grids = np.random.default_rng(0).random((args.images, args.grid, args.grid, args.channels), dtype=np.float32)
    # start/end ids no sampled word can be (the end id is out of the model's reach): full-length captions
    options = dict(start_id=1, end_id=args.vocab + 1, max_length=args.max_length, banned_ids=[0])
    repeated = np.repeat(grids, args.samples, axis=0)
    beam = dict(start_id=1, end_id=2, max_length=args.max_length, beam_width=3)

    def every_word_step(words, states, grid):  # the regions and keys again, inside the loop
        return decoder._step_graph(words, states, decoder._memory_graph(grid))
    every_word_search = tf.function(functools.partial(
        search_ops, decoder._initial_graph, every_word_step, divisors=length_divisors(args.max_length, DEFAULT_LENGTH_ALPHA),
        banned_ids=_banned(1, 2, 0, ()), **beam))

    def best_every_word():
        found = every_word_search(tf.constant(grids))
        return [ids[0, :length[0]].tolist() for ids, length in zip(found["ids"].numpy(), found["lengths"].numpy())]
    jobs = {  # name: {way: job}
        # Sampling as fine-tuning does it: the regions and keys once per photo, then repeated for its samples.
        "sampling": {"remembered": lambda: sample_decode(decoder, grids, samples=args.samples, seed=0, **options),
                     "every word": lambda: sample_decode(EveryWord(decoder), repeated, seed=0, **options)},
        # Beam search is one compiled graph either way (beams.py): remembered (as beam_search runs it) or with a
        # step that computes the regions and keys from the grid at every word.
        "beam search (k=3)": {"remembered": lambda: [image[0].ids for image in beam_search(decoder, grids, **beam)],
                              "every word": best_every_word},
    }
    print(f"attention, {args.grid} x {args.grid} x {args.channels} grid, units {preset['units']}, vocabulary "
          f"{args.vocab}; {args.images} images, {args.samples} samples each, {args.max_length} words, "
          f"{args.repeats} turns")
    ratios = {}
    for name, ways in jobs.items():
        assert ways["remembered"]() == ways["every word"](), f"{name}: the two ways disagree"  # also traces both
        times = {way: [] for way in ways}
        for _ in range(args.repeats):
            for way, job in ways.items():
                start = time.perf_counter()
                job()
                times[way].append(time.perf_counter() - start)
        fast, slow = statistics.median(times["remembered"]), statistics.median(times["every word"])
        ratios[name] = slow / fast
        print(f"{name}: regions and keys once per image {fast:.2f} s, at every word {slow:.2f} s: "
              f"{ratios[name]:.1f}x")
    print(f"attention_sampling_speedup: {ratios['sampling']:.1f}")


if __name__ == "__main__":
    main()
