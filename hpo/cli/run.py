"""Commands that train or measure: ``launch``, ``worker``, ``probe``."""

from __future__ import annotations

from typing import Annotated

import typer

from hpo.cli.app import (
    CheckpointDirOption,
    DataRootOption,
    DeviceOption,
    StorageOption,
    StudyOption,
    ThreadsOption,
    TrackOption,
    app,
    console,
    errors,
    node_settings,
    setup_logging,
    user_errors,
)
from hpo.cli.render import print_dashboard_hint, print_probe, print_summary
from hpo.settings import default_omp_wait_policy
from hpo.spec import load_spec

TrialsOption = Annotated[
    int | None,
    typer.Option(
        "--n-trials", min=1, help="Trials to run now (default: budget.n_trials of the study file)."
    ),
]
TimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        min=1,
        help="Stop starting trials after this many seconds (default: budget.timeout_s).",
    ),
]

WorkersOption = Annotated[
    int,
    typer.Option(
        "--workers",
        min=1,
        help=(
            "Local worker processes sharing the study (at most the CPU cores this "
            "process may use): the GPUs dealt out round-robin when there are any, and "
            "the CPU cores split between them."
        ),
    ),
]

# hpo worker's options: a worker joins a study, so its trial count is the study-wide total.
TotalTrialsOption = Annotated[
    int | None,
    typer.Option(
        "--n-trials",
        min=1,
        help="Study-wide total of finished trials to stop at (default: budget.n_trials).",
    ),
]
WorkerTimeoutOption = Annotated[
    float | None,
    typer.Option("--timeout", min=1, help="Stop starting trials after this many seconds."),
]
GpusOption = Annotated[
    str | None,
    typer.Option(
        "--gpus",
        help=(
            "'all', or GPU indices and ranges like 0,1,3 or 0-7: one worker process per GPU, "
            "each with CUDA_VISIBLE_DEVICES set to its GPU; with training.gpus_per_trial = N, "
            "one per group of N GPUs (floor(GPUs / N) trials at once, each data-parallel on "
            "its N GPUs). Default: one worker in this process."
        ),
        show_default=False,
    ),
]
SpecFileOption = Annotated[
    str | None,
    typer.Option(
        "--spec",
        help=(
            "A local study file (name or .toml path): creates the study if it is missing; "
            "refused, naming the fields, if it differs from the stored spec "
            "(node-local fields such as dataset.root never count)."
        ),
        show_default=False,
    ),
]


def _finish(code: int, outcome: object) -> None:
    """Exit with the run's code: a signal's 128 + n, else 1 when trials ran and none
    finished COMPLETE or PRUNED (the fail reasons printed with their counts), else 0."""
    from hpo.study import Outcome

    assert isinstance(outcome, Outcome)
    if code >= 128 or code == 2:
        raise typer.Exit(code)
    if not outcome.achieved_anything:
        errors.print(f"error: {outcome.describe_failures()}", markup=False)
        raise typer.Exit(1)


@app.command()
@user_errors
def create(study: StudyOption, storage: StorageOption = None) -> None:
    """Create the study from its file, or check that the stored study matches the file
    (refused, naming the fields, when not); runs no trial. A cluster's first step before
    its workers start."""
    from hpo.storage import mask_url, resolve_storage_url
    from hpo.study import count_finished, create_or_load_study

    spec = load_spec(study, check_paths=False)  # the data lives on the worker nodes
    storage_url = resolve_storage_url(storage)
    loaded = create_or_load_study(spec, storage_url, parallel=True)
    finished = count_finished(loaded.study)
    loaded.storage.dispose()
    console.print(
        f"study {spec.name} in {mask_url(storage_url)}: ready, {finished} of "
        f"{spec.budget.n_trials} trials finished",
        markup=False,
        soft_wrap=True,
    )


@app.command()
@user_errors
def launch(
    study: StudyOption,
    n_trials: TrialsOption = None,
    timeout: TimeoutOption = None,
    storage: StorageOption = None,
    workers: WorkersOption = 1,
    data_root: DataRootOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    checkpoint_dir: CheckpointDirOption = None,
    track: TrackOption = False,
) -> None:
    """Create the study from its file (or continue it), run trials, print the best per batch
    size. Exits 1 when trials ran and none finished COMPLETE or PRUNED."""
    default_omp_wait_policy()  # before torch is imported
    from hpo.api import launch as launch_study
    from hpo.cli.progress import BarProgress, LineProgress
    from hpo.storage import sqlite_path

    setup_logging()

    def progress(new_trials: int) -> BarProgress | LineProgress:
        # Off a terminal (a log file, CI, Slurm) a live bar is cut at 80 columns: lines.
        return BarProgress(new_trials) if console.is_terminal else LineProgress("")

    result = launch_study(
        study, storage=storage, n_trials=n_trials, workers=workers, timeout_s=timeout,
        node=node_settings(data_root, device, threads, checkpoint_dir, track), progress=progress,
        announce=lambda line: console.print(line, markup=False),
    )  # fmt: skip
    print_summary(result.study, result.spec.objective.metric)
    where = sqlite_path(result.storage)
    if where is not None:
        console.print(f"storage: SQLite file {where}")
    print_dashboard_hint(result.storage)
    _finish(result.exit_code, result.outcome)


@app.command()
@user_errors
def worker(
    study: Annotated[str, typer.Option("--study", help="Name of the study in the storage.")],
    storage: StorageOption = None,
    n_trials: TotalTrialsOption = None,
    timeout: WorkerTimeoutOption = None,
    gpus: GpusOption = None,
    spec_file: SpecFileOption = None,
    data_root: DataRootOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    checkpoint_dir: CheckpointDirOption = None,
    track: TrackOption = False,
) -> None:
    """Join a study (its spec is read from the storage) and run trials until the study-wide
    total is reached. SIGTERM/SIGINT re-queue the running trial and stop within seconds.
    Exits 1 when trials ran and none finished COMPLETE or PRUNED."""
    default_omp_wait_policy()  # before torch is imported
    from hpo.cli.progress import LineProgress
    from hpo.launcher import gpu_groups, resolve_gpus, run_worker_processes
    from hpo.settings import LABEL_ENV, env
    from hpo.storage import resolve_storage_url
    from hpo.study import load_study, run_outcome
    from hpo.worker import run_worker

    setup_logging()
    node = node_settings(data_root, device, threads, checkpoint_dir, track)
    storage_url = resolve_storage_url(storage)
    local_spec = load_spec(spec_file, check_paths=node.data_root is None) if spec_file else None
    loaded = load_study(study, storage_url, parallel=True, local_spec=local_spec)
    run = dict(
        total_trials=n_trials or loaded.spec.budget.n_trials,
        timeout_s=timeout or loaded.spec.budget.timeout_s,
    )
    # Read before the pool is closed below: the children's trials are counted from here.
    first_number = len(loaded.study.get_trials(deepcopy=False)) if gpus is not None else 0
    # The worker (or each child) opens its own pool: close this one's idle connections, or
    # every worker process holds them for its whole run (docs/scale.md).
    loaded.storage.dispose()
    if gpus is None:
        progress = LineProgress(env(LABEL_ENV) or "")
        result = run_worker(
            study, storage_url, progress=progress, parallel=True, node=node,
            local_spec=local_spec, **run,
        )  # fmt: skip
        _finish(result.exit_code, result.outcome)
        return
    gpu_list = resolve_gpus(gpus)
    per_trial = loaded.spec.training.gpus_per_trial
    devices: list[str | None] = list(gpu_groups(gpu_list, per_trial)) if gpu_list else []
    if not devices:
        errors.print("warning: --gpus all: this node sees no GPU; running one CPU worker")
        devices = [None]
    code = run_worker_processes(study, storage_url, devices=devices, node=node, **run)
    _finish(code, run_outcome(loaded.study, first_number))


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
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Which of the study's batch sizes fit this device: a few training steps at each power
    of two with the study's model and optimizer, samples/s and peak memory; stored on the
    study per device name, so no worker on this kind of device trains a batch size that
    does not fit."""
    default_omp_wait_policy()  # before torch is imported
    from hpo.device import start_on_this_node
    from hpo.probe import probe_study
    from hpo.storage import resolve_storage_url
    from hpo.study import load_or_create_study

    node = node_settings(None, device, threads, None)
    loaded = load_or_create_study(study, resolve_storage_url(storage))
    spec = loaded.spec.on_node(node)
    setup = start_on_this_node(spec.training)
    result, cap = probe_study(loaded.ref, spec, setup, steps=steps)
    print_probe(result, cap)
