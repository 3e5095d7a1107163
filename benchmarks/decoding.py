"""Captions per second: batched beam search vs the per-image, per-word loop of older tutorials.

    python benchmarks/decoding.py                          # trains a small model on synthetic data first
    python benchmarks/decoding.py --bundle BUNDLE_DIR [--features CACHE_DIR]

Both sides run beam search with width 3 on the same trained model and the
same image features, and must return identical captions:

  * batched (captioning.decoding.beam_search): all images x 3 beams in one
    compiled StepDecoder call per time step, recurrent states carried over;
  * per-image loop (the older tutorials' way): for each image, for each word,
    one `model.predict` on the full model with the beams' padded prefixes, so
    the whole prefix is re-read at every step and every call pays Keras's
    per-call overhead.

The loop is slow, so it captions only the first --loop-images of the images;
its rate is compared with the batched rate on all of them (and, for the
record, on the same few). It also times the repeat ban (no_repeat_ngram=2)
against plain beam search. Goals (issue 5): >= 50x, and >= 50 captions/s for
the default model size on a 2-core CPU. The last line is `name: value`.
"""

import argparse
import sys
import time

import numpy as np

from captioning import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402

from captioning.decoding import DEFAULT_LENGTH_ALPHA, beam_search, length_normalised  # noqa: E402
from captioning.architectures import build_captioner, make_step_decoder  # noqa: E402

PAD, START, END = 0, 1, 2
BEAM = 3


def synthetic_model(vocab_size=3000, feature_dim=2048, max_length=20, scenes=40, captions=4000, seed=0):
    """Train a default-size merge model (embed 256, units 256) for two epochs on made-up data.

    Each of `scenes` scenes has a feature vector and a base sentence; a caption
    is its scene's sentence with some words swapped and its length varied. A
    trained model ends its captions at sensible lengths, which an untrained
    one does not (it would always run to max_length: an unfair workload)."""
    random = np.random.default_rng(seed)
    centres = random.normal(size=(scenes, feature_dim)).astype(np.float32)
    sentences = [random.integers(4, vocab_size, size=random.integers(6, 15)) for _ in range(scenes)]
    scene_of = random.integers(0, scenes, size=captions)
    images = centres[scene_of] + 0.3 * random.normal(size=(captions, feature_dim)).astype(np.float32)
    words = np.full((captions, max_length + 2), PAD, dtype=np.int32)
    for row, scene in enumerate(scene_of):
        sentence = sentences[scene][: len(sentences[scene]) - random.integers(0, 3)].copy()
        swapped = random.random(len(sentence)) < 0.15
        sentence[swapped] = random.integers(4, vocab_size, size=swapped.sum())
        words[row, : len(sentence) + 2] = [START, *sentence, END]
    model = build_captioner("merge", vocab_size=vocab_size, feature_shape=feature_dim, max_length=max_length)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=PAD))
    model.fit({"image": images, "words": words[:, :-1]}, words[:, 1:], batch_size=64, epochs=2, verbose=0)
    test_images = centres[random.integers(0, scenes, size=512)]
    test_images += 0.3 * random.normal(size=test_images.shape).astype(np.float32)
    return model, max_length, test_images


def bundle_model(bundle_dir, features_dir, count):
    from captioning.bundle import Captioner
    captioner = Captioner.load(bundle_dir)
    vocab = captioner.vocab
    if (vocab.pad_id, vocab.start_id, vocab.end_id) != (PAD, START, END):
        raise ValueError(f"{bundle_dir}: unexpected special token ids")
    if features_dir:
        from captioning.features import FeatureStore
        store = FeatureStore.open(features_dir)
        features = store.get_many(store.ids[:count])
    else:  # CNN features after ReLU are non-negative; stay roughly in distribution
        features = np.abs(np.random.default_rng(0).normal(size=(count, *captioner.settings["feature_shape"])))
    return captioner.model, vocab.max_length, features.astype(np.float32)


def per_image_beam_search(model, feature, max_length, beam_width=BEAM, alpha=DEFAULT_LENGTH_ALPHA):
    """The same beam search, written the old way: plain Python per image, full model re-run per word."""
    beams = [([], 0.0)]  # (words so far, total log-prob)
    finished = []  # (score, log_prob, words)
    for length in range(1, max_length + 1):
        prefixes = np.full((len(beams), max_length + 1), PAD, dtype=np.int32)
        for row, (ids, _) in enumerate(beams):
            prefixes[row, : length] = [START, *ids]
        images = np.repeat(feature[None], len(beams), axis=0)
        logits = model.predict({"image": images, "words": prefixes}, verbose=0)[:, length - 1, :]
        log_probs = tf.nn.log_softmax(logits).numpy()
        log_probs[:, [PAD, START]] = -np.inf
        total = (np.array([log_prob for _, log_prob in beams])[:, None] + log_probs).reshape(-1)
        order = np.argsort(-total, kind="stable")[: 2 * beam_width]
        vocab_size = log_probs.shape[1]
        last = length == max_length
        next_beams = []
        for position, index in enumerate(order):
            beam, token, log_prob = index // vocab_size, index % vocab_size, float(total[index])
            ids = beams[beam][0]
            if position < beam_width and (token == END or last):
                complete = ids + ([] if token == END else [int(token)])
                finished.append((length_normalised(log_prob, length, alpha), log_prob, complete))
            elif token != END and len(next_beams) < beam_width:
                next_beams.append((ids + [int(token)], log_prob))
        finished = sorted(finished, key=lambda item: -item[0])[:beam_width]
        if last or len(finished) >= beam_width:
            break
        beams = next_beams
    return finished[0][2]


def batched(decoder, features, max_length, **options):
    results = beam_search(decoder, features, start_id=START, end_id=END, max_length=max_length, beam_width=BEAM,
                          **options)
    return [image[0].ids for image in results]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="a trained bundle (default: train a small model)")
    parser.add_argument("--features", default=None, help="with --bundle: a feature cache to caption")
    parser.add_argument("--images", type=int, default=256, help="images for the batched run")
    parser.add_argument("--loop-images", type=int, default=12, help="images for the per-image loop")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.bundle:
        model, max_length, features = bundle_model(args.bundle, args.features, args.images)
    else:
        model, max_length, features = synthetic_model()
    features = features[: args.images]
    print(f"model ready in {time.perf_counter() - start:.0f} s: {model.count_params():,} parameters, "
          f"{len(features)} images, max_length {max_length}, beam width {BEAM}")
    decoder = make_step_decoder(model)

    # Warm up both sides (tracing and first-call costs are not decoding speed).
    batched(decoder, features[:2], max_length)
    per_image_beam_search(model, features[0], max_length)

    start = time.perf_counter()
    fast = batched(decoder, features, max_length)
    batched_rate = len(features) / (time.perf_counter() - start)
    few = features[: args.loop_images]
    start = time.perf_counter()
    fast_few = batched(decoder, few, max_length)
    batched_few_rate = len(few) / (time.perf_counter() - start)
    start = time.perf_counter()
    slow = [per_image_beam_search(model, feature, max_length) for feature in few]
    loop_rate = len(few) / (time.perf_counter() - start)

    same = sum(a == b for a, b in zip(slow, fast[: len(few)]))
    mean_length = np.mean([len(ids) for ids in fast])
    print(f"identical captions: {same}/{len(few)} (mean caption length {mean_length:.1f} words)")
    print(f"batched beam-{BEAM}, {len(features)} images: {batched_rate:8.1f} captions/s")
    print(f"batched beam-{BEAM}, {len(few)} images:  {batched_few_rate:8.1f} captions/s")
    print(f"per-image loop, {len(few)} images:       {loop_rate:8.2f} captions/s")
    print(f"speed-up on the same {len(few)} images: {batched_few_rate / loop_rate:.0f}x")
    # The cost of the repeat ban (no_repeat_ngram=2, an option of beam search): both
    # ways alternately, three times each, on all the images; medians compared.
    seconds = {0: [], 2: []}
    for _ in range(3):
        for n in seconds:
            start = time.perf_counter()
            batched(decoder, features, max_length, no_repeat_ngram=n)
            seconds[n].append(time.perf_counter() - start)
    print(f"no_repeat_ngram=2 costs {np.median(seconds[2]) / np.median(seconds[0]):.2f}x the time of no ban "
          f"(medians of 3: {np.median(seconds[2]):.2f} s vs {np.median(seconds[0]):.2f} s)")
    if same != len(few) or fast_few != fast[: len(few)]:
        print("error: the two decoders disagree", file=sys.stderr)
        return 1
    print(f"decoding_speedup_batched_vs_per_image_loop: {batched_rate / loop_rate:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
