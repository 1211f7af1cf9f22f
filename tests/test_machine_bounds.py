"""Counts bounded by this machine: threads and worker processes beyond its cores are a
one-line exit 2 before anything starts; a launcher that cannot start worker N stops the
ones it started."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpo import launcher
from hpo.cli import app
from hpo.launcher import LaunchFailed, run_worker_processes
from hpo.settings import available_cores

from .conftest import tiny_study_text


@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        (["--workers", "100000"], {}, "--workers"),
        (["--threads", "100000"], {}, "--threads"),
        ([], {"HPO_NUM_THREADS": "100000"}, "$HPO_NUM_THREADS"),
    ],
)
def test_counts_beyond_the_cores_exit_2_before_the_study_exists(
    tiny_study: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], env: dict, named: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(launcher, "resolve_gpus", lambda gpus: [])  # a CPU-only node
    result = CliRunner().invoke(app, ["launch", "--study", "tiny", *flags])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert named in line and f"{available_cores()} CPU core(s)" in line
    assert not (tiny_study.parent.parent / "hpo.db").exists()


@pytest.mark.parametrize("gpus", [["0"], ["0", "1", "2", "3"]])
def test_workers_beyond_the_cores_exit_2_on_a_gpu_node_too(
    tiny_study: Path, monkeypatch: pytest.MonkeyPatch, gpus: list[str]
) -> None:
    monkeypatch.setattr(launcher, "resolve_gpus", lambda _: gpus)
    result = CliRunner().invoke(
        app, ["launch", "--study", "tiny", "--workers", str(available_cores() + 1)]
    )
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "--workers" in line and f"{available_cores()} CPU core(s)" in line
    assert not (tiny_study.parent.parent / "hpo.db").exists()


@pytest.mark.parametrize("device", [None, "0"])
def test_every_child_gets_its_share_of_the_cores(
    monkeypatch: pytest.MonkeyPatch, device: str | None
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = launcher._child_env("sqlite:///x.db", launcher.NodeSettings(), device, 0, threads=3)
    assert env["OMP_NUM_THREADS"] == "3"


def test_a_spec_asking_for_more_threads_than_cores_exits_2(tiny_study: Path) -> None:
    threads = available_cores() + 1
    tiny_study.write_text(tiny_study_text(extra=f"[training]\nnum_threads = {threads}\n"))
    result = CliRunner().invoke(app, ["launch", "--study", "tiny"])
    assert result.exit_code == 2, result.output
    assert "training.num_threads" in result.output


def test_a_launcher_that_cannot_start_a_child_stops_the_ones_it_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(command, env, **options):  # options: die_with_parent()
        if len(started) == 2:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        child = real_popen([sys.executable, "-c", "import time; time.sleep(120)"])
        started.append(child)
        return child

    monkeypatch.setattr(launcher.subprocess, "Popen", popen)
    with pytest.raises(LaunchFailed, match="worker 3 of 4.*stopped the 2 already started"):
        run_worker_processes(
            "tiny", "sqlite:///x.db", total_trials=1, timeout_s=None, devices=[None] * 4
        )
    assert [child.poll() for child in started] == [-15, -15]
