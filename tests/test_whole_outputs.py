"""Every output appears whole or not at all: a report, an export, a trials CSV and an
artifact interrupted part way (full disk, read-only file system, Ctrl-C) leave the previous
files as they were, no temporary debris, and one line with exit code 2."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from hpo.atomic import OutputWriteError, artifact_store
from hpo.cli import app
from hpo.report import files as report_files
from hpo.report import write_report
from tests.test_export import finished_study  # noqa: F401 - fixture
from tests.test_report import scaling_study

FAULTS = [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EROFS, "Read-only file system"),
    KeyboardInterrupt(),
]


def _snapshot(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _debris(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if p.name.startswith(".")]


def _fail_at_third_figure(monkeypatch: pytest.MonkeyPatch, fault: BaseException) -> None:
    real = report_files.png_figure
    calls = []

    def failing(model):  # type: ignore[no-untyped-def]
        calls.append(model)
        if len(calls) == 3:
            raise fault
        return real(model)

    monkeypatch.setattr(report_files, "png_figure", failing)


@pytest.mark.parametrize(
    ("fault", "earlier"),
    [(FAULTS[0], True), (FAULTS[1], False), (FAULTS[2], True)],
    ids=["full-over-a-report", "read-only-fresh", "ctrl-c-over-a-report"],
)
def test_an_interrupted_report_leaves_the_previous_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: BaseException, earlier: bool
) -> None:
    out = tmp_path / "reports" / "x"
    if earlier:
        write_report(scaling_study(1.0, batch_sizes=(16, 32)), out, metric="val_auc")
    before = _snapshot(out)
    _fail_at_third_figure(monkeypatch, fault)
    expected = OutputWriteError if isinstance(fault, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as raised:
        write_report(scaling_study(0.5, seed=3, batch_sizes=(16, 32)), out, metric="val_auc")
    if isinstance(fault, OSError):
        assert str(out) in str(raised.value) and "\n" not in str(raised.value)
    assert _snapshot(out) == before
    assert _debris(tmp_path) == []


def test_a_report_over_an_earlier_one_replaces_every_file(tmp_path: Path) -> None:
    out = tmp_path / "x"
    write_report(scaling_study(1.0), out, metric="val_auc")
    first = (out / "summary.md").read_text()
    write_report(scaling_study(0.0), out, metric="val_auc")
    assert (out / "summary.md").read_text() != first and _debris(tmp_path) == []


@pytest.mark.parametrize("fault", FAULTS[:2], ids=["full", "read-only"])
def test_a_trials_csv_on_a_full_disk_is_one_line_and_no_half_file(
    finished_study,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    fault: OSError,
) -> None:
    Path("trials.csv").write_text("earlier,export\n")

    def half_written(self, path, **kwargs):  # type: ignore[no-untyped-def]
        Path(path).write_text("number,sta")
        raise fault

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_written)
    result = CliRunner().invoke(app, ["export", "--study", "tiny", "--trials-csv", "trials.csv"])
    assert result.exit_code == 2, result.output
    assert "--trials-csv trials.csv" in result.stderr and "Traceback" not in result.output
    assert Path("trials.csv").read_text() == "earlier,export\n"
    assert _debris(Path.cwd()) == []


def test_an_export_interrupted_by_ctrl_c_leaves_no_half_file(
    finished_study,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(self, path, **kwargs):  # type: ignore[no-untyped-def]
        Path(path).write_text("number,sta")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", interrupted)
    result = CliRunner().invoke(app, ["export", "--study", "tiny", "--trials-csv", "t.csv"])
    assert result.exit_code == 130
    assert not Path("t.csv").exists() and _debris(Path.cwd()) == []


class _BrokenStream(io.BytesIO):
    def read(self, size: int = -1) -> bytes:
        if self.tell() > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().read(4)


def test_an_interrupted_artifact_upload_keeps_the_previous_artifact(tmp_path: Path) -> None:
    store = artifact_store(tmp_path)
    store.write("abc", io.BytesIO(b"\x89PNG whole"))  # type: ignore[attr-defined]
    with pytest.raises(OutputWriteError):
        store.write("abc", _BrokenStream(b"\x89PNG new and long"))  # type: ignore[attr-defined]
    assert (tmp_path / "abc").read_bytes() == b"\x89PNG whole"
    assert _debris(tmp_path) == []
    with pytest.raises(ValueError):
        store.write("../escape", io.BytesIO(b"x"))  # type: ignore[attr-defined]
