"""The ``hpo`` command. Thin: parse, call one library function, print.

Every error a user can cause (bad study file, missing data, unreachable storage) is
printed as one line naming the file or field, with exit code 2 and no traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from hpo.errors import UserError
from hpo.spec import load_spec

app = typer.Typer(
    name="hpo",
    help=(
        "Hyperparameter optimization for CNNs on histopathology patches: joint search over "
        "batch size (powers of two), learning rate and weight decay, on Optuna with SQL storage."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., object])

StudyOption = Annotated[
    str,
    typer.Option(
        "--study",
        help="Study name (finds ./studies/NAME.toml or $HPO_STUDIES_DIR/NAME.toml) or a path to a .toml file.",
    ),
]
StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="SQLAlchemy URL of the study storage. Default: $HPO_STORAGE, else sqlite:///./hpo.db.",
        show_default=False,
    ),
]


def user_errors(function: F) -> F:
    """Turn the errors a user can cause into one line on stderr and exit code 2."""

    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return function(*args, **kwargs)
        except UserError as error:
            errors.print(f"error: {error}", markup=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            errors.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _print_summary(study_name: str, storage_url: str, metric: str) -> None:
    import optuna

    from hpo.report import summarize
    from hpo.storage import open_storage

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    summary = summarize(study, metric)
    counts = ", ".join(f"{state.lower()} {n}" for state, n in sorted(summary.state_counts.items()))
    console.print(
        f"study [bold]{summary.study_name}[/] ({summary.direction} {metric}): {counts or 'no trials'}"
    )
    if summary.best is not None:
        best = summary.best
        console.print(
            f"best trial {best.number}: {metric} = {best.value:.4f} with batch_size "
            f"{best.user_attrs.get('batch_size')}, lr {best.params['lr']:.3g}, "
            f"weight_decay {best.params['weight_decay']:.3g}"
        )
    table = Table(title="best per batch size")
    for column in (
        "batch size",
        "complete",
        "pruned",
        f"best {metric}",
        "lr",
        "weight decay",
        "gap",
        "trial",
    ):
        table.add_column(column, justify="right")

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in summary.by_batch_size:
        table.add_row(
            str(row.batch_size),
            str(row.n_complete),
            str(row.n_pruned),
            fmt(row.best_value, ".4f"),
            fmt(row.best_lr, ".3g"),
            fmt(row.best_weight_decay, ".2g"),
            fmt(row.generalization_gap, "+.3f"),
            "-" if row.best_trial is None else str(row.best_trial),
        )
    console.print(table)


@app.command()
@user_errors
def launch(
    study: StudyOption,
    n_trials: Annotated[
        int | None,
        typer.Option(
            "--n-trials",
            min=1,
            help="Trials to run now (default: budget.n_trials of the study file).",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=1,
            help="Stop starting trials after this many seconds (default: budget.timeout_s).",
        ),
    ] = None,
    storage: StorageOption = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            help=(
                "Local worker processes sharing the study: one GPU each when there are "
                "enough GPUs, else the CPU cores split between them."
            ),
        ),
    ] = 1,
) -> None:
    """Create the study from its file (or continue it), run trials, print the best per batch size."""
    import optuna

    from hpo.storage import mask_url, resolve_storage_url, sqlite_path
    from hpo.worker import count_finished, create_or_load_study, run_local_workers

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # hpo prints its own one-line summary
    spec = load_spec(study)
    storage_url = resolve_storage_url(storage)
    created = create_or_load_study(spec, storage_url, parallel=workers > 1)
    already = count_finished(created)
    new_trials = n_trials or spec.budget.n_trials
    console.print(
        f"study [bold]{spec.name}[/] in {mask_url(storage_url)}: {already} finished trials; "
        f"running {new_trials} more with {workers} worker(s)"
    )
    code = run_local_workers(
        spec.name,
        storage_url,
        total_trials=already + new_trials,
        timeout_s=timeout or spec.budget.timeout_s,
        workers=workers,
    )
    _print_summary(spec.name, storage_url, spec.objective.metric)
    where = sqlite_path(storage_url)
    if where is not None:
        console.print(f"storage: SQLite file {where}")
    _print_dashboard_hint(storage_url)
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def worker(
    study: Annotated[str, typer.Option("--study", help="Name of the study in the storage.")],
    storage: StorageOption = None,
    n_trials: Annotated[
        int | None,
        typer.Option(
            "--n-trials",
            min=1,
            help="Study-wide total of finished trials to stop at (default: budget.n_trials).",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=1, help="Stop starting trials after this many seconds."),
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            "--gpus",
            help=(
                "'all' or GPU indices like 0,1,3: one worker process per GPU, each with "
                "CUDA_VISIBLE_DEVICES set to its GPU. Default: one worker in this process."
            ),
            show_default=False,
        ),
    ] = None,
    spec_file: Annotated[
        str | None,
        typer.Option(
            "--spec",
            help=(
                "A local study file (name or .toml path): creates the study if it is missing; "
                "refused, naming the fields, if it differs from the stored spec."
            ),
            show_default=False,
        ),
    ] = None,
) -> None:
    """Join a study (its spec is read from the storage) and run trials until the study-wide
    total is reached. SIGTERM/SIGINT re-queue the running trial and stop within seconds."""
    import os

    from hpo.storage import resolve_storage_url
    from hpo.worker import LABEL_ENV, load_study, resolve_gpus, run_worker, run_worker_processes

    storage_url = resolve_storage_url(storage)
    local_spec = load_spec(spec_file) if spec_file else None
    _, spec = load_study(study, storage_url, parallel=True, local_spec=local_spec)
    total_trials = n_trials or spec.budget.n_trials
    timeout_s = timeout or spec.budget.timeout_s
    if gpus is None:
        code = run_worker(
            study,
            storage_url,
            total_trials=total_trials,
            timeout_s=timeout_s,
            progress="lines",
            label=os.environ.get(LABEL_ENV, ""),
            parallel=True,
        )
    else:
        devices: list[str | None] = list(resolve_gpus(gpus))
        if not devices:
            errors.print("warning: --gpus all: this node sees no GPU; running one CPU worker")
            devices = [None]
        code = run_worker_processes(
            study, storage_url, total_trials=total_trials, timeout_s=timeout_s, devices=devices
        )
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def status(
    study: Annotated[str, typer.Option("--study", help="Name of a study in the storage.")],
    storage: StorageOption = None,
) -> None:
    """Trials by state, the best trial, and the best value per batch size."""
    from hpo.storage import resolve_storage_url
    from hpo.worker import load_study

    storage_url = resolve_storage_url(storage)
    _, spec = load_study(study, storage_url, parallel=False)
    _print_summary(study, storage_url, spec.objective.metric)


@app.command()
@user_errors
def probe(
    study: Annotated[
        str,
        typer.Option(
            "--study",
            help="Study in the storage (created from studies/NAME.toml if not there yet).",
        ),
    ],
    storage: StorageOption = None,
    steps: Annotated[
        int,
        typer.Option(
            "--steps", min=1, help="Timed training steps per batch size (after 1 warm-up)."
        ),
    ] = 3,
) -> None:
    """Which of the study's batch sizes fit this device: a few training steps at each power
    of two, samples/s and peak memory; stored on the study per device name, so no worker
    on this kind of device trains a batch size that does not fit."""
    from hpo.probe import probe_study
    from hpo.storage import resolve_storage_url

    storage_url = resolve_storage_url(storage)
    result, cap = probe_study(study, storage_url, steps=steps)
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
    console.print(table)
    console.print(f"peak memory: {result.memory_method}")
    console.print(f"batch-size cap stored for {result.device_name!r}: {cap if cap else 'none'}")


ArtifactsOption = Annotated[
    Path | None,
    typer.Option(
        "--artifacts",
        help=(
            "Directory of the dashboard's artifact store (the report's PNGs). Default: "
            "$HPO_ARTIFACTS, else hpo-artifacts/ beside the SQLite file, else ./hpo-artifacts."
        ),
        show_default=False,
    ),
]


def _print_dashboard_hint(storage_url: str) -> None:
    """The exact command that opens this storage in the browser (password masked)."""
    from sqlalchemy.engine import make_url

    from hpo.dashboard import dashboard_command

    line = f"dashboard: {dashboard_command(storage_url)}"
    if make_url(storage_url).password is not None:
        line += "  (password masked: put it back, or export HPO_STORAGE and drop --storage)"
    console.print(line, markup=False, soft_wrap=True)


@app.command()
@user_errors
def dashboard(
    storage: StorageOption = None,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help=(
                "Address to listen on. The dashboard has no authentication: any address but "
                "127.0.0.1/localhost lets everyone who reaches it read and edit the studies."
            ),
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8080,
    artifacts: ArtifactsOption = None,
) -> None:
    """Serve optuna-dashboard for every study in the storage, until Ctrl-C."""
    from hpo.dashboard import default_artifact_dir, describe, is_loopback, make_server, serve
    from hpo.storage import resolve_storage_url

    storage_url = resolve_storage_url(storage)
    artifact_dir = artifacts or default_artifact_dir(storage_url)
    if not is_loopback(host):
        errors.print(
            f"warning: listening on {host}, not 127.0.0.1: the dashboard has no "
            "authentication; anyone who can reach this port can read, change and delete "
            "studies. Prefer an SSH tunnel to 127.0.0.1.",
            markup=False,
        )
    server = make_server(storage_url, host=host, port=port, artifact_dir=artifact_dir)
    console.print(describe(storage_url, host, port, artifact_dir), markup=False, soft_wrap=True)
    serve(server)


@app.command()
@user_errors
def report(
    study: Annotated[str, typer.Option("--study", help="Name of a study in the storage.")],
    storage: StorageOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory for the PNG/HTML figures and summary.md. Default: ./reports/STUDY.",
            show_default=False,
        ),
    ] = None,
    artifacts: ArtifactsOption = None,
    attach: Annotated[
        bool,
        typer.Option(
            "--attach/--no-attach",
            help="Also put the figures, PNGs and summary on the study for `hpo dashboard`.",
        ),
    ] = True,
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k",
            min=1,
            help="Best complete trials per batch size that enter the fit of lr* ∝ B^α.",
        ),
    ] = 3,
) -> None:
    """Figures of how the best learning rate scales with batch size (α in lr* ∝ B^α), the
    objective over batch size × learning rate, generalization gap, learning curves and
    parameter importances, as PNG + HTML with a markdown summary."""
    from hpo.dashboard import default_artifact_dir
    from hpo.report import run_report
    from hpo.storage import resolve_storage_url

    storage_url = resolve_storage_url(storage)
    out_dir = out or Path("reports") / study
    artifact_dir = (artifacts or default_artifact_dir(storage_url)) if attach else None
    result = run_report(study, storage_url, out_dir, artifact_dir=artifact_dir, top_k=top_k)
    console.print(result.data.fit.describe(), markup=False, soft_wrap=True)
    console.print(
        f"wrote {len(result.files)} files to {out_dir} (summary.md; PNG and HTML figures)",
        markup=False,
        soft_wrap=True,
    )
    if artifact_dir is not None:
        console.print(
            f"attached to study {study!r} (figures, note; PNGs in {artifact_dir})",
            markup=False,
            soft_wrap=True,
        )
        _print_dashboard_hint(storage_url)


def main() -> None:  # pragma: no cover - entry point for ``python -m hpo``
    sys.exit(app())
