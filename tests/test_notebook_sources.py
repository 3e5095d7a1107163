"""Static checks of the committed notebooks: fast, no kernel, no TensorFlow.

The default `make demo` once died in notebook 01 because its parameters cell
said `download = True` after `from captioning import download`: the flag
replaced the module, and every later `download.download_coco(...)` failed. No
test ran that default path, so nothing noticed. These checks catch the whole
class by reading the cells: a name a notebook imports is never bound again by
anything else in it (parameters, assignments, loops, function definitions).
"""

import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((Path(__file__).resolve().parent.parent / "notebooks" / "solutions").glob("[0-9][0-9]_*.ipynb"))


def _code_cells(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            # IPython's own syntax (%magic, !shell) is not Python: leave those lines out.
            lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
            yield index, cell.get("metadata", {}).get("tags", []), "\n".join(lines)


class _TopLevelBindings(ast.NodeVisitor):
    """(name, kind, line) for every name a cell binds in the notebook's namespace.

    Function bodies are skipped: a local variable or parameter named like a
    module is harmless; the function's own name is a binding like any other.
    """

    def __init__(self):
        self.found = []

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((alias.asname or alias.name.split(".")[0], "import", node.lineno))

    def visit_ImportFrom(self, node):
        for alias in node.names:
            if alias.name != "*":
                self.found.append((alias.asname or alias.name, "import", node.lineno))

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Store):
            self.found.append((node.id, "assignment", node.lineno))

    def visit_FunctionDef(self, node):
        self.found.append((node.name, "definition", node.lineno))
        for decorator in node.decorator_list:
            self.visit(decorator)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.found.append((node.name, "definition", node.lineno))

    def visit_Lambda(self, node):
        pass


def _top_level_bindings(source):
    visitor = _TopLevelBindings()
    visitor.visit(ast.parse(source))
    return visitor.found


def imported_names_rebound(path):
    """Every place where a notebook binds, other than by importing it, a name it imports."""
    bindings = []
    for index, tags, source in _code_cells(path):
        where = "parameters cell" if "parameters" in tags else f"cell {index}"
        bindings += [(name, kind, f"{where}, line {line}") for name, kind, line in _top_level_bindings(source)]
    imported = {name for name, kind, _ in bindings if kind == "import"}
    return [f"{path.name}: {where} binds {name!r} ({kind}), a name the notebook imports"
            for name, kind, where in bindings if name in imported and kind != "import"]


class _ParameterBindings(_TopLevelBindings):
    """As _TopLevelBindings, but an assignment that reads the name it binds (`work_dir = Path(work_dir)`,
    `split = split or "dev"`) refines a parameter rather than replacing it, and is not recorded."""

    def visit_Assign(self, node):
        reads = {child.id for child in ast.walk(node.value) if isinstance(child, ast.Name)}
        for target in node.targets:
            for child in ast.walk(target):
                if isinstance(child, ast.Name) and child.id not in reads:
                    self.found.append((child.id, "assignment", node.lineno))
        self.visit(node.value)


def parameters_rebound(path):
    """Every place after the parameters cell where a notebook binds a parameter's name anew: a loop
    `for arch in ...` would silently replace the `arch` a learner (or `make demo PARAMS=...`) set."""
    parameters, problems = None, []
    for index, tags, source in _code_cells(path):
        if "parameters" in tags:
            parameters = {name for name, _, _ in _top_level_bindings(source)}
            continue
        if parameters is None:
            continue
        visitor = _ParameterBindings()
        visitor.visit(ast.parse(source))
        problems += [f"{path.name}: cell {index}, line {line} binds the parameter {name!r} ({kind})"
                     for name, kind, line in visitor.found if name in parameters]
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name[:2])
def test_no_cell_replaces_a_parameter(path):
    assert parameters_rebound(path) == []


def test_the_check_finds_a_loop_that_replaces_a_parameter(tmp_path):
    notebook = {"cells": [
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": ["arch = 'merge'\n", "split = ''\n"]},
        {"cell_type": "code", "metadata": {}, "source": ["split = split or 'dev'\n", "for arch in ('a', 'b'):\n",
                                                         "    pass\n"]},
    ]}
    path = tmp_path / "99_example.ipynb"
    path.write_text(json.dumps(notebook))
    assert parameters_rebound(path) == ["99_example.ipynb: cell 1, line 2 binds the parameter 'arch' (assignment)"]


def parameters_unread(path):
    """The parameters no cell after the parameters cell reads: `make demo PARAMS=name=value` would set
    them and change nothing (a parameter added to the cell but never passed on, say to train_pipeline)."""
    parameters, read = None, set()
    for _, tags, source in _code_cells(path):
        if "parameters" in tags:
            parameters = [name for name, _, _ in _top_level_bindings(source)]
        elif parameters is not None:
            read |= {node.id for node in ast.walk(ast.parse(source))
                     if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return [f"{path.name}: the parameter {name!r} is never read" for name in parameters or [] if name not in read]


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda path: path.stem)
def test_every_parameter_is_read(path):
    assert parameters_unread(path) == []


def test_the_check_finds_a_parameter_nothing_reads(tmp_path):
    notebook = {"cells": [
        {"cell_type": "code", "metadata": {}, "source": ["epochs = 1\n"]},  # before the parameters: not a read
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": ["epochs = 4\n", "bucket_width = 4\n"]},
        {"cell_type": "code", "metadata": {}, "source": ["train(epochs=epochs, bucket_width=None)\n"]},
    ]}
    path = tmp_path / "99_example.ipynb"
    path.write_text(json.dumps(notebook))
    assert parameters_unread(path) == ["99_example.ipynb: the parameter 'bucket_width' is never read"]


def test_there_are_six_notebooks():
    assert [path.name[:2] for path in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name[:2])
def test_no_cell_rebinds_an_imported_name(path):
    assert imported_names_rebound(path) == []


def test_the_check_finds_a_parameter_that_replaces_a_module(tmp_path):
    notebook = {"cells": [
        {"cell_type": "code", "metadata": {}, "source": ["from captioning import data, download\n"]},
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": ["download = True\n"]},
        {"cell_type": "code", "metadata": {}, "source": ["def helper(data):\n", "    data = 1\n"]},
    ]}
    path = tmp_path / "99_example.ipynb"
    path.write_text(json.dumps(notebook))
    # The parameter is caught; a function's own parameter or local named like a module is not.
    assert imported_names_rebound(path) == [
        "99_example.ipynb: parameters cell, line 1 binds 'download' (assignment), a name the notebook imports"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name[:2])
def test_committed_notebooks_carry_no_outputs_and_teach(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    cells = notebook["cells"]
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in cells if cell["cell_type"] == "code"), "commit notebooks without outputs"
    assert cells[0]["cell_type"] == "markdown", "a notebook starts by saying what it covers"
    assert "what to try" in "".join(cells[-1]["source"]).lower(), "a notebook ends with what to try"
    assert sum("parameters" in cell.get("metadata", {}).get("tags", []) for cell in cells) == 1


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda path: path.stem)
def test_papermill_sees_every_parameter(path):
    """make demo passes a parameter only if papermill's inspection finds it in the parameters cell;
    papermill skips a line holding two '=' (one in a comment is enough), and PARAMS then does nothing."""
    import papermill

    [source] = [source for _, tags, source in _code_cells(path) if "parameters" in tags]
    assigned = [target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)]
    assert assigned and sorted(papermill.inspect_notebook(str(path))) == sorted(assigned)


# What each notebook teaches, shown as the package's own source (issue: "the model code in view"). The
# notebooks call show_source(captioning.MODULE.NAME, ...) with dotted names, which this test reads.
CODE_IN_VIEW = {
    "03": {"captioning.models.merge", "captioning.models.par_inject", "captioning.models.init_inject_start",
           "captioning.models.pre_inject_start", "captioning.models.read_from",
           "captioning.self_critical.self_critical_epoch"},
    "04": {"captioning.architectures.StepDecoder.__init__", "captioning.architectures.StepDecoder.step",
           "captioning.decoding._word_by_word", "captioning.beams.search_ops"},
    "06": {"captioning.attention.AttentionDecoder.attend", "captioning.attention.AttentionDecoder.call",
           "captioning.attention.attention"},
}


def shown_sources(path):
    """The dotted names a notebook passes to show_source."""
    shown = set()
    for _, _, source in _code_cells(path):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "show_source":
                shown.update(ast.unparse(argument) for argument in node.args)
    return shown


@pytest.mark.parametrize("number", sorted(CODE_IN_VIEW))
def test_a_notebook_shows_the_code_it_teaches(number):
    import inspect
    import pkgutil

    [path] = [path for path in NOTEBOOKS if path.name.startswith(number)]
    shown = shown_sources(path)
    assert CODE_IN_VIEW[number] <= shown, f"{path.name} does not show {sorted(CODE_IN_VIEW[number] - shown)}"
    for name in shown:  # every name shown is the package's, and has source to show
        target = pkgutil.resolve_name(name)
        assert name.startswith("captioning.") and inspect.getsource(target).strip()


def test_notebook_03_checks_its_merge_model_against_the_package():
    """The merge model written out in notebook 03 is compared with build_captioner's: weights and logits."""
    [path] = [path for path in NOTEBOOKS if path.name.startswith("03")]
    sources = [source for _, _, source in _code_cells(path) if "def merge_by_hand" in source]
    assert len(sources) == 1
    assert "count_params()" in sources[0] and "raise AssertionError" in sources[0]
