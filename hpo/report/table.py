"""The table of the best trial per batch size, as text cells: one formatting for every place
that shows it (``hpo status``'s rich table, the report's markdown summary)."""

from __future__ import annotations

from hpo.report.analysis import BatchSizeRow, StudySummary
from hpo.report.cost import CostView


def format_cell(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or "-" where there is none (no complete trial)."""
    return "-" if value is None else format(value, spec)


# How the resource spent is written in each budget unit.
SPENT_FORMATS = {"epochs": ".1f", "steps": ".0f", "seconds": ",.0f"}


def table_title(summary: StudySummary) -> str:
    """The table's title, naming the budget unit the trials were compared in."""
    if summary.budget_unit is None:
        return "best per batch size"
    return f"best per batch size (budget.unit = {summary.budget_unit})"


def batch_size_table(summary: StudySummary) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (all cells text, every column right-aligned) of the best complete
    trial per batch size: counts, the resource its trials spent in the study's budget unit
    (a column only when the trials record one), the device-hours its trials took on every
    device kind together (a column only when trials record them), objective (4 decimals), lr (3 significant
    digits), weight decay (2), train − val gap (signed, 3 decimals), B_simple (whole
    examples) and the trial's number. Every cell after the counts and the resource spent is
    the best trial's, b_simple included: its gradient noise scale over its training (not a
    median over the batch size's trials), so a row reads as one trial."""
    unit = summary.budget_unit
    spent = [f"{unit} spent"] if unit in SPENT_FORMATS else []
    hours = ["device-h"] if summary.device.n_trials else []
    headers = [
        "batch size",
        "complete",
        "pruned",
        *spent,
        *hours,
        f"best {summary.metric}",
        "lr",
        "weight decay",
        "gap",
        "b_simple",
        "trial",
    ]
    rows = [
        [
            str(row.batch_size),
            str(row.n_complete),
            str(row.n_pruned),
            *([format_cell(row.spent, SPENT_FORMATS[unit])] if spent else []),
            *(
                [format_cell(summary.device.batch_size_hours(row.batch_size), ".3g")]
                if hours
                else []
            ),
            format_cell(row.best_value, ".4f"),
            format_cell(row.best_lr, ".3g"),
            format_cell(row.best_weight_decay, ".2g"),
            format_cell(row.generalization_gap, "+.3f"),
            _b_simple_cell(row),
            "-" if row.best_trial is None else str(row.best_trial),
        ]
        for row in summary.by_batch_size
    ]
    return headers, rows


def _b_simple_cell(row: BatchSizeRow) -> str:
    """B_simple in whole examples; "≥ N" when only its interval's lower end is known."""
    if row.best_b_simple is None and row.best_b_simple_at_least is not None:
        return f"≥ {row.best_b_simple_at_least:,.0f}"
    return format_cell(row.best_b_simple, ",.0f")


def cost_table(view: CostView) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (text, right-aligned) of the cost view per batch size: the best
    complete trial's value and its shortfall from the study's best, what that trial took
    (training seconds, optimizer updates, epochs), the batch size's median throughput,
    and whether that trial is on the Pareto front of value vs time to train."""
    headers = [
        "batch size",
        f"best {view.metric}",
        "below best",
        "train s",
        "samples/s",
        "updates",
        "epochs",
        "front",
        "trial",
    ]
    rows = [
        [
            str(row.batch_size),
            format(row.best_value, ".4f"),
            format(row.shortfall, ".2%"),
            format(row.train_seconds, ".3g"),
            format_cell(row.samples_per_s, ",.0f"),
            "-" if row.n_updates is None else str(row.n_updates),
            format_cell(row.train_epochs, ".3g"),
            "yes" if row.on_front else "",
            str(row.best_trial),
        ]
        for row in view.by_batch_size
    ]
    return headers, rows
