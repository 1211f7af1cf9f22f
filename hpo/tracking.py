"""MLflow tracking of a study's trials, which never blocks or fails a trial.

With ``[tracking] mlflow = "URI"`` in the study file, the study is one parent run (in the
MLflow experiment named after the study; found by its tag ``hpo.study`` so every worker and
``hpo report`` log to the same one) and each trial one nested run: its parameters and batch
size, every reported value (metric ``objective``, step = samples seen), its end state, fail
reason, worker host and B_simple. ``hpo report`` logs summary.md and the figures to the
parent run.

Every call from the worker only puts an event in a bounded queue (``MAX_PENDING``); one
daemon thread sends them in order. A tracker that is down or slow is logged once and the
event retried with a growing pause (at most ``RETRY_MAX_S``); when the queue is full the
newest events are dropped and counted (logged once), so memory stays bounded and the trial
never waits. At the worker's end ``close`` gives the thread ``FLUSH_S`` to send the rest.
MLflow is imported in that thread only (``hpo[mlflow]``).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_PENDING = 10_000
RETRY_MAX_S = 30.0
FLUSH_S = 10.0
STUDY_TAG = "hpo.study"
ROLE_TAG = "hpo.role"


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def study_run_id(client: Any, study_name: str) -> str:
    """The study's parent run: found by its tags, else created (with the experiment)."""
    experiment = client.get_experiment_by_name(study_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(study_name)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'study' and tags.`{STUDY_TAG}` = '{study_name}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id, run_name=study_name, tags={ROLE_TAG: "study", STUDY_TAG: study_name}
    )
    return run.info.run_id


class Tracker:
    """One worker's MLflow tracking (see the module docstring). All methods return at once."""

    def __init__(self, uri: str, study_name: str) -> None:
        self.uri, self.study_name = uri, study_name
        self.events: queue.Queue[tuple[str, tuple[Any, ...]]] = queue.Queue(MAX_PENDING)
        self.dropped = 0
        self._runs: dict[int, str] = {}
        self._parent: str | None = None
        self._client: Any = None
        self._closing = threading.Event()
        self._flush_until = math.inf  # set by close: the thread's last moment to send
        self._thread = threading.Thread(target=self._send_all, daemon=True, name="hpo-mlflow")
        self._thread.start()

    # What the worker calls.

    def trial_started(self, number: int, params: dict[str, Any], attrs: dict[str, Any]) -> None:
        self._put("start", (number, params, attrs))

    def reported(self, number: int, value: float, step: int) -> None:
        self._put("metric", (number, "objective", value, step))

    def trial_ended(self, number: int, state: str, tags: dict[str, Any]) -> None:
        self._put("end", (number, state, tags))

    def close(self, timeout: float = FLUSH_S) -> None:
        """Let the thread send what is queued for at most ``timeout`` seconds, retrying
        (a server that is back within them gets everything)."""
        self._flush_until = time.monotonic() + timeout
        self._closing.set()
        self._put("stop", ())
        self._thread.join(timeout)
        if self._thread.is_alive() or self.dropped:
            logger.warning(
                "MLflow tracking at %s: %d event(s) dropped, %d not sent at exit",
                self.uri, self.dropped, self.events.qsize(),
            )  # fmt: skip

    def _put(self, kind: str, payload: tuple[Any, ...]) -> None:
        try:
            self.events.put_nowait((kind, payload))
        except queue.Full:
            if not self.dropped:
                logger.warning("MLflow tracking at %s is behind: dropping events", self.uri)
            self.dropped += 1

    # The thread.

    def _send_all(self) -> None:
        pause, failing = 1.0, False
        while True:
            kind, payload = self.events.get()
            if kind == "stop":
                return
            while True:
                try:
                    self._send(kind, payload)
                    if failing:
                        logger.warning("MLflow tracking at %s reachable again", self.uri)
                    pause, failing = 1.0, False
                    break
                except Exception as error:  # any transport or server error: retry
                    if not failing:
                        logger.warning(
                            "MLflow tracking at %s failed (%s: %s); retrying, trials go on",
                            self.uri, type(error).__name__, str(error).splitlines()[0][:200]
                            if str(error) else "",
                        )  # fmt: skip
                    failing = True
                    if not self._pause(pause):
                        return  # the worker is done and its flush time is over
                    pause = min(RETRY_MAX_S, pause * 2)

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` before the next try; ``close`` cuts a pause short, and after it
        the pauses end at its flush time. False once that time is over: give up the rest."""
        if not self._closing.is_set():
            self._closing.wait(seconds)
            return True
        left = self._flush_until - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(seconds, left))
        return True

    def _send(self, kind: str, payload: tuple[Any, ...]) -> None:
        if self._client is None:
            self._client = _client(self.uri)
        client = self._client
        if self._parent is None:
            self._parent = study_run_id(client, self.study_name)
        if kind == "start":
            number, params, attrs = payload
            if number not in self._runs:
                parent = client.get_run(self._parent)
                run = client.create_run(
                    parent.info.experiment_id, run_name=f"trial {number}",
                    tags={"mlflow.parentRunId": self._parent, STUDY_TAG: self.study_name,
                          ROLE_TAG: "trial", "hpo.trial": str(number),
                          **{f"hpo.{k}": str(v) for k, v in attrs.items()}},
                )  # fmt: skip
                self._runs[number] = run.info.run_id
                for key, value in params.items():
                    client.log_param(run.info.run_id, key, value)
        elif kind == "metric":
            number, key, value, step = payload
            client.log_metric(self._runs[number], key, value, step=step)
        elif kind == "end":
            number, state, tags = payload
            run_id = self._runs[number]
            for key, value in tags.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    client.log_metric(run_id, key, float(value))
                elif value is not None:
                    client.set_tag(run_id, f"hpo.{key}", str(value)[:5000])
            client.set_tag(run_id, "hpo.state", state)
            status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
            client.set_terminated(run_id, status=status)


def log_report(uri: str, study_name: str, files: Iterable[Path]) -> None:
    """Log ``hpo report``'s files to the study's parent run (blocking: the report's own
    command waits for it; a failure is a warning, the files are on disk anyway)."""
    try:
        client = _client(uri)
        run_id = study_run_id(client, study_name)
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="report")
    except Exception as error:
        logger.warning(
            "report not logged to MLflow at %s: %s: %s", uri, type(error).__name__,
            str(error).splitlines()[0][:200] if str(error) else "",
        )  # fmt: skip


def make_tracker(uri: str | None, study_name: str) -> Tracker | None:
    return None if uri is None else Tracker(uri, study_name)
