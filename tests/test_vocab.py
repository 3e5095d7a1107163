"""Caption cleaning and the Vocabulary: ids, round trips, saving and loading."""

import json

import numpy as np
import pytest

from captioning.vocab import END, PAD, START, UNK, Vocabulary, clean_caption

CAPTIONS = [
    "a dog runs on the grass",
    "a dog plays with a ball",
    "the dog is brown",
    "a cat sleeps on a bed",
    "a man rides a bike",
]


@pytest.mark.parametrize("raw, clean", [
    ("A Dog, running!", "a dog running"),
    ("  two   dogs\tplay\n", "two dogs play"),
    ("A man's T-shirt.", "a mans t shirt"),
    ("Don\u2019t stop", "dont stop"),
    ("a b c", "a b c"),  # one-letter words stay
    ("Caf\u00e9 in Paris", "caf\u00e9 in paris"),
    ("...!!!", ""),
    (None, ""),
])
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean
    assert clean_caption(clean) == clean  # cleaning is idempotent


def test_special_tokens_come_first_with_fixed_ids():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    assert vocab.words[:4] == [PAD, START, END, UNK]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert len(vocab) == 4 + len({word for caption in CAPTIONS for word in caption.split()})


def test_min_count_and_max_size_and_frequency_order():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    assert vocab.words[4:] == ["a", "dog", "on", "the"]  # by count (7, 3, 2, 2), ties alphabetically
    capped = Vocabulary.build(CAPTIONS, min_count=1, max_size=6)
    assert len(capped) == 6 and capped.words[4:] == ["a", "dog"]
    with pytest.raises(ValueError, match="max_size"):
        Vocabulary.build(CAPTIONS, max_size=4)
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.build(CAPTIONS, min_count=0)


def test_encode_decode_round_trip_with_unknown_words_and_truncation():
    vocab = Vocabulary.build(CAPTIONS, min_count=1, max_length=5)
    ids = vocab.encode("A dog runs on the grass!")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id and len(ids) == 5 + 2
    assert vocab.decode(ids) == "a dog runs on the"  # cut to max_length words
    assert vocab.decode(vocab.encode("a zebra runs")) == f"a {UNK} runs"
    assert vocab.decode([vocab.start_id, vocab.index["dog"], vocab.end_id, vocab.index["cat"]]) == "dog"
    assert vocab.decode(np.array([vocab.index["a"], vocab.pad_id, vocab.index["cat"]])) == "a cat"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([len(vocab) + 3])


def test_encode_batch_pads_to_a_rectangle():
    vocab = Vocabulary.build(CAPTIONS, min_count=1, max_length=6)
    batch = vocab.encode_batch(["a dog", "a man rides a bike on the grass"])
    assert batch.dtype == np.int32 and batch.shape == (2, 8)
    assert batch[0].tolist() == [1, vocab.index["a"], vocab.index["dog"], 2, 0, 0, 0, 0]
    assert batch[1, -1] == vocab.end_id and vocab.pad_id not in batch[1]


def test_save_load_keeps_ids_and_fingerprint(tmp_path):
    vocab = Vocabulary.build(CAPTIONS, min_count=1, max_length=7)
    vocab.save(tmp_path / "vocabulary.json")
    loaded = Vocabulary.load(tmp_path / "vocabulary.json")
    assert loaded == vocab and loaded.fingerprint == vocab.fingerprint and loaded.max_length == 7
    assert loaded.encode("a brown dog") == vocab.encode("a brown dog")
    other = Vocabulary.build(CAPTIONS[:3], min_count=1)
    assert other.fingerprint != vocab.fingerprint
    assert [path.name for path in tmp_path.iterdir()] == ["vocabulary.json"]  # no temp files left


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("words"), "'words'"),
    (lambda d: d.update(words=["a", "b"]), "must start with"),
    (lambda d: d["words"].append("dog"), "duplicate"),
    (lambda d: d.update(max_length=0), "max_length"),
    (lambda d: d.update(format="something else"), "'format'"),
    (lambda d: d["words"].append("zebra"), "'fingerprint'"),
])
def test_load_names_the_file_and_the_bad_field(tmp_path, edit, message):
    path = tmp_path / "vocabulary.json"
    saved = Vocabulary.build(CAPTIONS, min_count=1).to_dict()
    edit(saved)
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=message) as caught:
        Vocabulary.load(path)
    assert str(path) in str(caught.value)


def test_load_rejects_broken_json_and_missing_file(tmp_path):
    path = tmp_path / "vocabulary.json"
    path.write_text('{"words": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        Vocabulary.load(path)
    with pytest.raises(FileNotFoundError, match="vocabulary"):
        Vocabulary.load(tmp_path / "absent.json")
