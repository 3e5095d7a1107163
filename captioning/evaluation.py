"""Scoring generated captions: BLEU with nltk, the COCO caption metrics, and diversity.

Taught in notebook 05_evaluation.ipynb. Every metric here compares a generated
caption with *all* the human captions of its image at once (five per image in
COCO and Flickr8k): a caption only has to agree with one of the people who
described the photo, not with their average.

Tokenisation, decided once for every metric. The COCO toolkit (pycocoevalcap)
normally tokenises with Stanford's PTBTokenizer, a Java program shipped without
its jar in the pip package. Instead we feed every scorer the tokens of our own
`clean_caption` (lowercase, punctuation stripped: the same text the model was
trained on), space-joined. So nltk and the toolkit see exactly the same tokens,
and a score does not depend on which tokenizer happened to be installed. Papers
that ran PTBTokenizer split "man's" into "man 's" where we write "mans": the
numbers are comparable in trend, not to the third decimal.

This module is pure metrics: captions in, numbers out. Captioning a whole
split with a bundle and writing the run's files is `evaluate.evaluate_bundle`.
"""

import shutil
import subprocess
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from captioning.cider import CiderD, cider_d  # noqa: F401 (CiderD: part of this module's API)
from captioning.vocab import END, PAD, START, clean_caption

MAX_ORDER = 4
# BLEU-n is the geometric mean of the first n clipped n-gram precisions, so its
# weights are n equal parts: BLEU-1 (1,), BLEU-2 (1/2, 1/2), ... BLEU-4 (1/4,)*4.
BLEU_WEIGHTS = [tuple([1.0 / n] * n) for n in range(1, MAX_ORDER + 1)]
BLEU_NAMES = [f"BLEU-{n}" for n in range(1, MAX_ORDER + 1)]
COCO_METRICS = BLEU_NAMES + ["METEOR", "ROUGE_L", "CIDEr"]

JAVA_MISSING = (
    "METEOR runs pycocoevalcap's meteor-1.5.jar, which needs Java 8 or newer, and `java` is not on PATH. "
    "Install a Java runtime (Debian/Ubuntu: `sudo apt-get install default-jre-headless`; macOS: "
    "`brew install openjdk`; conda: `conda install -c conda-forge openjdk`) and run the evaluation again."
)
SPICE_UNAVAILABLE = (
    "SPICE needs Stanford CoreNLP 3.6.0 (about 400 MB), which pycocoevalcap downloads from nlp.stanford.edu "
    "on first use, and an 8 GB Java heap; this course runs offline, so SPICE is not computed. Online, "
    "score the captions.json of a run with pycocoevalcap.spice.spice.Spice().compute_score(gts, res)."
)


def tokenize(caption):
    """The tokens every metric sees: `clean_caption(caption).split()`, with the
    vocabulary's start/end/padding markers removed first (notebook 05)."""
    if isinstance(caption, str):
        for special in (START, END, PAD):
            caption = caption.replace(special, " ")
    return clean_caption(caption).split()


def _paired_tokens(references, hypotheses):
    """Check that both dicts cover the same images; return (ids, reference token lists, hypothesis tokens)."""
    missing = sorted(set(hypotheses) - set(references), key=str)
    if missing:
        raise ValueError(f"hypotheses for images without references: {missing[:5]} ({len(missing)} in all)")
    unscored = sorted(set(references) - set(hypotheses), key=str)
    if unscored:
        raise ValueError(f"references for images without a hypothesis: {unscored[:5]} ({len(unscored)} in all)")
    if not hypotheses:
        raise ValueError("nothing to score: no hypotheses given")
    ids = sorted(hypotheses, key=str)
    reference_tokens, hypothesis_tokens = [], []
    for image_id in ids:
        refs = references[image_id]
        if isinstance(refs, str):
            raise ValueError(f"references of image {image_id!r} must be a list of captions, not one string")
        refs = [tokens for tokens in map(tokenize, refs) if tokens]
        if not refs:
            raise ValueError(f"image {image_id!r} has no non-empty reference caption")
        reference_tokens.append(refs)
        hypothesis_tokens.append(tokenize(hypotheses[image_id]))
    return ids, reference_tokens, hypothesis_tokens


def bleu_scores(references, hypotheses, *, smoothing=False):
    """Corpus BLEU-1..4 with nltk's `corpus_bleu` (notebook 05).

    references: {image id: [caption, ...]}; hypotheses: {image id: caption}.
    Corpus BLEU is not the mean of per-sentence BLEU: clipped n-gram matches and
    n-gram counts are summed over all images first, and one brevity penalty is
    computed from the summed hypothesis lengths and the summed *closest*
    reference lengths. Without smoothing, an order with no match at all makes
    BLEU-n (and every higher n) zero; `smoothing=True` (Chen & Cherry's method 1)
    or a SmoothingFunction method name ("method1".."method7") avoids that, which
    matters only for tiny test sets.
    """
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    _, reference_tokens, hypothesis_tokens = _paired_tokens(references, hypotheses)
    if smoothing is True:
        smoothing = "method1"
    smoothing_function = getattr(SmoothingFunction(), smoothing) if smoothing else None
    with warnings.catch_warnings():
        # nltk warns once per zero-match order; the docstring says what that means.
        warnings.simplefilter("ignore", UserWarning)
        scores = corpus_bleu(reference_tokens, hypothesis_tokens, weights=BLEU_WEIGHTS,
                             smoothing_function=smoothing_function)
    # Without smoothing nltk stands in 2.2e-308 for a zero precision; call that zero.
    return {name: float(score) if score > 1e-12 else 0.0 for name, score in zip(BLEU_NAMES, scores)}


def coco_scores(references, hypotheses, *, meteor=True, meteor_timeout=600):
    """The COCO caption metrics from pycocoevalcap (notebook 05): BLEU-1..4,
    METEOR, ROUGE-L and CIDEr (the toolkit's Cider is CIDEr-D: clipped tf-idf
    n-gram vectors and a Gaussian length penalty, times 10).

    Returns {metric: float or None, "unavailable": {metric: reason}}. METEOR is
    None where Java is missing (or `meteor=False`), SPICE always, each with the
    reason. CIDEr's idf weights come from the references being scored, so a
    CIDEr is only comparable between runs on the same split.
    """
    return coco_scores_per_image(references, hypotheses, meteor=meteor, meteor_timeout=meteor_timeout)[0]


def coco_scores_per_image(references, hypotheses, *, meteor=True, meteor_timeout=600):
    """`coco_scores` plus {image id: {metric: score}} for each image (used to find
    the best and worst captioned images in notebook 05)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    ids, reference_tokens, hypothesis_tokens = _paired_tokens(references, hypotheses)
    gts = {image_id: [" ".join(tokens) for tokens in refs] for image_id, refs in zip(ids, reference_tokens)}
    res = {image_id: [" ".join(tokens)] for image_id, tokens in zip(ids, hypothesis_tokens)}

    scores, per_image, unavailable = {}, {image_id: {} for image_id in ids}, {}

    def record(name, total, each):
        scores[name] = float(total)
        for image_id, value in zip(ids, each):
            per_image[image_id][name] = float(value)

    # verbose=0: the toolkit's BLEU otherwise prints its counts on stdout,
    # which would corrupt the JSON that `evaluate` prints there.
    bleu_total, bleu_each = Bleu(MAX_ORDER).compute_score(gts, res, verbose=0)
    for name, total, each in zip(BLEU_NAMES, bleu_total, bleu_each):
        record(name, total, each)
    scores["METEOR"] = None
    if not meteor:
        unavailable["METEOR"] = "not requested (meteor=False)"
    elif shutil.which("java") is None:
        unavailable["METEOR"] = JAVA_MISSING
    else:
        try:
            record("METEOR", *_meteor(gts, res, timeout=meteor_timeout))
        except (OSError, RuntimeError, ValueError) as error:
            scores["METEOR"] = None
            unavailable["METEOR"] = f"the METEOR scorer (Java) failed: {error}"
    record("ROUGE_L", *Rouge().compute_score(gts, res))
    cider = cider_d(list(gts.values()), [hypothesis for [hypothesis] in res.values()])
    record("CIDEr", cider.mean(), cider)
    scores["SPICE"] = None
    unavailable["SPICE"] = SPICE_UNAVAILABLE
    scores["unavailable"] = unavailable
    return scores, per_image


def _meteor(gts, res, *, timeout):
    """Score with pycocoevalcap's own METEOR 1.5 jar and its own command and protocol.

    We drive the jar ourselves rather than through `pycocoevalcap.meteor.Meteor`
    for two reasons: a Java process that dies (out of memory, killed) makes that
    class wait on a pipe forever, and after any error its `__del__` blocks on a
    lock it never released. Here a timer kills Java after `timeout` seconds and
    every failure becomes a RuntimeError that `coco_scores` reports.
    """
    import pycocoevalcap.meteor.meteor as toolkit

    jar_dir = Path(toolkit.__file__).resolve().parent
    command = ["java", "-jar", "-Xmx2G", toolkit.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, cwd=jar_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=errors, text=True, encoding="utf-8")
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()

        def answer():
            line = process.stdout.readline()
            if not line:
                errors.seek(0)
                reason = errors.read().decode(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"java exited or timed out after {timeout} s: {' '.join(reason)}")
            return line.strip()

        try:
            # One SCORE line per image (references ||| hypothesis) returns its
            # statistics; one EVAL line with all of them returns each image's
            # score and then the corpus score.
            stats = []
            for image_id in gts:
                process.stdin.write(" ||| ".join(["SCORE", *gts[image_id], res[image_id][0]]) + "\n")
                process.stdin.flush()
                stats.append(answer())
            process.stdin.write(" ||| ".join(["EVAL", *stats]) + "\n")
            process.stdin.flush()
            each = [float(answer()) for _ in stats]
            return float(answer()), each
        finally:
            watchdog.cancel()
            process.kill()
            process.wait()


def diversity(hypotheses, training_captions):
    """How varied the generated captions are (notebook 05).

    hypotheses: {image id: caption} or a list of captions; training_captions:
    the captions the model was trained on. A captioner that has learnt a few
    safe sentences can score a fair BLEU while saying the same thing about every
    photo; these numbers expose that: how many distinct words and captions it
    uses, which share it copied verbatim from the training set, and the length
    distribution (short, generic captions are the usual symptom).
    """
    captions = list(hypotheses.values()) if isinstance(hypotheses, Mapping) else list(hypotheses)
    if not captions:
        raise ValueError("diversity: no generated captions given")
    captions = [" ".join(tokenize(caption)) for caption in captions]
    training = {" ".join(tokenize(caption)) for caption in training_captions}
    lengths = np.array([len(caption.split()) for caption in captions])
    words = Counter(word for caption in captions for word in caption.split())
    return {
        "captions": len(captions),
        "vocabulary_used": len(words),
        "distinct_captions": len(set(captions)),
        "distinct_share": len(set(captions)) / len(captions),
        "copied_from_training": sum(caption in training for caption in captions) / len(captions),
        "length_mean": float(lengths.mean()),
        "length_std": float(lengths.std()),
        "length_min": int(lengths.min()),
        "length_max": int(lengths.max()),
        "length_counts": {str(length): int(count) for length, count in sorted(Counter(lengths.tolist()).items())},
        "top_words": words.most_common(10),
    }


SAME_CAPTION_CAUSES = (
    "the photos' features are almost the same: wrong encoder weights (WEIGHTS=none is random) or preprocessing; "
    "the feature cache says so when it is built (`features` prints the spread of the features)",
    "too few epochs: bundle.json's metrics.epochs_run, and whether the validation loss in training/history.csv "
    "was still falling",
    "a vocabulary too small for the captions: prepare's vocabulary size and unknown-word rate",
    "the learning rate: too high makes the loss jump or turn nan, too low barely moves it (training/history.csv)",
)


def same_caption_warning(captions):
    """None, or a warning when most photos got the same caption (notebook 05).

    A captioner that writes "a man in a blue shirt is standing" for every photo
    has learnt the captions' language but not to look: the usual symptom of
    one of SAME_CAPTION_CAUSES. "Most" is more than half of the photos, and at
    least five of them.
    """
    captions = [" ".join(tokenize(caption)) for caption in captions]
    if not captions:
        return None
    text, count = Counter(captions).most_common(1)[0]
    if count * 2 <= len(captions) or count < 5:
        return None
    checks = "".join(f"\n  - {cause}" for cause in SAME_CAPTION_CAUSES)
    return (f"{count} of {len(captions)} photos got the same caption ({text!r}): the model is not looking at the "
            f"photos. The usual causes, and what to check:{checks}")


def bootstrap_intervals(references, hypotheses, *, cider_per_image=None, resamples=1000, confidence=0.95, seed=0):
    """How far BLEU-4 and CIDEr-D could move on another set of images like these (notebook 05).

    The percentile bootstrap over images (Koehn 2004, "Statistical significance
    tests for machine translation evaluation"): draw as many images as were
    scored, with replacement, `resamples` times; score every draw; the interval
    holds the middle `confidence` share of those scores. On a hundred images it
    is wide (0.32 to 0.50 for a model scoring CIDEr-D 0.41 on the 113 Flickr8k
    dev images of the sample): two models whose scores differ by much less than
    that have not been told apart.

    BLEU-4 is nltk's corpus BLEU (bleu_scores), recomputed for every draw from
    the draw's summed n-gram statistics. CIDEr-D is the mean of the toolkit's
    per-image scores (pass coco_scores_per_image's as `cider_per_image`
    {image id: score} to save computing them again), with the idf weights of
    the whole split. Returns {"BLEU-4": [low, high], "CIDEr": [low, high],
    "resamples": ..., "confidence": ...}.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if int(resamples) < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    ids, reference_tokens, hypothesis_tokens = _paired_tokens(references, hypotheses)
    if cider_per_image is None:
        cider_per_image = dict(zip(ids, cider_d([[" ".join(tokens) for tokens in refs] for refs in reference_tokens],
                                               [" ".join(tokens) for tokens in hypothesis_tokens])))
    cider = np.array([cider_per_image[image_id] for image_id in ids], dtype=np.float64)

    # Each draw is a count per image (how often it was drawn), so a draw's sums are one matrix product.
    draws = np.random.default_rng(seed).multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=int(resamples))
    tails = [50 * (1 - confidence), 50 * (1 + confidence)]
    bleu = _bleu4(draws @ _bleu_statistics(reference_tokens, hypothesis_tokens))
    return {"BLEU-4": np.percentile(bleu, tails).tolist(),
            "CIDEr": np.percentile(draws @ cider / len(ids), tails).tolist(),
            "resamples": int(resamples), "confidence": confidence}


def _bleu_statistics(reference_tokens, hypothesis_tokens):
    """Per image, what nltk's corpus_bleu sums: for n = 1..4 the clipped n-gram matches and the
    hypothesis n-grams, then the hypothesis length and the closest reference length. (images, 10)"""
    from nltk.translate.bleu_score import closest_ref_length, modified_precision
    rows = []
    for refs, hypothesis in zip(reference_tokens, hypothesis_tokens):
        row = []
        for n in range(1, MAX_ORDER + 1):
            precision = modified_precision(refs, hypothesis, n)  # an unreduced fraction: the two counts
            row += [precision.numerator, precision.denominator]
        rows.append(row + [len(hypothesis), closest_ref_length(refs, len(hypothesis))])
    return np.array(rows, dtype=np.float64)


def _bleu4(totals):
    """Corpus BLEU-4 from summed statistics (rows of _bleu_statistics' columns), as corpus_bleu
    computes it without smoothing: 0 if some order has no match, else the brevity penalty times
    the geometric mean of the four precisions."""
    matches, counts = totals[:, 0:2 * MAX_ORDER:2], totals[:, 1:2 * MAX_ORDER:2]
    length, closest = totals[:, -2], totals[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_precision = np.log(matches / counts).mean(axis=1)
        brevity = np.where(length > closest, 0.0, 1.0 - closest / length)
        return np.where((matches > 0).all(axis=1) & (length > 0), np.exp(brevity + log_precision), 0.0)


TABLE_COLUMNS = COCO_METRICS + ["vocabulary_used", "distinct_share", "copied_from_training", "length_mean"]


def results_table(runs, columns=TABLE_COLUMNS):
    """One row per evaluation run, as a pandas DataFrame (notebook 05).

    runs: {run name: metrics dict} where each metrics dict is what
    `evaluate_bundle` returns (its "coco" and "diversity" sections are read) or a
    flat {column: value}. Unavailable metrics appear as NaN.
    """
    import pandas as pd

    rows = {}
    for name, metrics in runs.items():
        flat = {key: value for key, value in metrics.items() if not isinstance(value, (dict, list))}
        for section in ("coco", "diversity"):
            flat.update({key: value for key, value in metrics.get(section, {}).items()
                         if not isinstance(value, (dict, list))})
        rows[name] = {column: flat.get(column) for column in columns}
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(columns)).astype(float)

