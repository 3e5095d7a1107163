"""`make demo` checks its settings before any notebook runs (scripts/run_notebooks.py).

A typo in NOTEBOOKS or PARAMS used to run nothing and exit 0, or drop the setting silently, or fail
only after the notebooks before the one it breaks had run for minutes. Each case here is refused
at once with one line that names the setting and what to write instead.
"""

import time

import pytest

from conftest import REPO, shell
from run_notebooks import check_settings

MAKE_DEFAULTS = {"dataset": "flickr8k", "data_dir": "/data", "work_dir": "/work", "encoder": "mobilenet_v2",
                 "weights": "none", "download": False, "subset_size": 1800}


@pytest.mark.parametrize("only, parameters, message", [
    (["09"], {}, "NOTEBOOKS=09: no notebook 09; name them by their two digits"),
    (["1"], {}, "NOTEBOOKS=1: no notebook 1"),
    (None, {"epoch": 2}, "no notebook has a parameter 'epoch' (did you mean 'epochs'?)"),
    (None, {"epochs": "two"}, "epochs='two' should be a number or None"),
    (None, {"seed": 1.5}, "seed=1.5 should be a whole number"),
    (None, {"split": 3}, "split=3 should be text"),
    (None, {"arch": "par_inject"}, "arch 'par_inject' is not one of merge, par-inject"),
    (None, {"dataset": "flickr30k"}, "dataset 'flickr30k' is not one of coco, flickr8k"),
])
def test_bad_settings_are_named_before_any_notebook_runs(only, parameters, message):
    problem = check_settings({**MAKE_DEFAULTS, **parameters}, only)
    assert problem is not None and message in problem, problem


def test_good_settings_pass():
    # The suite's own capped budgets, a notebook subset, a parameter of one notebook only.
    assert check_settings({**MAKE_DEFAULTS, "epochs": 2, "experiment_epochs": 1}, ["01"]) is None
    assert check_settings({**MAKE_DEFAULTS, "arch": "par-inject", "beam_width": 5, "split": "dev"}, None) is None


def test_make_demo_refuses_a_typo_at_once():
    started = time.perf_counter()
    result = shell("make demo DATASET=flickr8k DOWNLOAD=0 WEIGHTS=none NOTEBOOKS=01 PARAMS=epoch=2", REPO, timeout=300)
    assert result.returncode != 0 and time.perf_counter() - started < 120
    assert "error: PARAMS: no notebook has a parameter 'epoch' (did you mean 'epochs'?)" in result.stderr
    assert "running" not in result.stdout and "Traceback" not in result.stderr
