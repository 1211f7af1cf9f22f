"""The package's shape, read from its source: imports flow one way, nothing imports the
CLI, and private names of other libraries appear in ``hpo/compat.py`` only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hpo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, inside functions too, except the bodies of ``if TYPE_CHECKING:``."""
    nodes, stack = [], [tree]
    while stack:
        node = stack.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def _imports(name: str) -> set[str]:
    """The hpo modules ``name`` imports at run time, at module level or inside functions."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in MODULES and target != name}
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            # A package's __init__ re-exporting its own submodules is not a cycle.
            if name.startswith(target + ".") or target.startswith(name + "."):
                continue
            if state.get(target) == 1:
                return [*path, name, target]
            if state.get(target) is None and (cycle := visit(target, [*path, name])):
                return cycle
        state[name] = 2
        return None

    for name in sorted(GRAPH):
        if state.get(name) is None and (cycle := visit(name, [])):
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    assert _find_cycle() is None, " -> ".join(_find_cycle() or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    GRAPH["hpo.errors"].add("hpo.storage.urls")  # urls imports errors: now a circle
    try:
        assert _find_cycle() is not None
    finally:
        GRAPH["hpo.errors"].discard("hpo.storage.urls")


def test_nothing_imports_the_cli() -> None:
    importers = {
        name
        for name, targets in GRAPH.items()
        if not name.startswith("hpo.cli") and name != "hpo.__main__"
        if any(target == "hpo.cli" or target.startswith("hpo.cli.") for target in targets)
    }
    assert not importers


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("hpo.train", {"hpo.objective", "hpo.study", "hpo.worker", "hpo.space", "hpo.caps"}),
        ("hpo.checkpoint", {"hpo.study", "hpo.objective", "hpo.worker"}),
        ("hpo.space", {"hpo.train", "hpo.probe", "hpo.caps", "hpo.device"}),
        ("hpo.spec", {"hpo.storage", "hpo.study", "hpo.train"}),
        ("hpo.settings", {name for name in MODULES if name not in ("hpo", "hpo.errors")}),
    ],
)
def test_lower_layers_do_not_reach_up(module: str, forbidden: set[str]) -> None:
    assert not (GRAPH[module] & forbidden)


def _library_imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {alias.name for alias in node.names if alias.name.startswith("_")}
    return names


def _defined_private_names() -> set[str]:
    """Private names hpo defines itself (its own attributes, functions and classes)."""
    names = set()
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {name for name in names if name.startswith("_")}


def test_private_names_of_other_libraries_appear_only_in_compat() -> None:
    own = _defined_private_names()
    offenders = []
    for name, path in MODULES.items():
        if name == "hpo.compat":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in own
            ):
                offenders.append(f"{name}:{node.lineno} .{node.attr}")
        offenders += [f"{name}: import {imported}" for imported in _library_imports(tree)]
    assert not offenders


def test_only_settings_reads_the_environment() -> None:
    readers = []
    for name, path in MODULES.items():
        if name == "hpo.settings":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                readers.append(f"{name}:{node.lineno}")
    assert not readers
