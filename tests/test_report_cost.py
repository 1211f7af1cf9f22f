"""The report's cost view: value vs time to train, the Pareto front, and the sentence that
names the fastest batch size within a tolerance of the best, on a planted study."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from hpo.report import collect, figure_models, plotly_figure, png_figure, write_report
from hpo.report.cost import pareto_front
from hpo.report.figures import Line, Markers
from hpo.report.table import cost_table

optuna.logging.set_verbosity(optuna.logging.WARNING)

DISTRIBUTIONS = {
    "log2_batch_size": IntDistribution(4, 9),
    "lr": FloatDistribution(1e-5, 10.0, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
}
# Samples/s and the best value of each batch size. Every trial trains the same samples
# (8 epochs of 2,048), so time = samples / throughput: B = 256 is 0.28% below the best
# (B = 32) at 3× its throughput; B = 512 is faster still but 2.2% below.
THROUGHPUT = {16: 500.0, 32: 1000.0, 64: 1800.0, 128: 2500.0, 256: 3000.0, 512: 3200.0}
BEST = {16: 0.890, 32: 0.900, 64: 0.8985, 128: 0.898, 256: 0.8975, 512: 0.880}
SAMPLES = 8 * 2048


def add(
    study: optuna.Study,
    batch_size: int,
    value: float,
    seconds: float,
    *,
    state: TrialState = TrialState.COMPLETE,
    unit: str = "epochs",
    throughput: float | None = None,
) -> None:
    rate = throughput if throughput is not None else THROUGHPUT[batch_size]
    study.add_trial(
        create_trial(
            state=state,
            value=value if state == TrialState.COMPLETE else None,
            params={
                "log2_batch_size": int(math.log2(batch_size)),
                "lr": 0.01,
                "weight_decay": 1e-4,
            },
            distributions=DISTRIBUTIONS,
            user_attrs={
                "batch_size": batch_size,
                "train_seconds": seconds,
                "samples_per_s": rate,
                "n_updates": SAMPLES // batch_size,
                "train_epochs": 8.0,
                "budget_unit": unit,
            },
            intermediate_values={1: value - 0.1, 2: value},
        )
    )


def planted(direction: str = "maximize") -> optuna.Study:
    """Per batch size its best trial, two worse ones (a little slower) and a pruned one
    (which measures throughput but has no value)."""
    study = optuna.create_study(direction=direction, study_name="cost")
    sign = 1 if direction == "maximize" else -1
    for batch_size, best in BEST.items():
        seconds = SAMPLES / THROUGHPUT[batch_size]
        value = best if sign == 1 else 1 - best
        add(study, batch_size, value, seconds)
        add(study, batch_size, value - sign * 0.02, seconds * 1.05)
        add(study, batch_size, value - sign * 0.05, seconds * 1.1)
        add(study, batch_size, 0.0, seconds / 4, state=TrialState.PRUNED)
    return study


def test_the_front_is_the_trials_no_other_beats_in_both_time_and_value() -> None:
    view = collect(planted(), "val_auc").cost
    front = [(p.batch_size, p.value) for p in view.front]
    assert front == [(512, 0.880), (256, 0.8975), (128, 0.898), (64, 0.8985), (32, 0.900)]
    assert view.best.batch_size == 32
    by_batch = {row.batch_size: row for row in view.by_batch_size}
    assert not by_batch[16].on_front and by_batch[256].on_front
    assert by_batch[256].shortfall == pytest.approx(0.0025 / 0.9)


def test_pareto_front_of_equal_times_keeps_only_the_better() -> None:
    from hpo.report.cost import CostPoint

    points = [
        CostPoint(0, 16, 0.8, 10.0, None, None, None),
        CostPoint(1, 32, 0.9, 10.0, None, None, None),
        CostPoint(2, 64, 0.85, 5.0, None, None, None),
        CostPoint(3, 64, 0.84, 6.0, None, None, None),
    ]
    assert pareto_front(points, maximize=True) == {1, 2}
    assert pareto_front(points, maximize=False) == {0, 2, 3}  # lower is better


def test_the_sentence_names_the_fastest_batch_size_within_the_tolerance() -> None:
    text = collect(planted(), "val_auc").cost.describe()
    assert text.startswith(
        "B = 256 gets within 0.28% of the best val_auc (0.8975 vs 0.9000 at B = 32) at "
        "3.0× the throughput (3,000 vs 1,000 samples/s) and 3.0× faster (5.46 s vs 16.4 s "
        "of training per trial;"
    )
    assert text.endswith("the fastest trial on the front within 1% of the best.")


def test_a_tighter_tolerance_names_a_slower_batch_size_or_the_best_itself() -> None:
    assert collect(planted(), cost_tolerance=0.002).cost.fastest_within.batch_size == 64
    view = collect(planted(), cost_tolerance=0.001).cost
    assert view.fastest_within.batch_size == 32
    assert "is also the fastest within 0.1% of the best" in view.describe()


def test_a_minimized_objective_ranks_the_lowest_value_best() -> None:
    # Losses 1 - value: B = 32 0.100, B = 256 0.1025 (2.5% above), B = 512 0.120 (20%).
    view = collect(planted("minimize"), "val_loss", cost_tolerance=0.03).cost
    assert view.best.batch_size == 32
    assert view.fastest_within.batch_size == 256
    assert "within 2.50% of the best val_loss (0.1025 vs 0.1000" in view.describe()


def test_throughput_is_the_median_of_complete_and_pruned_trials() -> None:
    study = planted()
    for _ in range(5):  # 4 trials at 500 samples/s (3 complete, 1 pruned), 5 pruned at 9,000
        add(study, 16, 0.0, 1.0, state=TrialState.PRUNED, throughput=9000.0)
    rows = {row.batch_size: row for row in collect(study).cost.by_batch_size}
    assert rows[16].samples_per_s == 9000.0
    assert rows[32].samples_per_s == 1000.0


def test_a_study_without_recorded_times_says_so() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trial(
        create_trial(
            value=0.9,
            params={"log2_batch_size": 5, "lr": 0.01, "weight_decay": 1e-4},
            distributions=DISTRIBUTIONS,
        )
    )
    data = collect(study)
    assert data.cost.points == () and "No cost view" in data.cost.describe()
    model = figure_models(data)["cost"]
    assert model.message is not None and "train_seconds" in model.message


def test_equal_seconds_budgets_say_time_does_not_separate_the_trials() -> None:
    study = optuna.create_study(direction="maximize")
    for batch_size, value in ((32, 0.9), (256, 0.89)):
        add(study, batch_size, value, 60.0, unit="seconds")
    assert "budget.unit = seconds" in collect(study).cost.describe()


def test_the_figure_draws_the_front_the_best_and_the_chosen_trade() -> None:
    data = collect(planted(), "val_auc")
    model = figure_models(data)["cost"]
    layers = {layer.label: layer for layer in model.layers()}
    front = layers["Pareto front"]
    assert isinstance(front, Line)
    assert front.y == (0.880, 0.8975, 0.898, 0.8985, 0.900)
    assert layers["best (B = 32)"].y == (0.900,)
    chosen = layers["fastest within 1% of the best (B = 256)"]
    assert isinstance(chosen, Markers) and chosen.x == (pytest.approx(SAMPLES / 3000),)
    assert sum(label.startswith("B = ") for label in layers) == 6
    assert "B = 256 gets within 0.28%" in " ".join(model.subtitle)
    throughput = model.panels[1].layers[0]
    assert dict(zip(throughput.x, throughput.y, strict=True)) == THROUGHPUT
    # Both renderers draw the model's front.
    traces = {trace.name: trace for trace in plotly_figure(model).data}
    assert tuple(traces["Pareto front"].y) == front.y
    png = png_figure(model)
    (line,) = [ln for ln in png.axes[0].get_lines() if ln.get_label() == "Pareto front"]
    assert tuple(line.get_ydata()) == front.y


def test_write_report_writes_the_cost_figure_and_links_it_from_the_summary(
    tmp_path: Path,
) -> None:
    report = write_report(planted(), tmp_path, metric="val_auc")
    assert (tmp_path / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Pareto front" in (tmp_path / "cost.html").read_text()
    summary = report.summary_path.read_text()
    assert "[cost.png](cost.png), [cost.html](cost.html)" in summary
    assert "B = 256 gets within 0.28% of the best val_auc" in summary
    headers, rows = cost_table(report.data.cost)
    assert "| " + " | ".join(headers) + " |" in summary
    assert ["256", "0.8975", "0.28%", "5.46", "3,000", "64", "8", "yes", "16"] in rows


def test_attach_puts_the_cost_png_in_the_note(tmp_path: Path) -> None:
    from optuna_dashboard import get_note

    from hpo.report import attach_report

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(storage=storage, direction="maximize", study_name="s")
    for trial in planted().trials:
        study.add_trial(trial)
    report = write_report(study, tmp_path / "out")
    study_id = storage.get_study_id_from_name("s")
    attach_report(study, report, tmp_path / "artifacts", storage=storage, study_id=study_id)
    attrs = storage.get_study_system_attrs(study_id)
    graph_ids = {key.split(":")[2] for key in attrs if key.startswith("dashboard:plot_data:")}
    assert "hpo-cost" in graph_ids
    assert "![value vs time to train](/artifacts/" in get_note(study)


def test_report_command_prints_the_cost_sentence_at_the_given_tolerance(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hpo.cli import app

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = optuna.create_study(storage=url, direction="maximize", study_name="cost")
    for trial in planted().trials:
        study.add_trial(trial)
    common = ["report", "--study", "cost", "--storage", url, "--no-attach"]
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "B = 256 gets within 0.28% of the best objective" in result.output
    tight = CliRunner().invoke(
        app, [*common, "--out", str(tmp_path / "b"), "--cost-tolerance", "0.002"]
    )
    assert tight.exit_code == 0, tight.output
    assert "B = 64 gets within 0.17%" in tight.output


# ------------------------------------------------------- the one table, with the unit


def test_the_batch_size_table_names_the_unit_and_what_each_batch_size_spent() -> None:
    from hpo.report import batch_size_table, summarize
    from hpo.report.table import table_title

    study = planted()
    add(study, 16, 0.0, 1.0, state=TrialState.FAIL)  # a failed trial spent nothing counted
    summary = summarize(study, "val_auc")
    headers, rows = batch_size_table(summary)
    assert headers[:4] == ["batch size", "complete", "pruned", "epochs spent"]
    assert rows[0][:4] == ["16", "3", "1", "32.0"]  # 4 finished trials × 8 epochs
    assert table_title(summary) == "best per batch size (budget.unit = epochs)"


def test_a_study_in_steps_spends_updates(tmp_path: Path) -> None:
    from hpo.report import batch_size_table, summarize

    study = optuna.create_study(direction="maximize")
    add(study, 64, 0.9, 10.0, unit="steps")
    add(study, 64, 0.8, 3.0, unit="steps", state=TrialState.PRUNED)
    headers, rows = batch_size_table(summarize(study, "val_auc"))
    assert headers[3] == "steps spent" and rows[0][3] == "512"  # 2 × 256 updates


def test_hpo_status_shows_complete_pruned_and_the_unit(tiny_study: Path) -> None:
    from typer.testing import CliRunner

    from hpo.cli import app
    from hpo.spec import load_spec
    from hpo.study import create_or_load_study

    url = "sqlite:///status.db"
    study = create_or_load_study(load_spec("tiny"), url).study
    add(study, 32, 0.9, 10.0, unit="steps")
    add(study, 32, 0.7, 2.0, unit="steps", state=TrialState.PRUNED)
    add(study, 64, 0.7, 2.0, unit="steps", state=TrialState.PRUNED)
    result = CliRunner().invoke(app, ["status", "--study", "tiny", "--storage", url])
    assert result.exit_code == 0, result.output
    assert "best per batch size (budget.unit = steps)" in result.output
    assert "steps" in result.output and "spent" in result.output
    lines = [line for line in result.output.splitlines() if line.strip().startswith("│")]
    cells = [[c.strip() for c in line.strip("│ ").split("│")] for line in lines]
    assert ["32", "1", "1", "1024"] in [row[:4] for row in cells]
    assert ["64", "0", "1", "256"] in [row[:4] for row in cells]


def test_odd_user_attrs_from_another_tool_are_left_out_not_fatal(tmp_path: Path) -> None:
    study = planted()
    for attrs in (
        {"train_seconds": "fast", "samples_per_s": True},
        {"train_seconds": float("nan"), "n_updates": float("inf")},
        {"train_seconds": -3.0, "budget_unit": 123},
        {"train_seconds": 2.0, "samples_per_s": "many", "n_updates": "x", "train_epochs": None},
    ):
        study.add_trial(
            create_trial(
                value=0.95,
                params={"log2_batch_size": 6, "lr": 0.01, "weight_decay": 1e-4},
                distributions=DISTRIBUTIONS,
                user_attrs=attrs,
            )
        )
    data = collect(study, "val_auc")
    odd = [p for p in data.cost.points if p.value == 0.95]
    assert [(p.train_seconds, p.samples_per_s, p.n_updates) for p in odd] == [(2.0, None, None)]
    assert data.cost.best.value == 0.95 and data.summary.budget_unit == "epochs"
    write_report(study, tmp_path)  # every file, no traceback
    alone = optuna.create_study(direction="maximize")
    alone.add_trial(study.trials[-2])  # budget_unit = 123
    assert collect(alone).summary.budget_unit is None
