"""What makes a training run what it is, and what another run can take from it (notebooks 03 and 05).

    run_identity         the architecture (and its own options' defaults), settings, seed, data,
                         vocabulary and features of a run: bundle.json "run". The same identity
                         trains the same model.
    teacher_forced_folder, keep_teacher_forced, take_teacher_forced
                         the teacher-forced model a run keeps in the work folder, which a run
                         that differs only in what comes after teacher forcing starts from

Training is deterministic on a CPU for a given seed (tests/test_readme.py holds notebook 03 and
`train` to bit-identical weights), so a model kept under its identity *is* the model another run of
that identity would train: taking it changes nothing but the time. Notebook 05 compares the four
architectures trained by teacher forcing only; its merge model is notebook 03's, as it was before
fine-tuning, so it trains only the three inject variants.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from captioning.fileio import read_json, save_atomically, write_json_atomic


def run_identity(arch, dataset, settings, seed, store, vocab):
    """What makes one training run's model what it is: bundle.json "run". A run with the same
    identity trains the same model, so train_pipeline(reuse=True) returns its bundle as it is, and
    an interrupted run resumes only into the same one. Notebook 03 records it as `train` does.
    The architecture's own options are in it because the code sets them, not the settings: a run
    saved before attention pooled its grid (attention.GRID_POOL) is not the model it builds now."""
    from captioning.architectures import own_options
    sources = read_json(Path(store.out_dir) / store.manifest["sources_file"], "feature cache sources", kind=dict)
    photos = sorted((image_id, entry.get("sha256")) for image_id, entry in sources.items())  # content, not paths
    return {"arch": arch, "options": own_options(arch), "dataset": dataset, "settings": settings, "seed": seed,
            "encoder": store.manifest["weights_id"], "vocabulary": vocab.fingerprint,
            "features": hashlib.sha256(json.dumps(photos).encode()).hexdigest()}


# Settings that act only after teacher forcing. Two runs that differ in nothing else start
# their fine-tuning from the same teacher-forced model, so the work folder keeps that model
# under the name of what made it (below) and either run can take it from the other.
AFTER_TEACHER_FORCING = ("self_critical_epochs", "self_critical_learning_rate", "self_critical_average",
                         "length_alpha", "no_repeat_ngram")


def teacher_forced_folder(folder, run):
    """Where the work folder keeps the teacher-forced model of `run` (run_identity): named by
    the run without its AFTER_TEACHER_FORCING settings. Notebook 05's merge model, trained
    without fine-tuning, is the model notebook 03 fine-tuned, as it was before its fine-tuning."""
    stage = dict(run, settings={key: value for key, value in run["settings"].items()
                                if key not in AFTER_TEACHER_FORCING})
    digest = hashlib.sha256(json.dumps(stage, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"{run['dataset']}-{run['arch']}-{digest}"


def _random_streams(model):
    """The state variables of the model's dropout random streams, in the model's order. A weights
    file leaves them out, and fine-tuning goes on drawing from them: a run that takes a kept
    teacher-forced model must draw what the run that trained it would have drawn next. They go by
    their place in the model, not their names, which count every stream the process made before."""
    return [variable for variable in model.variables if variable.path.endswith("seed_generator_state")]


def keep_teacher_forced(folder, model, record):
    """Keep a teacher-forced model: its weights, its random state and `record` (seconds, steps,
    history: what bundle.json reports of teacher forcing). The record is written last, so a
    folder without one is never taken. Notebook 03 keeps its model as `train` does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_atomically(folder / "model.weights.h5", model.save_weights, ".weights.h5")
    random_state = [variable.numpy().tolist() for variable in _random_streams(model)]
    write_json_atomic(folder / "record.json", dict(record, random_state=random_state))


def take_teacher_forced(folder, model):
    """Load a kept teacher-forced model into `model`; its record, or None when none is kept."""
    folder = Path(folder)
    if not ((folder / "record.json").is_file() and (folder / "model.weights.h5").is_file()):
        return None
    record = read_json(folder / "record.json", "kept teacher-forced model's record", kind=dict)
    random_state, streams = record.pop("random_state", None), _random_streams(model)
    if not isinstance(random_state, list) or len(random_state) != len(streams):
        return None  # kept by another version of Keras or of the model: train it again, to draw the same
    model.load_weights(folder / "model.weights.h5")
    for variable, value in zip(streams, random_state):
        variable.assign(np.asarray(value, dtype=variable.dtype))
    return record
