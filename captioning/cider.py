"""CIDEr-D, the score this course evaluates captions with and self-critical training optimises
(notebooks 03 and 05).

CIDEr-D (Vedantam et al., 2015) compares a caption with the human captions of its photo as tf-idf
weighted n-gram vectors (n = 1..4), clipped, with a Gaussian penalty on the difference in length,
times 10. The idf weights come from the references being scored, so a CIDEr-D is comparable only
between runs on the same split. pycocoevalcap's `Cider` is the field's implementation; `CiderD`
below computes its numbers, to the last bit, with the references' statistics kept across calls.
"""

from collections import Counter

import numpy as np


def cider_d(references, candidates):
    """CIDEr-D of each candidate caption against its list of references (pycocoevalcap's Cider):
    the one implementation that evaluation and self-critical training (its reward) share.

    Both are already tokenised text (space-joined `tokenize` output). Document
    frequencies come from the references given, so pass all of them at once; the
    same reference list repeated for several candidates of one image leaves the
    idf weights unchanged. The toolkit's corpus CIDEr-D is the mean of these.
    """
    return CiderD(references).scores(candidates)


class CiderD:
    """CIDEr-D against a fixed list of reference lists, whose statistics are computed once.

    pycocoevalcap's `Cider` counts every reference's n-grams, their document
    frequencies and their tf-idf vectors again at each call. Self-critical
    training (self_critical.py) scores new samples against the *same* references
    every epoch, so this class does that work once, in __init__, and `scores`
    only turns the candidates into vectors. The arithmetic is the toolkit's,
    step for step and in the same order, so the scores are the toolkit's to the
    last bit (tests/test_evaluation.py compares them).
    """

    def __init__(self, references, n=4, sigma=6.0):
        from pycocoevalcap.cider.cider_scorer import precook
        self.n, self.sigma, self.references = n, sigma, [list(refs) for refs in references]
        self._precook = precook
        self.document_frequency = Counter()
        for refs in self.references:  # as CiderScorer.compute_doc_freq: an n-gram counts once per entry
            self.document_frequency.update({ngram for ref in refs for ngram in precook(ref, n)})
        self.log_entries = np.log(float(len(self.references))) if self.references else 0.0
        vectors = {}  # a reference list repeated for several candidates is turned into vectors once
        self._reference_vectors = [vectors.setdefault(tuple(refs), [self._vector(precook(ref, n)) for ref in refs])
                                   for refs in self.references]

    def _vector(self, counts):
        """n-gram counts -> (tf-idf weights per n-gram length, their norms, the length), as the toolkit's counts2vec."""
        vector, norm, length = [{} for _ in range(self.n)], [0.0] * self.n, 0
        for ngram, term_freq in counts.items():
            size = len(ngram) - 1
            vector[size][ngram] = float(term_freq) * (self.log_entries -
                                                      np.log(max(1.0, self.document_frequency.get(ngram, 0.0))))
            norm[size] += pow(vector[size][ngram], 2)
            if size == 1:  # the toolkit's length counts bigrams: kept, so that the scores are its scores
                length += term_freq
        return vector, [np.sqrt(value) for value in norm], length

    def _similarity(self, candidate, reference):
        (vector, norm, length), (reference_vector, reference_norm, reference_length) = candidate, reference
        delta = float(length - reference_length)
        value = np.array([0.0] * self.n)
        for size in range(self.n):
            for ngram, weight in vector[size].items():
                other = reference_vector[size].get(ngram, 0.0)
                value[size] += min(weight, other) * other  # clipped: CIDEr-D
            if norm[size] != 0 and reference_norm[size] != 0:
                value[size] /= norm[size] * reference_norm[size]
            value[size] *= np.e ** (-(delta ** 2) / (2 * self.sigma ** 2))  # the length penalty
        return value

    def scores(self, candidates):
        """One CIDEr-D per candidate (space-joined tokens), candidate i against references[i]."""
        if len(candidates) != len(self.references):
            raise ValueError(f"{len(candidates)} candidates for {len(self.references)} reference lists")
        result = np.zeros(len(candidates), dtype=np.float64)
        for index, (candidate, reference_vectors) in enumerate(zip(candidates, self._reference_vectors)):
            # The toolkit cannot score an empty caption; a word that no reference uses scores the same zero.
            vector = self._vector(self._precook(candidate if candidate.strip() else "<empty>", self.n))
            total = np.array([0.0] * self.n)
            for reference in reference_vectors:
                total += self._similarity(vector, reference)
            result[index] = np.mean(total) / len(reference_vectors) * 10.0
        return result
