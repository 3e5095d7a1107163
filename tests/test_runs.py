"""The teacher-forced model a run keeps in the work folder (captioning/runs.py), and the runs that take it.

Taking a kept model must change nothing but the time: a run that takes it writes the bundle, bit for
bit, that the same run would have written training from scratch. Each run is its own process, as a
user's `train` or notebook is, on the tiny generated Flickr8k folder of test_faults.py and
MobileNetV2 with fixed random weights.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from captioning.runs import take_teacher_forced
from conftest import REPO
from test_faults import tiny_flickr8k

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return tiny_flickr8k(root / "flickr8k"), root / "work"


def train(data_dir, work, out, arch="merge", before="", **options):
    """train_pipeline in a process of its own (the command line has no `reuse`), after the code
    `before`; what it logged."""
    code = (f"import json, sys\n{before}from captioning.pipeline import train_pipeline\n"
            f"train_pipeline('flickr8k', sys.argv[1], encoder='mobilenet_v2', weights='none', arch={arch!r},"
            " out_dir=sys.argv[2],"
            " cache_dir=sys.argv[3], epochs=2, log=lambda line: print(line, flush=True), **json.loads(sys.argv[4]))\n")
    result = subprocess.run([sys.executable, "-c", code, str(data_dir), str(out), str(work), json.dumps(options)],
                            capture_output=True, text=True, timeout=900, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def bundle(folder):
    """(bundle.json without the times and the model file's hash, the model's weights)."""
    from captioning.bundle import Captioner
    settings = json.loads((folder / "bundle.json").read_text())
    settings.pop("model_sha256", None)  # a .keras file records when it was saved
    settings["metrics"].pop("training_seconds")
    for epoch in settings["metrics"].get("self_critical", []):
        epoch.pop("seconds", None)  # how long each fine-tuning epoch's parts took: this run's clock
    return settings, Captioner.load(folder).model.get_weights()


def assert_same_bundle(first, second):
    (settings, weights), (other_settings, other_weights) = bundle(first), bundle(second)
    assert settings == other_settings
    assert all(np.array_equal(a, b) for a, b in zip(weights, other_weights, strict=True))  # bit-identical


def test_a_run_without_fine_tuning_takes_the_model_a_fine_tuned_run_kept_and_writes_the_same_bundle(tiny_data,
                                                                                                      tmp_path):
    # Notebook 05's merge model is notebook 03's before fine-tuning: the same run with self_critical_epochs=0.
    data_dir, work = tiny_data
    fine_tuned = train(data_dir, work, tmp_path / "fine-tuned", self_critical_epochs=1)
    assert "teacher forcing: taking" not in fine_tuned and "epoch 2/2" in fine_tuned.lower()
    [kept] = (work / "teacher-forced").iterdir()
    assert kept.name.startswith("flickr8k-merge-") and (kept / "record.json").is_file()

    taking = train(data_dir, work, tmp_path / "taken", self_critical_epochs=0, reuse=True)
    assert f"teacher forcing: taking the model kept in {kept}" in taking and "epoch 1/2" not in taking.lower()
    recorded = json.loads((kept / "record.json").read_text())  # the time and steps the taken model cost
    taken = json.loads((tmp_path / "taken" / "bundle.json").read_text())["metrics"]
    assert taken["training_seconds"] == round(recorded["seconds"], 1) and taken["steps"] == recorded["steps"]
    training = train(data_dir, work, tmp_path / "trained", self_critical_epochs=0)  # reuse=False: trains
    assert "teacher forcing: taking" not in training and "epoch 2/2" in training.lower()
    assert_same_bundle(tmp_path / "taken", tmp_path / "trained")
    # Fine-tuning moved the weights the fine-tuned bundle holds away from the kept ones.
    _, fine_tuned_weights = bundle(tmp_path / "fine-tuned")
    _, taken_weights = bundle(tmp_path / "taken")
    assert not all(np.array_equal(a, b) for a, b in zip(fine_tuned_weights, taken_weights))


def test_a_run_that_changes_only_the_fine_tuning_starts_from_the_kept_model_and_draws_the_same(tiny_data, tmp_path):
    # Fine-tuning draws dropout masks from random streams that a weights file leaves out: the kept
    # model carries their state, or the run that takes it would fine-tune another model.
    data_dir, work = tiny_data
    train(data_dir, work, tmp_path / "first", self_critical_epochs=1)
    changed = dict(self_critical_epochs=1, self_critical_learning_rate=2e-4)
    taking = train(data_dir, work, tmp_path / "taken", reuse=True, **changed)
    assert "teacher forcing: taking the model" in taking and "self-critical epoch 1" in taking
    train(data_dir, work, tmp_path / "trained", **changed)
    assert_same_bundle(tmp_path / "taken", tmp_path / "trained")


def build(word_dropout=0.35):
    from captioning.architectures import build_captioner
    return build_captioner("merge", vocab_size=12, feature_shape=(8,), max_length=5, embed_dim=4, units=4,
                           rnn="lstm", dropout=0.5, word_dropout=word_dropout)


def streams(model):
    return [variable.numpy() for variable in model.variables if variable.path.endswith("seed_generator_state")]


def test_a_run_saved_before_the_architecture_changed_is_trained_again_not_reused(tiny_data, tmp_path):
    """The code, not the settings, says how attention reads its grid (attention.GRID_POOL). A bundle
    saved when it read every cell is another model: reuse=True trains again, then reuses that."""
    data_dir, work = tiny_data
    out = tmp_path / "attention"
    every_cell = "import captioning.attention as a\na.attention_layers.__kwdefaults__['grid_pool'] = 1\n"

    def pools(folder):
        from captioning.bundle import Captioner
        return any(layer.name == "grid_pooling" for layer in Captioner.load(folder).model.layers)

    options = dict(arch="attention", self_critical_epochs=0, reuse=True, overwrite=True)
    train(data_dir, work, out, before=every_cell, **options)
    assert not pools(out)
    said = train(data_dir, work, out, **options).splitlines()
    assert not any(line.startswith((f"reusing {out}", "teacher forcing: taking")) for line in said), said
    assert pools(out)
    said = train(data_dir, work, out, **options).splitlines()
    assert any(line.startswith(f"reusing {out}") for line in said), said


def test_a_kept_model_is_taken_by_a_model_built_later_in_another_order(tmp_path):
    # Notebook 03's kernel builds several models before the one it trains, so the names of its random
    # streams (seed_generator_7/...) are not those of `train`'s process (seed_generator/...).
    from captioning.runs import keep_teacher_forced
    kept = build()
    for variable in kept.variables:
        if variable.path.endswith("seed_generator_state"):
            variable.assign(variable + 5)  # as after some training
    keep_teacher_forced(tmp_path / "kept", kept, {"seconds": 1.0, "steps": 3, "history": {"loss": [1.0]}})
    build(), build()
    later = build()
    assert [v.path for v in later.variables] != [v.path for v in kept.variables]
    assert take_teacher_forced(tmp_path / "kept", later)["steps"] == 3
    assert all(np.array_equal(a, b) for a, b in zip(streams(later), streams(kept), strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(later.get_weights(), kept.get_weights(), strict=True))


def test_a_kept_model_without_its_record_or_from_another_model_is_not_taken(tmp_path):
    from captioning.runs import keep_teacher_forced
    model = build()
    keep_teacher_forced(tmp_path / "kept", model, {"seconds": 1.0, "steps": 3, "history": {"loss": [1.0]}})
    record = json.loads((tmp_path / "kept" / "record.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.weights.h5").write_bytes((tmp_path / "kept" / "model.weights.h5").read_bytes())
    (tmp_path / "other" / "record.json").write_text(json.dumps(dict(record, random_state=record["random_state"][1:])))
    assert take_teacher_forced(tmp_path / "other", model) is None  # its random streams are not this model's
    (tmp_path / "kept" / "record.json").unlink()  # a run cut while keeping: weights, no record
    assert take_teacher_forced(tmp_path / "kept", model) is None


def test_a_model_that_cannot_be_kept_costs_the_run_nothing_but_a_note(tiny_data, tmp_path):
    # Keeping saves later runs time; a run whose work folder cannot take it (full, read-only, or
    # here a file where the folder should be) still trains and writes its bundle.
    data_dir, _ = tiny_data
    work = tmp_path / "work"
    work.mkdir()
    (work / "teacher-forced").write_text("not a folder")
    code = ("import sys\nfrom captioning.pipeline import train_pipeline\n"
            "train_pipeline('flickr8k', sys.argv[1], encoder='mobilenet_v2', weights='none', arch='merge',"
            " out_dir=sys.argv[2], cache_dir=sys.argv[3], epochs=1, self_critical_epochs=0)\n")
    result = subprocess.run([sys.executable, "-c", code, str(data_dir), str(tmp_path / "bundle"), str(work)],
                            capture_output=True, text=True, timeout=900, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: could not keep the teacher-forced model in" in result.stderr
    assert (tmp_path / "bundle" / "bundle.json").is_file()
