"""Caption cleaning and the word <-> id vocabulary (taught in notebook 01).

A captioning model never sees words, only integer ids. This module decides
which words get an id, and fixes four special ids that every later stage
relies on:

    <pad>   0   fills the end of short captions so a batch is a rectangle
    <start> 1   the first word the decoder is fed
    <end>   2   the word the decoder must learn to emit when it is done
    <unk>   3   stands for every word too rare to earn its own id

A trained model is only meaningful together with the exact vocabulary it was
trained with (id 57 must mean the same word at training and at captioning
time), so the vocabulary saves to JSON and carries a fingerprint that later
stages can check.
"""

import collections
import hashlib
import re
import unicodedata
from pathlib import Path

import numpy as np

from captioning.fileio import read_json, write_json_atomic

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(len(SPECIALS))  # every other module takes the ids from here
FORMAT = "captioning-vocabulary"
VERSION = 1

# Apostrophes are deleted rather than turned into spaces so that "don't" stays
# one word ("dont") instead of becoming "don" + "t". Every other character that
# is not a letter or a digit separates words: "t-shirt," -> "t shirt".
_APOSTROPHES = re.compile(r"['\u2019\u2018`]")
_NOT_WORD = re.compile(r"[\W_]+")


def clean_caption(text):
    """Lowercase, strip punctuation, collapse whitespace; one-letter words ("a") are kept.

    Many tutorials drop words of one letter, which deletes "a" from nearly every
    caption and teaches the model broken English, so we keep them.
    Non-text input (None, NaN) cleans to the empty string. Notebook 01.
    """
    if not isinstance(text, str):
        return ""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _APOSTROPHES.sub("", text)
    return " ".join(_NOT_WORD.sub(" ", text).split())


class Vocabulary:
    """Word <-> id mapping with the four special tokens first. Notebook 01."""

    def __init__(self, words, max_length=20, min_count=None, max_size=None):
        words = list(words)
        if tuple(words[:4]) != SPECIALS:
            raise ValueError(f"vocabulary words must start with {list(SPECIALS)}, got {words[:4]}")
        if len(set(words)) != len(words):
            duplicates = sorted(word for word, n in collections.Counter(words).items() if n > 1)
            raise ValueError(f"vocabulary has duplicate words: {duplicates[:10]}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        self.words = words
        self.max_length = max_length
        self.min_count = min_count
        self.max_size = max_size
        self.index = {word: i for i, word in enumerate(words)}
        self.pad_id, self.start_id, self.end_id, self.unk_id = PAD_ID, START_ID, END_ID, UNK_ID

    @classmethod
    def build(cls, cleaned_captions, min_count=5, max_size=None, max_length=20):
        """Count words in already-cleaned captions and keep the frequent ones.

        `min_count`: a word seen fewer times gets <unk>: the model could not
        learn much about it anyway, and every extra word widens the softmax.
        `max_size`: cap on len(vocab), the 4 special tokens included, so it is
        exactly the width of the model's output layer.
        Words are ordered by frequency, ties alphabetically, so that the same
        captions always give the same ids (and the same fingerprint).
        """
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        if max_size is not None and max_size <= len(SPECIALS):
            raise ValueError(f"max_size must be more than {len(SPECIALS)} (the special tokens), got {max_size}")
        counts = collections.Counter()
        for caption in cleaned_captions:
            counts.update(caption.split() if isinstance(caption, str) else caption)
        for special in SPECIALS:
            counts.pop(special, None)
        kept = sorted((word for word, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            kept = kept[: max_size - len(SPECIALS)]
        return cls(list(SPECIALS) + kept, max_length=max_length, min_count=min_count, max_size=max_size)

    def __len__(self):
        return len(self.words)

    def __contains__(self, word):
        return word in self.index

    def __repr__(self):
        return f"Vocabulary({len(self)} words incl. specials, max_length={self.max_length})"

    @property
    def fingerprint(self):
        """Hex sha256 of the words in id order: equal fingerprints mean equal ids."""
        return hashlib.sha256("\n".join(self.words).encode("utf-8")).hexdigest()

    def encode(self, caption):
        """[start] + word ids (cut to max_length words) + [end]. Unknown words -> unk_id.

        `caption` is a string (it is cleaned first; cleaning twice changes
        nothing) or a list of words.
        """
        words = clean_caption(caption).split() if isinstance(caption, str) else list(caption)
        ids = [self.index.get(word, self.unk_id) for word in words[: self.max_length]]
        return [self.start_id] + ids + [self.end_id]

    def encode_batch(self, captions):
        """int32 array (N, max_length + 2): encoded captions padded with pad_id."""
        batch = np.full((len(captions), self.max_length + 2), self.pad_id, dtype=np.int32)
        for row, caption in enumerate(captions):
            ids = self.encode(caption)
            batch[row, : len(ids)] = ids
        return batch

    def decode(self, ids):
        """Ids -> text: start and pad are skipped, decoding stops at the first end."""
        words = []
        for token in np.asarray(ids).reshape(-1).tolist():
            if token == self.end_id:
                break
            if token in (self.start_id, self.pad_id):
                continue
            if not 0 <= token < len(self.words):
                raise ValueError(f"id {token} is outside the vocabulary (size {len(self.words)})")
            words.append(self.words[token])
        return " ".join(words)

    # --- saving --------------------------------------------------------------------

    def to_dict(self):
        return {
            "format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
            "max_length": self.max_length, "min_count": self.min_count, "max_size": self.max_size,
            "words": self.words,
        }

    def save(self, path):
        """Write the vocabulary as JSON, atomically (never a half-written file)."""
        write_json_atomic(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path):
        """Read a vocabulary saved by `save`; every problem is a ValueError naming the file and field."""
        data = read_json(path, "vocabulary file")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a vocabulary file (field 'format' should be {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"{path}: field 'version' is {data.get('version')!r}; this code reads version {VERSION}")
        words = data.get("words")
        if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
            raise ValueError(f"{path}: field 'words' must be a list of strings")
        try:
            vocab = cls(words, max_length=data.get("max_length"), min_count=data.get("min_count"),
                        max_size=data.get("max_size"))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        if data.get("fingerprint") not in (None, vocab.fingerprint):
            raise ValueError(f"{path}: field 'fingerprint' does not match the words (the file was edited or damaged)")
        return vocab

    def __eq__(self, other):
        return isinstance(other, Vocabulary) and self.words == other.words and self.max_length == other.max_length
