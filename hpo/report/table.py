"""The table of the best trial per batch size, as text cells: one formatting for every place
that shows it (``hpo status``'s rich table, the report's markdown summary)."""

from __future__ import annotations

from hpo.report.analysis import StudySummary


def format_cell(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or "-" where there is none (no complete trial)."""
    return "-" if value is None else format(value, spec)


def batch_size_table(summary: StudySummary) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (all cells text, every column right-aligned) of the best complete
    trial per batch size: counts, objective (4 decimals), lr (3 significant digits), weight
    decay (2), train − val gap (signed, 3 decimals), B_simple (whole examples) and the
    trial's number. Every cell after the counts is the best trial's, b_simple included:
    its gradient noise scale at its last epoch (not a median over the batch size's
    trials), so a row reads as one trial."""
    headers = [
        "batch size",
        "complete",
        "pruned",
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
            format_cell(row.best_value, ".4f"),
            format_cell(row.best_lr, ".3g"),
            format_cell(row.best_weight_decay, ".2g"),
            format_cell(row.generalization_gap, "+.3f"),
            format_cell(row.best_b_simple, ",.0f"),
            "-" if row.best_trial is None else str(row.best_trial),
        ]
        for row in summary.by_batch_size
    ]
    return headers, rows
