"""The exercises and their solutions.

Every course notebook has two or three exercises before its closing "what to try": a
"### Exercise N.k" cell saying the task, then a scaffold that runs as it is. Every exercise
has a worked solution in notebooks/solutions/ that checks its answer against the package
with asserts. The static checks here are quick; the solutions themselves run on the work
folder that the README's offline `make demo` leaves (conftest.offline_demo, shared with
tests/test_readme.py), through `make solutions`, as a teacher runs them.
"""

import json
import re
import time
from pathlib import Path

import pytest

from conftest import REPO, shell
from test_notebook_sources import imported_names_rebound

COURSE = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = REPO / "notebooks" / "solutions"
EXERCISE = re.compile(r"^### Exercise (\d\d?)\.(\d)\b", re.M)


def cells(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))["cells"]


def source(cell):
    return "".join(cell["source"])


def exercises(path):
    """[(number "N.k", index of its markdown cell)] in the order they appear."""
    found = []
    for index, cell in enumerate(cells(path)):
        if cell["cell_type"] == "markdown":
            found += [(f"{int(match[1])}.{match[2]}", index) for match in EXERCISE.finditer(source(cell))]
    return found


def solution_of(path):
    return SOLUTIONS / f"{path.stem}_solutions.ipynb"


def parameters(path):
    import papermill
    return {name: spec["default"] for name, spec in papermill.inspect_notebook(str(path)).items()}


@pytest.mark.parametrize("path", COURSE, ids=lambda path: path.name[:2])
def test_two_or_three_exercises_with_runnable_scaffolds_before_what_to_try(path):
    notebook = cells(path)
    found = exercises(path)
    number = int(path.name[:2])
    assert [name for name, _ in found] in ([f"{number}.1", f"{number}.2"], [f"{number}.1", f"{number}.2", f"{number}.3"])
    for _, index in found:
        scaffold = notebook[index + 1]
        assert scaffold["cell_type"] == "code" and "# Exercise" in source(scaffold)
        assert "your code here" in source(scaffold).lower()
        assert "raise" not in source(scaffold)  # left as it is, it runs: a placeholder and a hint
    assert found[-1][1] + 1 < len(notebook) - 1, "the exercises come before the closing cell"
    assert "what to try" in source(notebook[-1]).lower()


@pytest.mark.parametrize("path", COURSE, ids=lambda path: path.name[:2])
def test_every_exercise_has_a_solution_that_checks_it_against_the_package(path):
    solution = solution_of(path)
    assert solution.is_file(), f"no solutions notebook for {path.name}: expected {solution.relative_to(REPO)}"
    notebook = cells(solution)
    assert notebook[0]["cell_type"] == "markdown" and path.name in source(notebook[0])
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in notebook if cell["cell_type"] == "code"), "commit solutions without outputs"
    assert sum("parameters" in cell.get("metadata", {}).get("tags", []) for cell in notebook) == 1
    assert imported_names_rebound(solution) == []
    solved = exercises(solution)
    assert [name for name, _ in solved] == [name for name, _ in exercises(path)]
    for (name, index), next_index in zip(solved, [index for _, index in solved[1:]] + [len(notebook)]):
        code = "\n".join(source(cell) for cell in notebook[index:next_index] if cell["cell_type"] == "code")
        assert re.search(r"^\s*assert ", code, re.M), f"the solution of exercise {name} asserts nothing"


@pytest.mark.parametrize("path", COURSE, ids=lambda path: path.name[:2])
def test_solutions_take_the_course_notebooks_parameters(path):
    course, solution = parameters(path), parameters(solution_of(path))
    assert {"dataset", "work_dir"} <= set(solution)
    for name in set(course) & set(solution):
        # Same defaults, one folder deeper (notebooks/solutions/).
        assert solution[name].replace('"../../', '"../') == course[name], name


@pytest.mark.slow
def test_the_solutions_pass_on_the_offline_demo_work_folder(offline_demo):
    assert offline_demo.result.returncode == 0, offline_demo.result.stderr[-3000:]
    command = offline_demo.command.replace("make demo", "make solutions", 1)
    started = time.perf_counter()
    result = shell(command, REPO, {"WORK_DIR": str(offline_demo.work_dir), "RUNS": str(offline_demo.runs)})
    seconds = time.perf_counter() - started
    assert result.returncode == 0, f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    executed = sorted((offline_demo.runs / "solutions").glob("*.ipynb"))
    assert [path.name[:2] for path in executed] == ["01", "02", "03", "04", "05", "06"]
    assert re.search(r"solutions wall time: 01 \d+ s, .*06 \d+ s; total \d+ s", result.stdout), result.stdout[-2000:]
    for path in executed:
        outputs = [output for cell in cells(path) for output in cell.get("outputs", [])]
        assert not [output for output in outputs if output.get("output_type") == "error"], path.name
    print(f"the six solutions ran in {seconds:.0f} s")
