"""The package's shape, read from its source: imports flow one way, nothing imports the
CLI, and private names of other libraries appear in ``hpo/compat.py`` only."""

from __future__ import annotations

import ast
from pathlib import Path

import optuna
import pytest

from hpo import compat

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


# ---------------------------------------------------------------- sizes a reader can hold

MAX_FILE_LINES = 600
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60


def _size_offenders(path: Path) -> list[str]:
    """Where ``path`` is over the sizes a reader can hold: the file, a class, a function
    (a CLI command's option declarations aside: its body is counted from its first
    statement after the docstring)."""
    text = path.read_text()
    name = _module_name(path)
    found = []
    if len(text.splitlines()) > MAX_FILE_LINES:
        found.append(f"{name}: {len(text.splitlines())} lines")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_CLASS_LINES:
                found.append(f"{name}.{node.name}: class of {length} lines")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.lineno
            if name.startswith("hpo.cli"):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                first = body[0].lineno if body else node.end_lineno
            length = node.end_lineno - first + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}.{node.name}: function of {length} lines")
    return found


def test_no_module_class_or_function_is_larger_than_a_reader_can_hold() -> None:
    offenders = [found for path in MODULES.values() for found in _size_offenders(path)]
    assert not offenders


def test_the_size_check_finds_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{n} = {n}" for n in range(MAX_FUNCTION_LINES))
    long = tmp_path / "long.py"
    long.write_text(f"def long():\n{body}\n")
    short = tmp_path / "short.py"
    short.write_text("def short():\n    return 1\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path.parent
    try:
        assert _size_offenders(long) and not _size_offenders(short)
    finally:
        PACKAGE = saved


# ---------------------------------------------------------------- the claim has one home

# What storage offers a claim: primitives. Only ``hpo.claim`` (and storage itself) uses them.
CLAIM_PRIMITIVES = {
    "claiming",
    "at_once",
    "claims_at_once",
    "prepare_claims",
    "trial_claimed_with",
    "waiting_trial_ids",
    "has_stale_trials",
    "count_trials",
    "NoTrialAtOnce",
    "AtOnceCounts",
}


def _names_used(tree: ast.AST) -> set[str]:
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.ImportFrom):
            used |= {alias.name for alias in node.names}
    return used


def test_only_the_claim_module_uses_the_storages_claim_primitives() -> None:
    users = {
        name: sorted(_names_used(ast.parse(path.read_text())) & CLAIM_PRIMITIVES)
        for name, path in MODULES.items()
        if name != "hpo.claim" and not name.startswith("hpo.storage")
    }
    assert not {name: used for name, used in users.items() if used}


def test_the_worker_claims_with_one_call_to_the_claim_module() -> None:
    tree = ast.parse(MODULES["hpo.worker"].read_text())
    calls = [
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    ]
    assert calls.count("claim_trial") == 1
    assert "hpo.claim" in GRAPH["hpo.worker"]


def test_storage_imports_no_module_that_decides() -> None:
    # hpo.secrets: the one masking function, a leaf that imports nothing of hpo.
    allowed = {"hpo", "hpo.errors", "hpo.settings", "hpo.compat", "hpo.retry", "hpo.secrets"}
    reached = {
        target
        for name, targets in GRAPH.items()
        if name.startswith("hpo.storage")
        for target in targets
        if not target.startswith("hpo.storage")
    }
    assert reached <= allowed, reached - allowed


# ---------------------------------------------------------------- Optuna's private names


def _optuna_private_names() -> set[str]:
    """Private (single-underscore) names of the Optuna classes hpo works with: methods and
    attributes of its storages, cache layer, study, trials, samplers, pruners and retry
    callback, including the attributes their instances set."""
    from optuna.storages import _cached_storage

    classes = [
        optuna.storages.RDBStorage,
        _cached_storage._CachedStorage,
        optuna.storages.BaseStorage,
        optuna.Study,
        optuna.Trial,
        optuna.trial.FrozenTrial,
        optuna.samplers.BaseSampler,
        optuna.samplers.GridSampler,
        optuna.samplers.TPESampler,
        optuna.pruners.BasePruner,
        optuna.pruners.HyperbandPruner,
        optuna.storages.RetryHeartbeatStaleTrialCallback,
    ]
    names = {name for cls in classes for name in dir(cls)}
    study = optuna.create_study(storage=optuna.storages.RDBStorage("sqlite://"))
    for instance in (study, study._storage, study._storage._backend, optuna.samplers.TPESampler()):
        names |= set(vars(instance))
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def _private_optuna_uses(tree: ast.AST, optuna_private: set[str]) -> list[tuple[int, str]]:
    """Optuna's private names a module reaches (``x._name``) or overrides (a method of that
    name in a class), except names the module defines itself outside a class's methods
    (a function or attribute of its own that happens to share the name)."""
    overrides = set()
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            overrides |= {
                item.name
                for item in node.body
                if isinstance(item, ast.FunctionDef) and item.name in optuna_private
            }
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.bases:
            continue
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name not in overrides:
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in optuna_private - own:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.FunctionDef) and node.name in overrides:
            found.append((node.lineno, node.name))
    return found


def test_optunas_private_names_appear_only_in_compat_and_the_one_storage_subclass() -> None:
    # The subclass may override (and call up to) exactly the private methods that
    # hpo.compat lists and tests/test_compat.py pins; nothing else reaches Optuna's insides.
    optuna_private = _optuna_private_names()
    offenders = []
    for name, path in MODULES.items():
        if name == "hpo.compat":
            continue
        allowed = set(compat.RDB_STORAGE_PRIVATE_METHODS) if name == "hpo.storage.rdb" else set()
        offenders += [
            f"{name}:{line} {used}"
            for line, used in _private_optuna_uses(ast.parse(path.read_text()), optuna_private)
            if used not in allowed
        ]
    assert not offenders


def test_the_private_name_check_finds_a_reach_and_an_override() -> None:
    optuna_private = _optuna_private_names()
    reach = ast.parse("def f(study):\n    return study._storage\n")
    override = ast.parse("class S(Base):\n    def _get_trials(self):\n        return []\n")
    own = ast.parse("class O:\n    def _params(self):\n        return self._params\n")
    assert _private_optuna_uses(reach, optuna_private) == [(2, "_storage")]
    assert _private_optuna_uses(override, optuna_private) == [(2, "_get_trials")]
    assert _private_optuna_uses(own, optuna_private) == []
