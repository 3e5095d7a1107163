"""Self-critical fine-tuning: train on the captions the model writes, scored by CIDEr-D
(Rennie et al. 2017, "Self-critical sequence training for image captioning"). Notebook 03.

Teacher forcing (training.py) teaches the model to predict the next *human*
word. But at test time the model reads its *own* words, and we judge whole
captions with CIDEr-D, not words with cross-entropy. Self-critical training
closes both gaps with REINFORCE:

    1. for every training image, sample a few captions from the model;
    2. score each with CIDEr-D against that image's human captions;
    3. make the words of captions that beat the others of the same image more
       likely, and those of worse ones less likely.

Step 3 is teacher forcing again, on the model's own sampled caption, with the
loss of every word weighted by the caption's *advantage*: its score minus the
mean score of the other samples of the same image (the baseline of Luo, 2020,
"A better variant of self-critical sequence training"). So the full-sequence
model, its masked loss and fit() are reused as they are, with sample weights.

Which weights to keep. Each epoch's captions are sampled, so the weights
wander from epoch to epoch, and the validation score with them. `average_last=1`
keeps the weights of the last epoch: fine-tuning ran its course, and nothing is
chosen on a hundred noisy validation images. With `average_last=K` (5, the
cpu-small preset's) the model ends with the *mean* of the last K epochs' weights
(they all start from the same teacher-forced model and move little, so their
mean is a model of the same basin: Izmailov et al. 2018, "Averaging weights
leads to wider optima"); it is part of the recipe that passed the paired rule
(docs/experiments.md). Either way the kept weights' validation score is
reported, not used to choose; a large drop below the starting weights means
the learning rate is too high, and the log says so. `average_last=0` keeps the
epoch with the best validation CIDEr-D (the starting weights included).
"""

import collections
import contextlib
import time

import numpy as np

from captioning.architectures import make_step_decoder
from captioning.decoding import beam_search, sample_decode
from captioning.cider import CiderD, cider_d
from captioning.interrupts import StopBetweenSteps, between_steps, stop_if_asked
from captioning.training import compile_captioner, gather_features, make_dataset


def references_by_image(captions, splits, store):
    """(features (M, ...), M lists of cleaned captions) for the images of `splits` in the store."""
    part = captions[captions["split"].isin(splits) & captions["image_id"].isin(set(store.ids))]
    groups = part.groupby("image_id")["clean"].apply(list)
    features, _ = gather_features(store, groups.index.tolist())  # sorted ids, like groups
    return features, groups.tolist()


def _encode(vocab, rows):
    """Sampled word ids -> (N, max_length + 2) sequences [<start>, words, <end>, <pad>...]; a
    caption cut at max_length has no <end>, since the model did not choose one."""
    sequences = np.full((len(rows), vocab.max_length + 2), vocab.pad_id, dtype=np.int32)
    sequences[:, 0] = vocab.start_id
    for row, ids in enumerate(rows):
        sequences[row, 1:len(ids) + 1] = ids
        if len(ids) < vocab.max_length:
            sequences[row, len(ids) + 1] = vocab.end_id
    return sequences


def _captions(vocab, rows):
    return [" ".join(vocab.words[i] for i in ids) for ids in rows]


def validation_cider(decoder, vocab, features, references, *, chunk=128, **beam_options):
    """Mean CIDEr-D of beam-search captions: what the fine-tuning keeps or rejects an epoch on.
    beam_options (beam_width, length_alpha, no_repeat_ngram) go to beam_search: pass those the
    captions will be written with, so that the epoch kept is the best for them."""
    rows = []
    for first in range(0, len(features), chunk):
        results = beam_search(decoder, np.asarray(features[first:first + chunk], dtype=np.float32),
                              start_id=vocab.start_id, end_id=vocab.end_id, max_length=vocab.max_length,
                              banned_ids=[vocab.unk_id], **beam_options)
        rows += [hypotheses[0].ids for hypotheses in results]
    return float(cider_d(references, _captions(vocab, rows)).mean())


def _sample(decoder, vocab, features, samples, seed, chunk=128):
    """`samples` captions per image, image after image; sampled a chunk of images at a time
    so that what the steps read of each sample's image (attention's regions and keys) never
    fills the memory."""
    rows = []
    for first in range(0, len(features), chunk):
        stop_if_asked()  # Ctrl-C stops between chunks (interrupts.py)
        rows += sample_decode(decoder, np.asarray(features[first:first + chunk], dtype=np.float32), samples=samples,
                              start_id=vocab.start_id, end_id=vocab.end_id, max_length=vocab.max_length,
                              seed=seed + first, banned_ids=[vocab.unk_id])
    return rows


def self_critical(model, vocab, train_features, train_references, val_features=None, val_references=None, *,
                  epochs=10, samples=5, learning_rate=5e-5, batch_size=64, bucket_width=0, patience=None,
                  beam_width=3, length_alpha=0.7, no_repeat_ngram=0, average_last=0, seed=0, log=print):
    """Fine-tune a teacher-forced caption model on CIDEr-D (notebook 03); returns a history list.

    train_features: one row per image; train_references: the cleaned human
    captions of each (references_by_image gives both). With validation images,
    the weights of the best validation epoch (the starting ones included) are
    kept, and `patience` epochs without a better one stop early. The default,
    None, runs every epoch: the first ones often score lower on validation
    while the captions change style, before they score higher. average_last=K
    keeps the mean weights of the last K epochs instead, whatever they score
    (see the module's docstring). bucket_width: make_dataset's length buckets for the
    gradient steps on the sampled captions.
    """
    if samples < 2:
        raise ValueError(f"samples must be at least 2 (the baseline is the other samples' mean), got {samples}")
    if len(train_features) != len(train_references):
        raise ValueError(f"{len(train_features)} training images but {len(train_references)} reference lists")
    if int(average_last) < 0:
        raise ValueError(f"average_last must be >= 0 (0 = keep the best epoch), got {average_last}")
    beam_options = dict(beam_width=beam_width, length_alpha=length_alpha, no_repeat_ngram=no_repeat_ngram)
    with _no_word_dropout(model), between_steps():  # Ctrl-C stops after a step, not inside one
        return _fine_tune(model, vocab, train_features, train_references, val_features, val_references, beam_options,
                          epochs=epochs, samples=samples, learning_rate=learning_rate, batch_size=batch_size,
                          bucket_width=bucket_width, patience=patience, average_last=int(average_last), seed=seed,
                          log=log)


def self_critical_epoch(model, decoder, vocab, features, reward, *, samples, batch_size, seed, epoch,
                        timings=None, bucket_width=0):
    """One epoch of self-critical training, the update itself (notebook 03 shows it); returns the
    samples' rewards, image after image.

    `decoder` is the model's StepDecoder; `reward` a CiderD of every image's references, each
    repeated `samples` times, so that sample j of image i is scored against image i's captions.
    `timings`, a dict if given, receives the seconds of sampling, reward and gradient steps.
    """
    with _timed(timings, "sampling"):
        rows = _sample(decoder, vocab, features, samples, seed=(seed * 1000 + epoch) * 100_000)
    with _timed(timings, "reward"):
        rewards = reward.scores(_captions(vocab, rows))
    # The baseline of each sample is the mean reward of the *other* samples of its image: a
    # caption is pushed up when it beats its siblings, down when it loses to them.
    per_image = rewards.reshape(-1, samples)
    baseline = (per_image.sum(axis=1, keepdims=True) - per_image) / (samples - 1)
    advantage = (per_image - baseline).reshape(-1)
    # Teacher forcing on the model's own captions, every word's loss weighted by its caption's
    # advantage: the same masked loss and fit() as training.py, with sample weights.
    image_rows = np.repeat(np.arange(len(features)), samples)
    data = make_dataset(features, image_rows, _encode(vocab, rows), batch_size=batch_size, seed=seed + epoch,
                        weights=advantage, bucket_width=bucket_width)
    with _timed(timings, "gradient"):  # StopBetweenSteps: a Ctrl-C stops after a batch, not inside one
        model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[StopBetweenSteps()])
    return rewards


@contextlib.contextmanager
def _timed(timings, part):
    """Add the seconds the block takes to timings[part]; nothing to do when timings is None.

    The clock sits in self_critical_epoch, around its three calls, because only there are they
    apart; the function keeps returning just the rewards (notebook 03 reads it as the update, and a
    clock in its result would be noise there), and a caller that wants the split passes a dict."""
    start = time.perf_counter()
    yield
    if timings is not None:
        timings[part] = timings.get(part, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def _no_word_dropout(model):
    """The gradient is meant for the words the model read while it sampled, so no
    word dropout while fine-tuning (teacher forcing keeps it); the rate is put back after."""
    layer = {layer.name: layer for layer in model.layers}.get("word_dropout")
    rate = layer.rate if layer is not None else 0.0
    if layer is not None:
        layer.rate = 0.0  # before compile_captioner: fit() traces its training step once
    try:
        yield
    finally:
        if layer is not None:
            layer.rate = rate


def _fine_tune(model, vocab, train_features, train_references, val_features, val_references, beam_options, *,
               epochs, samples, learning_rate, batch_size, bucket_width, patience, average_last, seed, log):
    decoder = make_step_decoder(model)
    compile_captioner(model, learning_rate=learning_rate)
    validating = val_features is not None and len(val_features) > 0

    def score():
        return validation_cider(decoder, vocab, val_features, val_references, **beam_options)

    best = start = score() if validating else -np.inf
    best_weights = model.get_weights()
    waited, history, recent = 0, [], collections.deque(maxlen=average_last or None)
    if validating:
        log(f"self-critical: validation CIDEr-D {best:.4f} before fine-tuning")
    reward = CiderD([refs for refs in train_references for _ in range(samples)])  # the references' statistics, once

    for epoch in range(epochs):
        seconds = {}  # where the epoch's time went (benchmarks/course.py reports it from bundle.json)
        rewards = self_critical_epoch(model, decoder, vocab, train_features, reward, samples=samples,
                                      batch_size=batch_size, seed=seed, epoch=epoch, timings=seconds,
                                      bucket_width=bucket_width)
        if average_last:
            recent.append(model.get_weights())

        record = {"epoch": epoch + 1, "sample_cider": round(float(rewards.mean()), 4)}
        if validating:
            with _timed(seconds, "validation"):
                record["val_cider"] = round(score(), 4)
            if record["val_cider"] > best:
                best, best_weights, waited = record["val_cider"], model.get_weights(), 0
            else:
                waited += 1
        # Measured, so different on every run: a comparison of histories that must hold exactly leaves it out.
        record["seconds"] = {part: round(value, 2) for part, value in seconds.items()}
        history.append(record)
        log(f"self-critical epoch {epoch + 1}: {record}")
        if validating and patience is not None and waited >= patience:
            break
    if average_last and history:
        _keep_the_mean(model, recent, start, score if validating else None, history, log)
    elif validating:
        model.set_weights(best_weights)
    return history


def _keep_the_mean(model, recent, start, score, history, log):
    """Set the model to the mean of the `recent` weights and add a record to `history`,
    with the mean's validation score when there is one. One set of weights is its own
    mean: the model holds it already and its epoch's record says what it scores."""
    last = history[-1]["epoch"]
    if len(recent) == 1:
        kept = history[-1]
        log(f"self-critical: kept epoch {last} (one epoch: nothing to average)")
    else:
        model.set_weights([np.mean(arrays, axis=0) for arrays in zip(*recent)])
        kept = {"epoch": f"mean of {last - len(recent) + 1}-{last}"}
        if score is not None:
            kept["val_cider"] = round(score(), 4)
        history.append(kept)
        log(f"self-critical: kept {kept}")
    if score is not None and kept["val_cider"] < start:
        log(f"self-critical: the kept weights score below the starting weights ({kept['val_cider']:.4f} < {start:.4f}); "
            "by a little, that is noise on few validation images; by much, lower the learning rate")
