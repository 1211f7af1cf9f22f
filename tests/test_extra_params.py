"""Extra searched parameters (``[search.extra.NAME]``): the schema and its one-line errors,
sampling after hpo's own three, ``ctx.params`` in a user's trainer, grid studies, export."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import tomllib
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo.cli import app
from hpo.export import best_configuration
from hpo.settings import TRUSTED_MODULES_ENV, NodeSettings
from hpo.space import BATCH_PARAM, BATCH_SIZE_PARAM, grid_search_space, sample_params
from hpo.spec import StudySpec, parse_spec
from hpo.study import create_or_load_study
from hpo.worker import run_worker
from tests.conftest import EXAMPLE_STUDY, REPO

EXTRAS = """
[search.extra.dropout]
low = 0.0
high = 0.5
[search.extra.warmup_steps]
low = 0
high = 200
step = 50
[search.extra.label_smoothing]
choices = [0.0, 0.1]
[search.extra.width]
low = 16
high = 128
log = true
[search.extra.scale]
low = 1e-3
high = 1.0
log = true
"""


def _with_extras(extras: str, **changes: object) -> StudySpec:
    data = tomllib.loads(EXAMPLE_STUDY.read_text())
    data["search"]["extra"] = tomllib.loads(extras)["search"]["extra"] if extras else {}
    for dotted, value in changes.items():
        table, _, key = dotted.partition("__")
        data.setdefault(table, {})[key] = value
    return parse_spec(data, source="test", default_name="own-training")


def test_the_schema_reads_floats_ints_log_steps_and_choices() -> None:
    extra = _with_extras(EXTRAS).search.extra
    assert list(extra) == ["dropout", "warmup_steps", "label_smoothing", "width", "scale"]
    kinds = {name: param.kind for name, param in extra.items()}
    assert kinds == {
        "dropout": "float",
        "warmup_steps": "int",
        "label_smoothing": "categorical",
        "width": "int",
        "scale": "float",
    }
    spec = _with_extras(EXTRAS)
    assert StudySpec.from_json(spec.to_json()) == spec  # stored on the study and read back


def _extra_table(name: str, body: str) -> str:
    return f"[search.extra.{name}]\n{body}\n"


BAD_EXTRAS = [
    ("low not below high", _extra_table("dropout", "low = 0.5\nhigh = 0.5"), "low = 0.5 must"),
    ("log needs positive low", _extra_table("width", "low = 0\nhigh = 8\nlog = true"), "log"),
    ("empty choices", _extra_table("act", "choices = []"), "choices is empty"),
    ("repeated choice", _extra_table("act", 'choices = ["relu", "relu"]'), "twice"),
    ("no range", _extra_table("dropout", "low = 0.1"), "give low and high"),
    ("choices and a range", _extra_table("act", "choices = [1, 2]\nlow = 1"), "cannot be"),
    ("negative step", _extra_table("steps", "low = 0\nhigh = 9\nstep = -1"), "step = -1"),
    ("step with log", _extra_table("x", "low = 0.1\nhigh = 9.0\nstep = 0.1\nlog = true"), "step"),
    ("unknown key", _extra_table("dropout", "low = 0.0\nhigh = 0.5\nlogg = true"), "logg"),
    ("reserved name", _extra_table("lr", "low = 0.1\nhigh = 0.5"), "extra.lr"),
    ("not an identifier", _extra_table('"1x"', "low = 0.1\nhigh = 0.5"), "identifier"),
    ("a string bound", _extra_table("dropout", 'low = "a"\nhigh = 0.5'), "dropout.low"),
]


@pytest.mark.parametrize(("case", "text", "expected"), BAD_EXTRAS, ids=[b[0] for b in BAD_EXTRAS])
def test_a_bad_extra_exits_2_in_one_line_naming_it(
    studies_dir: Path, case: str, text: str, expected: str
) -> None:
    (studies_dir / "bad.toml").write_text(EXAMPLE_STUDY.read_text() + "\n" + text)
    result = CliRunner().invoke(app, ["launch", "--study", "bad"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = " ".join(result.output.split())
    assert "search" in line and expected in line, line


def test_extras_need_the_users_trainer_and_choices_in_a_grid() -> None:
    data = tomllib.loads((REPO / "studies" / "demo.toml").read_text())
    data["search"]["extra"] = {"dropout": {"low": 0.0, "high": 0.5}}
    with pytest.raises(ValueError, match=r"search\.extra\.dropout: hpo's built-in trainer"):
        parse_spec(data, source="test", default_name="demo")
    with pytest.raises(ValueError, match=r"search\.extra\.dropout: a grid study needs choices"):
        _with_extras(EXTRAS, sampler__kind="grid")


def test_a_grid_study_crosses_categorical_extras() -> None:
    spec = _with_extras(
        '[search.extra.act]\nchoices = ["relu", "gelu"]\n', sampler__kind="grid",
        sampler__cover_batch_sizes=False,
    )  # fmt: skip
    grid = grid_search_space(spec)
    assert grid["act"] == ["relu", "gelu"]
    assert list(grid)[:3] == [BATCH_PARAM, "lr", "weight_decay"]


def _draw(spec: StudySpec, n: int, seed: int = 3) -> list[optuna.trial.FrozenTrial]:
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4))
    study.optimize(lambda trial: sample_params(trial, spec).lr, n_trials=n)
    return study.trials


def _old_sampling(trial: optuna.Trial, spec: StudySpec) -> float:
    """The three draws as they were asked before extras existed, in the same order."""
    search = spec.search
    log2 = trial.suggest_int(
        BATCH_PARAM, int(math.log2(search.batch_size_min)), int(math.log2(search.batch_size_max))
    )
    trial.suggest_int(BATCH_SIZE_PARAM, 2**log2, 2**log2, log=True)
    lr = trial.suggest_float("lr", search.lr_low, search.lr_high, log=True)
    trial.suggest_float("weight_decay", search.weight_decay_low, search.weight_decay_high, log=True)
    return lr


def test_a_study_without_extras_draws_what_it_drew_before() -> None:
    spec = _with_extras("")
    assert spec.search.extra == {}
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3, n_startup_trials=4))
    study.optimize(lambda trial: _old_sampling(trial, spec), n_trials=8)
    new = _draw(spec, 8)
    assert [t.params for t in new] == [t.params for t in study.trials]
    assert [t.distributions for t in new] == [t.distributions for t in study.trials]


def test_extras_are_drawn_after_the_three_inside_their_ranges() -> None:
    spec = _with_extras(EXTRAS)
    trials = _draw(spec, 12)
    for trial in trials:
        assert list(trial.params)[:4] == [BATCH_PARAM, BATCH_SIZE_PARAM, "lr", "weight_decay"]
        params = trial.params
        assert isinstance(params["dropout"], float) and 0.0 <= params["dropout"] <= 0.5
        assert isinstance(params["warmup_steps"], int) and params["warmup_steps"] in range(
            0, 201, 50
        )
        assert params["label_smoothing"] in (0.0, 0.1)
        assert isinstance(params["width"], int) and 16 <= params["width"] <= 128
        assert 1e-3 <= params["scale"] <= 1.0
    assert len({t.params["dropout"] for t in trials}) > 1  # searched, not fixed


def test_a_users_trainer_gets_the_extras_in_ctx_params_and_export_shows_them(
    example_on_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TRUSTED_MODULES_ENV, "tests.trainer_functions")
    spec = _with_extras(EXTRAS, trainer__function="tests.trainer_functions:records_params")
    url = f"sqlite:///{example_on_path / 'study.db'}"
    create_or_load_study(spec, url).storage.engine.dispose()
    assert run_worker(spec.name, url, total_trials=2, node=NodeSettings()).exit_code == 0
    study = optuna.load_study(study_name=spec.name, storage=url)
    # The first two of the queued first round: their three params fixed, the extras drawn.
    done = study.get_trials(states=[TrialState.COMPLETE])
    assert len(done) == 2 and all(t.user_attrs.get("queued_by") for t in done)
    for trial in done:
        attrs = trial.user_attrs
        for name in ("dropout", "warmup_steps", "label_smoothing", "width", "scale"):
            assert attrs[f"seen_{name}"][0] == trial.params[name]
        assert attrs["seen_warmup_steps"][1] == "int" and attrs["seen_width"][1] == "int"
        assert attrs["seen_dropout"][1] == "float"
        assert attrs["seen_batch_size"][0] == attrs["batch_size"]
    exported = best_configuration(study, spec)
    best = study.trials[exported["trial"]]
    assert exported["extra"] == {k: best.params[k] for k in spec.search.extra}
