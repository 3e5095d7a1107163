"""The callbacks of the notebooks' interactive panels (captioning/widgets.py), called directly
on small synthetic bundles: notebook 04's beam table and photo upload, notebook 06's
attention map for a chosen word."""

import numpy as np
import pytest
from PIL import Image

from captioning import quiet_tensorflow

tf = quiet_tensorflow()

from captioning.attention import GRID_POOL  # noqa: E402
from captioning.bundle import Captioner, save_bundle  # noqa: E402
from captioning.decoding import length_normalised  # noqa: E402
from captioning.vocab import Vocabulary  # noqa: E402
from captioning.widgets import attention_overlay, beam_table, photo_features, save_upload, word_attention  # noqa: E402
from test_attention import train_where, where_data  # noqa: E402
from test_training import synthetic_captions, train_synthetic  # noqa: E402

SETTINGS = {"arch": "merge", "dataset": "synthetic", "encoder": {"encoder": "none"},
            "decoding": {"length_alpha": 0.7, "no_repeat_ngram": 0}}


@pytest.fixture(scope="module")
def weak_captioner(tmp_path_factory):
    """A merge bundle trained for two epochs only: unsure enough that beam width matters."""
    model, vocab, _ = train_synthetic("merge", epochs=2)
    return Captioner.load(save_bundle(tmp_path_factory.mktemp("weak") / "bundle", model, vocab, SETTINGS))


def tokens_scored(caption, max_length):
    words = len(caption.split())
    return words + (1 if words < max_length else 0)  # <end>, unless cut at max_length


# --- notebook 04: beam width and length normalisation ----------------------------------------

def test_beam_table_lists_the_k_finished_captions_with_their_scores(weak_captioner):
    features, _ = synthetic_captions(6, seed=5)
    max_length = weak_captioner.vocab.max_length
    for row in range(len(features)):
        for width in (1, 3, 5):
            table = beam_table(weak_captioner, features[row:row + 1], beam_width=width, length_alpha=0.7)
            assert list(table.columns) == ["caption", "words", "log-prob", "score"] and len(table) == width
            assert list(table.index) == list(range(1, width + 1))
            assert table["score"].is_monotonic_decreasing  # best first
            for _, entry in table.iterrows():
                assert entry["words"] == len(entry["caption"].split())
                assert entry["score"] == pytest.approx(
                    length_normalised(entry["log-prob"], tokens_scored(entry["caption"], max_length), 0.7))
        # Width 1 is greedy: the caption the bundle writes with beam_width=1.
        greedy = weak_captioner.caption_features(features[row:row + 1], beam_width=1)[0]
        assert beam_table(weak_captioner, features[row:row + 1], beam_width=1)["caption"][1] == greedy


def test_the_table_changes_with_beam_width_and_length_alpha(weak_captioner):
    features, _ = synthetic_captions(20, seed=6)
    tables = {(width, alpha): [beam_table(weak_captioner, features[i:i + 1], width, alpha) for i in range(20)]
              for width in (1, 5) for alpha in (0.0, 2.0)}
    # A wider beam finds other captions for some photos.
    best = {key: [table["caption"][1] for table in rows] for key, rows in tables.items()}
    assert best[(1, 0.0)] != best[(5, 0.0)]
    # α = 0 ranks by the model's log-probability itself; α = 2 forgives length, and reorders.
    for table in tables[(5, 0.0)]:
        np.testing.assert_allclose(table["score"], table["log-prob"])
        assert table["log-prob"].is_monotonic_decreasing
    assert any(list(a["caption"]) != list(b["caption"]) for a, b in zip(tables[(5, 0.0)], tables[(5, 2.0)]))
    # The same search with α = 2 scores each caption log-prob / tokens ** 2.
    for table in tables[(5, 2.0)]:
        tokens = [tokens_scored(caption, weak_captioner.vocab.max_length) for caption in table["caption"]]
        np.testing.assert_allclose(table["score"], table["log-prob"] / np.square(tokens))


def test_an_upload_is_saved_inside_its_folder_by_its_base_name(tmp_path):
    folder = tmp_path / "uploads"
    for name in ("photo.jpg", "../../escape.jpg", "/etc/evil.jpg", "a\\b\\windows.jpg"):
        path = save_upload(name, memoryview(b"bytes of " + name.encode()), folder)
        assert path.parent == folder and path.read_bytes() == b"bytes of " + name.encode()
    assert sorted(path.name for path in folder.iterdir()) == ["escape.jpg", "evil.jpg", "photo.jpg", "windows.jpg"]
    assert not (tmp_path / "escape.jpg").exists()
    with pytest.raises(ValueError, match="name"):
        save_upload("..", b"x", folder)


@pytest.mark.slow
def test_an_uploaded_photo_goes_through_the_bundles_own_encoder(tmp_path):
    from captioning.architectures import build_captioner
    from captioning.encoders import build_encoder, encode_images

    encoder = build_encoder("mobilenet_v2", weights="none")  # fixed random weights: no download
    vocab = Vocabulary.build(["a red dog", "a blue car"], min_count=1, max_length=5)
    model = build_captioner("merge", vocab_size=len(vocab), feature_shape=encoder.feature_shape[0],
                            max_length=vocab.max_length, embed_dim=4, units=4)
    captioner = Captioner.load(save_bundle(tmp_path / "bundle", model, vocab,
                                           dict(SETTINGS, encoder=encoder.settings())))
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(photo)
    features = photo_features(captioner, photo)
    assert features.shape == (1, *encoder.feature_shape)
    np.testing.assert_allclose(features, encode_images(encoder, [photo])[0], rtol=1e-5, atol=1e-5)
    assert len(beam_table(captioner, features, beam_width=2)) == 2
    broken = save_upload("notes.jpg", b"not a photo at all", tmp_path)
    with pytest.raises(ValueError, match="cannot read notes.jpg"):
        photo_features(captioner, broken)


# --- notebook 06: the attention map of a chosen word ------------------------------------------

@pytest.fixture(scope="module")
def attention_captioner(tmp_path_factory):
    grids, captions = where_data(240, seed=1)
    vocab = Vocabulary.build(captions, min_count=1, max_length=4)
    model = train_where("attention", grids, captions, vocab, epochs=8)
    bundle = save_bundle(tmp_path_factory.mktemp("attention") / "bundle", model, vocab,
                         {"arch": "attention", "dataset": "synthetic", "encoder": {"encoder": "none"}})
    return Captioner.load(bundle)


def test_the_map_of_a_chosen_word_has_the_regions_shape_and_sums_to_one(attention_captioner):
    grids, _ = where_data(5, seed=7)
    attended = attention_captioner.attend(grids, beam_width=3)
    grid = tuple(-(-side // GRID_POOL) for side in grids.shape[1:3])  # the grid's cells, pooled into regions
    for words, maps in attended:
        assert len(words) >= 2 and maps.shape == (len(words), *grid)
        for position, word in enumerate(words):
            chosen = word_attention(words, maps, position)
            assert chosen.shape == grid and (chosen >= 0).all()
            assert chosen.sum() == pytest.approx(1.0, abs=1e-5)
            np.testing.assert_array_equal(chosen, maps[position])
            # By the word itself: its first occurrence in the caption.
            np.testing.assert_array_equal(word_attention(words, maps, word), maps[words.index(word)])
        # The model looks elsewhere for different words: the maps are not one map repeated.
        assert not all(np.allclose(maps[0], other) for other in maps[1:])
    words, maps = attended[0]
    with pytest.raises(ValueError, match="not a word of the caption"):
        word_attention(words, maps, "zebra")
    with pytest.raises(ValueError, match="not in the caption"):
        word_attention(words, maps, len(words))


def test_the_overlay_stretches_the_map_over_the_photo():
    weights = np.zeros((10, 10), dtype=np.float32)
    weights[2, 7] = 1.0  # all the attention on one region: row 2, column 7
    overlay = attention_overlay(weights, (400, 300))  # (width, height) as PIL gives photo.size
    assert overlay.shape == (300, 400)
    assert overlay.max() <= 1.0 + 1e-6 and overlay.min() >= 0.0
    y, x = np.unravel_index(overlay.argmax(), overlay.shape)
    assert (int(y // 30), int(x // 40)) == (2, 7)  # the peak lies in that region of the photo
    assert overlay[300 - 1, 0] == 0.0  # far from it, nothing
