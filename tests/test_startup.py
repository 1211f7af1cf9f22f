"""Process start: the commands that only read a study never import torch.

Importing torch (and torchvision, which pulls in torch._dynamo) costs seconds per process
on this machine; ``hpo status``, ``hpo report``, ``hpo dashboard`` and ``hpo --help`` do
not train, so they must not pay it. Each command runs in a fresh interpreter, as a user
runs it, and the test reads that interpreter's ``sys.modules`` afterwards.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hpo.settings import default_omp_wait_policy
from hpo.spec import load_spec
from hpo.study import create_or_load_study
from tests.conftest import tiny_study_text
from tests.test_report import scaling_study

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision")

# Runs hpo commands one after another in this interpreter (each argv a JSON list), and
# prints after each which heavy modules are loaded by then; then imports hpo.train, which
# must load torch (so the check can fail). ``serve`` is replaced so ``hpo dashboard``
# builds its server and returns.
RUN_COMMANDS = textwrap.dedent(
    """
    import json, sys
    import hpo.dashboard
    hpo.dashboard.serve = lambda server: None
    from hpo.cli import app
    def heavy():
        return [name for name in {heavy!r} if name in sys.modules]
    for argv in sys.argv[1:]:
        try:
            app(json.loads(argv), standalone_mode=False)
        except SystemExit:
            pass
        print("HEAVY=" + json.dumps(heavy()), flush=True)
    import hpo.train
    print("HEAVY=" + json.dumps(heavy()), flush=True)
    """
).format(heavy=HEAVY)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def stored_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An hpo study (spec stored on it) with finished trials, in a SQLite file."""
    directory = tmp_path_factory.mktemp("startup")
    (directory / "tiny.toml").write_text(tiny_study_text())
    url = f"sqlite:///{directory / 'hpo.db'}"
    loaded = create_or_load_study(load_spec(directory / "tiny.toml"), url)
    for trial in scaling_study(1.0, batch_sizes=(16, 32, 64)).trials:
        loaded.study.add_trial(trial)
    return directory, url


def test_read_only_commands_do_not_import_torch(stored_study: tuple[Path, str]) -> None:
    directory, url = stored_study
    commands = {
        "--help": ["--help"],
        "status": ["status", "--study", "tiny", "--storage", url],
        "report": ["report", "--study", "tiny", "--storage", url, "--out", "out"],
        "dashboard": ["dashboard", "--storage", url, "--port", str(_free_port())],
    }
    completed = subprocess.run(
        [sys.executable, "-c", RUN_COMMANDS, *map(json.dumps, commands.values())],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = [line for line in completed.stdout.splitlines() if line.startswith("HEAVY=")]
    loaded = [json.loads(line.removeprefix("HEAVY=")) for line in lines]
    assert len(loaded) == len(commands) + 1, completed.stdout + completed.stderr
    assert dict(zip(commands, loaded, strict=False)) == {name: [] for name in commands}
    assert "torch" in loaded[-1], "the check must see torch once hpo.train is imported"
    assert (directory / "out" / "summary.md").is_file() and "best" in completed.stdout


def test_bytecode_is_compiled_at_install() -> None:
    """PYTHONDONTWRITEBYTECODE is set here: without compiled .pyc every process re-parses
    torch and optuna from source (twice as slow to start; docs/benchmarks.md)."""
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r"^\[tool\.uv\]$[^\[]*^compile-bytecode = true$", text, re.MULTILINE)


def test_idle_openmp_threads_sleep_unless_the_user_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    default_omp_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    default_omp_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_training_commands_set_the_wait_policy_before_importing_torch() -> None:
    """launch, worker and probe call it first: their bodies import torch right after."""
    source = (REPO / "hpo" / "cli" / "run.py").read_text()
    for command in ("launch", "worker", "probe"):
        body = source.split(f"\ndef {command}(", 1)[1]
        first_import = body.index("\n    from hpo.")
        assert "default_omp_wait_policy()" in body[:first_import], command
