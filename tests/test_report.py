"""`hpo report`: the figures, the α fit and the summary, on studies built in the test.

No training here: trials are made with ``optuna.trial.create_trial`` so the structure of
the study (where the best learning rate lies for each batch size) is known exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from hpo.cli import app
from hpo.report import (
    FIGURE_NAMES,
    attach_report,
    batch_size_table,
    collect,
    figure_models,
    fit_lr_scaling,
    plotly_figure,
    png_figure,
    summarize,
    summary_markdown,
    write_report,
)
from hpo.report.figures import Band
from hpo.storage import SPEC_ATTR

DISTRIBUTIONS = {
    "log2_batch_size": IntDistribution(4, 9),
    "lr": FloatDistribution(1e-5, 10.0, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
}


def add_trial(
    study: optuna.Study,
    batch_size: int,
    lr: float,
    value: float,
    *,
    state: TrialState = TrialState.COMPLETE,
    epochs: int = 4,
    user_attrs: dict[str, Any] | None = None,
) -> None:
    """One finished trial as `hpo` stores it: params, batch size, accuracies, curve."""
    curve = {epoch: value - 0.05 * (epochs - epoch) for epoch in range(1, epochs + 1)}
    if state == TrialState.PRUNED:
        curve = {epoch: curve[epoch] for epoch in (1, 2)}
    val_acc = value - 0.05
    study.add_trial(
        create_trial(
            state=state,
            value=value if state == TrialState.COMPLETE else None,
            params={"log2_batch_size": int(math.log2(batch_size)), "lr": lr, "weight_decay": 1e-4},
            distributions=DISTRIBUTIONS,
            user_attrs={
                "batch_size": batch_size,
                "val_acc": val_acc,
                "train_acc": val_acc + 0.002 * math.log2(batch_size),
                "generalization_gap": 0.002 * math.log2(batch_size),
                **(user_attrs or {}),
            },
            intermediate_values=curve,
        )
    )


def scaling_study(
    alpha: float, *, seed: int = 0, batch_sizes=(16, 32, 64, 128, 256, 512)
) -> optuna.Study:
    """Per batch size, 9 learning rates around lr*(B) = 0.01 · (B/16)^alpha; the objective
    falls off quadratically in log2(lr / lr*), plus a little seeded noise. Two trials per
    batch size are pruned (far from the optimum)."""
    rng = random.Random(seed)
    study = optuna.create_study(direction="maximize", study_name=f"alpha-{alpha}")
    for batch_size in batch_sizes:
        best_lr = 0.01 * (batch_size / 16) ** alpha
        for offset in (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0):
            lr = best_lr * 2.0 ** (offset + rng.uniform(-0.1, 0.1))
            value = 0.92 - 0.04 * math.log2(lr / best_lr) ** 2 + rng.uniform(-0.003, 0.003)
            add_trial(study, batch_size, lr, value)
        add_trial(study, batch_size, best_lr * 16, 0.55, state=TrialState.PRUNED)
        add_trial(study, batch_size, best_lr / 16, 0.6, state=TrialState.PRUNED)
    return study


def test_best_lr_doubling_with_batch_size_gives_alpha_one_within_its_interval() -> None:
    fit = fit_lr_scaling(scaling_study(1.0))
    assert fit.alpha == pytest.approx(1.0, abs=0.08)
    assert fit.alpha_low < 1.0 < fit.alpha_high
    assert fit.alpha_high - fit.alpha_low < 0.3
    assert fit.n_points == 6  # one estimated best LR per batch size
    assert "Consistent with the linear rule" in fit.describe()


def floor_kept_study(alpha: float, *, seed: int = 0) -> optuna.Study:
    """The shape that misleads a fit over every top trial: per batch size, the best trial
    near the true lr*, one more within noise of it, and one the per-batch-size floor kept
    from pruning at an LR far off (a decade above, where training diverged to chance, or
    below, where it learned little). Values at lr*: 0.74 ± 0.002; the poor ones 0.51–0.64."""
    rng = random.Random(seed)
    study = optuna.create_study(direction="maximize")
    for index, batch_size in enumerate((16, 32, 64, 128, 256)):
        best_lr = 0.01 * (batch_size / 16) ** alpha
        for octaves in (rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4)):
            value = 0.74 - 0.01 * octaves**2 + rng.uniform(-0.002, 0.002)
            add_trial(study, batch_size, best_lr * 2.0**octaves, value)
        far, value = ((10.0, 0.51), (1 / 10, 0.62))[index % 2]
        add_trial(study, batch_size, best_lr * far, value + rng.uniform(-0.02, 0.02))
    return study


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_a_poor_trial_kept_by_the_floor_does_not_enter_the_fit(alpha: float) -> None:
    # A fit over the top 3 of 3 complete trials per batch size would take the diverged and
    # the slow one too, and give an interval 1.4 wide around the wrong α.
    fit = fit_lr_scaling(floor_kept_study(alpha))
    assert fit.contains(alpha)
    assert fit.alpha == pytest.approx(alpha, abs=0.2)
    assert fit.alpha_high - fit.alpha_low < 0.6
    assert len(fit.trials) == 2 * 5 and fit.n_points == 5


def test_near_best_trials_average_into_one_point_per_batch_size() -> None:
    study = optuna.create_study(direction="maximize")
    add_trial(study, 16, 0.01, 0.800)
    add_trial(study, 16, 0.04, 0.795)  # within 1% of 0.800: averages in (geometric mean 0.02)
    add_trial(study, 16, 0.3, 0.780)  # 2.5% below: not an estimate of the optimum
    add_trial(study, 32, 0.04, 0.800)
    add_trial(study, 64, 0.08, 0.800)
    fit = fit_lr_scaling(study)
    assert dict(fit.points)[16] == pytest.approx(0.02)
    assert sorted(lr for b, lr in fit.trials if b == 16) == [0.01, 0.04]
    assert fit_lr_scaling(study, near_best=0.0).points[0] == (16, pytest.approx(0.01))


def test_near_best_is_measured_below_the_best_of_a_minimized_objective() -> None:
    study = optuna.create_study(direction="minimize")
    add_trial(study, 16, 0.01, 0.400)
    add_trial(study, 16, 0.04, 0.403)  # within 1% above the lowest loss
    add_trial(study, 16, 0.3, 0.500)
    add_trial(study, 32, 0.04, 0.4)
    fit = fit_lr_scaling(study)
    assert dict(fit.points)[16] == pytest.approx(0.02)


def test_lr_independent_of_batch_size_gives_alpha_zero() -> None:
    fit = fit_lr_scaling(scaling_study(0.0))
    assert fit.alpha == pytest.approx(0.0, abs=0.08)
    assert fit.alpha_low < 0.0 < fit.alpha_high
    assert fit.contains(0.5) is False and fit.contains(1.0) is False
    assert "Neither the linear rule" in fit.describe()


def test_square_root_scaling_is_told_apart_from_linear() -> None:
    fit = fit_lr_scaling(scaling_study(0.5, seed=3))
    assert fit.contains(0.5) and not fit.contains(1.0)


def test_a_wide_interval_is_called_too_wide_to_tell_the_rules_apart() -> None:
    study = optuna.create_study(direction="maximize")
    for batch_size, lr in ((16, 0.01), (32, 0.2), (64, 0.003), (128, 0.05)):
        add_trial(study, batch_size, lr, 0.8)
    fit = fit_lr_scaling(study)
    assert fit.contains(1.0) and fit.contains(0.5) and fit.contains(0.0)
    assert "too wide to tell the linear rule" in fit.describe()
    assert "Consistent with" not in fit.describe()


def test_minimized_objective_ranks_lowest_values_as_best() -> None:
    study = optuna.create_study(direction="minimize")
    for batch_size, good_lr in ((16, 0.01), (64, 0.04), (256, 0.16)):
        add_trial(study, batch_size, good_lr, 0.1)
        add_trial(study, batch_size, 1.0, 0.9)
    fit = fit_lr_scaling(study, top_k=1)
    assert fit.alpha == pytest.approx(1.0)


def test_one_batch_size_says_so_in_words_instead_of_fitting() -> None:
    study = optuna.create_study(direction="maximize")
    for lr in (0.01, 0.02, 0.04):
        add_trial(study, 64, lr, 0.8)
    add_trial(study, 128, 0.01, 0.5, state=TrialState.PRUNED)
    fit = fit_lr_scaling(study)
    assert fit.alpha is None
    assert "only batch size 64 has complete trials" in fit.describe()
    assert "two or more batch sizes" in fit.describe()


def test_two_points_give_alpha_but_no_interval() -> None:
    study = optuna.create_study(direction="maximize")
    add_trial(study, 32, 0.01, 0.8)
    add_trial(study, 64, 0.02, 0.8)
    fit = fit_lr_scaling(study)
    assert fit.alpha == pytest.approx(1.0)
    assert fit.alpha_low is None and fit.contains(1.0) is None
    assert "no interval" in fit.describe()


def test_empty_study_reports_no_fit() -> None:
    fit = fit_lr_scaling(optuna.create_study())
    assert fit.alpha is None and "no batch size has complete trials" in fit.reason


def test_a_negative_near_best_is_refused() -> None:
    with pytest.raises(ValueError, match="near_best"):
        fit_lr_scaling(optuna.create_study(), near_best=-0.01)


def test_write_report_writes_png_html_and_summary(tmp_path: Path) -> None:
    report = write_report(scaling_study(1.0), tmp_path / "out", metric="val_auc")
    for name in FIGURE_NAMES:
        png = tmp_path / "out" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        html = (tmp_path / "out" / f"{name}.html").read_text()
        assert "plotly.min.js" in html  # shared, offline copy beside the HTML files
    assert (tmp_path / "out" / "plotly.min.js").stat().st_size > 100_000
    summary = report.summary_path.read_text()
    assert "α = 1.0" in summary or "α = 0.9" in summary
    assert "| 512 | 9 | 2 |" in summary
    assert "Importances (PED-ANOVA)" in summary


def test_pruned_trials_are_marked_on_the_objective_plane(tmp_path: Path) -> None:
    report = write_report(scaling_study(1.0), tmp_path)
    traces = {trace.name: trace for trace in report.figures["objective_plane"].data}
    assert len(traces["pruned"].x) == 12
    assert traces["pruned"].marker.symbol == "x"
    assert len(traces["complete"].x) == 54


def test_learning_curves_have_one_legend_entry_per_batch_size(tmp_path: Path) -> None:
    report = write_report(scaling_study(1.0), tmp_path)
    traces = report.figures["learning_curves"].data
    assert len(traces) == 6 * 11
    assert sorted(t.name for t in traces if t.showlegend) == sorted(
        f"B = {b}" for b in (16, 32, 64, 128, 256, 512)
    )


def test_report_with_too_few_trials_still_writes_every_file(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    add_trial(study, 64, 0.01, 0.8)
    report = write_report(study, tmp_path)
    assert len(report.files) == 2 * len(FIGURE_NAMES) + 1
    assert (
        "No scaling fit: only batch size 64 has complete trials" in report.summary_path.read_text()
    )


def test_attach_puts_figures_note_and_pngs_on_the_study(tmp_path: Path) -> None:
    from optuna.artifacts import get_all_artifact_meta
    from optuna_dashboard import get_note

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(storage=storage, direction="maximize", study_name="s")
    for trial in scaling_study(1.0).trials:
        study.add_trial(trial)
    study_id = storage.get_study_id_from_name("s")
    report = write_report(study, tmp_path / "out")
    for _ in range(2):  # the second time replaces, does not pile up
        attach_report(study, report, tmp_path / "artifacts", storage=storage, study_id=study_id)

    attrs = storage.get_study_system_attrs(study_id)
    graph_ids = {key.split(":")[2] for key in attrs if key.startswith("dashboard:plot_data:")}
    assert graph_ids == {f"hpo-{name}" for name in FIGURE_NAMES}
    metas = get_all_artifact_meta(study, storage=storage)
    assert sorted(m.filename for m in metas) == sorted(f"hpo-{n}.png" for n in FIGURE_NAMES)
    assert len(list((tmp_path / "artifacts").iterdir())) == len(FIGURE_NAMES)
    note = get_note(study)
    assert "α = " in note and "/artifacts/" in note


def test_summary_markdown_names_the_metric() -> None:
    text = summary_markdown(collect(scaling_study(1.0), "val_auc"))
    assert "maximize val_auc" in text and "best val_auc" in text


def test_best_per_batch_size_table_formats_each_cell_once() -> None:
    study = optuna.create_study(direction="maximize")
    add_trial(study, 32, 0.0123456, 0.912345)
    add_trial(study, 32, 0.5, 0.3, state=TrialState.PRUNED)
    add_trial(study, 64, 0.5, 0.3, state=TrialState.PRUNED)
    headers, rows = batch_size_table(summarize(study, "val_auc"))
    assert headers == [
        "batch size",
        "complete",
        "pruned",
        "best val_auc",
        "lr",
        "weight decay",
        "gap",
        "b_simple",
        "trial",
    ]
    assert rows == [
        ["32", "1", "1", "0.9123", "0.0123", "0.0001", "+0.010", "-", "0"],
        ["64", "0", "1", "-", "-", "-", "-", "-", "-"],
    ]


def test_summary_markdown_table_is_the_batch_size_table() -> None:
    data = collect(scaling_study(1.0), "val_auc")
    headers, rows = batch_size_table(data.summary)
    text = summary_markdown(data)
    assert "| " + " | ".join(headers) + " |" in text
    for row in rows:
        assert "| " + " | ".join(row) + " |" in text


def _plotly_band(figure: Any) -> tuple[list[float], list[float], list[float]]:
    """x, lower, upper of the plotly band (one polygon: along upper, back along lower)."""
    (trace,) = [t for t in figure.data if t.fill == "toself"]
    n = len(trace.x) // 2
    return list(trace.x[:n]), list(trace.y[n:])[::-1], list(trace.y[:n])


def _png_band_vertices(figure: Any) -> set[tuple[float, float]]:
    from matplotlib.collections import PolyCollection

    (axes,) = figure.axes
    (band,) = [c for c in axes.collections if isinstance(c, PolyCollection)]
    return {(float(x), float(y)) for x, y in band.get_paths()[0].vertices}


def test_plotly_and_png_draw_the_alpha_band_of_the_one_figure_model() -> None:
    model = figure_models(collect(scaling_study(1.0)))["lr_scaling"]
    (band,) = [layer for layer in model.layers() if isinstance(layer, Band)]
    # Move the band's edges off anything a renderer could compute from the fit itself: a
    # renderer that drew its own band would draw different numbers.
    doctored = dataclasses.replace(
        band,
        lower=tuple(y * (0.5 + i / 100) for i, y in enumerate(band.lower)),
        upper=tuple(y * (1.7 + i / 100) for i, y in enumerate(band.upper)),
    )
    panel = dataclasses.replace(
        model.panels[0],
        layers=tuple(doctored if layer is band else layer for layer in model.panels[0].layers),
    )
    model = dataclasses.replace(model, panels=(panel,))

    xs, lower, upper = _plotly_band(plotly_figure(model))
    assert (tuple(xs), tuple(lower), tuple(upper)) == (doctored.x, doctored.lower, doctored.upper)
    expected = set(zip(doctored.x, doctored.lower, strict=True))
    expected |= set(zip(doctored.x, doctored.upper, strict=True))
    assert _png_band_vertices(png_figure(model)) == expected


def test_alpha_band_spans_the_interval_ends_on_both_sides_of_the_fit() -> None:
    fit = fit_lr_scaling(scaling_study(1.0))
    model = figure_models(collect(scaling_study(1.0)))["lr_scaling"]
    (band,) = [layer for layer in model.layers() if isinstance(layer, Band)]
    for x, low, high in zip(band.x, band.lower, band.upper, strict=True):
        assert low <= fit.lr_at(x) * (1 + 1e-12) and fit.lr_at(x) <= high * (1 + 1e-12)
    assert band.upper[0] / band.lower[0] > 1.1 and band.upper[-1] / band.lower[-1] > 1.1


# ---------------------------------------------------------------------------- the command


def _stored_study(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = optuna.create_study(storage=url, direction="maximize", study_name="demo")
    study.set_user_attr(SPEC_ATTR, json.dumps({"objective": {"metric": "val_auc"}}))
    for trial in scaling_study(1.0).trials:
        study.add_trial(trial)
    return url


def test_report_command_writes_files_and_prints_alpha(tmp_path: Path) -> None:
    url = _stored_study(tmp_path)
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "report",
            "--study",
            "demo",
            "--storage",
            url,
            "--out",
            str(out),
            "--artifacts",
            str(tmp_path / "artifacts"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "α = " in result.output
    assert (out / "lr_scaling.png").exists() and (out / "summary.md").exists()
    assert "val_auc" in (out / "summary.md").read_text()
    assert len(list((tmp_path / "artifacts").iterdir())) == len(FIGURE_NAMES)


def test_report_command_on_unknown_study_exits_2(tmp_path: Path) -> None:
    url = _stored_study(tmp_path)
    result = CliRunner().invoke(
        app, ["report", "--study", "nope", "--storage", url, "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "study 'nope' not found" in result.output


@pytest.mark.parametrize(
    ("unit", "per_report", "axis"),
    [
        ("epochs", 0.5, "report (every 0.5 epochs)"),  # the demo: 2 epochs, 4 reports
        ("epochs", 1.0, "epoch"),
        ("steps", 128.0, "report (every 128 steps)"),
        ("seconds", 15.0, "report (every 15 s)"),
        (None, None, "epoch"),  # a study from before budgets were recorded
    ],
)
def test_learning_curves_axis_names_what_a_report_is(
    unit: str | None, per_report: float | None, axis: str
) -> None:
    from hpo.report.figures import learning_curves_figure

    study = optuna.create_study(direction="maximize")
    budget = {} if unit is None else {"budget_unit": unit, "budget_per_report": per_report}
    for batch_size in (16, 32):
        add_trial(study, batch_size, 0.01, 0.8, user_attrs=budget)
    (panel,) = learning_curves_figure(collect(study, "val_auc")).panels
    assert panel.x.title == axis


def test_a_best_lr_at_the_edge_of_what_was_tried_is_flagged() -> None:
    study = optuna.create_study(direction="maximize")
    add_trial(study, 16, 0.01, 0.80)  # B = 16: best at the lowest LR tried there
    add_trial(study, 16, 0.04, 0.70)
    add_trial(study, 32, 0.005, 0.70)  # B = 32: bracketed by worse trials on both sides...
    add_trial(study, 32, 0.02, 0.80)
    add_trial(study, 32, 0.08, 0.60, state=TrialState.PRUNED)  # ...this one at its report
    add_trial(study, 64, 0.04, 0.80)
    add_trial(study, 64, 0.16, 0.79)  # B = 64: worse above, nothing tried below
    fit = fit_lr_scaling(study)
    assert set(fit.unbracketed) == {(16, "below"), (64, "below")}
    assert "Caution: at B = 16 (lowest), B = 64 (lowest) the best trial" in fit.describe()


def test_a_pruned_trial_better_than_the_best_at_its_report_brackets_nothing() -> None:
    study = optuna.create_study(direction="maximize")
    add_trial(study, 16, 0.01, 0.70)
    add_trial(study, 16, 0.04, 0.90, state=TrialState.PRUNED)  # ahead at its last report
    add_trial(study, 16, 0.002, 0.60)
    add_trial(study, 32, 0.02, 0.80)
    assert (16, "above") in fit_lr_scaling(study).unbracketed
    assert (16, "below") not in fit_lr_scaling(study).unbracketed


def test_points_placed_on_one_line_by_a_rule_get_the_interval_their_lr_spacing_allows() -> None:
    # Every batch size's best is the LR a rule placed (the first round: the square-root
    # rule's LR x 2), its neighbour 4x lower: zero scatter about the line, which gave a
    # zero-width interval. Each best LR lies somewhere between the midpoints to the LRs
    # tried beside it: width 2 in log2 (the 4x gap, one side), sd 2 / sqrt(12).
    study = optuna.create_study(direction="maximize")
    batch_sizes = (16, 32, 64, 128, 256)
    for b in batch_sizes:
        rule = 0.01 * (b / 32) ** 0.5
        add_trial(study, b, 2 * rule, 0.80)
        add_trial(study, b, rule / 2, 0.70)
    fit = fit_lr_scaling(study)
    xs = [math.log2(b) for b in batch_sizes]
    sxx = sum((x - sum(xs) / 5) ** 2 for x in xs)
    floor = math.sqrt(sxx * (2**2 / 12)) / sxx
    t = 3.182446305284263  # Student's t, 97.5 %, 3 degrees of freedom
    assert fit.alpha == pytest.approx(0.5)
    assert fit.resolution_bound
    assert fit.alpha_high - fit.alpha_low == pytest.approx(2 * t * floor)
    assert "how far apart the LRs tried" in fit.describe()


def test_scatter_wider_than_the_lr_spacing_sets_the_interval_as_before() -> None:
    study = optuna.create_study(direction="maximize")
    for b, best in ((16, 0.004), (32, 0.03), (64, 0.01), (128, 0.08), (256, 0.02)):
        for factor, value in ((1.0, 0.80), (1.1, 0.70), (1 / 1.1, 0.70)):  # LRs 10% apart
            add_trial(study, b, best * factor, value)
    fit = fit_lr_scaling(study)
    xs = [math.log2(b) for b in (16, 32, 64, 128, 256)]
    ys = [math.log2(lr) for lr in (0.004, 0.03, 0.01, 0.08, 0.02)]
    mx, my = sum(xs) / 5, sum(ys) / 5
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    t = 3.182446305284263
    assert not fit.resolution_bound
    assert fit.alpha_high - fit.alpha_low == pytest.approx(2 * t * math.sqrt(residual / 3 / sxx))


def test_caution_names_a_batch_size_once_when_neither_side_is_bracketed() -> None:
    study = optuna.create_study(direction="maximize")
    add_trial(study, 16, 0.01, 0.8)  # one LR at B = 16: no worse trial on either side
    add_trial(study, 32, 0.02, 0.85)
    add_trial(study, 32, 0.04, 0.80)  # B = 32: bracketed above only
    add_trial(study, 64, 0.05, 0.86)
    add_trial(study, 64, 0.02, 0.80)
    add_trial(study, 64, 0.1, 0.80)
    text = fit_lr_scaling(study).describe()
    assert "B = 16 (no worse LR tried on either side)" in text
    assert "B = 16 (lowest)" not in text and "B = 16 (highest)" not in text
    assert "B = 32 (lowest)" in text


def test_summary_predicts_lr_at_twice_and_four_times_the_largest_batch_size() -> None:
    study = scaling_study(1.0, batch_sizes=(16, 32, 64, 128))
    text = summary_markdown(collect(study, "val_auc"), figure_links=False)
    assert "## Predicted beyond the studied batch sizes (extrapolated)" in text
    rows = {
        line.split("|")[1].strip(): line
        for line in text.splitlines()
        if line.startswith("| 256 ") or line.startswith("| 512 ")
    }
    assert set(rows) == {"256", "512"}
    # lr* = 0.01·(B/16): 0.16 at 256, 0.32 at 512; predicted within a factor 2, and the
    # interval widens further out.
    widths = {}
    for batch_size, truth in (("256", 0.16), ("512", 0.32)):
        cells = rows[batch_size].split("|")
        assert truth / 2 <= float(cells[2]) <= truth * 2
        low, high = (float(v) for v in cells[3].split(" to "))
        assert low <= float(cells[2]) <= high
        widths[batch_size] = high / low
    assert widths["512"] > widths["256"]
