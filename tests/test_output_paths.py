"""Where reports go: ``--out`` checked before anything is written; the default directory
built from a study name stays under reports/ whatever the name."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hpo.cli import app
from hpo.paths import OutputDirError, check_writable_dir, safe_component


@settings(derandomize=True)
@given(name=st.text(max_size=300))
def test_a_default_directory_from_any_name_stays_under_its_parent(name: str) -> None:
    component = safe_component(name)
    assert component not in ("", ".", "..")
    assert "/" not in component and "\x00" not in component and len(component) <= 100
    parent = Path("/srv/reports")
    assert (parent / component).resolve().parent == parent


@settings(derandomize=True)
@given(a=st.text(max_size=50), b=st.text(max_size=50))
def test_different_names_get_different_directories(a: str, b: str) -> None:
    if a != b:
        assert safe_component(a) != safe_component(b)


def test_a_plain_study_name_is_kept() -> None:
    assert safe_component("histo-2024_b") == "histo-2024_b"


@pytest.mark.parametrize("make", [lambda t: t / "afile", lambda t: t / "afile" / "sub"])
def test_report_out_to_a_file_is_exit_2_in_one_line(tmp_path: Path, make) -> None:
    (tmp_path / "afile").write_text("x")
    out = make(tmp_path)
    result = CliRunner().invoke(
        app,
        ["report", "--study", "x", "--storage", f"sqlite:///{tmp_path}/x.db", "--out", str(out)],
    )
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --out") and str(out) in line


def test_a_nul_in_a_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OutputDirError, match="not usable"):
        check_writable_dir(tmp_path / "a\x00b", "--out")


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_checking_a_directory_creates_nothing(tmp_path: Path, depth: int) -> None:
    out = tmp_path.joinpath(*[f"d{level}" for level in range(depth)])
    check_writable_dir(out, "--out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("create_database", [False, True])
@pytest.mark.parametrize("out", [None, "nested/out"])
def test_a_report_of_an_unknown_study_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, create_database: bool, out: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    if create_database:
        from hpo.storage import open_storage

        open_storage("sqlite:///x.db").engine.dispose()
    command = ["report", "--study", "nope", "--storage", "sqlite:///x.db"]
    result = CliRunner().invoke(app, command + (["--out", out] if out else []))
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "nope" in line and "not found" in line
    assert not (tmp_path / "reports").exists() and not (tmp_path / "nested").exists()
