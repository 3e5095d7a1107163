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
