"""The report's markdown summary: counts, the best trial, α in words, the best trial per
batch size and importances. Written to ``summary.md`` and, without figure links, used as the
study's note in the dashboard."""

from __future__ import annotations

import html

from hpo.report.analysis import ReportData, trial_batch_size
from hpo.report.critical_batch import describe_critical_batch_size, describe_steps_to_target
from hpo.report.figures import FIGURE_NAMES, FIGURE_TITLES
from hpo.report.table import batch_size_table, cost_table, format_cell


def summary_markdown(data: ReportData, *, figure_links: bool = True) -> str:
    """The short markdown summary: counts, best trial, α in words, best per batch size.
    ``figure_links`` lists the figure files (relative links, for ``summary.md`` beside them)."""
    lines = _overview(data)
    lines += [
        "",
        "## How the best learning rate scales with batch size",
        "",
        data.fit.describe(),
        "",
    ]
    if data.ridge is not None and data.noise_scale is not None:
        lines += [describe_critical_batch_size(data.ridge, data.noise_scale), ""]
    if data.steps_to_target is not None and data.noise_scale is not None:
        direct = describe_steps_to_target(data.steps_to_target, data.noise_scale, data.metric)
        lines += [direct, ""]
    if data.summary.by_batch_size:
        lines += _table(data)
    if data.noise_floor is not None:
        lines += ["", "## Noise floor", "", data.noise_floor.describe()]
        if data.noise_floor.groups:
            lines[-1] += (
                " The replicate trials count only here: the table, the best trial, the fits "
                "and the importances are the search's (their training is in epochs spent "
                "and device-h)."
            )
    if data.weight_decay is not None:
        lines += _weight_decay(data)
    lines += _predictions(data)
    if data.cost is not None:
        lines += _cost(data)
    if data.importances:
        ranked = sorted(data.importances.items(), key=lambda item: -item[1])
        lines += [
            "",
            "Importances (PED-ANOVA): " + ", ".join(f"{n} {v:.2f}" for n, v in ranked) + ".",
        ]
    lines += _importance_caveats(data)
    if figure_links:
        lines += ["", "## Figures", ""]
        for name in FIGURE_NAMES:
            lines.append(
                f"- {FIGURE_TITLES[name]}: [{name}.png]({name}.png), [{name}.html]({name}.html)"
            )
    return "\n".join(lines) + "\n"


def _importance_caveats(data: ReportData) -> list[str]:
    """Which parameters were not varied (left out of the importances) or varied rarely."""
    from hpo.report.analysis import describe_variation

    text = describe_variation(data.importances, data.variation, data.n_complete)
    return ["", text] if text else []


def _overview(data: ReportData) -> list[str]:
    """Heading, trial counts by state, the objective and the best trial."""
    summary = data.summary
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(summary.state_counts.items()))
    total = sum(summary.state_counts.values())
    lines = [
        f"# {_plain(data.study_name)}: batch size × learning rate",
        "",
        f"{total} trials ({counts or 'none'}); objective: {summary.direction} "
        f"{summary.metric_description}.",
    ]
    if summary.best is not None:
        best = summary.best
        lines.append(
            f"Best trial {best.number}: {data.metric} = {best.value:.4f} with batch size "
            f"{trial_batch_size(best)}, lr {format_cell(best.params.get('lr'), '.3g')}, "
            f"weight decay {format_cell(best.params.get('weight_decay'), '.2g')}."
        )
        ranks = best.user_attrs.get("ranks", 1)
        if isinstance(ranks, int) and ranks > 1:  # training.gpus_per_trial (hpo.distributed)
            lines.append(
                f"Batch sizes are global: each trial trained data-parallel on {ranks} devices, "
                f"batch size / {ranks} on each."
            )
    return lines


def _table(data: ReportData) -> list[str]:
    """``batch_size_table`` as a markdown table (right-aligned columns) and its footnote."""
    headers, rows = batch_size_table(data.summary)
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---:" for _ in headers) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "gap: train − val accuracy of the best trial at its last epoch."]
    unit = data.summary.budget_unit
    if unit is not None:
        lines[-1] += (
            f" Trials were compared at equal {unit} (budget.unit); {unit} spent: what the "
            "batch size's complete and pruned trials trained together."
        )
    lines += [
        "b_simple: the best trial's gradient noise scale, the ratio of the means of its "
        "measurements over its training (≥ N: only its interval's lower end, the mean |G|² "
        "estimate was not positive; - : no estimate; the trial's b_simple_missing says why)."
    ]
    if data.summary.device.n_trials:
        lines += [
            "device-h: device-hours of the batch size's trials of any state (training, "
            "evaluation, waiting for the claim), on every device kind together.",
            "",
            data.summary.device.describe(),
        ]
    return lines


def _weight_decay(data: ReportData) -> list[str]:
    """The best weight decay per batch size, whether it was searched, and τ_epoch."""
    assert data.weight_decay is not None
    view = data.weight_decay
    lines = ["", "## Weight decay", "", view.describe(), ""]
    if not view.rows:
        return lines
    lines += [
        "| batch size | best weight decay | weight decays tried | lr | τ_epoch | τ interval |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in view.rows:
        interval = (
            f"{row.tau_low:.3g} to {row.tau_high:.3g}"
            if row.tau_low is not None and row.tau_high is not None
            else "-"
        )
        lines.append(
            f"| {row.batch_size} | {row.weight_decay:.2g}{'' if row.searched else ' (fixed)'} "
            f"| {row.n_weight_decays} | {row.lr:.3g} | {format_cell(row.tau_epoch, '.3g')} "
            f"| {interval} |"
        )
    lines += [
        "",
        "τ_epoch = B/(η·λ·N): the epochs over which the weights average past updates "
        "(Wang & Aitchison 2024); its interval spans the midpoints to the nearest LR and "
        "weight decay tried at that batch size. (fixed): one weight decay among the batch "
        "size's complete trials.",
    ]
    return lines


def _predictions(data: ReportData) -> list[str]:
    """Predicted LR and weight decay at 2× and 4× the largest studied batch size (80%
    intervals, the model the leave-one-batch-size-out error chose), or why there is none."""
    from hpo.report.prediction import PREDICTION_CONFIDENCE, predict_from_fit, unavailable_reason

    title = ["", "## Predicted beyond the studied batch sizes (extrapolated)", ""]
    reason = unavailable_reason(list(data.fit.points))
    if reason is not None:
        return [*title, f"No prediction: {reason}."]
    largest = max(data.fit.batch_sizes)
    rows = []
    for batch_size in (2 * largest, 4 * largest):
        prediction = predict_from_fit(data.fit, batch_size, data.weight_decay, data.optimizer)
        assert prediction is not None and prediction.lr_interval is not None
        interval = prediction.weight_decay_interval
        rows.append(
            f"| {batch_size} | {prediction.lr:.3g} | {prediction.lr_interval[0]:.3g} to "
            f"{prediction.lr_interval[1]:.3g} | {format_cell(prediction.weight_decay, '.2g')} | "
            + (f"{interval[0]:.2g} to {interval[1]:.2g}" if interval else "-")
            + " |"
        )
    model = prediction.model_of_scaling
    errors = ", ".join(f"{k} {v:.2f}" for k, v in prediction.leave_one_out_error.items())
    note = _decay_note(prediction)
    return [
        *title,
        f"From the {model} model (leave-one-batch-size-out error in log2 LR: {errors}; the "
        f"smallest chosen; a model within 2× of it widens the interval), "
        f"{PREDICTION_CONFIDENCE:.0%} intervals. `hpo export --batch-size B` gives the same "
        f"for any B.{note}",
        "",
        "| batch size | lr | lr interval | weight decay | weight decay interval |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]


def _decay_note(prediction) -> str:
    """The sentence on the predicted weight decay: its model and the errors that chose it,
    and ``weight_decay_note``."""
    said = prediction.weight_decay_note
    errors = prediction.weight_decay_leave_one_out_error
    if not prediction.model_of_weight_decay or not errors:
        return f" Weight decay: {said}." if said else ""
    listed = ", ".join(f"{k} {v:.2f}" for k, v in errors.items())
    text = (
        f" Weight decay from the {prediction.model_of_weight_decay} model (leave-one-batch-"
        f"size-out error in log2 λ: {listed}; the smallest chosen)"
    )
    return text + (f"; {said}." if said else ".")


def _cost(data: ReportData) -> list[str]:
    """The cost view: the trade-off sentence and, per batch size, what its best cost."""
    assert data.cost is not None
    lines = ["", "## What each batch size's best cost to train", "", data.cost.describe(), ""]
    if not data.cost.by_batch_size:
        return lines
    headers, rows = cost_table(data.cost)
    lines += [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---:" for _ in headers) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    scale = f", in {data.cost.device} seconds" if data.cost.normalised else ""
    lines += [
        "",
        f"train s: training time of the best trial (evaluation not counted{scale}); "
        "samples/s: the median over the batch size's complete and pruned trials; front: the "
        "best trial is on the Pareto front of value vs training time.",
    ]
    return lines


def _plain(text: str) -> str:
    """A name from the storage as plain text in markdown: HTML and markdown's own markup
    characters escaped (a study name may come from any tool)."""
    escaped = html.escape(" ".join(text.split()))
    return "".join(f"\\{ch}" if ch in "\\`*_[]#|<>!" else ch for ch in escaped)
