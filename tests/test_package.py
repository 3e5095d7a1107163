"""The package's shape: no import circles, every module imports on its own, none is longer than a
sitting, and the map in captioning/__init__.py (and the README's summary of it) names them all."""

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "captioning"


def import_graph():
    """{module: {captioning modules it imports}}, counting imports inside functions too:
    a lazy import that closes a circle is still a circle, only a hidden one."""
    modules = {path.stem for path in PACKAGE.glob("*.py") if path.stem not in ("__init__", "__main__")}
    graph = {}
    for name in sorted(modules):
        found = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] == "captioning":
                    targets = [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
                    found |= {target for target in targets if target in modules}
            elif isinstance(node, ast.Import):
                found |= {alias.name.split(".")[1] for alias in node.names
                          if alias.name.startswith("captioning.") and alias.name.split(".")[1] in modules}
        graph[name] = found - {name}
    return graph


def cycles(graph):
    """Every circle in the graph, each as a list of modules (depth-first search)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_imports_itself_back():
    assert cycles(import_graph()) == []


def test_the_check_finds_a_circle():
    assert cycles({"models": {"attention"}, "attention": {"models"}, "data": set()}) == [
        ["attention", "models", "attention"]]


def test_every_module_imports_in_any_order():
    # One process, the modules in reverse order of the graph's leaves-first order: a module
    # that only worked because another was imported first would fail here.
    names = sorted(import_graph(), reverse=True)
    code = "".join(f"import captioning.{name}\n" for name in names)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-2000:]


# --- a newcomer reads it in one sitting ------------------------------------------------------------

def package_map():
    """The map in captioning/__init__.py's docstring: {"taught": [modules], "plumbing": [modules]},
    in its order. A line of the map starts with four spaces and a module's name."""
    import captioning

    taught_part, plumbing_part = captioning.__doc__.split("Plumbing:")
    return {group: [line.split()[0] for line in part.splitlines()
                    if line.startswith("    ") and line.split() and line.split()[0].isidentifier()]
            for group, part in (("taught", taught_part), ("plumbing", plumbing_part))}


def test_no_module_is_longer_than_a_sitting():
    # Issue 29: a module reads in one sitting. 400 lines is the ceiling, not the aim.
    lengths = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in PACKAGE.glob("*.py")}
    assert {name: lines for name, lines in lengths.items() if lines > 400} == {}


def test_the_package_map_names_every_module_once():
    groups = package_map()
    named = groups["taught"] + groups["plumbing"]
    modules = {path.stem for path in PACKAGE.glob("*.py") if path.stem not in ("__init__", "__main__")}
    assert sorted(named) == sorted(modules), "captioning/__init__.py's map and the package's modules differ"


def test_the_readme_sorts_the_modules_as_the_package_map_does():
    # The README's reading guide names the taught modules and the plumbing; it must not drift
    # from the map it summarises when a module is added, split or renamed.
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    guide = readme.split("## Reading the package", 1)[1].split("\n## ", 1)[0]
    taught_line = next(line for line in guide.splitlines() if line.startswith("Taught"))
    plumbing_line = next(line for line in guide.splitlines() if line.startswith("Plumbing"))
    groups = package_map()
    assert re.findall(r"`(\w+)`", taught_line) == groups["taught"]
    assert re.findall(r"`(\w+)`", plumbing_line) == groups["plumbing"]
