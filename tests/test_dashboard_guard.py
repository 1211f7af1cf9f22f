"""The dashboard answers only the Host names it serves (no DNS rebinding), refuses writes
that would corrupt a running trial, and a worker survives a trial finished behind its back."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
from optuna.trial import TrialState
from optuna_dashboard import wsgi

from hpo.dashboard_guard import guard_requests, host_is_served
from hpo.settings import NodeSettings
from hpo.storage import open_storage


def _call(app, method: str, path: str, host: str = "127.0.0.1:8080", body: object = None):
    environ: dict = {"REQUEST_METHOD": method, "PATH_INFO": path, "HTTP_HOST": host}
    data = json.dumps(body).encode() if body is not None else b""
    environ |= {"wsgi.input": io.BytesIO(data), "CONTENT_LENGTH": str(len(data))}
    environ["CONTENT_TYPE"] = "application/json"
    setup_testing_defaults(environ)
    status = []
    chunks = app(environ, lambda s, headers, exc_info=None: status.append(s))
    return int(status[0].split()[0]), b"".join(chunks)


@pytest.fixture
def served(tmp_path: Path):
    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    running = study.ask()
    study.tell(study.ask(), 0.5)
    app = guard_requests(wsgi(storage), storage, "127.0.0.1")
    yield app, storage, study, running
    storage.engine.dispose()


@pytest.mark.parametrize(
    "host",
    ["evil.example:8080", "attacker.com", "127.0.0.1.nip.io:8080", "", "localhost.evil.com",
     "[::1", "evil.example:80:80"],
)  # fmt: skip
def test_a_host_it_does_not_serve_gets_403(served, host: str) -> None:
    app, *_ = served
    status, body = _call(app, "GET", "/api/studies", host=host)
    assert status == 403 and b"Host" in body


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost:9000", "[::1]:8080", "LOCALHOST"])
def test_the_hosts_it_serves_are_answered(served, host: str) -> None:
    app, *_ = served
    assert _call(app, "GET", "/api/studies", host=host)[0] == 200
    assert host_is_served("10.1.2.3", set()) and not host_is_served("a.b", set())


def test_telling_or_editing_a_running_trial_is_refused(served) -> None:
    app, storage, study, running = served
    tell = f"/api/trials/{running._trial_id}/tell"  # noqa: SLF001 - the dashboard's id
    status, body = _call(app, "POST", tell, body={"state": "Complete", "values": [9.9]})
    assert status == 409 and b"RUNNING" in body
    attrs = f"/api/trials/{running._trial_id}/user-attrs"  # noqa: SLF001
    assert _call(app, "POST", attrs, body={"user_attrs": {"batch_size": 1}})[0] == 409
    assert _call(app, "DELETE", f"/api/studies/{study._study_id}")[0] == 409  # noqa: SLF001
    assert study.trials[0].state == TrialState.RUNNING and study.trials[0].user_attrs == {}
    finished = f"/api/trials/{study.trials[1]._trial_id}/user-attrs"  # noqa: SLF001
    # a finished trial is optuna-dashboard's to answer (it refuses in its own way)
    assert _call(app, "POST", finished, body={"user_attrs": {"note": "ok"}})[0] != 409


def test_a_worker_survives_a_trial_finished_behind_its_back(
    tiny_study: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hpo.objective import Objective
    from hpo.spec import load_spec
    from hpo.study import create_or_load_study
    from hpo.worker import run_worker

    url = "sqlite:///hpo.db"
    create_or_load_study(load_spec("tiny"), url).storage.engine.dispose()
    real = Objective.__call__
    told = []

    def finished_elsewhere(self, trial):  # type: ignore[no-untyped-def]
        if not told:  # the first trial is told from outside before it reports
            outside = optuna.load_study(study_name="tiny", storage=url)
            outside.tell(trial.number, 0.123)
            told.append(trial.number)
        return real(self, trial)

    monkeypatch.setattr(Objective, "__call__", finished_elsewhere)
    with caplog.at_level(logging.WARNING):
        result = run_worker("tiny", url, total_trials=2, node=NodeSettings(num_threads=1))
    assert result.exit_code == 0
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == pytest.approx(0.123)
    assert trials[1].state == TrialState.COMPLETE
    assert "was finished outside this worker" in caplog.text
    assert "Traceback" not in caplog.text
