"""The time tables of the README and the teacher's guide, held against the benchmark that measured them.

How long each notebook takes used to be typed by hand, and went stale. Now `benchmarks/course.py`
runs the course and keeps its numbers in benchmarks/results/course-flickr8k.json, and
`course.py --tables` writes the tables between `<!-- course-times:begin -->` and
`<!-- course-times:end -->`. This test renders them again from the committed JSON, with the
benchmark's own function, and compares: a hand edit of a table, or a new run whose tables were not
rewritten, fails here. Nothing runs a notebook: the benchmark takes most of an hour.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "course-flickr8k.json"
DOCUMENTS = ["README.md", "docs/teaching.md"]


def _course():
    """benchmarks/course.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("course_benchmark", REPO / "benchmarks" / "course.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


course = _course()


def _results():
    assert RESULTS.is_file(), f"{RESULTS.relative_to(REPO)} is missing: run benchmarks/course.py"
    return json.loads(RESULTS.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", DOCUMENTS)
def test_the_time_table_is_what_the_benchmark_measured(name):
    expected = course.render_tables(_results())[name]
    written = course.between_markers((REPO / name).read_text(encoding="utf-8"), name)
    assert written == expected, (f"{name}: its time table is not what `benchmarks/course.py --tables` renders from "
                                 f"{RESULTS.relative_to(REPO)}; run that command (never edit the table by hand)")


def test_the_committed_results_are_a_whole_run_with_the_defaults():
    results = _results()
    assert results["defaults"] and results["complete"], "the committed JSON is not a finished run with the defaults"
    assert set(results["notebooks"]) == set(course.NOTEBOOKS), sorted(results["notebooks"])
    for notebook, times in results["notebooks"].items():
        # CPU time comes from getrusage(RUSAGE_CHILDREN), which counts the kernel only once it was
        # waited for; /proc, read while it ran, saw a little less. Far less would mean it was not counted.
        assert times["cpu_seconds"] >= 0.9 * times["cpu_seconds_seen_in_proc"], (notebook, times)


@pytest.mark.parametrize("name", DOCUMENTS)
def test_no_old_hand_typed_total_survives(name):
    # The old tables' totals and the folder they were measured on, quoted in prose around them.
    text = " ".join((REPO / name).read_text(encoding="utf-8").split())
    stale = [phrase for phrase in ("52 min", "7.6 min", "most of an hour", "16 times the photos")
             if phrase in text]
    assert not stale, f"{name} still quotes the old hand-typed times: {stale}"
    assert len(re.findall(re.escape(course.BEGIN), text)) == 1, f"{name} needs one course-times table"


def test_the_fine_tuning_split_is_read_from_the_bundles(tmp_path):
    """where_the_time_went totals each self-critical part over a bundle's epochs (not its summary row)
    and takes the median of the epochs' sampling / gradient; a bundle that did not fine-tune, or one
    saved before the epochs were timed, gets no split rather than zeros."""
    epochs = [{"epoch": 1, "sample_cider": 0.5, "val_cider": 0.4,
               "seconds": {"sampling": 6.0, "reward": 0.5, "gradient": 3.0, "validation": 2.0}},
              {"epoch": 2, "sample_cider": 0.6, "val_cider": 0.5,
               "seconds": {"sampling": 4.0, "reward": 0.5, "gradient": 4.0, "validation": 2.5}},
              {"epoch": 3, "sample_cider": 0.7,  # no validation images: no validation part
               "seconds": {"sampling": 9.0, "reward": 1.0, "gradient": 3.0}},
              {"epoch": "mean of 2-3", "val_cider": 0.55}]
    bundles = {"timed": epochs, "untimed": [{key: value for key, value in row.items() if key != "seconds"}
                                            for row in epochs], "teacher_forcing_only": None}
    for name, history in bundles.items():
        (tmp_path / name).mkdir()
        metrics = {"training_seconds": 10.0, "steps": 20, "epochs_run": 2,
                   **({"self_critical": history} if history else {})}
        (tmp_path / name / "bundle.json").write_text(json.dumps({"metrics": metrics}), encoding="utf-8")
    found = course.where_the_time_went(tmp_path, tmp_path / "runs")["bundles"]
    assert found["timed"]["fine_tuning_epochs"] == 3
    assert found["timed"]["fine_tuning_seconds"] == {"sampling": 19.0, "reward": 2.0, "gradient": 10.0,
                                                     "validation": 4.5}
    assert found["timed"]["sampling_over_gradient_median"] == 2.0  # of 2.0, 1.0 and 3.0
    assert found["untimed"]["fine_tuning_epochs"] == 3 and "fine_tuning_seconds" not in found["untimed"]
    assert found["teacher_forcing_only"]["fine_tuning_epochs"] == 0
    assert "fine_tuning_seconds" not in found["teacher_forcing_only"]
    [line] = course.fine_tuning_lines(found)
    assert line.startswith("timed: fine-tuning, 3 epochs: sampling 19.0 s, reward 2.0 s, gradient 10.0 s, "
                           "validation 4.5 s;") and line.endswith("(median) 2.00")
