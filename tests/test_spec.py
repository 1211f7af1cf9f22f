"""Study files: validation of every field, and bad files → exit code 2 naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from hpo.cli import app
from hpo.spec import (
    SpecError,
    StudySpec,
    TrainingSpec,
    load_spec,
    resolve_study_path,
    spec_differences,
)
from tests.conftest import tiny_study_text

REPO = Path(__file__).resolve().parents[1]


def test_shipped_study_files_are_valid(tmp_path: Path) -> None:
    # histo.toml points at data/pcam, which a CI machine does not have: check the schema only.
    import tomllib

    from hpo.spec import parse_spec

    for path in (REPO / "studies").glob("*.toml"):
        spec = parse_spec(tomllib.loads(path.read_text()), source=str(path), default_name=path.stem)
        assert spec.name == path.stem
    histo = parse_spec(
        tomllib.loads((REPO / "studies/histo.toml").read_text()), source="h", default_name="histo"
    )
    assert histo.dataset.kind == "pcam"
    assert histo.search.batch_sizes == [16, 32, 64, 128, 256, 512]
    assert histo.pruner.kind == "hyperband"
    assert histo.objective.direction == "maximize"


def test_name_finds_file_in_studies_dir(tiny_study: Path) -> None:
    spec = load_spec("tiny")
    assert spec.name == "tiny"
    assert spec.search.batch_sizes == [16, 32, 64]


def test_hpo_studies_dir_env_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.toml").write_text(tiny_study_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPO_STUDIES_DIR", str(elsewhere))
    assert load_spec("mine").name == "mine"


def test_path_to_toml_works(tmp_path: Path) -> None:
    path = tmp_path / "custom-study.toml"
    path.write_text(tiny_study_text())
    assert load_spec(str(path)).name == "custom-study"


@pytest.mark.parametrize("name", ["../../secrets", "Histo", "_x", "a/b", "", "x y"])
def test_unsafe_study_names_are_refused(studies_dir: Path, name: str) -> None:
    with pytest.raises(SpecError, match="not allowed"):
        resolve_study_path(name)


def test_direction_follows_metric(tiny_study: Path) -> None:
    spec = load_spec("tiny")
    data = spec.model_dump()
    data["objective"] = {"metric": "val_loss"}
    assert StudySpec.model_validate(data).objective.direction == "minimize"
    data["objective"] = {"metric": "val_acc"}
    assert StudySpec.model_validate(data).objective.direction == "maximize"


def test_spec_round_trips_through_json(tiny_study: Path) -> None:
    spec = load_spec("tiny")
    assert StudySpec.from_json(spec.to_json()) == spec


def test_spec_differences_name_the_fields(tiny_study: Path) -> None:
    spec = load_spec("tiny")
    data = spec.model_dump()
    data["search"]["lr_high"] = 0.5
    data["budget"]["epochs"] = 3
    assert spec_differences(spec, StudySpec.model_validate(data)) == [
        "budget.epochs",
        "search.lr_high",
    ]


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


BASE = tiny_study_text()

# (description, file text, text that the one-line error must contain)
BAD_FILES = [
    ("unknown top-level key", BASE + "\nfoo = 1\n", "foo: unknown key"),
    (
        "unknown key in a table",
        _replace(BASE, "[model]\n", "[model]\ndepth = 3\n"),
        "model.depth: unknown key",
    ),
    ("typo in table name", _replace(BASE, "[pruner]", "[prunner]"), "prunner: unknown key"),
    ("wrong type", _replace(BASE, "epochs = 2", 'epochs = "ten"'), "budget.epochs"),
    ("negative epochs", _replace(BASE, "epochs = 2", "epochs = -1"), "budget.epochs"),
    ("zero trials", _replace(BASE, "n_trials = 4", "n_trials = 0"), "budget.n_trials"),
    (
        "non-power-of-two min",
        _replace(BASE, "batch_size_min = 16", "batch_size_min = 24"),
        "batch_size_min = 24 is not a power of two",
    ),
    (
        "non-power-of-two max",
        _replace(BASE, "batch_size_max = 64", "batch_size_max = 100"),
        "batch_size_max = 100 is not a power of two",
    ),
    (
        "batch min >= max",
        _replace(BASE, "batch_size_min = 16", "batch_size_min = 64"),
        "batch_size_min = 64 must be less than batch_size_max",
    ),
    (
        "lr low >= high",
        _replace(BASE, "lr_low = 1e-3", "lr_low = 0.5"),
        "lr_low = 0.5 must be less than lr_high",
    ),
    ("negative lr", _replace(BASE, "lr_low = 1e-3", "lr_low = -1e-3"), "search.lr_low"),
    (
        "wd low >= high",
        _replace(BASE, "weight_decay_low = 1e-6", "weight_decay_low = 1e-2"),
        "weight_decay_low = 0.01 must be less than weight_decay_high",
    ),
    (
        "batch larger than training set",
        _replace(BASE, "batch_size_max = 64", "batch_size_max = 512"),
        "larger than the training set (256 patches)",
    ),
    (
        "malformed model name",
        _replace(BASE, 'name = "small-cnn"', 'name = "Res Net"'),
        "model: name 'Res Net' is not a model name",
    ),
    (
        "model name and factory",
        _replace(BASE, 'name = "small-cnn"', 'name = "small-cnn"\nfactory = "m:f"'),
        "model: set exactly one of 'name'",
    ),
    (
        "malformed factory",
        _replace(BASE, 'name = "small-cnn"', 'factory = "mymodels.build"'),
        "model: factory 'mymodels.build' must look like",
    ),
    (
        "unknown dataset kind",
        _replace(BASE, 'kind = "synthetic"', 'kind = "mnist"'),
        "dataset.kind: got 'mnist'",
    ),
    (
        "unknown optimizer",
        _replace(BASE, 'optimizer = "sgd"', 'optimizer = "lamb"'),
        "search.optimizer",
    ),
    ("unknown pruner", _replace(BASE, 'kind = "median"', 'kind = "asha"'), "pruner.kind"),
    ("unknown sampler", _replace(BASE, 'kind = "tpe"', 'kind = "cmaes"'), "sampler.kind"),
    ("unknown metric", _replace(BASE, 'metric = "val_auc"', 'metric = "f1"'), "objective.metric"),
    ("pcam without root", _replace(BASE, 'kind = "synthetic"', 'kind = "pcam"'), "needs 'root'"),
    (
        "missing dataset root",
        _replace(BASE, 'kind = "synthetic"\n', 'kind = "imagefolder"\nroot = "no/such/dir"\n'),
        "dataset.root: directory 'no/such/dir' does not exist",
    ),
    (
        "warm-up longer than budget",
        _replace(BASE, "min_epochs = 1", "min_epochs = 5"),
        "pruner.min_epochs = 5 exceeds budget.epochs = 2",
    ),
    (
        "grid value outside range",
        BASE.replace('kind = "tpe"', 'kind = "grid"\ngrid_lr = [10.0]'),
        "grid_lr value 10.0 is outside",
    ),
    ("missing search table", BASE.replace("[search]", "[search_space]"), "search: Field required"),
    ("bad study name field", 'name = "Bad Name"\n' + BASE, "name 'Bad Name' must match"),
    ("not TOML", "[dataset\nkind=", "not valid TOML"),
]


@pytest.mark.parametrize(
    ("description", "text", "expected"), BAD_FILES, ids=[b[0] for b in BAD_FILES]
)
def test_bad_study_file_exits_2_naming_the_field(
    studies_dir: Path, description: str, text: str, expected: str
) -> None:
    path = studies_dir / "bad.toml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["launch", "--study", "bad"])
    assert result.exit_code == 2, result.output
    output = result.output
    assert "Traceback" not in output
    assert str(path.relative_to(studies_dir.parent)) in output or "bad.toml" in output
    assert expected in output.replace("\n", " ")


def test_unsafe_name_exits_2_from_the_cli(studies_dir: Path) -> None:
    result = CliRunner().invoke(app, ["launch", "--study", "../../secrets"])
    assert result.exit_code == 2
    assert "not allowed" in result.output


def test_missing_study_file_exits_2(studies_dir: Path) -> None:
    result = CliRunner().invoke(app, ["launch", "--study", "nothere"])
    assert result.exit_code == 2
    assert "studies/nothere.toml: study file not found" in result.output


def test_real_entry_point_prints_one_line_and_no_traceback(studies_dir: Path) -> None:
    (studies_dir / "bad.toml").write_text(
        _replace(BASE, "batch_size_min = 16", "batch_size_min = 24")
    )
    completed = subprocess.run(
        [sys.executable, "-c", "from hpo.cli import app; app()", "launch", "--study", "bad"],
        capture_output=True,
        text=True,
        cwd=studies_dir.parent,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr + completed.stdout
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: studies/bad.toml: search:")


@pytest.mark.parametrize("value", ["fast", 1.5, "reduce_overhead"])
def test_training_compile_accepts_only_a_bool_or_a_torch_compile_mode(value: object) -> None:
    """``training.compile`` is true/false or one of torch.compile's modes; anything else is
    rejected naming the field (a typo must not silently train eagerly)."""
    with pytest.raises(ValidationError, match="compile"):
        TrainingSpec.model_validate({"compile": value})
