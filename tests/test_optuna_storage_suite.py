"""Conformance: Optuna's own storage tests pass against hpo's storage.

They ship in Optuna's source distribution, not in its wheel: ``.ci/run`` downloads the
sdist of the installed version (pip, from the package registry) and unpacks its ``tests/``
into ``.hpo-cache/optuna-VERSION/`` (or ``$HPO_OPTUNA_TESTS``). Locally the test skips
when they are absent; with ``HPO_REQUIRE_OPTUNA_SUITE=1`` (set by ``.ci/run``) it fails.

Each file runs in pytest processes of its own with ``tests/optuna_suite_plugin.py`` (which
swaps in ``hpo.storage.open_storage``), every process of every backend at once: the
heartbeat tests are 2 minutes of sleeps (their grace periods) and a few seconds of CPU, so
their file is split between ``SHARDS`` processes (``HPO_SUITE_SHARD``), which between them
run each of its tests once; the other two files are CPU-bound and take one each.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from .databases import scratch_database

ROOT = Path(__file__).resolve().parents[1]
# file -> the processes it is split between
SHARDS = {"test_storages.py": 1, "test_heartbeat.py": 5, "test_with_server.py": 1}
SUITE_TIMEOUT_S = 400
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.db)]


def optuna_tests_dir() -> Path:
    configured = os.environ.get("HPO_OPTUNA_TESTS")
    return (
        Path(configured) if configured else ROOT / f".hpo-cache/optuna-{optuna.__version__}/tests"
    )


@pytest.fixture(scope="module")
def storages_tests() -> Path:
    directory = optuna_tests_dir() / "storages_tests"
    if not all((directory / name).is_file() for name in SHARDS):
        message = f"Optuna {optuna.__version__}'s storage tests not found in {directory} (.ci/run fetches them)"
        if os.environ.get("HPO_REQUIRE_OPTUNA_SUITE"):
            pytest.fail(f"HPO_REQUIRE_OPTUNA_SUITE is set and {message}")
        pytest.skip(message)
    return directory


@dataclass
class Run:
    """One pytest process: a file (or a shard of it) on one backend."""

    name: str
    shard: int
    process: subprocess.Popen[bytes]
    log: Path


def _start(storages_tests: Path, name: str, shard: int, url: str, directory: Path) -> Run:
    backend = "sqlite" if url.startswith("sqlite") else "postgresql"
    env = dict(os.environ)
    env.update(
        HPO_SUITE_BACKEND=backend,
        HPO_SUITE_DB_URL=url,
        HPO_SUITE_SHARD=f"{shard}/{SHARDS[name]}",
        TEST_DB_URL=url,  # test_with_server's multi-process tests
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH")])
        ),
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "optuna_suite_plugin"]
    command += ["-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore::DeprecationWarning"]
    command += ["--rootdir", str(storages_tests.parent), str(storages_tests / name)]
    log = directory / f"{name}-{shard}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, env=env, cwd=directory, stdout=handle, stderr=subprocess.STDOUT
        )
    return Run(name, shard, process, log)


def _start_backend(
    backend: str, storages_tests: Path, directory: Path, databases: contextlib.ExitStack
) -> list[Run]:
    processes = [(name, shard) for name, count in SHARDS.items() for shard in range(count)]
    if backend == "sqlite":
        urls = [f"sqlite:///{directory / name}-{shard}.db" for name, shard in processes]
    else:  # a database per process: each empties its own before every storage
        urls = [databases.enter_context(scratch_database("postgresql")) for _ in processes]
    return [
        _start(storages_tests, name, shard, url, directory)
        for (name, shard), url in zip(processes, urls, strict=True)
    ]


@pytest.fixture(scope="module")
def suite_runs(
    request: pytest.FixtureRequest,
    storages_tests: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, list[Run] | BaseException]]:
    """The processes of every backend this session runs the test for, started together;
    for a backend whose database is not there, the skip or failure that says so."""
    test = test_optunas_own_storage_tests_pass_against_hpos_storage.__name__
    backends = [
        item.callspec.params["backend"]
        for item in request.session.items
        if getattr(item, "originalname", None) == test
    ]
    started: dict[str, list[Run] | BaseException] = {}
    with contextlib.ExitStack() as databases:
        try:
            for backend in dict.fromkeys(backends):
                directory = tmp_path_factory.mktemp(f"optuna-suite-{backend}")
                try:
                    started[backend] = _start_backend(backend, storages_tests, directory, databases)
                except (pytest.fail.Exception, pytest.skip.Exception) as outcome:
                    started[backend] = outcome
            yield started
        finally:
            for runs in started.values():
                for run in runs if isinstance(runs, list) else []:
                    if run.process.poll() is None:
                        run.process.kill()
                        run.process.wait()


def _summary(output: str) -> str:
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return lines[-1] if lines else output[-2000:]


def _count(summary: str, outcome: str) -> int:
    found = re.search(rf"(\d+) {outcome}", summary)
    return int(found.group(1)) if found else 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_optunas_own_storage_tests_pass_against_hpos_storage(
    backend: str, suite_runs: dict[str, list[Run] | BaseException]
) -> None:
    runs = suite_runs[backend]
    if isinstance(runs, BaseException):
        raise runs
    codes = {(run.name, run.shard): run.process.wait(timeout=SUITE_TIMEOUT_S) for run in runs}
    outputs = {(run.name, run.shard): run.log.read_text() for run in runs}
    summaries = {key: _summary(output) for key, output in outputs.items()}
    print(backend, summaries)
    for key, code in codes.items():
        assert code == 0, f"{key} on {backend}: {summaries[key]}\n{outputs[key][-6000:]}"
        assert "skipped" not in summaries[key], f"{key} on {backend}: {summaries[key]}"
    for name, count in SHARDS.items():
        shards = [summaries[name, shard] for shard in range(count)]
        # Between them the shards ran every test of the file: each passed what it kept, and
        # what one shard kept and deselected is the whole file.
        collected = _count(shards[0], "passed") + _count(shards[0], "deselected")
        assert sum(_count(summary, "passed") for summary in shards) == collected, shards
