"""The SQLite study file deleted under a running worker: found within one heartbeat, the
worker stops with exit 1 and one line, and no empty database appears in its place."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from hpo.cli import app
from hpo.spec import parse_spec
from hpo.sqlite_guard import SQLiteFileGuard, SQLiteFileLost
from hpo.storage import open_storage
from hpo.study import create_or_load_study

from .conftest import tiny_study_text


def _storage(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    return url, open_storage(url)


def test_a_deleted_file_is_found_and_never_recreated(tmp_path: Path) -> None:
    url, storage = _storage(tmp_path)
    guard = SQLiteFileGuard.attach(storage)
    assert guard is not None and guard.problem() is None
    storage.engine.dispose()  # every later call needs a new connection
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'hpo.db'}{suffix}").unlink(missing_ok=True)

    assert "was deleted" in (guard.problem() or "")
    with pytest.raises(SQLiteFileLost, match="was deleted"):
        storage.get_all_studies()
    assert not (tmp_path / "hpo.db").exists()


def test_a_replaced_file_is_found(tmp_path: Path) -> None:
    url, storage = _storage(tmp_path)
    guard = SQLiteFileGuard.attach(storage)
    assert guard is not None
    os.replace(tmp_path / "hpo.db", tmp_path / "old.db")
    sqlite3.connect(tmp_path / "hpo.db").close()
    with pytest.raises(SQLiteFileLost, match="was replaced"):
        guard.check()


@pytest.mark.parametrize("command", ["status", "worker", "report"])
def test_reading_a_missing_sqlite_file_is_exit_2_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, [command, "--study", "tiny", "--storage", "sqlite:///missing.db"]
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: study 'tiny' not found: sqlite:///missing.db: SQLite file 'missing.db' does "
        "not exist"
    ]
    assert not (tmp_path / "missing.db").exists()


def _running_trials(db: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
            query = "SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'"
            return connection.execute(query).fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_worker_whose_database_is_deleted_stops_within_a_heartbeat(tmp_path: Path) -> None:
    text = tiny_study_text(epochs=500, pruner="none", sampler="random")
    spec = parse_spec(tomllib.loads(text), source="test", default_name="tiny")
    db = tmp_path / "hpo.db"
    url = f"sqlite:///{db}"
    create_or_load_study(spec, url).storage.engine.dispose()
    env = os.environ | {"HPO_STORAGE": url, "HPO_HEARTBEAT_S": "1", "HPO_GRACE_S": "5",
                        "HPO_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "HPO_NUM_THREADS": "1"}  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "hpo", "worker", "--study", "tiny", "--n-trials", "1"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _running_trials(db) == 0:
            assert worker.poll() is None, worker.communicate()[0]
            assert time.monotonic() < deadline, "no trial started"
            time.sleep(0.5)
        time.sleep(1.5)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        deleted = time.monotonic()
        output, _ = worker.communicate(timeout=60)
        stopped_after = time.monotonic() - deleted
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
    assert worker.returncode == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: SQLite file {db} was deleted while this worker ran; stopping"]
    assert "Traceback" not in output
    assert stopped_after < 10, stopped_after  # one 1 s heartbeat, plus a loaded machine
    assert not db.exists()


def _written_storage(tmp_path: Path):
    """A storage with a study and trials whose pages sit in the WAL (not checkpointed),
    and a copy of its file taken before those writes (a "backup")."""
    import optuna

    url, storage = _storage(tmp_path)
    optuna.create_study(storage=storage, study_name="backed-up")
    with storage.engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    backup = tmp_path / "backup.db"
    with (
        contextlib.closing(sqlite3.connect(tmp_path / "hpo.db")) as source,
        contextlib.closing(sqlite3.connect(backup)) as target,
    ):
        source.backup(target)
    guard = SQLiteFileGuard.attach(storage)
    study = optuna.create_study(storage=storage, study_name="after-backup")
    for value in range(30):
        study.add_trial(optuna.trial.create_trial(value=float(value)))
    assert Path(f"{tmp_path / 'hpo.db'}-wal").stat().st_size > 0
    return storage, guard, backup


def _healthy(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [row[0] for row in connection.execute("SELECT study_name FROM studies")]


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_side_files_of_a_lost_file_are_never_replayed_into_a_restored_one(
    tmp_path: Path, how: str
) -> None:
    storage, guard, backup = _written_storage(tmp_path)
    db = tmp_path / "hpo.db"
    if how == "deleted":
        db.unlink()
    else:
        os.replace(db, tmp_path / "moved-away.db")
    with pytest.raises(SQLiteFileLost):
        guard.check()
    os.replace(backup, db)  # the operator restores the backup while the worker is gone
    assert _healthy(db) == ["backed-up"]
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    assert list(tmp_path.glob("hpo.db-wal.lost-*"))  # kept aside, not destroyed


def test_a_new_file_is_never_made_from_orphaned_side_files(tmp_path: Path) -> None:
    import optuna

    storage, guard, backup = _written_storage(tmp_path)
    db = tmp_path / "hpo.db"
    stale_wal = Path(f"{db}-wal").read_bytes()
    db.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    Path(f"{db}-wal").write_bytes(stale_wal)  # left by a process killed outright
    fresh = open_storage(f"sqlite:///{db}")
    optuna.create_study(storage=fresh, study_name="fresh")
    fresh.engine.dispose()
    assert _healthy(db) == ["fresh"]
    assert list(tmp_path.glob("hpo.db-wal.lost-*"))
