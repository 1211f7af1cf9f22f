"""Who can write the database cannot make a node run code: a worker imports a study's
``model.factory`` only when this node trusts the module ($HPO_TRUSTED_MODULES, or a study
file of its own), and ``python -m hpo`` children never import from the working directory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from hpo import trust
from hpo.cli import app
from hpo.launcher import python_module_command
from tests.conftest import tiny_study_text

EVIL = """
from pathlib import Path
Path("imported.marker").write_text("ran")
import torch.nn as nn

def tiny(num_classes):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, num_classes))
"""


@pytest.fixture
def stored_factory_study(studies_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A study in hpo.db whose stored spec names ``evilpkg:tiny``; this process trusts
    nothing afterwards (as a worker on another node that only has the database)."""
    from hpo.spec import load_spec
    from hpo.study import create_or_load_study

    (studies_dir.parent / "evilpkg.py").write_text(textwrap.dedent(EVIL))
    monkeypatch.syspath_prepend(str(studies_dir.parent))
    text = tiny_study_text(epochs=1, pruner="none").replace(
        'name = "small-cnn"', 'factory = "evilpkg:tiny"'
    )
    (studies_dir / "tiny.toml").write_text(text)
    create_or_load_study(load_spec("tiny"), "sqlite:///hpo.db")
    monkeypatch.setattr(trust, "_trusted_here", set())
    monkeypatch.delenv("HPO_TRUSTED_MODULES", raising=False)
    sys.modules.pop("evilpkg", None)
    Path("imported.marker").unlink(missing_ok=True)
    yield studies_dir / "tiny.toml"
    sys.modules.pop("evilpkg", None)


def _worker(*extra: str) -> object:
    args = ["worker", "--study", "tiny", "--storage", "sqlite:///hpo.db", "--n-trials", "1"]
    return CliRunner().invoke(app, [*args, *extra])


def test_a_study_row_alone_cannot_make_a_worker_import_its_factory(stored_factory_study) -> None:
    result = _worker()
    assert result.exit_code == 2, result.output
    assert "model.factory: module 'evilpkg'" in result.stderr
    assert "HPO_TRUSTED_MODULES" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not Path("imported.marker").exists()
    assert optuna.load_study(study_name="tiny", storage="sqlite:///hpo.db").trials == []


def test_the_operator_allow_list_trusts_a_package_and_its_modules(
    stored_factory_study, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPO_TRUSTED_MODULES", "other, evilpkg")
    assert _worker().exit_code == 0
    assert Path("imported.marker").exists()
    trust.check_trusted("evilpkg.sub.deeper", "model.factory")
    with pytest.raises(trust.UntrustedModule):
        trust.check_trusted("evilpkgx", "model.factory")


def test_the_workers_own_spec_naming_the_module_trusts_it(stored_factory_study) -> None:
    assert _worker("--spec", str(stored_factory_study)).exit_code == 0


def test_python_m_hpo_children_do_not_import_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "typer.py").write_text("open('shadowed.marker', 'w').write('ran')\n")
    result = subprocess.run(
        [*python_module_command(), "--help"], cwd=tmp_path, capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "shadowed.marker").exists()
    plain = subprocess.run(
        [sys.executable, "-m", "hpo", "--help"], cwd=tmp_path, capture_output=True, timeout=120
    )
    assert not (tmp_path / "shadowed.marker").exists(), plain.stderr
