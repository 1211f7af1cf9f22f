"""`hpo dashboard`: a real headless Chromium loads the running command against a test study.

Locally the browser test skips (with the reason) when Chromium cannot start; in CI
(``HPO_REQUIRE_BROWSER=1``, set by ``.ci/run``, which also installs the Debian package
``chromium``) it fails instead.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from hpo.cli import app
from hpo.dashboard import dashboard_command, default_artifact_dir, is_loopback
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


@pytest.fixture
def report_study(tmp_path: Path) -> tuple[str, int]:
    """A SQLite study of 33 trials (3 batch sizes, best lr ∝ B) with its report attached."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = optuna.create_study(storage=url, direction="maximize", study_name=STUDY_NAME)
    for trial in scaling_study(1.0, batch_sizes=(16, 64, 256)).trials:
        study.add_trial(trial)
    run_report(STUDY_NAME, url, tmp_path / "report", artifact_dir=default_artifact_dir(url))
    return url, len(study.trials)


@pytest.fixture
def dashboard_server(report_study: tuple[str, int], tmp_path: Path) -> Iterator[str]:
    """`hpo dashboard` running in a child process; yields its base URL, stops it after."""
    url, _ = report_study
    port = free_port()
    log = (tmp_path / "dashboard.log").open("w")
    process = subprocess.Popen(
        hpo_command("dashboard", "--storage", url, "--port", str(port)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"hpo dashboard exited: {(tmp_path / 'dashboard.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=5) as response:
                    if response.status == 200:
                        break
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
def browser() -> Iterator[object]:
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


def test_binding_beyond_loopback_warns_that_there_is_no_authentication(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    optuna.create_study(storage=url, study_name="s")
    with socket.socket() as taken:  # taken, so the command stops right after the warning
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            app, ["dashboard", "--storage", url, "--host", "0.0.0.0", "--port", str(port)]
        )
    assert result.exit_code == 2
    assert "warning: listening on 0.0.0.0" in result.output
    assert "no authentication" in result.output


def test_launch_hint_masks_the_password_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from hpo.cli.render import print_dashboard_hint

    print_dashboard_hint("postgresql+psycopg://hpo:s3cret@db:5432/hpo")
    out = capsys.readouterr().out
    assert out.startswith("dashboard: hpo dashboard --storage ")
    assert "s3cret" not in out and "password masked" in out
    assert len(out.strip().splitlines()) == 1


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
    assert shlex.split(command) == ["hpo", "dashboard", "--storage", mask_url(url)]
    spaced = dashboard_command("sqlite:////data/my studies/hpo.db")
    assert shlex.split(spaced)[-1] == "sqlite:////data/my studies/hpo.db"


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
