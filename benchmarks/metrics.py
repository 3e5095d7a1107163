"""How long BLEU and CIDEr take on a COCO-sized evaluation: 5,000 generated captions, 25,000 references.

Scoring runs after every experiment in notebook 05 (five times per run), so it
must stay a few seconds, not minutes. Java-free metrics only: METEOR's cost is
mostly the JVM start-up (about 7 s on this machine whatever the input size).

The captions are real when the COCO val2017 annotations are on disk (all 5,000
images, 25,014 human captions): each image's "generated" caption is one of its
own captions with one word dropped (a good caption) for half the images, and a
caption of another image (fluent but wrong) for the other half, so n-gram
overlaps look like a real model's. Without the file, a small grammar makes
synthetic captions of the same shape.

Usage: .venv/bin/python benchmarks/metrics.py [--annotations PATH]
"""

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from captioning.evaluation import bleu_scores, bootstrap_intervals, coco_scores_per_image  # noqa: E402

DEFAULT_ANNOTATIONS = REPO.parent / "shared/data/coco-val2017-sample/annotations/captions_val2017.json"
IMAGES, REFERENCES_PER_IMAGE = 5000, 5


def coco_references(path):
    with open(path, encoding="utf-8") as handle:
        annotations = json.load(handle)["annotations"]
    references = defaultdict(list)
    for annotation in annotations:
        references[str(annotation["image_id"])].append(annotation["caption"])
    return dict(references)


def synthetic_references(rng):
    subjects = ["a man", "a woman", "two dogs", "a cat", "a group of people", "a young boy", "a train", "a bus"]
    verbs = ["sitting on", "standing next to", "riding", "walking along", "parked near", "looking at"]
    objects = ["a bench", "the beach", "a red car", "a wooden table", "the street", "a grassy field"]
    tails = ["", " in the snow", " on a sunny day", " with a frisbee", " near the water"]
    return {str(i): [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(tails)}"
                     for _ in range(REFERENCES_PER_IMAGE)] for i in range(IMAGES)}


def make_hypotheses(references, rng):
    ids = list(references)
    hypotheses = {}
    for image_id in ids:
        if rng.random() < 0.5:
            words = rng.choice(references[image_id]).split()
            del words[rng.randrange(len(words))]
            hypotheses[image_id] = " ".join(words)
        else:
            hypotheses[image_id] = rng.choice(references[rng.choice(ids)])
    return hypotheses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", default=str(DEFAULT_ANNOTATIONS))
    args = parser.parse_args(argv)
    rng = random.Random(0)
    if Path(args.annotations).is_file():
        references = coco_references(args.annotations)
        source = f"COCO val2017 captions ({args.annotations})"
    else:
        references = synthetic_references(rng)
        source = "synthetic captions (COCO annotations not found)"
    references = dict(list(references.items())[:IMAGES])
    hypotheses = make_hypotheses(references, rng)
    print(f"{len(hypotheses):,} generated captions, {sum(map(len, references.values())):,} references: {source}")

    start = time.perf_counter()
    nltk_bleu = bleu_scores(references, hypotheses)
    nltk_seconds = time.perf_counter() - start
    toolkit, per_image = coco_scores_per_image(references, hypotheses, meteor=False)
    total = time.perf_counter() - start
    print(f"nltk corpus BLEU-4 {nltk_bleu['BLEU-4']:.4f} in {nltk_seconds:.2f} s")
    print(f"COCO toolkit (BLEU, ROUGE-L, CIDEr-D) BLEU-4 {toolkit['BLEU-4']:.4f} CIDEr {toolkit['CIDEr']:.3f} "
          f"in {total - nltk_seconds:.2f} s")
    print(f"goal <= 10 s: {'met' if total <= 10 else 'MISSED'} ({total / 10:.2f} of the budget)")
    print(f"metrics_seconds: {total:.2f}")

    # Not part of the goal: the 95% intervals `evaluate` adds (1,000 resamples), from the same per-image scores.
    start = time.perf_counter()
    intervals = bootstrap_intervals(references, hypotheses,
                                    cider_per_image={key: value["CIDEr"] for key, value in per_image.items()})
    seconds = time.perf_counter() - start
    print(f"bootstrap intervals BLEU-4 {intervals['BLEU-4'][0]:.4f}-{intervals['BLEU-4'][1]:.4f} "
          f"CIDEr {intervals['CIDEr'][0]:.3f}-{intervals['CIDEr'][1]:.3f} in {seconds:.2f} s "
          f"({seconds / total:.2f}x the metrics' time)")


if __name__ == "__main__":
    main()
