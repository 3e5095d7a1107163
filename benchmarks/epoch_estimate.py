"""How long one epoch of full-COCO training takes: measured step cost, counted FLOPs, an estimate.

The README's full-COCO recipe trains the `gpu-full` preset's merge model (512-d
embedding and LSTM, batches of 256 captions) on COCO's train2017 captions. This
script builds that model with COCO's vocabulary size, times training steps on
random data of the real shapes on this machine, and counts the model's matrix
multiplication FLOPs per step by hand (every dense product: embedding lookups
and element-wise work are left out, so the count is a lower bound). From the two
it prints:

  * the measured seconds per step here, and the FLOP rate that implies;
  * one epoch here: steps per epoch x measured seconds per step;
  * one epoch on a GPU, ESTIMATED: the epoch's FLOPs divided by an assumed
    sustained rate (--gpu-tflops, default 4: a third of a T4's 8 TFLOPS fp32
    peak, usual for a model this small). Not measured: no GPU was available.

    .venv/bin/python benchmarks/epoch_estimate.py [--steps 10] [--vocabulary 10000] [--captions 591753]

The last line is `name: value` as the others: the estimated GPU epoch in minutes.
"""

import argparse
import time

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import numpy as np  # noqa: E402

from captioning.architectures import build_captioner  # noqa: E402
from captioning.training import MODEL_KEYS, compile_captioner, preset_settings  # noqa: E402

FEATURES = 2048            # InceptionV3's pooled vector
TRAIN_CAPTIONS = 591_753   # captions_train2017.json (118,287 images)


def matmul_flops(settings, vocabulary, positions, batch):
    """Multiply-adds x 2 of one training step (forward, and backward at twice the forward)."""
    embed, units = settings["embed_dim"], settings["units"]
    per_position = (4 * (embed + units) * units      # the LSTM's four gates
                    + units * vocabulary)            # the word classifier
    per_caption = FEATURES * units + positions * per_position  # the image projection, once per caption
    forward = 2 * per_caption * batch
    return 3 * forward


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after two untimed)")
    parser.add_argument("--vocabulary", type=int, default=10_000,
                        help="words of min_count 5 in COCO train2017 (about 10,000)")
    parser.add_argument("--captions", type=int, default=TRAIN_CAPTIONS)
    parser.add_argument("--gpu-tflops", type=float, default=4.0, help="assumed sustained GPU rate, for the estimate")
    args = parser.parse_args()

    settings = preset_settings("gpu-full")
    batch, positions = settings["batch_size"], settings["max_length"] + 1
    model = build_captioner("merge", vocab_size=args.vocabulary, feature_shape=(FEATURES,),
                            max_length=settings["max_length"], **{key: settings[key] for key in MODEL_KEYS})
    compile_captioner(model, learning_rate=settings["learning_rate"])
    rng = np.random.default_rng(0)
    inputs = {"image": rng.standard_normal((batch, FEATURES)).astype("float32"),
              "words": rng.integers(1, args.vocabulary, (batch, positions)).astype("int32")}
    targets = rng.integers(1, args.vocabulary, (batch, positions)).astype("int32")
    for _ in range(2):
        model.train_on_batch(inputs, targets)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model.train_on_batch(inputs, targets)
        times.append(time.perf_counter() - start)
    step = float(np.median(times))

    flops = matmul_flops(settings, args.vocabulary, positions, batch)
    steps_per_epoch = -(-args.captions // batch)
    gpu_minutes = flops * steps_per_epoch / (args.gpu_tflops * 1e12) / 60
    print(f"gpu-full merge, vocabulary {args.vocabulary:,}, batch {batch}, {positions} positions: "
          f"{model.count_params():,} weights, {flops / 1e9:.1f} GFLOP per training step (matrix products)")
    print(f"measured here: median {step:.2f} s per step over {args.steps} -> {flops / step / 1e9:.0f} GFLOP/s")
    print(f"one epoch = {steps_per_epoch:,} steps ({args.captions:,} captions): "
          f"{steps_per_epoch * step / 3600:.1f} h here (measured step cost x steps)")
    print(f"ESTIMATE, not measured: {gpu_minutes:.1f} min per epoch on a GPU sustaining {args.gpu_tflops:g} TFLOPS")
    print(f"gpu_epoch_minutes_estimate: {gpu_minutes:.1f}")


if __name__ == "__main__":
    main()
