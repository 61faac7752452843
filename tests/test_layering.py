"""The package's import graph: layered, without cycles.

Every import statement of every module counts, also those inside functions (a lazy import is
still a dependency, and a cycle through one only hides until the function runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dept_kernels

PACKAGE = Path(dept_kernels.__file__).resolve().parent

# Lowest first; a module may import its own layer and the ones below it. The first matching
# prefix names a module's layer.
LAYERS = [
    ("engines", ("dept_kernels._engines", "dept_kernels._files")),
    ("build", ("dept_kernels._build",)),
    ("kernels", ("dept_kernels.triton", "dept_kernels.backends")),
    ("ops", ("dept_kernels.ops",)),
    ("testing", ("dept_kernels.testing",)),
    ("methods", ("dept_kernels.methods",)),
    ("models", ("dept_kernels.models",)),
    (
        "generic",
        (
            "dept_kernels.patch",
            "dept_kernels.checkpoint",
            "dept_kernels.official",
            "dept_kernels.multitask",
        ),
    ),
    (
        "entry points",
        (
            "dept_kernels.bench",
            "dept_kernels.check_build",
            "dept_kernels.gpu_run",
            "dept_kernels.__init__",
        ),
    ),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts)


def layer(name: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{name} has no layer in tests/test_layering.py's LAYERS")


def imports(path: Path) -> set[str]:
    """The package modules `path` imports, resolved to module names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            # `from . import x` imports the submodule x; `from .x import y`, module x.
            for alias in node.names:
                candidate = f"{prefix}.{alias.name}"
                found.add(candidate if _is_module(candidate) else prefix)
    return {m for m in found if m == "dept_kernels" or m.startswith("dept_kernels.")}


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:`, which are for type checkers only."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
            continue
        yield child
        yield from _runtime_nodes(child)


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _canonical(name: str) -> str:
    """A package as its `__init__` module."""
    rel = Path(*name.split(".")[1:])
    return f"{name}.__init__" if (PACKAGE / rel / "__init__.py").is_file() else name


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _canonical(module_name(path))
        # A module's own package (`from . import x` naming a function) is not an edge: the
        # package's __init__ runs before any of its modules anyway.
        graph[name] = {_canonical(m) for m in imports(path)} - {name, "dept_kernels.__init__"}
    return graph


GRAPH = _graph()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    """ops and backends never import methods, models or patch; methods never models; ..."""
    upward = [m for m in GRAPH[module] if layer(m) > layer(module)]
    assert not upward, f"{module} ({LAYERS[layer(module)][0]}) imports higher layers: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(GRAPH):
        if start not in state:
            visit(start, [start])
