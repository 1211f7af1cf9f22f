"""Conformance: Optuna's own storage tests pass against hpo's storage.

They ship in Optuna's source distribution, not in its wheel: ``.ci/run`` downloads the
sdist of the installed version (pip, from the package registry) and unpacks its ``tests/``
into ``.hpo-cache/optuna-VERSION/`` (or ``$HPO_OPTUNA_TESTS``). Locally the test skips
when they are absent; with ``HPO_REQUIRE_OPTUNA_SUITE=1`` (set by ``.ci/run``) it fails.

Each file runs in its own pytest process with ``tests/optuna_suite_plugin.py`` (which
swaps in ``hpo.storage.open_storage``), the three at once: most of their time is the
heartbeat tests' sleeps and the multi-process test, not CPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from .databases import scratch_database

ROOT = Path(__file__).resolve().parents[1]
SUITE_FILES = ("test_storages.py", "test_heartbeat.py", "test_with_server.py")
SUITE_TIMEOUT_S = 400


def optuna_tests_dir() -> Path:
    configured = os.environ.get("HPO_OPTUNA_TESTS")
    return (
        Path(configured) if configured else ROOT / f".hpo-cache/optuna-{optuna.__version__}/tests"
    )


@pytest.fixture(scope="module")
def storages_tests() -> Path:
    directory = optuna_tests_dir() / "storages_tests"
    if not all((directory / name).is_file() for name in SUITE_FILES):
        message = f"Optuna {optuna.__version__}'s storage tests not found in {directory} (.ci/run fetches them)"
        if os.environ.get("HPO_REQUIRE_OPTUNA_SUITE"):
            pytest.fail(f"HPO_REQUIRE_OPTUNA_SUITE is set and {message}")
        pytest.skip(message)
    return directory


def _summary(output: str) -> str:
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return lines[-1] if lines else output[-2000:]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.db)])
def test_optunas_own_storage_tests_pass_against_hpos_storage(
    backend: str, storages_tests: Path, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as databases:
        runs = {}
        for name in SUITE_FILES:
            if backend == "sqlite":
                url = f"sqlite:///{tmp_path / name}.db"
            else:
                url = databases.enter_context(scratch_database("postgresql"))
            env = dict(os.environ)
            env.update(
                HPO_SUITE_BACKEND=backend,
                HPO_SUITE_DB_URL=url,
                TEST_DB_URL=url,  # test_with_server's multi-process tests
                PYTHONPATH=os.pathsep.join(
                    filter(None, [str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH")])
                ),
            )
            command = [sys.executable, "-m", "pytest", "-q", "-p", "optuna_suite_plugin"]
            command += [
                "-p",
                "no:cacheprovider",
                "-o",
                "addopts=",
                "-W",
                "ignore::DeprecationWarning",
            ]
            command += ["--rootdir", str(storages_tests.parent), str(storages_tests / name)]
            log = tmp_path / f"{name}.log"
            with open(log, "w") as handle:
                process = subprocess.Popen(
                    command, env=env, cwd=tmp_path, stdout=handle, stderr=subprocess.STDOUT
                )
            runs[name] = (process, log)
        try:
            codes = {
                name: process.wait(timeout=SUITE_TIMEOUT_S) for name, (process, _) in runs.items()
            }
        finally:
            for process, _ in runs.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
    outputs = {name: log.read_text() for name, (_, log) in runs.items()}
    summaries = {name: _summary(output) for name, output in outputs.items()}
    print(backend, summaries)
    for name, code in codes.items():
        assert code == 0, f"{name} on {backend}: {summaries[name]}\n{outputs[name][-6000:]}"
        assert "skipped" not in summaries[name], f"{name} on {backend}: {summaries[name]}"
