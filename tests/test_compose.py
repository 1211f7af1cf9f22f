"""docker-compose.yml: Docker cannot run here, so the file is parsed and checked, and each
service's command is run directly against the local PostgreSQL, with the compose file's own
environment (``${VAR:-default}`` interpolated as compose does)."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hpo.storage import open_storage

from .conftest import tiny_study_text
from .databases import FAST_HEARTBEAT, scratch_database, wait_all
from .pgbouncer import pgbouncer

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::([-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$ for $."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, kind, argument = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name}: {argument}")
        return argument if kind == "-" else ""

    return VARIABLE.sub(replace, value)


def test_services_are_postgres_pgbouncer_dashboard_and_worker() -> None:
    assert set(SERVICES) == {"postgres", "pgbouncer", "dashboard", "worker"}


def test_workers_go_through_pgbouncer_in_transaction_pooling_mode() -> None:
    pgbouncer = SERVICES["pgbouncer"]
    assert pgbouncer["environment"]["POOL_MODE"] == "transaction"
    assert pgbouncer["environment"]["DB_HOST"] == "postgres"
    assert pgbouncer["environment"]["DB_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert pgbouncer["depends_on"]["postgres"]["condition"] == "service_healthy"
    (ports,) = pgbouncer["ports"]
    assert interpolate(ports, {}) == "127.0.0.1:6432:5432"
    worker = SERVICES["worker"]
    assert "@pgbouncer:5432/" in worker["environment"]["HPO_STORAGE"]
    assert worker["depends_on"]["pgbouncer"]["condition"] == "service_healthy"
    assert "@postgres:5432/" in SERVICES["dashboard"]["environment"]["HPO_STORAGE"]


def test_pgbouncer_gives_the_workers_study_lock_an_alias_with_its_own_pool(
    tmp_path: Path,
) -> None:
    # The image writes pgbouncer.ini from its environment, then runs the command; the
    # command adds "<db>_lock" (docs/scale.md), once even when the container restarts.
    pgbouncer = SERVICES["pgbouncer"]
    environment = {k: interpolate(str(v), {"POSTGRES_PASSWORD": "x"}) for k, v in
                   pgbouncer["environment"].items()}  # fmt: skip
    ini = tmp_path / "pgbouncer.ini"
    generated = "[databases]\nhpo = host=postgres port=5432 auth_user=hpo\n\n[pgbouncer]\n"
    ini.write_text(generated)
    shell, flag, script = pgbouncer["command"]
    script = interpolate(script, {}).replace("/etc/pgbouncer/pgbouncer.ini", str(ini))
    prepare, _, run = script.strip().rpartition("\n")
    assert run == 'exec /usr/bin/pgbouncer "$ini"'
    for _ in range(2):  # a restarted container finds its ini already written
        subprocess.run([shell, flag, prepare], env=environment, check=True)
    lines = ini.read_text().splitlines()
    assert lines[:3] == [
        "[databases]",
        "hpo_lock = host=postgres port=5432 dbname=hpo auth_user=hpo pool_size=4",
        "hpo = host=postgres port=5432 auth_user=hpo",
    ]
    worker = SERVICES["worker"]["environment"]
    assert interpolate(worker["HPO_LOCK_DATABASE"], {}) == "hpo_lock"
    assert interpolate(worker["HPO_LOCK_DATABASE"], {"POSTGRES_DB": "lab"}) == "lab_lock"
    assert "@pgbouncer:5432/${POSTGRES_DB:-hpo}" in worker["HPO_STORAGE"]


def test_postgres_has_a_volume_a_healthcheck_and_its_password_from_env() -> None:
    postgres = SERVICES["postgres"]
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_worker_reserves_nvidia_gpus_waits_for_the_database_and_can_scale() -> None:
    worker = SERVICES["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "container_name" not in worker and "ports" not in worker  # both block --scale


def test_dashboard_is_bound_to_localhost_on_the_host_by_default() -> None:
    dashboard = SERVICES["dashboard"]
    (ports,) = dashboard["ports"]
    assert interpolate(ports, {}) == "127.0.0.1:8080:8080"
    assert dashboard["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_no_secret_is_written_into_the_compose_file() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for line in text.splitlines():
        if re.search(r"PASSWORD\s*[:=]", line) and not line.lstrip().startswith("#"):
            assert "${POSTGRES_PASSWORD" in line or "${HPO_DASHBOARD_PASSWORD:?" in line, line
    storage = SERVICES["worker"]["environment"]["HPO_STORAGE"]
    assert ":${POSTGRES_PASSWORD:?" in storage
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(storage, {})
    example = (ROOT / ".env.example").read_text()
    assert "POSTGRES_PASSWORD=change-me" in example
    assert "HPO_DASHBOARD_PASSWORD=change-me-too" in example
    dashboard = SERVICES["dashboard"]["environment"]
    with pytest.raises(KeyError, match="HPO_DASHBOARD_PASSWORD"):
        interpolate(dashboard["HPO_DASHBOARD_PASSWORD"], {})
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _service_env(
    service: str, database: str, tmp_path: Path, pgbouncer_port: int = 0
) -> tuple[dict[str, str], dict[str, str]]:
    """The service's environment from the compose file, for this machine (the database host
    ``postgres`` becomes 127.0.0.1, ``pgbouncer`` a real PgBouncer on ``pgbouncer_port``,
    container paths become temporary directories), and the ``.env`` values used to
    interpolate it."""
    dotenv = {"POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "unused-with-trust-auth",
              "POSTGRES_DB": database, "HPO_STUDY": "tiny",
              "HPO_DASHBOARD_PASSWORD": "pw"}  # fmt: skip
    env = dict(os.environ)
    env.update(FAST_HEARTBEAT)
    for key, value in SERVICES[service]["environment"].items():
        env[key] = interpolate(str(value), dotenv)
    env["HPO_STORAGE"] = (
        env["HPO_STORAGE"]
        .replace("@postgres:5432/", "@127.0.0.1:5432/")
        .replace("@pgbouncer:5432/", f"@127.0.0.1:{pgbouncer_port}/")
    )
    env.update(HPO_STUDIES_DIR=str(tmp_path / "studies"), OMP_NUM_THREADS="1",
               HPO_CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
               HPO_ARTIFACTS=str(tmp_path / "artifacts"))  # fmt: skip
    return env, dotenv


@pytest.mark.db
def test_service_commands_run_against_the_local_postgresql(tmp_path: Path) -> None:
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "tiny.toml").write_text(
        tiny_study_text(epochs=1, train_size=128, val_size=64)
    )
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(scratch_database("postgresql"))
        database = url.rsplit("/", 1)[1]
        # The alias compose's pgbouncer command adds (HPO_LOCK_DATABASE on the workers).
        aliases = {f"{database}_lock": (database, 4)}
        pgbouncer_port = stack.enter_context(pgbouncer(aliases=aliases))
        env, dotenv = _service_env("worker", database, tmp_path, pgbouncer_port)
        assert env["HPO_LOCK_DATABASE"] == f"{database}_lock"
        assert f"@127.0.0.1:{pgbouncer_port}/" in env["HPO_STORAGE"]
        healthcheck = SERVICES["postgres"]["healthcheck"]["test"][1]
        if shutil.which("pg_isready"):
            check_env = {**env, "PGHOST": "127.0.0.1", "POSTGRES_USER": "postgres",
                         "POSTGRES_DB": database}  # fmt: skip
            command = interpolate(healthcheck, {}).replace("$$", "$")
            assert subprocess.run(["sh", "-c", command], env=check_env).returncode == 0

        worker = [interpolate(part, dotenv) for part in SERVICES["worker"]["command"]]
        assert worker[0] == "hpo"
        run = subprocess.run([sys.executable, "-m", "hpo", *worker[1:]], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=400)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        study = optuna.load_study(study_name="tiny", storage=open_storage(url))
        assert len(study.trials) == 4  # budget.n_trials of the study file
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)

        port = _free_port()
        dashboard = [interpolate(part, dotenv) for part in SERVICES["dashboard"]["command"]]
        dashboard[dashboard.index("--port") + 1] = str(port)
        env, _ = _service_env("dashboard", database, tmp_path)
        server = subprocess.Popen([sys.executable, "-m", "hpo", *dashboard[1:]], env=env,
                                  cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        try:
            address = f"http://127.0.0.1:{port}/api/studies"
            body = _get_when_up(address, server, auth=("hpo", "pw"))
            assert b"tiny" in body
            with pytest.raises(urllib.error.HTTPError, match="401"):
                urllib.request.urlopen(address, timeout=30)
        finally:
            server.terminate()
            wait_all([server], timeout_s=30)


def _get_when_up(
    address: str, server: subprocess.Popen, auth: tuple[str, str], timeout_s: float = 90
) -> bytes:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(address)
    token = base64.b64encode(":".join(auth).encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.read()
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"dashboard exited: {server.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard not answering at {address}")
            time.sleep(0.5)
