"""The critical batch size in the report: the LR ridge fit and the measured B_simple."""

from __future__ import annotations

import math
import random
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, create_trial

from hpo.report import (
    attach_report,
    batch_size_table,
    collect,
    figure_models,
    summarize,
    write_report,
)
from hpo.report.critical_batch import describe_critical_batch_size, verdict
from hpo.report.figures import Band, Line, Markers
from hpo.report.noise_scale import (
    MeasuredNoiseScale,
    fit_lr_ridge,
    measured_b_simple,
)
from tests.test_report import DISTRIBUTIONS

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _planted(b_noise: float, eps_max: float, scatter: float, seed: int = 0):
    rng = random.Random(seed)
    return [
        (b, eps_max / (1 + b_noise / b) * math.exp(rng.gauss(0, scatter)))
        for b in (16, 32, 64, 128, 256, 512, 1024)
        for _ in range(3)
    ]


@pytest.mark.parametrize("b_noise", [60.0, 200.0])
def test_ridge_recovers_a_planted_b_noise_within_its_interval(b_noise: float) -> None:
    fit = fit_lr_ridge(_planted(b_noise, eps_max=0.5, scatter=0.15))
    assert fit.b_noise_low <= b_noise <= fit.b_noise_high
    assert fit.b_noise == pytest.approx(b_noise, rel=0.5)
    assert fit.eps_max == pytest.approx(0.5, rel=0.3)
    assert fit.lr_at(1e9) == pytest.approx(fit.eps_max, rel=1e-6)


def test_ridge_needs_two_batch_sizes() -> None:
    assert fit_lr_ridge([(32, 0.1), (32, 0.2)]).b_noise is None
    assert fit_lr_ridge([(32, 0.1), (64, 0.2)]).b_noise_low is None  # no interval from 2


def test_measured_b_simple_takes_the_best_complete_trials() -> None:
    study = optuna.create_study(direction="maximize")
    for value, b_simple in [(0.9, 100.0), (0.8, 120.0), (0.7, 140.0), (0.1, 9999.0)]:
        trial = study.ask()
        trial.set_user_attr("b_simple", b_simple)
        study.tell(trial, value)
    study.tell(study.ask(), 0.95)  # no b_simple recorded: ignored
    measured = measured_b_simple(study, top_k=3)
    assert (measured.median, measured.low, measured.high, measured.n_trials) == (
        120.0,
        110.0,
        130.0,
        3,
    )


def test_a_stored_non_positive_b_simple_counts_as_not_measured() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(32, 0.9, -33.0, curve=[None, -33.0]))  # as the demo once stored
    study.add_trial(_trial(32, 0.8, 40.0, curve=[20.0, 40.0]))
    assert measured_b_simple(study).median == 40.0
    headers, rows = batch_size_table(summarize(study, "val_auc"))
    assert rows[0][headers.index("b_simple")] == "-"  # the best trial's, not another's
    (curve,) = collect(study, "val_auc").noise_curves
    assert curve.values == ((1, 20.0), (2, 40.0))


def _measured(value: float, low: float, high: float | None) -> MeasuredNoiseScale:
    return MeasuredNoiseScale(value, value, value, 5, value, low, high, 40)


def test_overlapping_intervals_are_called_agreeing() -> None:
    fit = fit_lr_ridge(_planted(200.0, eps_max=0.5, scatter=0.1))
    assert fit.b_noise_low <= 180 <= fit.b_noise_high
    agree = describe_critical_batch_size(fit, _measured(180.0, 120.0, 260.0))
    assert verdict(fit, _measured(180.0, 120.0, 260.0)).word == "agree"
    assert (
        "critical batch size is about 180" in agree and "agree (their intervals overlap)" in agree
    )


def test_intervals_apart_are_called_disagreeing_with_what_would_settle_it() -> None:
    fit = fit_lr_ridge(_planted(200.0, eps_max=0.5, scatter=0.1))
    apart = describe_critical_batch_size(fit, _measured(5.0, 4.0, 6.0))
    assert "disagree (their intervals do not overlap)" in apart
    assert "critical batch size is about" not in apart and "steps to a target" in apart


def test_an_overlap_through_an_unbounded_interval_cannot_tell() -> None:
    fit = fit_lr_ridge(_planted(200.0, eps_max=0.5, scatter=0.1))
    lower_bound_only = _measured(300.0, 90.0, None)
    assert verdict(fit, lower_bound_only).word == "cannot tell"
    text = describe_critical_batch_size(fit, lower_bound_only)
    assert "cannot be told" in text and "more measurements of B_simple" in text
    assert "agree (" not in text and "critical batch size is about" not in text


def test_a_very_wide_ridge_interval_cannot_tell_even_when_it_overlaps() -> None:
    wide = fit_lr_ridge(_planted(60.0, eps_max=0.5, scatter=1.0, seed=3))
    low, high = wide.b_noise_low, wide.b_noise_high
    assert high / low > 100
    measured = _measured(
        math.sqrt(low * high), math.sqrt(low * high) / 2, math.sqrt(low * high) * 2
    )
    said = verdict(wide, measured)
    assert said.word == "cannot tell" and "more batch sizes" in said.settle


def test_no_measured_interval_cannot_tell_and_no_estimate_says_so() -> None:
    fit = fit_lr_ridge(_planted(200.0, eps_max=0.5, scatter=0.1))
    quartiles_only = MeasuredNoiseScale(180.0, 150.0, 230.0, 5)  # trials without sums
    assert verdict(fit, quartiles_only).word == "cannot tell"
    nothing = describe_critical_batch_size(
        fit_lr_ridge([]), MeasuredNoiseScale(None, None, None, 0)
    )
    assert "critical batch size" in nothing


def test_summary_markdown_names_the_critical_batch_size() -> None:
    from hpo.report import collect, summary_markdown
    from tests.test_report import scaling_study

    text = summary_markdown(collect(ridge_study(), "val_auc"))
    assert "critical batch size" in text and "B_noise" in text
    # lr* ∝ B over the whole range: the ridge only bounds B_noise from below.
    linear = summary_markdown(collect(scaling_study(1.0), "val_auc"))
    assert "critical batch size lies above the largest studied batch size" in linear


def _trial(batch_size: int, value: float, b_simple: float | None, curve=None) -> FrozenTrial:
    """A complete trial as ``hpo`` stores it, with its B_simple (last and per epoch)."""
    attrs: dict[str, object] = {"batch_size": batch_size}
    if b_simple is not None:
        attrs["b_simple"] = b_simple
        attrs["b_simple_per_epoch"] = list(curve or [b_simple])
    return create_trial(
        value=value,
        params={"log2_batch_size": int(math.log2(batch_size)), "lr": 0.01, "weight_decay": 1e-4},
        distributions=DISTRIBUTIONS,
        user_attrs=attrs,
        intermediate_values={1: value},
    )


def _study_with_b_simple() -> optuna.Study:
    """B = 32: the best trial measured 150.2, a worse one 900; B = 64: one trial, 1,234.4;
    B = 128: a complete trial that recorded no B_simple."""
    study = optuna.create_study(direction="maximize", study_name="noise")
    for batch_size, value, b_simple in [
        (32, 0.9, 150.2),
        (32, 0.7, 900.0),
        (64, 0.8, 1234.4),
        (128, 0.6, None),
    ]:
        study.add_trial(_trial(batch_size, value, b_simple))
    return study


def test_batch_size_table_b_simple_is_the_best_trials_last_value() -> None:
    headers, rows = batch_size_table(summarize(_study_with_b_simple(), "val_auc"))
    column = headers.index("b_simple")
    assert [(row[0], row[column], row[headers.index("trial")]) for row in rows] == [
        ("32", "150", "0"),
        ("64", "1,234", "2"),
        ("128", "-", "3"),
    ]


def test_batch_size_table_gives_the_lower_end_when_b_simple_has_only_one() -> None:
    study = _study_with_b_simple()
    lower_bound_only = _trial(16, 0.95, None)
    lower_bound_only.user_attrs["b_simple_interval"] = [354.4, None]
    both_ends_but_no_value = _trial(256, 0.5, None)
    both_ends_but_no_value.user_attrs["b_simple_interval"] = [10.0, 20.0]
    study.add_trials([lower_bound_only, both_ends_but_no_value])
    headers, rows = batch_size_table(summarize(study, "val_auc"))
    cells = {row[0]: row[headers.index("b_simple")] for row in rows}
    assert (cells["16"], cells["32"], cells["128"], cells["256"]) == ("≥ 354", "150", "-", "-")


def test_status_prints_the_b_simple_column(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpo.cli.app import console
    from hpo.cli.render import print_summary

    monkeypatch.setattr(console, "width", 160)  # wide enough that no header wraps
    with console.capture() as captured:
        print_summary(_study_with_b_simple(), "val_auc")
    table = captured.get()
    assert "b_simple" in table
    assert "1,234" in table and "150" in table


PLANTED_B_NOISE = 128.0
BATCH_SIZES = (16, 32, 64, 128, 256, 512)


def ridge_study(seed: int = 0) -> optuna.Study:
    """Per batch size, 6 learning rates around the ridge ε_opt(B) = 0.4 / (1 + 128 / B);
    the objective falls off quadratically in log2(lr / ε_opt). Every trial records a
    B_simple series that grows over its 4 epochs (the first epoch unmeasured, ``null``):
    the top 3 of each batch size end near 100 + B/4, the others at 9,999 (so a figure
    that draws the wrong trials shows it)."""
    rng = random.Random(seed)
    study = optuna.create_study(direction="maximize", study_name="ridge")
    for batch_size in BATCH_SIZES:
        best_lr = 0.4 / (1 + PLANTED_B_NOISE / batch_size)
        for rank, offset in enumerate((0.0, 0.3, -0.3, 1.0, -1.2, 1.6)):
            lr = best_lr * 2.0 ** (offset + rng.uniform(-0.05, 0.05))
            value = 0.92 - 0.04 * offset**2 + rng.uniform(-0.001, 0.001)
            last = 100.0 + batch_size / 4 if rank < 3 else 9999.0
            series = [None, last / 2, last * 0.8, last]
            study.add_trial(
                create_trial(
                    value=value,
                    params={
                        "log2_batch_size": int(math.log2(batch_size)),
                        "lr": lr,
                        "weight_decay": 1e-4,
                    },
                    distributions=DISTRIBUTIONS,
                    user_attrs={
                        "batch_size": batch_size,
                        "b_simple": last,
                        "b_simple_per_epoch": series,
                    },
                    intermediate_values={e: value for e in range(1, 5)},
                )
            )
    return study


def _top3_numbers(study: optuna.Study) -> set[int]:
    top = set()
    for batch_size in BATCH_SIZES:
        mine = [t for t in study.trials if t.user_attrs["batch_size"] == batch_size]
        top |= {t.number for t in sorted(mine, key=lambda t: -t.value)[:3]}
    return top


def test_noise_figure_draws_b_simple_of_the_top_trials_of_each_batch_size() -> None:
    study = ridge_study()
    model = figure_models(collect(study, "val_auc"))["noise_scale"]
    curves, ridge = model.panels
    lines = [layer for layer in curves.layers if isinstance(layer, Line) and layer.group]
    assert {int(line.hover.split(",")[0].removeprefix("trial ")) for line in lines} == (
        _top3_numbers(study)
    )
    assert len(lines) == 3 * len(BATCH_SIZES)
    for line in lines:
        batch_size = int(line.group)
        assert line.x == (2, 3, 4)  # the unmeasured first epoch is a gap
        assert line.y[-1] == pytest.approx(100.0 + batch_size / 4)
    # Coloured by batch size: one colour and one legend entry per B.
    assert len({line.color for line in lines}) == len(BATCH_SIZES)
    assert sorted(line.label for line in lines if line.show_legend) == sorted(
        f"B = {b}" for b in BATCH_SIZES
    )
    (band,) = [layer for layer in curves.layers if isinstance(layer, Band)]
    assert (band.lower, band.upper) == ((16, 16), (512, 512))
    assert band.x == (2, 4)


def test_noise_figure_draws_both_fits_of_the_lr_ridge() -> None:
    data = collect(ridge_study(), "val_auc")
    _, ridge = figure_models(data)["noise_scale"].panels
    lines = {layer.label.split(",")[0]: layer for layer in ridge.layers if isinstance(layer, Line)}
    power_law = lines["power law lr* ∝ B^α"]
    saturating = lines["ε_max / (1 + B_noise / B)"]
    assert power_law.x == saturating.x and power_law.x[0] == 16 and power_law.x[-1] == 512
    for x, y in zip(power_law.x, power_law.y, strict=True):
        assert y == pytest.approx(data.fit.lr_at(x))
    # The ridge curve is the fitted ε_max/(1 + B_noise/B), and it recovers the planted one.
    assert data.ridge.b_noise_low <= PLANTED_B_NOISE <= data.ridge.b_noise_high
    for x, y in zip(saturating.x, saturating.y, strict=True):
        assert y == pytest.approx(data.ridge.eps_max / (1 + data.ridge.b_noise / x))
    best = [
        layer for layer in ridge.layers if isinstance(layer, Markers) and layer.symbol == "star"
    ]
    assert best[0].x == BATCH_SIZES


def test_noise_figure_marks_measured_b_simple_and_b_noise() -> None:
    data = collect(ridge_study(), "val_auc")
    model = figure_models(data)["noise_scale"]
    curves, _ = model.panels
    references = {layer.label: layer.y for layer in curves.layers if isinstance(layer, Line)}
    assert references["measured B_simple (median)"] == (data.noise_scale.median,) * 2
    assert references["ridge B_noise"] == (data.ridge.b_noise,) * 2
    assert "B_simple" in model.subtitle[0] and "B_noise" in model.subtitle[0]
    # The B_simple axis is read in batch sizes: power-of-two ticks spanning all it draws.
    assert curves.y.ticks[0] <= 16 and curves.y.ticks[-1] >= max(references["ridge B_noise"])


def test_noise_figure_without_measurements_still_draws_the_ridge() -> None:
    from tests.test_report import scaling_study

    model = figure_models(collect(scaling_study(1.0), "val_auc"))["noise_scale"]
    curves, ridge = model.panels
    assert "no trial has measured one yet" in curves.title
    assert any(isinstance(layer, Line) for layer in ridge.layers)
    empty = figure_models(collect(optuna.create_study(), "val_auc"))["noise_scale"]
    assert empty.message is not None and not empty.panels


def test_noise_figure_is_written_linked_and_attached(tmp_path: Path) -> None:
    from optuna.artifacts import get_all_artifact_meta

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(storage=storage, direction="maximize", study_name="s")
    for trial in ridge_study().trials:
        study.add_trial(trial)
    report = write_report(study, tmp_path / "out", metric="val_auc")
    png = tmp_path / "out" / "noise_scale.png"
    assert png in report.files and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "B_noise" in (tmp_path / "out" / "noise_scale.html").read_text()
    names = {trace.name for trace in report.figures["noise_scale"].data}
    assert "studied batch sizes 16–512" in names and "best per B" in names
    assert any(name.startswith("ε_max / (1 + B_noise / B)") for name in names)
    summary = report.summary_path.read_text()
    assert "[noise_scale.png](noise_scale.png)" in summary
    assert "[noise_scale.html](noise_scale.html)" in summary

    study_id = storage.get_study_id_from_name("s")
    attach_report(study, report, tmp_path / "artifacts", storage=storage, study_id=study_id)
    attrs = storage.get_study_system_attrs(study_id)
    assert any(key.startswith("dashboard:plot_data:hpo-noise_scale:") for key in attrs)
    assert "hpo-noise_scale.png" in {m.filename for m in get_all_artifact_meta(study)}


def test_noise_figure_breaks_a_curve_at_an_unmeasured_epoch() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(32, 0.9, 80.0, curve=[None, 40.0, None, 60.0, 80.0]))
    study.add_trial(_trial(64, 0.8, 50.0, curve=[50.0]))
    data = collect(study, "val_auc")
    curves, _ = figure_models(data)["noise_scale"].panels
    segments = [(layer.x, layer.show_legend) for layer in curves.layers if layer.label == "B = 32"]
    assert segments == [((2,), True), ((4, 5), False)]


def test_a_ridge_flat_over_the_studied_batches_is_called_a_bound_not_a_value() -> None:
    flat = fit_lr_ridge([(b, 0.02 * (1.05 if i % 2 else 0.95)) for i, b in enumerate(BATCH_SIZES)])
    assert flat.edge == "low" and flat.b_noise < 16
    text = describe_critical_batch_size(flat, MeasuredNoiseScale(None, None, None, 0))
    assert "flat over the studied batch sizes" in text
    assert "critical batch size lies below the smallest studied batch size" in text
    rising = fit_lr_ridge([(b, 1e-4 * b) for b in BATCH_SIZES])
    assert rising.edge == "high"
    assert "above the largest" in describe_critical_batch_size(
        rising, MeasuredNoiseScale(None, None, None, 0)
    )
    assert fit_lr_ridge(_planted(200.0, eps_max=0.5, scatter=0.1)).edge is None


def test_noise_figure_names_unmeasured_batch_sizes_and_makes_room_for_them() -> None:
    from hpo.report import plotly_figure

    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(32, 0.9, 80.0, curve=[40.0, 80.0]))
    study.add_trial(_trial(256, 0.8, None))  # too few updates for a measurement
    model = figure_models(collect(study, "val_auc"))["noise_scale"]
    assert model.subtitle[-1] == "no B_simple among the top trials at B = 256"
    # Two subtitle lines: the HTML's top margin grows so they clear the panel titles.
    assert plotly_figure(model).layout.margin.t > 80


def _sums_of(pairs: list[tuple[float, float]]) -> dict[str, float]:
    sums = dict.fromkeys(("n", "g", "t", "gg", "tt", "gt"), 0.0)
    for g, t in pairs:
        for key, v in (("n", 1), ("g", g), ("t", t), ("gg", g * g), ("tt", t * t), ("gt", g * t)):
            sums[key] += v
    return sums


def test_each_batch_size_pools_its_trials_measurements_into_one_interval() -> None:
    """Planted: every measurement estimates |G|² ≈ 1 and tr(Σ) ≈ 80 (B_simple 80); each
    trial stores 4 pairs, too few alone, and a batch size's 3 trials pool to 12."""
    rng = random.Random(2)
    study = optuna.create_study(direction="maximize")
    for batch_size in (32, 64):
        for value in (0.9, 0.85, 0.8):
            trial = _trial(batch_size, value, 80.0)
            pairs = [(1 + rng.gauss(0, 0.3), 80 + rng.gauss(0, 20)) for _ in range(4)]
            trial.user_attrs["b_simple_sums"] = _sums_of(pairs)
            study.add_trial(trial)
    measured = collect(study, "val_auc").noise_scale
    assert [
        (row.batch_size, row.n_trials, row.n_measurements) for row in measured.by_batch_size
    ] == [
        (32, 3, 12),
        (64, 3, 12),
    ]
    for row in measured.by_batch_size:
        assert row.low < 80 < row.high
    assert measured.n_measurements == 4 * 3  # the report's top 3 trials pooled
    assert measured.interval_low < measured.pooled < measured.interval_high


def test_noise_figure_counts_reports_not_epochs() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(32, 0.9, 80.0, curve=[40.0, 60.0, 80.0]))
    curves, _ = figure_models(collect(study, "val_auc"))["noise_scale"].panels
    assert curves.x.title == "report" and "report" in curves.title


def test_png_ridge_panel_labels_its_learning_rate_axis() -> None:
    """Best LRs within one decade: a log axis with no major tick inside; its labels are the
    minor ticks', which the batch-size axis's fixed ticks must not switch off."""
    from hpo.report import png_figure

    study = optuna.create_study(direction="maximize")
    for batch_size, lr in ((16, 0.012), (32, 0.02), (64, 0.03), (128, 0.05)):
        study.add_trial(
            create_trial(
                value=0.9,
                params={
                    "log2_batch_size": int(math.log2(batch_size)),
                    "lr": lr,
                    "weight_decay": 1e-4,
                },
                distributions=DISTRIBUTIONS,
                user_attrs={"batch_size": batch_size},
            )
        )
    figure = png_figure(figure_models(collect(study, "val_auc"))["noise_scale"])
    figure.canvas.draw()
    ridge = figure.axes[1]
    labels = [t.get_text() for t in ridge.get_yticklabels() + ridge.get_yticklabels(minor=True)]
    low, high = ridge.get_ylim()
    shown = [
        t.get_text()
        for t, v in zip(
            ridge.get_yticklabels(minor=True), ridge.yaxis.get_minorticklocs(), strict=False
        )
        if low <= v <= high and t.get_text()
    ]
    assert any(labels) and shown


def test_a_batch_size_without_an_estimate_is_named_with_why() -> None:
    from hpo.report.critical_batch import describe_measured
    from hpo.report.noise_scale import BatchSizeNoiseScale

    measured = MeasuredNoiseScale(
        50.0, 50.0, 50.0, 3, 50.0, 20.0, 120.0, 30,
        (BatchSizeNoiseScale(16, None, None, None, 2, 32), BatchSizeNoiseScale(32, 50.0, 20.0, 120.0, 2, 16)),
    )  # fmt: skip
    text = describe_measured(measured)
    assert "B = 16: no estimate (32 measurements of 2 trial(s)" in text
    assert "B = 32: 50 (20 to 120, 16 measurements of 2 trial(s))" in text
