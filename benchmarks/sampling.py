"""Where sampling's time goes: the model's steps, the Gumbel noise, and the rest of the Python loop.

Self-critical fine-tuning draws 5 captions per photo every epoch (decoding.sample_decode, 128
photos at a time), in a Python loop over the words: one compiled StepDecoder call per word for all
640 rows, then numpy draws the next words. Issue 27 asked for that loop compiled (a tf.while_loop)
where it pays. A compiled loop still runs the model's steps; what it could remove is the rest:
the Python around them, and numpy's noise if it drew TensorFlow's instead (which would change the
draws, so the quality rule would have to decide). This script measures that share, so that the
decision rests on a number: it samples as fine-tuning does on the merge and attention models
(cpu-small sizes, fixed random weights, MobileNetV2's feature sizes, a vocabulary the size of the
Flickr8k sample's), timing every call of the model inside the loop (its steps, and what it
computes once per photo before them), and times the noise alone (the same numpy draws:
Generator.gumbel and, for the record, the same formula with numpy's vector log). The end word is
out of the model's reach, so every caption runs to max_length.

    .venv/bin/python benchmarks/sampling.py [--images 128] [--vocab 760] [--repeats 5]

It prints, per model, the median sampling time and the shares, and the most a compiled loop could
gain: the whole time over the model's. The last line is `name: value`: that bound for
attention, whose sampling fine-tuning spends the most on.
"""

import argparse
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
from captioning.decoding import sample_decode  # noqa: E402
from captioning.training import PRESETS  # noqa: E402

SHAPES = {"merge": (1280,), "attention": (10, 10, 1280)}  # MobileNetV2 at 320 px: pooled, and its grid


class TimedModel:
    """The decoder, with a clock around each of its compiled calls (and their arrays back): `step`,
    once per word, and `initial_state` and `remember`, once per photo (attention's regions and keys)."""

    def __init__(self, decoder):
        self.decoder, self.seconds = decoder, {"steps": 0.0, "per photo": 0.0}

    def __getattr__(self, name):  # last_attention: the decoder's own
        return getattr(self.decoder, name)

    def _timed(self, part, call, *args):
        start = time.perf_counter()
        result = call(*args)
        self.seconds[part] += time.perf_counter() - start
        return result

    def step(self, words, states, features):
        return self._timed("steps", self.decoder.step, words, states, features)

    def initial_state(self, features):
        return self._timed("per photo", self.decoder.initial_state, features)

    def remember(self, features):
        return self._timed("per photo", self.decoder.remember, features)


def vector_gumbel(random, shape):
    """Generator.gumbel's formula on the same uniform numbers, with numpy's vector log (agrees to ~1e-15)."""
    return -np.log(-np.log(1.0 - random.random(shape)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="photos (fine-tuning samples 128 at a time)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=760, help="the default run's on the Flickr8k sample: about 760")
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    preset = PRESETS["cpu-small"]
    rows = args.images * args.samples
    options = dict(start_id=1, end_id=args.vocab + 1, max_length=args.max_length, banned_ids=[0],
                   samples=args.samples, seed=0)
    print(f"{args.images} photos x {args.samples} samples = {rows} rows, {args.max_length} words each, vocabulary "
          f"{args.vocab}, cpu-small sizes; medians of {args.repeats} runs")
    noise = {"Generator.gumbel": [], "vector log": []}
    for _ in range(args.repeats):
        for way, draw in (("Generator.gumbel", lambda random, shape: random.gumbel(size=shape)),
                          ("vector log", vector_gumbel)):
            random, start = np.random.default_rng(0), time.perf_counter()
            for _ in range(args.max_length):
                draw(random, (rows, args.vocab))
            noise[way].append(time.perf_counter() - start)
    noise = {way: statistics.median(seconds) for way, seconds in noise.items()}
    bounds = {}
    for arch, shape in SHAPES.items():
        keras.utils.set_random_seed(0)
        model = build_captioner(arch, vocab_size=args.vocab, feature_shape=shape, max_length=args.max_length,
                                embed_dim=preset["embed_dim"], units=preset["units"])
        decoder = TimedModel(make_step_decoder(model))
        features = np.random.default_rng(0).random((args.images, *shape), dtype=np.float32)
        sample_decode(decoder, features, **options)  # traces the decoder's graphs
        seconds = {"total": [], "steps": [], "per photo": []}
        for _ in range(args.repeats):
            decoder.seconds = {"steps": 0.0, "per photo": 0.0}
            start = time.perf_counter()
            sample_decode(decoder, features, **options)
            seconds["total"].append(time.perf_counter() - start)
            for part, value in decoder.seconds.items():
                seconds[part].append(value)
        total, step, photo = (statistics.median(seconds[part]) for part in ("total", "steps", "per photo"))
        gumbel = noise["Generator.gumbel"]
        rest = total - step - photo - gumbel
        bounds[arch] = total / (step + photo)
        print(f"{arch}: sampling {total:.2f} s; the model's steps {step:.2f} s ({step / total:.0%}), its work per "
              f"photo {photo:.2f} s ({photo / total:.0%}), the noise {gumbel:.2f} s ({gumbel / total:.0%}), the rest "
              f"{rest:.2f} s ({rest / total:.0%}); a compiled loop could be at most {bounds[arch]:.2f}x faster")
    print(f"the noise alone, {args.max_length} words of {rows} x {args.vocab}: Generator.gumbel "
          f"{noise['Generator.gumbel']:.2f} s, the same formula with numpy's vector log {noise['vector log']:.2f} s")
    print(f"merge_sampling_compiled_loop_bound: {bounds['merge']:.2f}")
    print(f"attention_sampling_compiled_loop_bound: {bounds['attention']:.2f}")


if __name__ == "__main__":
    main()
