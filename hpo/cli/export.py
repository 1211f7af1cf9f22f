"""``hpo export``: the best configuration out of the study, for the user's own training code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hpo.cli.app import StorageOption, StoredStudyOption, app, console, errors, user_errors


@app.command()
@user_errors
def export(
    study: StoredStudyOption,
    storage: StorageOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="File to write, JSON or TOML by its extension (.json, .toml). Default: JSON on stdout (pipes into jq).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help="Export the best complete trial at this batch size instead of the overall best; at a batch size no trial completed (inside or outside the studied range), the LR and weight decay predicted by the fitted scaling model, with 80% intervals.",
            show_default=False,
        ),
    ] = None,
    trials_csv: Annotated[
        Path | None,
        typer.Option(
            "--trials-csv",
            help="Also write every trial (params, batch size, state, metrics, fail_reason) to this CSV file, through Optuna's trials_dataframe.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """The best configuration (batch_size, lr, weight_decay, optimizer, momentum, epochs,
    model, precision, the metric and its value, the trial) and the best-per-batch-size table."""
    from hpo.api import load
    from hpo.export import dumps_configuration, export_format, write_configuration, write_trials_csv

    if out is not None:
        export_format(out)  # an unknown extension fails before the storage is opened
    result = load(study, storage=storage)
    configuration = result.export(batch_size=batch_size)
    if trials_csv is not None:
        rows = write_trials_csv(result.study, trials_csv)
        errors.print(f"wrote {rows} trials to {trials_csv}", markup=False, soft_wrap=True)
    if out is None:
        typer.echo(dumps_configuration(configuration, "json"), nl=False)
        return
    write_configuration(configuration, out)
    what = (
        f"trial {configuration['trial']} ({configuration['metric']} = {configuration['value']:.4f}"
        if "trial" in configuration
        else f"the prediction ({configuration['model_of_scaling']}"
    )
    console.print(
        f"wrote {what}, batch size {configuration['batch_size']}) to {out}",
        markup=False,
        soft_wrap=True,
    )
