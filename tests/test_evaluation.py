"""Metrics against hand-computed values, nltk BLEU against the COCO toolkit, and the evaluate CLI."""

import json
import math
import shutil

import pytest

from captioning import evaluation
from captioning.evaluation import (bleu_scores, bootstrap_intervals, coco_scores, diversity, results_table,
                                  same_caption_warning, tokenize)
from conftest import run_cli

# Image "cat": the classic clipping example. Image "dog": a short hypothesis that
# the brevity penalty must punish. Every hypothesis has at least 4 tokens and
# every n-gram order has at least one match, the case where nltk and the toolkit
# must agree exactly.
REFERENCES = {
    "cat": ["The cat is on the mat.", "There is a cat on the mat"],          # 6 and 7 tokens
    "dog": ["A dog runs in the park", "a brown dog is running through a park on a sunny day"],  # 6 and 12
}
HYPOTHESES = {"cat": "the cat the cat on the mat", "dog": "a dog runs fast"}  # 7 and 4 tokens

# Hand counts (clipped matches / hypothesis n-grams):
# "cat": unigrams the x3 (clipped to 2, ref 1 has two), cat x2 (clipped to 1), on, mat -> 5/7
#        bigrams the-cat x2 (clip 1), cat-the (0), cat-on, on-the, the-mat -> 4/6
#        trigrams the-cat-the, cat-the-cat, the-cat-on (0), cat-on-the, on-the-mat -> 2/5
#        4-grams: only cat-on-the-mat (ref 2) -> 1/4
# "dog": a, dog, runs match, fast does not -> 3/4; a-dog, dog-runs, runs-fast -> 2/3;
#        a-dog-runs, dog-runs-fast -> 1/2; a-dog-runs-fast -> 0/1
# Corpus precisions sum numerators and denominators: p1 = 8/11, p2 = 6/9, p3 = 3/7, p4 = 1/5.
# Brevity: hypothesis length c = 7 + 4 = 11; closest reference lengths 7 ("cat") and 6
# ("dog": |6-4| < |12-4|), r = 13, c < r so BP = exp(1 - r/c) = exp(1 - 13/11).
P = [8 / 11, 6 / 9, 3 / 7, 1 / 5]
BP = math.exp(1 - 13 / 11)
EXPECTED = {f"BLEU-{n}": BP * math.prod(P[:n]) ** (1 / n) for n in range(1, 5)}


def test_tokenize_drops_markers_and_punctuation():
    assert tokenize("<start> A man's hat, <unk> on a T-shirt. <end> <pad> <pad>") == \
        ["a", "mans", "hat", "unk", "on", "a", "t", "shirt"]
    assert tokenize(None) == []


def test_nltk_bleu_matches_hand_computation():
    scores = bleu_scores(REFERENCES, HYPOTHESES)
    assert scores.keys() == EXPECTED.keys()
    for name, value in EXPECTED.items():
        assert scores[name] == pytest.approx(value, rel=1e-12), name
    # Single image "cat" alone: closest reference length 7 = hypothesis length, no penalty.
    alone = bleu_scores({"cat": REFERENCES["cat"]}, {"cat": HYPOTHESES["cat"]})
    assert alone["BLEU-2"] == pytest.approx(math.sqrt(5 / 7 * 4 / 6))
    assert alone["BLEU-4"] == pytest.approx((5 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)


def test_corpus_bleu_is_not_the_mean_of_sentence_bleu():
    per_image = [bleu_scores({key: REFERENCES[key]}, {key: HYPOTHESES[key]}, smoothing=True)["BLEU-2"]
                 for key in REFERENCES]
    corpus = bleu_scores(REFERENCES, HYPOTHESES)["BLEU-2"]
    assert corpus != pytest.approx(sum(per_image) / 2, abs=1e-3)


def test_smoothing_rescues_a_zero_order():
    references = {"a": ["a dog runs in the park"]}
    hypotheses = {"a": "a dog sleeps in a park"}  # bigrams: only a-dog matches (1/5); no trigram
    plain = bleu_scores(references, hypotheses)
    smoothed = bleu_scores(references, hypotheses, smoothing=True)
    assert plain["BLEU-3"] == 0.0 and plain["BLEU-4"] == 0.0
    assert plain["BLEU-1"] == pytest.approx(4 / 6)  # a, dog, in, park (the second "a" is clipped)
    assert 0 < smoothed["BLEU-4"] < smoothed["BLEU-1"] == plain["BLEU-1"]


def test_toolkit_bleu_agrees_with_nltk_where_it_should():
    """pycocoevalcap's BleuScorer(option="closest") and nltk's corpus_bleu compute the
    same thing: clipped counts summed over the corpus, closest reference length per
    sentence (ties to the shorter in both), one corpus brevity penalty. They differ
    only by the toolkit's guards (+1e-15 / +1e-9 in each precision and in the length
    ratio): agreement to 1e-6 here."""
    toolkit = coco_scores(REFERENCES, HYPOTHESES, meteor=False)
    for name, value in EXPECTED.items():
        assert toolkit[name] == pytest.approx(value, rel=1e-6), name
    # A tie: hypothesis of 5 tokens, references of 4 and 6; both must choose 4 (no penalty).
    tie_refs, tie_hyps = {"x": ["a b c d", "a b c d e f"]}, {"x": "a b c d e"}
    assert coco_scores(tie_refs, tie_hyps, meteor=False)["BLEU-4"] == \
        pytest.approx(bleu_scores(tie_refs, tie_hyps)["BLEU-4"], rel=1e-6)
    # All 5 unigrams match reference 2, and r = 4 < c = 5: BLEU-1 = 1. Had the tie gone to
    # the longer reference, the brevity penalty would be exp(1 - 6/5) = 0.82.
    assert bleu_scores(tie_refs, tie_hyps)["BLEU-1"] == pytest.approx(1.0)


def test_toolkit_bleu_differs_from_nltk_on_short_and_zero_cases():
    # 1. A hypothesis shorter than n: nltk counts max(1, 0) = 1 n-gram of order n
    #    for it, the toolkit 0. With "a dog" (2 tokens) added, the 4-gram
    #    denominator is 4 + 1 + 1 = 6 in nltk but 5 in the toolkit.
    references = dict(REFERENCES, short=["a dog on a beach"])
    hypotheses = dict(HYPOTHESES, short="a dog")
    nltk4 = bleu_scores(references, hypotheses)["BLEU-4"]
    toolkit4 = coco_scores(references, hypotheses, meteor=False)["BLEU-4"]
    # p1 = 10/13, p2 = 7/10, p3 = 3/7 (+1 in nltk's denominator: 3/8), p4 = 1/5 (nltk 1/6);
    # c = 13, r = 13 + 5 (closest to 2 is 5) = 18.
    bp = math.exp(1 - 18 / 13)
    assert toolkit4 == pytest.approx(bp * (10 / 13 * 7 / 10 * 3 / 7 * 1 / 5) ** 0.25, rel=1e-6)
    assert nltk4 == pytest.approx(bp * (10 / 13 * 7 / 10 * 3 / 8 * 1 / 6) ** 0.25, rel=1e-9)
    # 2. No 4-gram match at all: nltk says 0, the toolkit's 1e-15 guard leaves a
    #    small positive number (about 1e-4), not a real score.
    zero_refs, zero_hyps = {"z": ["a dog runs in the park"]}, {"z": "a dog runs on grass"}
    assert bleu_scores(zero_refs, zero_hyps)["BLEU-4"] == 0.0
    assert 0 < coco_scores(zero_refs, zero_hyps, meteor=False)["BLEU-4"] < 1e-3


def test_cider_d_hand_value_and_ordering():
    # Two images with disjoint words, hypothesis equal to every reference: every
    # n-gram has df = 1 of N = 2 images, so all tf-idf weights are log 2 > 0, each
    # cosine is 1, the length penalty exp(-0^2 / 2 sigma^2) is 1, and CIDEr-D =
    # 10 x mean over n of 1 = 10 exactly.
    refs = {"1": ["a dog runs on grass"] * 2, "2": ["two cats sleep together"] * 2}
    perfect = {"1": "a dog runs on grass", "2": "two cats sleep together"}
    assert coco_scores(refs, perfect, meteor=False)["CIDEr"] == pytest.approx(10.0)
    # An unrelated caption shares no n-gram with the references: 0. A close one is between.
    references = {"1": ["a dog runs on the grass", "a brown dog running on grass"],
                  "2": ["a man rides a red bike", "a person riding a bicycle"],
                  "3": ["two cats sleep on a sofa", "cats sleeping on the couch"]}
    close = {"1": "a dog running on the grass", "2": "a man riding a bike", "3": "two cats on a sofa"}
    unrelated = {"1": "kitchen oven", "2": "snowy mountain peak", "3": "plates of food"}
    close_score = coco_scores(references, close, meteor=False)
    assert coco_scores(references, unrelated, meteor=False)["CIDEr"] == 0.0
    assert close_score["CIDEr"] > 0.5
    # CIDEr needs a corpus: with one image every idf is log(1/1) = 0 and the score is 0.
    assert coco_scores({"1": references["1"]}, {"1": close["1"]}, meteor=False)["CIDEr"] == 0.0
    assert 0 < close_score["ROUGE_L"] <= 1


def test_cider_d_scorer_gives_the_toolkits_scores_to_the_last_bit():
    # The self-critical reward keeps the references' statistics (CiderD) across epochs; it must
    # score what pycocoevalcap's Cider scores, exactly: repeated reference lists (five samples
    # per image), an empty candidate, candidates that share nothing with their references.
    import random

    import numpy as np
    from pycocoevalcap.cider.cider import Cider

    words = "a the dog man runs on grass two in of red shirt ball water boy girl".split()
    draw = random.Random(7)

    def sentence():
        return " ".join(draw.choice(words) for _ in range(draw.randint(1, 14)))

    references = [[sentence() for _ in range(5)] for _ in range(60)]
    repeated = [refs for refs in references for _ in range(5)]
    scorer = evaluation.CiderD(repeated)
    for _ in range(2):  # the same scorer for a second set of candidates, as in a second epoch
        candidates = [sentence() for _ in repeated]
        candidates[3], candidates[7] = "", "kitchen oven"
        toolkit = Cider().compute_score({i: refs for i, refs in enumerate(repeated)},
                                        {i: [text or "<empty>"] for i, text in enumerate(candidates)})[1]
        assert np.array_equal(scorer.scores(candidates), np.asarray(toolkit))
        assert np.array_equal(evaluation.cider_d(repeated, candidates), np.asarray(toolkit))
    with pytest.raises(ValueError, match="3 candidates for 300 reference lists"):
        scorer.scores(["a dog"] * 3)
    assert evaluation.cider_d([], []).shape == (0,)


def test_spice_is_reported_unavailable_not_an_error():
    scores = coco_scores(REFERENCES, HYPOTHESES, meteor=False)
    assert scores["SPICE"] is None
    assert "CoreNLP" in scores["unavailable"]["SPICE"] and "offline" in scores["unavailable"]["SPICE"]


def test_meteor_without_java_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(evaluation.shutil, "which", lambda name: None)
    scores = coco_scores(REFERENCES, HYPOTHESES)
    assert scores["METEOR"] is None
    assert "Java" in scores["unavailable"]["METEOR"] and "apt-get install" in scores["unavailable"]["METEOR"]
    assert scores["CIDEr"] > 0  # the other metrics are still there


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java (`java` not on PATH)")
def test_meteor_runs_with_java():
    # One Java start (several seconds) for all: two close captions, two unrelated ones.
    references = {"good1": ["a dog runs on the grass", "a brown dog running on grass"],
                  "good2": ["a man rides a bike", "a person riding a bicycle"],
                  "bad1": ["a dog runs on the grass", "a brown dog running on grass"],
                  "bad2": ["a man rides a bike", "a person riding a bicycle"]}
    hypotheses = {"good1": "a dog running on the grass", "good2": "a man riding a bike",
                  "bad1": "plates of food", "bad2": "snow on the mountain"}
    scores, per_image = evaluation.coco_scores_per_image(references, hypotheses)
    assert "METEOR" not in scores["unavailable"]
    assert 0 < scores["METEOR"] <= 1
    assert set(per_image) == set(references)
    assert min(per_image["good1"]["METEOR"], per_image["good2"]["METEOR"]) > 0.3
    assert max(per_image["bad1"]["METEOR"], per_image["bad2"]["METEOR"]) < 0.2


def test_mismatched_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="without references"):
        bleu_scores({"a": ["x y"]}, {"a": "x", "b": "y"})
    with pytest.raises(ValueError, match="without a hypothesis"):
        coco_scores({"a": ["x y"], "b": ["z"]}, {"a": "x"}, meteor=False)
    with pytest.raises(ValueError, match="list of captions"):
        bleu_scores({"a": "x y"}, {"a": "x"})
    with pytest.raises(ValueError, match="no non-empty reference"):
        bleu_scores({"a": ["...", ""]}, {"a": "x"})


def test_the_same_caption_alarm_rings_when_most_photos_get_one_caption():
    warning = same_caption_warning(["A man is standing."] * 6 + ["a dog runs on the grass"])
    assert warning.startswith("6 of 7 photos got the same caption ('a man is standing')")
    for cause in ("features are almost the same", "too few epochs", "vocabulary too small", "learning rate"):
        assert cause in warning
    assert same_caption_warning(["a man is standing"] * 4 + ["a dog"] * 1) is None  # too few photos to tell
    assert same_caption_warning(["a man is standing"] * 5 + [f"caption {i}" for i in range(5)]) is None  # half
    assert same_caption_warning([]) is None


def test_diversity_counts():
    hypotheses = {"1": "A dog runs.", "2": "a dog runs", "3": "a man on a bike", "4": "two cats"}
    result = diversity(hypotheses, training_captions=["a man on a bike", "A DOG RUNS!", "something else"])
    assert result["vocabulary_used"] == 8  # a dog runs man on bike two cats
    assert result["distinct_captions"] == 3 and result["distinct_share"] == 3 / 4
    assert result["copied_from_training"] == 3 / 4  # both "a dog runs" and "a man on a bike"
    assert result["length_counts"] == {"2": 1, "3": 2, "5": 1}
    assert result["length_mean"] == 13 / 4 and (result["length_min"], result["length_max"]) == (2, 5)


def test_bootstrap_bleu_statistics_sum_to_nltks_corpus_bleu():
    _, references, hypotheses = evaluation._paired_tokens(REFERENCES, HYPOTHESES)
    statistics = evaluation._bleu_statistics(references, hypotheses)
    assert statistics.tolist() == [[5, 7, 4, 6, 2, 5, 1, 4, 7, 7], [3, 4, 2, 3, 1, 2, 0, 1, 4, 6]]  # hand counts above
    assert evaluation._bleu4(statistics.sum(axis=0, keepdims=True))[0] == pytest.approx(EXPECTED["BLEU-4"], rel=1e-12)


def test_bootstrap_intervals_on_two_images_by_hand():
    # A draw of two images is (cat, cat), (dog, dog) or one of each, a quarter, a quarter and a half of
    # the time. BLEU-4 of "cat" alone: (5/7 * 4/6 * 2/5 * 1/4) ** (1/4), no brevity penalty (7 = 7
    # tokens); "dog" alone has no 4-gram match: 0. So the 95% interval runs from 0 to cat's BLEU-4.
    cat_alone = (5 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert bleu_scores({"cat": REFERENCES["cat"]}, {"cat": HYPOTHESES["cat"]})["BLEU-4"] == pytest.approx(cat_alone)
    intervals = bootstrap_intervals(REFERENCES, HYPOTHESES, cider_per_image={"cat": 1.0, "dog": 3.0},
                                    resamples=2000, seed=1)
    assert intervals["BLEU-4"] == pytest.approx([0.0, cat_alone])
    assert intervals["CIDEr"] == pytest.approx([1.0, 3.0])  # the means of (1, 1), (3, 3) and (1, 3)
    assert intervals["resamples"] == 2000 and intervals["confidence"] == 0.95
    assert bootstrap_intervals(REFERENCES, HYPOTHESES, seed=1)["CIDEr"] == \
        bootstrap_intervals(REFERENCES, HYPOTHESES, seed=1)["CIDEr"]  # toolkit CIDEr-D, same draws


def test_bootstrap_intervals_narrow_as_images_are_added():
    def copies(count):
        references = {f"{key}{i}": REFERENCES[key] for key in REFERENCES for i in range(count)}
        hypotheses = {f"{key}{i}": HYPOTHESES[key] for key in HYPOTHESES for i in range(count)}
        return bootstrap_intervals(references, hypotheses, cider_per_image={key: float(key.startswith("dog"))
                                                                             for key in hypotheses})
    few, many = copies(5), copies(80)  # 10 and 160 images: 4 times narrower, as 1 / sqrt(images)
    for name in ("BLEU-4", "CIDEr"):
        assert few[name][0] < many[name][0] <= many[name][1] < few[name][1]
        assert (many[name][1] - many[name][0]) < 0.4 * (few[name][1] - few[name][0])
    assert many["CIDEr"][0] < 0.5 < many["CIDEr"][1]  # the mean of as many 0s as 1s
    for bad in (dict(confidence=1.0), dict(confidence=0), dict(resamples=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            bootstrap_intervals(REFERENCES, HYPOTHESES, **bad)


def test_results_table_one_row_per_run_nan_for_unavailable():
    metrics = {"coco": coco_scores(REFERENCES, HYPOTHESES, meteor=False),
               "diversity": diversity(HYPOTHESES, []), "images": 2}
    table = results_table({"merge": metrics, "flat": {"BLEU-4": 0.25, "CIDEr": 0.5}})
    assert list(table.index) == ["merge", "flat"]
    assert table.loc["merge", "BLEU-4"] == pytest.approx(EXPECTED["BLEU-4"], rel=1e-6)
    assert math.isnan(table.loc["merge", "METEOR"]) and math.isnan(table.loc["flat", "vocabulary_used"])
    assert table.loc["merge", "vocabulary_used"] == 8  # the cat on mat a dog runs fast


@pytest.mark.slow
def test_evaluate_cli_on_flickr8k_dev(flickr8k_bundle, flickr8k_small_dir, flickr8k_work_dir, tmp_path):
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--model", flickr8k_bundle, "--dataset", "flickr8k", "--data-dir", flickr8k_small_dir,
                     "--split", "dev", "--beam", 2, "--cache-dir", flickr8k_work_dir, "--out", out)
    metrics = json.loads(result.stdout)  # stdout is exactly the metrics JSON
    assert metrics["split"] == "dev" and metrics["beam_width"] == 2
    assert metrics["images"] == 30  # the dev images of the suite's Flickr8k folder
    for name in ("BLEU-1", "BLEU-4", "ROUGE_L", "CIDEr"):
        assert 0 <= metrics["coco"][name] <= (10 if name == "CIDEr" else 1)
    assert metrics["coco"]["BLEU-1"] > 0.2  # a trained model gets common words right
    assert metrics["coco"]["SPICE"] is None
    assert metrics["bleu_nltk"]["BLEU-1"] == pytest.approx(metrics["coco"]["BLEU-1"], rel=0.05)
    assert json.loads((out / "metrics.json").read_text())["coco"] == metrics["coco"]
    intervals = metrics["intervals"]
    # A two-epoch model may write one caption of "a a a ..." for every photo: CIDEr-D 0 and an interval
    # [0, 0]. The interval must hold the score; that it has a width is tested on known scores above.
    assert intervals["CIDEr"][0] <= metrics["coco"]["CIDEr"] <= intervals["CIDEr"][1]
    assert intervals["BLEU-4"][0] <= metrics["bleu_nltk"]["BLEU-4"] <= intervals["BLEU-4"][1]
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions) == 30 and len({entry["id"] for entry in captions}) == 30
    entry = captions[0]
    assert entry["file"].endswith(".jpg") and entry["caption"].strip() and len(entry["references"]) == 5
    assert "CIDEr" in entry["scores"]

    bad = run_cli("evaluate", "--model", flickr8k_bundle, "--dataset", "flickr8k", "--data-dir", flickr8k_small_dir,
                  "--split", "test", "--cache-dir", flickr8k_work_dir, "--out", tmp_path / "bad", check=False)
    assert bad.returncode == 1 and "split 'test' has no images" in bad.stderr and "dev" in bad.stderr
