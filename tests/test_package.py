"""The package's shape: no import circles, and every module imports on its own."""

import ast
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
