"""The package's layout rules (issue 18): no import cycle inside biflow_bench (function-local and annotation-only
imports included), no module named like a standard-library module, no source file over 450 lines, in the package or
under tests/ (issue 41); config.py imports nothing of training/ (the run's description sits below what trains it)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import biflow_bench

PACKAGE = Path(biflow_bench.__file__).parent
TESTS = Path(__file__).resolve().parent
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str], include_typing: bool = True) -> set[str]:
    """The biflow_bench modules a module imports anywhere in its body (top level, functions, branches); those under
    `if TYPE_CHECKING:` (never run) only with `include_typing`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = set() if include_typing else {id(n) for block in ast.walk(tree) if _is_typing_block(block)
                                      for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import runner`
    internal = set()
    for target in found:
        while target and target not in known:  # `pkg.mod.attr` -> `pkg.mod`
            target = target.rpartition(".")[0]
        if target and target != name:
            internal.add(target)
    return internal


def _is_typing_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def import_graph(include_typing: bool = False) -> dict[str, set[str]]:
    """Module -> the modules it imports: as run, or (`include_typing`) with the annotation-only ones too."""
    mods = modules()
    return {name: imported(path, name, set(mods), include_typing) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None. A package's __init__ importing its own submodules is
    the usual re-export, not a cycle; a submodule importing its package's __init__ is counted."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def edges(node: str) -> set[str]:
        return {t for t in graph[node] if not t.startswith(node + ".")}

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges(node)):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_function_local_and_relative_imports():
    graph = import_graph()
    assert "biflow_bench.config" in graph["biflow_bench.ablations"]
    assert "biflow_bench.runner" in graph["biflow_bench.cli.run"]  # imported inside a command function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_config_imports_nothing_of_training():
    """The run's description must not depend on what trains it (annotation-only imports included)."""
    up = sorted(m for m in import_graph(include_typing=True)["biflow_bench.config"]
                if m == "biflow_bench.training" or m.startswith("biflow_bench.training."))
    assert not up, f"biflow_bench/config.py imports {up}: move what it needs below training/"


def test_no_import_cycle():
    """Annotation-only imports (`if TYPE_CHECKING:`) count too: a cycle through them is a knot in the layering,
    untied by putting the shared types below both sides."""
    cycle = find_cycle(import_graph(include_typing=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_shadows_the_standard_library():
    shadowing = sorted(name for name in modules() if name.rpartition(".")[2] in sys.stdlib_module_names)
    assert not shadowing, f"modules named like standard-library modules: {shadowing}"


def long_files(root: Path) -> dict[str, int]:
    """The Python files under `root` (test modules, conftest and helpers alike) over MAX_LINES: path -> lines."""
    return {str(p.relative_to(root)): n for p in sorted(root.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}


@pytest.mark.parametrize("root", [PACKAGE, TESTS], ids=["biflow_bench", "tests"])
def test_no_file_over_the_line_limit(root: Path):
    long = long_files(root)
    assert not long, f"files over {MAX_LINES} lines under {root.name}/: {long}"
