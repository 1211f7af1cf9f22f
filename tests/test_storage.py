"""Storage and joining a study: masked passwords, clear refusals, the exact trial budget."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest
import tomllib
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo.claim import claim_trial
from hpo.cli import app
from hpo.launcher import GpuSelectionError, resolve_gpus
from hpo.spec import parse_spec
from hpo.storage import (
    SchemaVersionError,
    StorageError,
    is_connection_error,
    mask_url,
    open_storage,
)
from hpo.study import LoadedStudy, create_or_load_study, study_budget

from .conftest import tiny_study_text

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

runner = CliRunner()
SECRET = "s3cret-pw"


def _spec(**kwargs):
    return parse_spec(tomllib.loads(tiny_study_text(**kwargs)), source="test", default_name="tiny")


def test_mask_url_hides_the_password() -> None:
    url = f"postgresql+psycopg://hpo:{SECRET}@db.example:5432/hpo"
    assert mask_url(url) == "postgresql+psycopg://hpo:***@db.example:5432/hpo"


def test_unreachable_storage_error_names_it_without_the_password() -> None:
    with pytest.raises(StorageError) as error:
        open_storage(f"postgresql+psycopg://hpo:{SECRET}@127.0.0.1:9/hpo", attempts=1)
    assert "hpo:***@127.0.0.1:9/hpo" in str(error.value)
    assert SECRET not in str(error.value)


def test_status_of_an_unknown_study_exits_2_with_the_password_masked(studies_dir: Path) -> None:
    url = f"postgresql+psycopg://hpo:{SECRET}@127.0.0.1:9/hpo"
    result = runner.invoke(app, ["status", "--study", "nope", "--storage", url])
    assert result.exit_code == 2
    assert "***" in result.output and SECRET not in result.output


def test_worker_for_an_unknown_study_exits_2(studies_dir: Path) -> None:
    result = runner.invoke(app, ["worker", "--study", "nope"])
    assert result.exit_code == 2
    assert "study 'nope' not found" in result.output


def test_worker_refuses_a_local_spec_that_differs_naming_the_fields(tiny_study: Path) -> None:
    create_or_load_study(_spec(), f"sqlite:///{tiny_study.parent.parent / 'hpo.db'}", parallel=True)
    tiny_study.write_text(tiny_study_text(epochs=3, sampler="random"))
    result = runner.invoke(app, ["worker", "--study", "tiny", "--spec", "tiny"])
    assert result.exit_code == 2
    assert "differing fields: budget.epochs, sampler.kind" in result.output


def test_sqlite_storage_uses_wal_so_local_workers_can_share_it(tmp_path: Path) -> None:
    open_storage(f"sqlite:///{tmp_path / 'hpo.db'}")
    with sqlite3.connect(tmp_path / "hpo.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _stamp_schema(path: Path, revision: str) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def test_a_storage_of_an_older_optuna_schema_is_one_error_naming_the_upgrade(
    tmp_path: Path,
) -> None:
    open_storage(f"sqlite:///{tmp_path / 'hpo.db'}").engine.dispose()
    older = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'hpo.db'}").get_all_versions()[1]
    _stamp_schema(tmp_path / "hpo.db", older)
    with pytest.raises(SchemaVersionError, match="optuna storage upgrade") as error:
        open_storage(f"sqlite:///{tmp_path / 'hpo.db'}")
    assert older in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, StorageError)  # a UserError: one line, exit 2


def test_a_storage_of_a_newer_optuna_schema_is_one_error_naming_the_fix(tmp_path: Path) -> None:
    open_storage(f"sqlite:///{tmp_path / 'hpo.db'}").engine.dispose()
    _stamp_schema(tmp_path / "hpo.db", "v99.0.0.a")
    with pytest.raises(SchemaVersionError, match="written by a newer Optuna"):
        open_storage(f"sqlite:///{tmp_path / 'hpo.db'}", attempts=3)


def test_status_on_a_storage_of_another_schema_exits_2_with_one_line(tmp_path: Path) -> None:
    open_storage(f"sqlite:///{tmp_path / 'hpo.db'}").engine.dispose()
    _stamp_schema(tmp_path / "hpo.db", "v99.0.0.a")
    result = runner.invoke(
        app, ["status", "--study", "tiny", "--storage", f"sqlite:///{tmp_path / 'hpo.db'}"]
    )
    assert result.exit_code == 2
    assert "newer Optuna" in result.output and "Traceback" not in result.output


def test_opening_a_storage_never_holds_two_connections_at_once(tmp_path: Path) -> None:
    # Optuna's own schema check holds a session while it opens a second connection; behind
    # PgBouncer that stalls more simultaneous starters than its pool (docs/scale.md).
    import sqlalchemy

    open_storage(f"sqlite:///{tmp_path / 'hpo.db'}").engine.dispose()  # tables exist
    held, peak = 0, 0

    def checkout(*args: object) -> None:
        nonlocal held, peak
        held += 1
        peak = max(peak, held)

    def checkin(*args: object) -> None:
        nonlocal held
        held -= 1

    sqlalchemy.event.listen(sqlalchemy.pool.Pool, "checkout", checkout)
    sqlalchemy.event.listen(sqlalchemy.pool.Pool, "checkin", checkin)
    try:
        open_storage(f"sqlite:///{tmp_path / 'hpo.db'}").engine.dispose()
    finally:
        sqlalchemy.event.remove(sqlalchemy.pool.Pool, "checkout", checkout)
        sqlalchemy.event.remove(sqlalchemy.pool.Pool, "checkin", checkin)
    assert peak == 1


def test_lost_connection_errors_are_retried_and_others_are_not() -> None:
    import sqlalchemy

    lost = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed"))
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = lost
    assert is_connection_error(lost) and is_connection_error(wrapped)
    assert not is_connection_error(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception()))


@pytest.fixture
def sqlite_study(tmp_path: Path) -> LoadedStudy:
    return create_or_load_study(_spec(), f"sqlite:///{tmp_path / 'hpo.db'}", parallel=True)


def test_claim_stops_at_the_total_and_waits_while_trials_run(sqlite_study) -> None:
    study = sqlite_study.study
    study.add_trial(optuna.create_trial(value=0.5))
    running = claim_trial(sqlite_study, 2)
    assert isinstance(running, optuna.Trial)
    assert claim_trial(sqlite_study, 2) == "wait"
    study.tell(running, 0.6)
    assert claim_trial(sqlite_study, 2) == "done"


def test_a_requeued_failure_gives_its_place_to_the_retry(sqlite_study) -> None:
    study = sqlite_study.study
    first = claim_trial(sqlite_study, 1)
    study.tell(first, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback()(study, study.trials[0])
    assert study_budget(study).finished == 0

    retry = claim_trial(sqlite_study, 1)
    assert retry.number == 1 and retry.params == first.params
    study.tell(retry, 0.7)
    assert claim_trial(sqlite_study, 1) == "done"
    assert study_budget(study).finished == 1


def test_gpus_all_and_indices_map_through_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    assert resolve_gpus("all") == ["2", "3", "5"]
    assert resolve_gpus("0,2") == ["2", "5"]
    with pytest.raises(GpuSelectionError, match="this node sees 3 GPU"):
        resolve_gpus("3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_gpus("all") == []


def test_sqlite_launch_with_several_workers_finishes_the_exact_total(studies_dir: Path) -> None:
    (studies_dir / "tiny.toml").write_text(tiny_study_text(epochs=1, train_size=128, val_size=64))
    result = runner.invoke(app, ["launch", "--study", "tiny", "--n-trials", "4", "--workers", "2"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{studies_dir.parent}/hpo.db")
    assert len(study.trials) == 4
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)


def test_every_storage_call_of_optunas_cache_layer_is_retried_on_disconnect() -> None:
    import inspect
    import re

    from optuna.storages import _cached_storage

    from hpo.storage import ReconnectingRDBStorage

    called = set(re.findall(r"self\._backend\.(\w+)", inspect.getsource(_cached_storage)))
    no_database = {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
    for name in called - no_database:
        method = getattr(ReconnectingRDBStorage, name)
        assert method is not getattr(optuna.storages.RDBStorage, name), name
