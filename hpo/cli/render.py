"""Tables and lines the commands print."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.segment import Segments
from rich.table import Table

from hpo.cli.app import console

if TYPE_CHECKING:
    from pathlib import Path

    import optuna

    from hpo.probe import ProbeResult
    from hpo.report import Report
    from hpo.report.summary import StudySummary


# Off a terminal (a log file, CI, Slurm, `nohup`) rich assumes 80 columns and cuts the
# cells of a wide table ("0.71…"): a log has no width, so tables get this much room there.
LOG_TABLE_WIDTH = 200


def print_table(table: Table) -> None:
    """A table at the terminal's width, or whole (up to LOG_TABLE_WIDTH) off a terminal."""
    if console.is_terminal:
        console.print(table)
        return
    # rich caps a print's width at the console's: render at the log width, then print
    # the finished lines (soft-wrapped, so not cut again) through the same console.
    options = console.options.update_width(max(console.width, LOG_TABLE_WIDTH))
    lines = console.render_lines(table, options, pad=False, new_lines=True)
    console.print(Segments(segment for line in lines for segment in line), soft_wrap=True)


def print_summary(study: optuna.Study, metric: str) -> None:
    """Trials by state, the best trial, and the best-per-batch-size table."""
    from hpo.report import batch_size_table, summarize
    from hpo.report.table import table_title

    summary = summarize(study, metric)
    counts = ", ".join(f"{state.lower()} {n}" for state, n in sorted(summary.state_counts.items()))
    console.print(
        f"study [bold]{escape(summary.study_name)}[/] ({summary.direction} "
        f"{escape(summary.metric_description)}): {counts or 'no trials'}"
    )
    if summary.class_counts:
        print_class_counts(summary.class_counts)
    if summary.best is not None:
        best = summary.best
        console.print(
            f"best trial {best.number}: {metric} = {best.value:.4f} with batch_size "
            f"{best.user_attrs.get('batch_size')}, lr {best.params['lr']:.3g}, "
            f"weight_decay {best.params['weight_decay']:.3g}"
        )
    headers, rows = batch_size_table(summary)
    table = Table(title=table_title(summary))
    for column in headers:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    print_table(table)
    if summary.device.n_trials:
        console.print(summary.device.describe(), markup=False, soft_wrap=True)
    console.print(noise_floor_line(study, summary), markup=False, soft_wrap=True)


def noise_floor_line(study: optuna.Study, summary: StudySummary) -> str:
    """The seed-to-seed spread and whether the winner beats the runner-up beyond it."""
    from hpo.replicates import why_no_replicates
    from hpo.report.noise_floor import noise_floor

    floor = noise_floor(
        study.get_trials(deepcopy=False),
        summary.by_batch_size,
        summary.direction == "maximize",
        why_none=why_no_replicates(study),
    )
    return floor.describe()


def print_class_counts(counts: dict[str, dict[str, int]]) -> None:
    """Patches per class in each split, as stored on the study by the workers."""
    table = Table(title="patches per class")
    table.add_column("class", justify="left")
    splits = list(counts)
    for split in splits:
        table.add_column(split, justify="right")
    for name in counts[splits[0]]:
        table.add_row(name, *(str(counts[split].get(name, 0)) for split in splits))
    print_table(table)


def print_probe(result: ProbeResult, cap: int | None) -> None:
    table = Table(title=f"batch sizes on {result.device_name}")
    for column in ("batch size", "fits", "samples/s", "peak memory (MiB)", "note"):
        table.add_column(column, justify="left" if column == "note" else "right")
    for row in result.rows:
        table.add_row(
            str(row.batch_size),
            "yes" if row.fits else "no",
            "-" if row.samples_per_s is None else f"{row.samples_per_s:,.0f}",
            "-" if row.peak_memory_mib is None else f"{row.peak_memory_mib:,.0f}",
            row.note,
        )
    print_table(table)
    console.print(f"peak memory: {result.memory_method}")
    console.print(f"batch-size cap stored for {result.device_name!r}: {cap if cap else 'none'}")


def print_dashboard_hint(storage_url: str, artifact_dir: Path | None = None) -> None:
    """The exact command that opens this storage in the browser (password masked), with
    the artifact directory the report's figures are in (default: where ``hpo report``
    puts them for this storage)."""
    from sqlalchemy.engine import make_url

    from hpo.dashboard import dashboard_command

    line = f"dashboard: {dashboard_command(storage_url, artifact_dir)}"
    if make_url(storage_url).password is not None:
        line += "  (password masked: put it back, or export HPO_STORAGE and drop --storage)"
    console.print(line, markup=False, soft_wrap=True)


def print_report(result: Report, study: str, storage_url: str, *, attached: Path | None) -> None:
    """What ``hpo report`` wrote: the α fit's and the cost view's sentences, where the
    files are, and where the PNGs went when the report was ``attached`` to the study."""
    console.print(result.data.fit.describe(), markup=False, soft_wrap=True)
    if result.data.cost is not None:
        console.print(result.data.cost.describe(), markup=False, soft_wrap=True)
    console.print(
        f"wrote {len(result.files)} files to {result.out_dir} (summary.md; PNG and HTML figures)",
        markup=False,
        soft_wrap=True,
    )
    if attached is not None:
        console.print(
            f"attached to study {study!r} (figures, note; PNGs in {attached})",
            markup=False,
            soft_wrap=True,
        )
        print_dashboard_hint(storage_url, attached)
