"""MLflow tracking against a real ``mlflow server`` (loopback, SQLite backend): the study's
parent run, one nested run per trial with its params, reported values and end, the
report's files on the parent run; a tracker that is down never fails a trial."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from hpo.cli import app
from tests.conftest import EXAMPLE_STUDY

pytest.importorskip("mlflow")  # hpo[mlflow]; installed with the dev dependencies


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(directory: Path, port: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
        "--artifacts-destination", str(directory / "mlflow-artifacts"), "--workers", "1",
    ]  # fmt: skip
    log = open(directory / "mlflow.log", "a")  # noqa: SIM115 (closed with the server)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            assert server.poll() is None, (directory / "mlflow.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.25)


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    server.wait(timeout=30)


class MlflowServer:
    """``mlflow server`` on a loopback port, its SQLite store in ``directory``; stopped and
    started again on the same port and store."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = _start_server(self.directory, self.port)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


@pytest.fixture(scope="module")
def shared_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One server for the module's tests that read runs back: each test logs to its own
    experiment (a study or tracker of its own name), so none sees another's runs."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(shared_mlflow: MlflowServer) -> str:
    """The shared server's URL, started if it is not running (first use, or a restart
    test that failed while it was down)."""
    if shared_mlflow.process is None:
        shared_mlflow.start()
    return shared_mlflow.url


def _tracked_study(directory: Path, uri: str) -> Path:
    text = EXAMPLE_STUDY.read_text() + f'\n[tracking]\nmlflow = "{uri}"\n'
    path = directory / "study.toml"
    path.write_text(text.replace("n_trials = 10", "n_trials = 5"))
    return path


@pytest.mark.slow
def test_a_tracked_study_has_a_parent_run_and_a_nested_run_per_trial(
    example_on_path: Path, mlflow_server: str
) -> None:
    from mlflow.tracking import MlflowClient

    url = f"sqlite:///{example_on_path / 'study.db'}"
    study_file = _tracked_study(example_on_path, mlflow_server)
    launched = CliRunner().invoke(app, ["launch", "--study", str(study_file), "--storage", url])
    assert launched.exit_code == 0, launched.output
    reported = CliRunner().invoke(app, ["report", "--study", "own-training", "--storage", url])
    assert reported.exit_code == 0, reported.output

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("own-training")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("hpo.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = optuna.load_study(study_name="own-training", storage=url).get_trials()
    assert len(children) == len(trials) == 5
    for trial in trials:
        (run,) = [r for r in children if r.data.tags["hpo.trial"] == str(trial.number)]
        assert run.data.params["batch_size"] == str(trial.params["batch_size"])
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert run.data.tags["hpo.state"] == trial.state.name
        assert run.data.tags["hpo.worker"] == trial.user_attrs["worker"]
        history = client.get_metric_history(run.info.run_id, "objective")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
        )
        batch = trial.params["batch_size"]
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [
            k * (2048 // batch) * batch for k in sorted(trial.intermediate_values)
        ]  # step = samples seen
        if trial.state.name == "PRUNED":
            assert run.data.tags["hpo.fail_reason"] == "pruned"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/summary.md" in artifacts


def test_a_tracker_that_is_down_never_fails_or_holds_up_a_trial(example_on_path: Path) -> None:
    url = f"sqlite:///{example_on_path / 'study.db'}"
    nobody = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    study_file = _tracked_study(example_on_path, nobody)
    started = time.monotonic()
    launched = CliRunner().invoke(
        app, ["launch", "--study", str(study_file), "--storage", url, "--n-trials", "2"]
    )
    assert launched.exit_code == 0, launched.output
    trials = optuna.load_study(study_name="own-training", storage=url).get_trials()
    assert [t.state.name for t in trials[:2]] == ["COMPLETE", "COMPLETE"]
    assert time.monotonic() - started < 120  # the tracker's flush is bounded (FLUSH_S)


def test_close_goes_on_retrying_until_its_flush_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # close() arriving while the thread pauses between tries of an unreachable server used
    # to end the thread at once, losing what a server back a moment later would have got.
    from hpo import tracking

    sent: list[str] = []
    failed = threading.Event()
    failures = iter([True, True])  # the first two tries fail: the server is down

    def send(self: tracking.Tracker, kind: str, payload: tuple) -> None:
        if next(failures, False):
            failed.set()
            raise ConnectionError("connection refused")
        sent.append(kind)

    monkeypatch.setattr(tracking.Tracker, "_send", send)
    tracker = tracking.Tracker("http://127.0.0.1:9", "tracked")
    tracker.trial_started(0, {"lr": 0.01}, {})
    tracker.reported(0, 0.6, 100)
    assert failed.wait(10)  # the thread is in its pause after the first failure
    tracker.close(timeout=30)
    assert sent == ["start", "metric"]
    assert not tracker._thread.is_alive()


@pytest.mark.slow
def test_a_server_stopped_mid_study_loses_nothing_once_it_is_back(
    shared_mlflow: MlflowServer, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from hpo import tracking
    from hpo.tracking import Tracker

    # Only hpo's own retry, at most a second apart: the MLflow client's retries (7, with a
    # growing backoff) would leave the thread asleep in one request for up to a minute after
    # the server is back. What arrives is what hpo's thread sends, as with MLflow's retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "RETRY_MAX_S", 1.0)
    uri = mlflow_server
    tracker = Tracker(uri, "tracked")
    try:
        tracker.trial_started(0, {"batch_size": 32, "lr": 0.01}, {"worker": "a:1"})
        tracker.reported(0, 0.6, 100)
        deadline = time.monotonic() + 60
        while tracker.events.qsize() and time.monotonic() < deadline:
            time.sleep(0.2)  # the first events are sent
        shared_mlflow.stop()
        began = time.monotonic()
        tracker.reported(0, 0.7, 200)  # the server is down: queued, not waited for
        tracker.trial_ended(0, "COMPLETE", {"value": 0.7, "b_simple": 120.0})
        tracker.trial_started(1, {"batch_size": 64, "lr": 0.02}, {"worker": "a:1"})
        tracker.reported(1, 0.5, 64)
        tracker.trial_ended(1, "PRUNED", {"value": None, "fail_reason": "pruned"})
        assert time.monotonic() - began < 1.0
        time.sleep(3)  # the thread has failed and is retrying
        shared_mlflow.start()  # the same port and store, a new process
        tracker.close(timeout=90)
        client = MlflowClient(tracking_uri=uri)  # read back what arrived
        experiment = client.get_experiment_by_name("tracked")
        runs = {
            r.data.tags.get("hpo.trial"): r for r in client.search_runs([experiment.experiment_id])
        }
        first, second = runs["0"], runs["1"]
        history = client.get_metric_history(first.info.run_id, "objective")
        assert sorted((m.step, m.value) for m in history) == [(100, 0.6), (200, 0.7)]
        assert first.data.metrics["b_simple"] == 120.0 and first.info.status == "FINISHED"
        assert second.data.tags["hpo.fail_reason"] == "pruned" and second.info.status == "KILLED"
        assert tracker.dropped == 0
    finally:
        tracker.close(timeout=0)


def test_track_takes_mlflow_tracking_uri_for_a_study_file_without_tracking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hpo.settings import NodeSettings
    from hpo.spec import load_spec

    monkeypatch.delenv("HPO_TRACK_MLFLOW", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    spec = load_spec(EXAMPLE_STUDY)
    assert spec.on_node(NodeSettings.from_env()).tracking.mlflow is None  # not without --track
    node = NodeSettings.from_env(track=True)
    assert spec.on_node(node).tracking.mlflow == "http://127.0.0.1:5999"
    # A child worker (hpo launch --workers N) gets it through its environment.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    for name, value in node.to_env().items():
        monkeypatch.setenv(name, value)
    assert NodeSettings.from_env().mlflow_uri == "http://127.0.0.1:5999"


def test_track_without_mlflow_tracking_uri_exits_2_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("HPO_TRACK_MLFLOW", raising=False)
    result = CliRunner().invoke(app, ["worker", "--study", "own-training", "--track"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "--track needs $MLFLOW_TRACKING_URI" in line


@pytest.mark.slow
def test_a_study_tracked_with_track_gets_its_report_logged_with_track(
    example_on_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No [tracking] in the study file: the node's --track with $MLFLOW_TRACKING_URI. The
    # stored spec does not know the URI, so hpo report is told with --track as well.
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("HPO_TRACK_MLFLOW", raising=False)
    url = f"sqlite:///{example_on_path / 'study.db'}"
    # The example under a name of its own: its experiment is not the other test's.
    study_file = example_on_path / "tracked-with-flag.toml"
    study_file.write_text(EXAMPLE_STUDY.read_text().replace(
        'name = "own-training"', 'name = "own-training-flag"'))  # fmt: skip
    launched = CliRunner().invoke(
        app, ["launch", "--study", str(study_file), "--storage", url, "--n-trials", "3",
              "--track"],
    )  # fmt: skip
    assert launched.exit_code == 0, launched.output
    reported = CliRunner().invoke(
        app, ["report", "--study", "own-training-flag", "--storage", url, "--track"]
    )
    assert reported.exit_code == 0, reported.output
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("own-training-flag")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("hpo.role") == "study"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/summary.md" in artifacts


def test_report_track_without_mlflow_tracking_uri_exits_2_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["report", "--study", "s", "--storage", f"sqlite:///{tmp_path / 'x.db'}",
              "--out", str(out), "--track"],
    )  # fmt: skip
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "--track needs $MLFLOW_TRACKING_URI" in line and not out.exists()
