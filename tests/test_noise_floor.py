"""The noise floor: the seed-to-seed spread of replicated configurations and whether the
winner beats the runner-up beyond it, in the report, ``hpo status`` and ``hpo export``
(hpo.report.noise_floor)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import create_trial
from typer.testing import CliRunner

from hpo.cli import app
from hpo.cli.render import noise_floor_line
from hpo.export import best_configuration, seed_spread
from hpo.replicates import REPLICATE_OF_ATTR, REPLICATES_ATTR, SEED_ATTR
from hpo.report.analysis import collect, summarize
from hpo.report.figures import Band, HorizontalLine, Line, Markers, figure_models
from hpo.report.markdown import summary_markdown
from hpo.report.noise_floor import noise_floor
from hpo.space import BATCH_PARAM
from hpo.spec import StudySpec, load_spec
from hpo.storage import SPEC_ATTR
from hpo.study import create_or_load_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

DISTRIBUTIONS = {
    BATCH_PARAM: IntDistribution(4, 6),
    "lr": FloatDistribution(1e-3, 0.3, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
}


def _trial(log2: int, lr: float, value: float, replicate_of: int | None = None):
    attrs: dict[str, object] = {"batch_size": 2**log2}
    if replicate_of is not None:
        attrs |= {"queued_by": "replicate", REPLICATE_OF_ATTR: replicate_of, SEED_ATTR: 99}
    params = {BATCH_PARAM: log2, "lr": lr, "weight_decay": 1e-4}
    return create_trial(params=params, distributions=DISTRIBUTIONS, value=value, user_attrs=attrs)


def _plant(study: optuna.Study, winner: tuple[float, float], runner_up: tuple[float, float]):
    """B = 32's best (trial 0) and B = 16's best (trial 1), a worse B = 64 trial (2), then
    one replicate of each of the first two."""
    study.add_trial(_trial(5, 0.02, winner[0]))
    study.add_trial(_trial(4, 0.01, runner_up[0]))
    study.add_trial(_trial(6, 0.04, 0.60))
    study.add_trial(_trial(5, 0.02, winner[1], replicate_of=0))
    study.add_trial(_trial(4, 0.01, runner_up[1], replicate_of=1))
    return study


def _floor(winner: tuple[float, float], runner_up: tuple[float, float]):
    study = _plant(optuna.create_study(direction="maximize"), winner, runner_up)
    rows = summarize(study, "val_auc").by_batch_size
    return noise_floor(study.get_trials(), rows, maximize=True)


def test_a_margin_above_the_floor_is_said_to_be_beyond_it() -> None:
    floor = _floor((0.80, 0.79), (0.70, 0.71))
    assert floor.spread == pytest.approx(math.sqrt(5e-5))  # pooled over two pairs, 2 dof
    assert floor.dof == 2
    assert floor.spread_low < floor.spread < floor.spread_high
    assert floor.margin == pytest.approx(0.09)
    assert floor.beyond is True
    text = floor.describe()
    assert "is beyond the seed-to-seed spread: B = 32 beats B = 16" in text
    assert "pooled SD of 2 configuration(s) run with 4 seeds in all, 2 degree(s)" in text


def test_a_margin_below_the_floor_is_said_to_be_within_it() -> None:
    floor = _floor((0.80, 0.76), (0.77, 0.75))
    assert floor.margin == pytest.approx(0.02)
    assert floor.margin_low < 0 < floor.margin_high
    assert floor.beyond is False
    text = floor.describe()
    assert "is within the seed-to-seed spread: these runs cannot tell B = 32 from B = 16" in text
    assert "beats" not in text


def test_without_replicates_there_is_no_floor_and_the_text_says_why() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(5, 0.02, 0.8))
    study.add_trial(_trial(4, 0.01, 0.7))
    rows = summarize(study, "val_auc").by_batch_size
    floor = noise_floor(study.get_trials(), rows, True, why_none="a grid study")
    assert floor.spread is None
    assert floor.as_dict() == {"none": "a grid study"}
    assert floor.describe().startswith("Noise floor: none, a grid study; so nothing here says")


def _spec_study(tiny_study: Path, n_trials: int = 20, **changes: object) -> optuna.Study:
    """An in-memory study with the tiny spec (``changes``: "search.replicates" = 0, ...)
    stored on it as ``hpo launch`` stores it, and a search of two batch sizes."""
    data = load_spec("tiny").model_dump()
    data["budget"]["n_trials"] = n_trials
    for key, value in changes.items():
        table, field = key.split(".")
        data[table][field] = value
    study = optuna.create_study(direction="maximize")
    study.set_user_attr(SPEC_ATTR, StudySpec.model_validate(data).to_json())
    study.add_trial(_trial(5, 0.02, 0.8))
    study.add_trial(_trial(4, 0.01, 0.7))
    return study


def _said(study: optuna.Study) -> tuple[str, str, str]:
    """Why there is no floor, as the report, ``hpo status`` and ``hpo export`` say it."""
    summary = summarize(study, "val_auc")
    markdown = summary_markdown(collect(study, "val_auc"), figure_links=False)
    part = markdown.split("## Noise floor\n\n")[1].split("\n")[0]
    exported = seed_spread(study, summary)
    assert set(exported) == {"none"}
    return part, noise_floor_line(study, summary), exported["none"]


def _each_says(study: optuna.Study, words: str) -> None:
    report, status, export = _said(study)
    assert words in report and words in status and words in export
    assert report.startswith("Noise floor: none, ")


def test_no_floor_with_replicates_0_says_so(tiny_study: Path) -> None:
    study = _spec_study(tiny_study, **{"search.replicates": 0})
    _each_says(study, "search.replicates = 0 in the study's spec: no replicate trial is queued")


def test_no_floor_in_a_grid_study_says_so(tiny_study: Path) -> None:
    study = _spec_study(tiny_study, **{"sampler.kind": "grid"})
    _each_says(study, "a grid study (its trials are the grid): no replicate trial is queued")


def test_no_floor_when_replicates_would_take_over_a_third_of_the_budget(
    tiny_study: Path,
) -> None:
    study = _spec_study(tiny_study, n_trials=8, **{"search.replicates": 2})
    _each_says(
        study,
        "the replicates (2 × search.replicates = 4 trials) would take more than a third of "
        "the budget (n_trials = 8): none is queued",
    )
    # Six trials give room for 2: the same study is then waiting for its replicates.
    assert (
        "not queued yet: the 2 replicate trials are queued once"
        in _said(_spec_study(tiny_study, n_trials=6))[0]
    )


def test_no_floor_while_the_queued_replicates_run_says_so(tiny_study: Path) -> None:
    study = _spec_study(tiny_study)
    study.set_user_attr(REPLICATES_ATTR, {"queued": [0, 1]})
    study.enqueue_trial({BATCH_PARAM: 5, "lr": 0.02, "weight_decay": 1e-4}, user_attrs={
        "queued_by": "replicate", REPLICATE_OF_ATTR: 0, SEED_ATTR: 7
    })  # fmt: skip
    _each_says(study, "2 replicate trial(s) of trial(s) 0 and 1 queued but not yet complete")
    assert "(1 waiting)" in _said(study)[2]


def test_no_floor_when_the_claim_found_no_runner_up_says_its_reason(tiny_study: Path) -> None:
    study = _spec_study(tiny_study)
    study.set_user_attr(REPLICATES_ATTR, {"queued": [], "reason": "no room was left"})
    _each_says(study, "no replicate trial was queued: no room was left")


def test_no_floor_without_a_stored_spec_says_so() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(5, 0.02, 0.8))
    _each_says(study, "the study has no hpo spec stored on it")


def test_a_lucky_replicate_is_not_the_searchs_best_and_moves_no_search_output() -> None:
    study = _plant(optuna.create_study(direction="maximize"), (0.80, 0.95), (0.70, 0.71))
    data = collect(study, "val_auc")
    assert data.summary.best is not None and data.summary.best.number == 0
    assert {p.number for p in data.points} == {0, 1, 2}
    assert sum(data.summary.state_counts.values()) == 5
    markdown = summary_markdown(data, figure_links=False)
    assert "## Noise floor" in markdown and "Seed-to-seed spread:" in markdown


def test_export_and_status_state_the_spread(tiny_study: Path) -> None:
    spec = load_spec("tiny")
    study = create_or_load_study(spec, "sqlite:///hpo.db").study
    _plant(study, (0.80, 0.79), (0.70, 0.71))
    exported = best_configuration(study, spec)
    assert exported["trial"] == 0
    spread = exported["seed_spread"]
    assert spread["value"] == pytest.approx(math.sqrt(5e-5))
    assert spread["winner_margin"]["beyond_spread"] is True
    assert spread["winner_margin"]["runner_up_batch_size"] == 16
    cli = CliRunner().invoke(app, ["export", "--study", "tiny"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["seed_spread"]["dof"] == 2
    status = CliRunner().invoke(app, ["status", "--study", "tiny"])
    assert status.exit_code == 0, status.output
    assert "is beyond the seed-to-seed spread: B = 32 beats B = 16" in " ".join(
        status.stdout.split()
    )


def test_export_and_status_say_why_there_is_no_spread(tiny_study: Path) -> None:
    spec = load_spec("tiny")  # n_trials = 4: 2 replicate trials would be more than a third
    study = create_or_load_study(spec, "sqlite:///hpo.db").study
    study.add_trial(_trial(5, 0.02, 0.8))
    study.add_trial(_trial(4, 0.01, 0.7))
    why = "would take more than a third of the budget (n_trials = 4)"
    assert why in best_configuration(study, spec)["seed_spread"]["none"]
    cli = CliRunner().invoke(app, ["export", "--study", "tiny"])
    assert cli.exit_code == 0, cli.output
    assert why in json.loads(cli.stdout)["seed_spread"]["none"]
    status = CliRunner().invoke(app, ["status", "--study", "tiny"])
    assert status.exit_code == 0, status.output
    assert why in " ".join(status.stdout.split())


def _figure(winner: tuple[float, float], runner_up: tuple[float, float]):
    study = _plant(optuna.create_study(direction="maximize"), winner, runner_up)
    data = collect(study, "val_auc")
    return data.noise_floor, figure_models(data)["noise_floor"]


def test_the_figure_draws_each_configurations_runs_with_the_pooled_spread() -> None:
    floor, model = _figure((0.80, 0.79), (0.70, 0.71))
    runs, margin = model.panels
    assert runs.x.labels == ("B = 32 (winner), trial 0", "B = 16 (runner-up), trial 1")
    original, replicates = [layer for layer in runs.layers if isinstance(layer, Markers)]
    assert (original.x, original.y) == ((0.0, 1.0), (0.80, 0.70))
    assert replicates.y == (0.79, 0.71) and replicates.symbol == "x"
    bands = [layer for layer in runs.layers if isinstance(layer, Band)]
    for band, mean in zip(bands, (0.795, 0.705), strict=True):
        assert band.lower[0] == pytest.approx(mean - floor.spread)
        assert band.upper[0] == pytest.approx(mean + floor.spread)
    assert [band.show_legend for band in bands] == [True, False]
    # The margin with its interval, against 0: the numbers of summary.md's sentence.
    (interval,) = [layer for layer in margin.layers if isinstance(layer, Line)]
    assert interval.y == (floor.margin_low, floor.margin_high)
    assert any(isinstance(layer, HorizontalLine) and layer.y == 0 for layer in margin.layers)
    assert model.subtitle[1].endswith(floor.verdict())
    assert "beyond the seed-to-seed spread: B = 32 beats B = 16" in model.subtitle[1]
    assert f"s = {floor.spread:.4f}" in model.subtitle[0]


def test_the_figure_says_within_the_spread_when_the_interval_contains_0() -> None:
    floor, model = _figure((0.80, 0.76), (0.77, 0.75))
    assert floor.margin_low < 0 < floor.margin_high
    assert "within the seed-to-seed spread: these runs cannot tell B = 32" in model.subtitle[1]
    assert "beats" not in " ".join(model.subtitle)


def test_the_figure_renders_to_html_and_png(tmp_path: Path) -> None:
    from hpo.report import plotly_figure
    from hpo.report.png_render import png_figure

    _, model = _figure((0.80, 0.79), (0.70, 0.71))
    names = {trace.name for trace in plotly_figure(model).data}
    assert {"original trial", "replicates (other seeds)", "margin 0.0900"} <= names
    figure = plotly_figure(model)
    assert list(figure.layout.xaxis.ticktext) == list(model.panels[0].x.labels)
    png = tmp_path / "noise_floor.png"
    png_figure(model).savefig(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_replicates_the_figure_is_a_note_saying_why(tiny_study: Path) -> None:
    study = _spec_study(tiny_study, **{"search.replicates": 0})
    model = figure_models(collect(study, "val_auc"))["noise_floor"]
    assert not model.panels
    assert model.message == (
        "No noise floor: search.replicates = 0 in the study's spec: no replicate trial is queued."
    )
