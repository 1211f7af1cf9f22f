"""`hpo dashboard`: a real headless Chromium loads the running command against a test study.

Locally the browser test skips (with the reason) when Chromium cannot start; in CI
(``HPO_REQUIRE_BROWSER=1``, set by ``.ci/run``, which also installs the Debian package
``chromium``) it fails instead.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from hpo.cli import app
from hpo.dashboard import (
    ARTIFACTS_DIR_NAME,
    dashboard_command,
    default_artifact_dir,
    is_loopback,
)
from hpo.report import run_report
from hpo.space import BATCH_PARAM, sample_params
from hpo.spec import load_spec
from hpo.storage import mask_url
from tests.test_report import scaling_study

STUDY_NAME = "bs-scaling"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Starting the command imports optuna, SQLAlchemy and optuna-dashboard; on a busy 2-core
# machine that has taken over 30 s.
SERVER_START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def hpo_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from hpo.cli import app; sys.exit(app())", *args]


@pytest.fixture(scope="module")
def attached_report_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A SQLite study of 33 trials (3 batch sizes, best lr ∝ B) with its report attached,
    made once for the module: its directory (``hpo.db`` and the artifacts beside it)."""
    directory = tmp_path_factory.mktemp("report-study")
    url = f"sqlite:///{directory / 'hpo.db'}"
    study = optuna.create_study(storage=url, direction="maximize", study_name=STUDY_NAME)
    for trial in scaling_study(1.0, batch_sizes=(16, 64, 256)).trials:
        study.add_trial(trial)
    run_report(STUDY_NAME, url, directory / "report", artifact_dir=default_artifact_dir(url))
    return directory, len(study.trials)


@pytest.fixture
def report_study(attached_report_study: tuple[Path, int], tmp_path: Path) -> tuple[str, int]:
    """A copy of that study (the database and its attached artifacts) in this test's own
    directory, which the test may change: its URL and trial count."""
    directory, n_trials = attached_report_study
    source = contextlib.closing(sqlite3.connect(directory / "hpo.db"))
    with source as original, contextlib.closing(sqlite3.connect(tmp_path / "hpo.db")) as copy:
        original.backup(copy)  # whole, whatever the journal mode
    shutil.copytree(directory / ARTIFACTS_DIR_NAME, tmp_path / ARTIFACTS_DIR_NAME)
    return f"sqlite:///{tmp_path / 'hpo.db'}", n_trials


@contextlib.contextmanager
def running_dashboard(
    url: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`hpo dashboard --storage url ARGS` in a child process (with ``env`` added to its
    environment); yields its base URL once it answers, stops it after."""
    port = free_port()
    log_path = tmp_path / f"dashboard-{port}.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        hpo_command("dashboard", "--storage", url, "--port", str(port), *args),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"hpo dashboard exited: {log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=5):
                    break
            except urllib.error.HTTPError:
                break  # it answers (401 when it asks for credentials)
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"hpo dashboard did not answer within {SERVER_START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=30) == 0, "hpo dashboard did not stop cleanly on SIGTERM"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()


@pytest.fixture
def dashboard_server(report_study: tuple[str, int], tmp_path: Path) -> Iterator[str]:
    """`hpo dashboard` running in a child process; yields its base URL, stops it after."""
    with running_dashboard(report_study[0], tmp_path) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One headless Chromium for the module; each test opens its own pages and contexts."""
    required = os.environ.get("HPO_REQUIRE_BROWSER") == "1"

    def unavailable(reason: str) -> None:
        if required:
            pytest.fail(f"HPO_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)

    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("playwright is not installed (dev dependency group)")
    executable = chromium_path()
    if executable is None:
        unavailable("no chromium binary on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        try:
            instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Error as error:
            unavailable(f"chromium at {executable} did not start: {error}")
        try:
            yield instance
        finally:
            instance.close()


@pytest.mark.browser
def test_browser_shows_study_trial_count_and_attached_scaling_figure(
    browser, dashboard_server: str, report_study: tuple[str, int], tmp_path: Path
) -> None:
    _, n_trials = report_study
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)

    page.goto(f"{dashboard_server}/dashboard")
    page.get_by_text(STUDY_NAME).first.wait_for()

    page.goto(f"{dashboard_server}/dashboard/studies/1/trials")
    page.get_by_text(f"{n_trials} Trials").wait_for()

    page.goto(f"{dashboard_server}/dashboard/studies/1")
    page.get_by_text("hpo-lr_scaling.png").wait_for()  # the PNG, under Study Artifacts
    scaling_title = page.locator(".gtitle", has_text="Best learning rate per batch size")
    scaling_title.first.wait_for()  # the interactive plotly figure, with α in its title
    assert "α = " in (scaling_title.first.text_content() or "")
    # The noise-scale figure is shown with the others.
    page.locator(".gtitle", has_text="Gradient noise scale").first.wait_for()
    # The cost view is attached too (this study records no training times: its message).
    page.locator(".gtitle", has_text="Value vs time to train").first.wait_for()
    page.wait_for_timeout(1000)  # let the remaining plots finish drawing
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert STUDY_NAME in page.inner_text("body")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_taken_port_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    optuna.create_study(storage=url, study_name="s")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["dashboard", "--storage", url, "--port", str(port)])
    assert result.exit_code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in result.output


def test_binding_beyond_loopback_without_credentials_exits_2_naming_the_ways_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HPO_DASHBOARD_USER", raising=False)
    monkeypatch.delenv("HPO_DASHBOARD_PASSWORD", raising=False)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    optuna.create_study(storage=url, study_name="s")
    result = CliRunner().invoke(app, ["dashboard", "--storage", url, "--host", "0.0.0.0"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "listening on 0.0.0.0 needs credentials" in line and len(line.splitlines()) == 1
    assert "$HPO_DASHBOARD_USER" in line and "--auth-file" in line and "--no-auth" in line


def test_no_auth_beyond_loopback_warns_that_everyone_may_write(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    optuna.create_study(storage=url, study_name="s")
    with socket.socket() as taken:  # taken, so the command stops right after the warning
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            app,
            ["dashboard", "--storage", url, "--host", "0.0.0.0", "--port", str(port), "--no-auth"],
        )
    assert result.exit_code == 2
    assert "warning: listening on 0.0.0.0 with --no-auth" in result.output


def test_only_one_credential_variable_or_a_bad_auth_file_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    optuna.create_study(storage=url, study_name="s")
    monkeypatch.delenv("HPO_DASHBOARD_USER", raising=False)
    monkeypatch.setenv("HPO_DASHBOARD_PASSWORD", "hunter2")
    result = CliRunner().invoke(app, ["dashboard", "--storage", url])
    assert result.exit_code == 2 and "$HPO_DASHBOARD_USER is not set" in result.output
    assert "hunter2" not in result.output
    monkeypatch.delenv("HPO_DASHBOARD_PASSWORD")
    bad = tmp_path / "auth"
    bad.write_text("only-a-user\n")
    result = CliRunner().invoke(app, ["dashboard", "--storage", url, "--auth-file", str(bad)])
    assert result.exit_code == 2
    assert f"--auth-file {bad}: its first line must be USER:PASSWORD" in result.output


def _request(url: str, *, auth: str | None = None, method: str = "GET", body: bytes | None = None):
    """(status, body) of one HTTP request, with basic auth ``user:password`` if given."""
    request = urllib.request.Request(url, data=body, method=method)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_basic_auth_from_the_environment_protects_loopback_too(
    report_study: tuple[str, int], tmp_path: Path
) -> None:
    """Credentials set: 401 (with a challenge) without them or with wrong ones, 200 with
    them; the password never appears in the command's output."""
    secret = "s3cret:with-colon"
    env = {"HPO_DASHBOARD_USER": "alice", "HPO_DASHBOARD_PASSWORD": secret}
    with running_dashboard(report_study[0], tmp_path, env=env) as base:
        status, _ = _request(f"{base}/api/studies")
        assert status == 401
        assert _request(f"{base}/dashboard", auth="alice:wrong")[0] == 401
        assert _request(f"{base}/api/studies", auth=f"bob:{secret}")[0] == 401
        status, body = _request(f"{base}/api/studies", auth=f"alice:{secret}")
        assert status == 200 and STUDY_NAME in body.decode()
    log = "".join(path.read_text() for path in tmp_path.glob("dashboard-*.log"))
    assert "basic auth" in log and secret not in log


def test_read_only_refuses_notes_user_attrs_and_deletes(
    report_study: tuple[str, int], tmp_path: Path
) -> None:
    url, n_trials = report_study
    auth_file = tmp_path / "auth"
    auth_file.write_text("carol:pw\n")
    args = ("--read-only", "--auth-file", str(auth_file))
    with running_dashboard(url, tmp_path, *args) as base:
        assert _request(f"{base}/api/studies/1", auth="carol:pw")[0] == 200
        note = json.dumps({"version": 1, "body": "overwritten"}).encode()
        writes = [
            ("PUT", f"{base}/api/studies/1/note", note),
            ("POST", f"{base}/api/trials/1/user-attrs", b'{"user_attrs": {"x": 1}}'),
            ("DELETE", f"{base}/api/studies/1", None),
        ]
        for method, target, body in writes:
            assert _request(target, auth="carol:pw", method=method, body=body)[0] == 403
        assert _request(f"{base}/api/studies/1", method="DELETE")[0] == 401
    study = optuna.load_study(study_name=STUDY_NAME, storage=url)
    assert len(study.trials) == n_trials  # nothing deleted
    assert "x" not in study.trials[0].user_attrs


@pytest.mark.browser
def test_browser_asks_for_credentials_and_a_read_only_write_is_refused(
    browser, report_study: tuple[str, int], tmp_path: Path
) -> None:
    """In Chromium: no or wrong credentials get 401; the right ones show the study; a note
    saved from the page of a --read-only dashboard gets 403 and changes nothing."""
    url, _ = report_study
    env = {"HPO_DASHBOARD_USER": "dave", "HPO_DASHBOARD_PASSWORD": "correct horse"}
    with running_dashboard(url, tmp_path, "--read-only", env=env) as base:
        from playwright.sync_api import Error

        def refused_with(context) -> list[int]:
            """Statuses the page received: the 401 is shown, or Chromium gives up on the
            credentials (ERR_INVALID_AUTH_CREDENTIALS) after it."""
            page, statuses = context.new_page(), []
            page.on("response", lambda response: statuses.append(response.status))
            try:
                page.goto(f"{base}/dashboard")
            except Error as error:
                assert "ERR_INVALID_AUTH_CREDENTIALS" in str(error)
            return statuses

        anonymous = browser.new_context()
        assert set(refused_with(anonymous)) == {401}
        wrong = browser.new_context(http_credentials={"username": "dave", "password": "nope"})
        assert set(refused_with(wrong)) == {401}
        right = browser.new_context(
            http_credentials={"username": "dave", "password": "correct horse"}
        )
        page = right.new_page()
        page.set_default_timeout(60_000)
        assert page.goto(f"{base}/dashboard/studies/1").status == 200
        page.get_by_text("hpo-lr_scaling.png").wait_for()  # the study, with its artifacts
        status = page.evaluate(
            """async () => (await fetch('/api/studies/1/note', {method: 'PUT',
                 headers: {'Content-Type': 'application/json'},
                 body: JSON.stringify({version: 1, body: 'overwritten'})})).status"""
        )
        assert status == 403
        for context in (anonymous, wrong, right):
            context.close()
    note = optuna.storages.RDBStorage(url).get_study_system_attrs(1)
    assert "overwritten" not in json.dumps(note) and "note" in json.dumps(note)


def test_missing_sqlite_file_exits_2_instead_of_creating_an_empty_database(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["dashboard", "--storage", f"sqlite:///{tmp_path / 'no.db'}"])
    assert result.exit_code == 2
    assert "no SQLite database" in result.output
    assert not (tmp_path / "no.db").exists()


def test_only_loopback_addresses_count_as_private() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("node7")


def test_dashboard_command_masks_the_password_and_quotes_for_the_shell() -> None:
    url = "postgresql+psycopg://hpo:s3cret@db:5432/hpo"
    command = dashboard_command(url)
    assert "s3cret" not in command
    assert shlex.split(command)[:4] == ["hpo", "dashboard", "--storage", mask_url(url)]
    spaced = dashboard_command("sqlite:////data/my studies/hpo.db")
    assert shlex.split(spaced)[3:] == [
        "sqlite:////data/my studies/hpo.db",
        "--artifacts",
        "/data/my studies/hpo-artifacts",
    ]


def test_artifacts_default_to_beside_the_sqlite_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HPO_ARTIFACTS", raising=False)
    assert (
        default_artifact_dir(f"sqlite:///{tmp_path}/x/hpo.db") == tmp_path / "x" / "hpo-artifacts"
    )
    monkeypatch.setenv("HPO_ARTIFACTS", str(tmp_path / "shared"))
    assert default_artifact_dir("postgresql+psycopg://u@h/db") == tmp_path / "shared"


@pytest.mark.browser
def test_browser_shows_the_batch_size_as_a_number_wherever_params_are_shown(
    browser, dashboard_server: str, report_study: tuple[str, int], tiny_study: Path
) -> None:
    """A trial sampled by hpo with log2_batch_size 4 shows batch_size 16 in the best-trial
    card, the trial list's parameters and the trial table's columns (Smart Selection)."""
    url, _ = report_study
    spec = load_spec("tiny")
    study = optuna.create_study(storage=url, study_name="bs-display", direction="maximize")
    study.enqueue_trial({BATCH_PARAM: 4, "lr": 0.01, "weight_decay": 1e-4})
    study.optimize(lambda trial: sample_params(trial, spec).lr, n_trials=1)
    with urllib.request.urlopen(f"{dashboard_server}/api/studies", timeout=30) as response:
        studies = json.load(response)["study_summaries"]
    study_id = next(s["study_id"] for s in studies if s["study_name"] == "bs-display")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)

    page.goto(f"{dashboard_server}/dashboard/studies/{study_id}")
    best = page.get_by_text("Params = [")
    best.wait_for()  # the best-trial card
    assert "batch_size: 16," in (best.text_content() or "")
    assert "log2_batch_size: 4," in (best.text_content() or "")

    page.goto(f"{dashboard_server}/dashboard/studies/{study_id}/trials")
    shown = page.get_by_text("batch_size 16", exact=True)
    shown.first.wait_for()
    assert shown.count() == 2  # the trial's Parameter list and its User Attributes
    assert page.get_by_text("log2_batch_size 4", exact=True).count() == 1

    # 0.21's trial table (Optuna's trials as columns) sits on the "Smart Selection" page.
    page.goto(f"{dashboard_server}/dashboard/studies/{study_id}/smartSelection")
    header = page.locator("th", has_text="Param batch_size")
    header.wait_for()
    # A header's text is its title, then the sort button's label on a second line.
    headers = [text.split("\n")[0].strip() for text in page.locator("thead th").all_inner_texts()]
    column = headers.index("Param batch_size")
    assert column < headers.index("Param log2_batch_size")  # sorted by name: listed first
    cells = [
        text.strip() for text in page.locator("tbody tr").first.locator("td").all_inner_texts()
    ]
    assert cells[column] == "16" and cells[headers.index("Param log2_batch_size")] == "4"
    assert cells[headers.index("UserAttribute batch_size")] == "16"
