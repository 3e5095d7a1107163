"""What the notebooks' interactive panels compute, as plain functions (notebooks 04 and 06).

The panels themselves (ipywidgets sliders, an upload button, a dropdown) are a
few lines in the notebooks; what happens when a learner moves a slider or picks
a word is here, so that it is tested like the rest of the package and runs the
same with or without a browser:

    notebook 04   save_upload, photo_features   an uploaded photo -> its features
                  beam_table                    beam width, length_alpha -> the n-best captions, scored
    notebook 06   word_attention                a word of the caption -> the map the model used for it
                  attention_overlay             that map stretched over the photo
"""

import json
from pathlib import Path

import numpy as np

_ENCODERS = {}  # built encoders by (their settings, weights): building a CNN takes seconds


def save_upload(name, content, folder):
    """Write an uploaded file's bytes into `folder` under its base name and return the path
    (notebook 04). Only the last part of the name is used, so "../../x.jpg" lands in `folder`."""
    base = Path(str(name).replace("\\", "/")).name
    if base in ("", ".", ".."):
        raise ValueError(f"cannot save an upload named {name!r}: give the file a name")
    path = Path(folder) / base
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(content))
    return path


def photo_features(captioner, path, weights=None):
    """Features (1, *feature_shape) of one photo through the bundle's own encoder (notebook 04).

    The encoder is built once per bundle encoder and kept, so a second upload is quick.
    `weights`: where the encoder's weights file is now, if it moved. An unreadable photo
    raises ValueError with the reason (not an image, truncated, too large...).
    """
    from captioning.encoders import build_encoder_like, encode_images
    settings = captioner.settings["encoder"]
    key = (json.dumps(settings, sort_keys=True), str(weights))
    if key not in _ENCODERS:
        _ENCODERS[key] = build_encoder_like(settings, weights=weights,
                                            where=f"{captioner.bundle_dir}/bundle.json field 'encoder'")
    features, _, errors = encode_images(_ENCODERS[key], [path], batch_size=1)
    if errors:
        raise ValueError(f"cannot read {Path(path).name}: {errors[0][1]}")
    return features


def beam_table(captioner, features, beam_width=3, length_alpha=0.7):
    """Beam search on one photo's features, as a table of its `beam_width` finished captions,
    best first (notebook 04): caption, words, log-prob (the model's total) and score
    (log-prob / length ** length_alpha, the length counting <end>). Width 1 is greedy. The
    bundle's own repeat ban (bundle.json "decoding") applies, and <unk> is never shown."""
    import pandas as pd

    from captioning.decoding import beam_search
    vocab = captioner.vocab
    [hypotheses] = beam_search(
        captioner.decoder, np.asarray(features, dtype=np.float32)[:1], beam_width=int(beam_width),
        n_best=int(beam_width), length_alpha=float(length_alpha), start_id=vocab.start_id, end_id=vocab.end_id,
        max_length=vocab.max_length, banned_ids=[vocab.unk_id],
        no_repeat_ngram=captioner.settings.get("decoding", {}).get("no_repeat_ngram", 0))
    rows = [{"caption": vocab.decode(h.ids), "words": len(h.ids), "log-prob": h.log_prob, "score": h.score}
            for h in hypotheses]
    return pd.DataFrame(rows, index=pd.RangeIndex(1, len(rows) + 1, name="rank"))


def word_attention(words, maps, word):
    """The attention map (H, W) the model used while choosing `word`, one of `words` (notebook 06).

    `words` and `maps` are one photo's result of `Captioner.attend`; `word` is a word of
    the caption (its first occurrence) or its position. The map sums to 1 over the grid.
    """
    if isinstance(word, (int, np.integer)):
        position = int(word)
        if not 0 <= position < len(words):
            raise ValueError(f"position {position} is not in the caption ({len(words)} words)")
    elif word in words:
        position = list(words).index(word)
    else:
        raise ValueError(f"{word!r} is not a word of the caption {' '.join(words)!r}")
    return np.asarray(maps[position], dtype=np.float32)


def attention_overlay(weights, size):
    """A grid of attention weights stretched (bilinear) to a photo's `size` = (width, height),
    as it is laid over the photo (notebook 06): the grid covers the whole photo, squashed to a
    square as the encoder saw it. Returns an array (height, width)."""
    from PIL import Image
    grid = Image.fromarray(np.asarray(weights, dtype=np.float32))  # mode "F": 32-bit floats
    return np.asarray(grid.resize(tuple(int(side) for side in size), Image.BILINEAR))
