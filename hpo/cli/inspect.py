"""Commands that read a study: ``status``, ``report``, ``dashboard``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hpo.cli.app import StorageOption, StoredStudyOption, app, console, errors, user_errors
from hpo.cli.render import print_report, print_summary


@app.command()
@user_errors
def status(study: StoredStudyOption, storage: StorageOption = None) -> None:
    """Trials by state, the best trial, and the best value per batch size."""
    from hpo.api import load

    result = load(study, storage=storage)
    print_summary(result.study, result.spec.objective.metric)


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


@app.command()
@user_errors
def dashboard(
    storage: StorageOption = None,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help=(
                "Address to listen on. Any address but 127.0.0.1/localhost needs credentials "
                "($HPO_DASHBOARD_USER and $HPO_DASHBOARD_PASSWORD, or --auth-file) or --no-auth."
            ),
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8080,
    artifacts: ArtifactsOption = None,
    auth_file: Annotated[
        Path | None,
        typer.Option(
            "--auth-file",
            help=(
                "File whose first line is USER:PASSWORD for HTTP basic auth (instead of "
                "$HPO_DASHBOARD_USER / $HPO_DASHBOARD_PASSWORD). Given credentials are "
                "required on every address, loopback included."
            ),
            show_default=False,
        ),
    ] = None,
    no_auth: Annotated[
        bool,
        typer.Option(
            "--no-auth",
            help="Serve without credentials even beyond loopback (everyone may write).",
        ),
    ] = False,
    read_only: Annotated[
        bool,
        typer.Option(
            "--read-only",
            help="Refuse every write: notes, deletes, user attributes, uploads (HTTP 403).",
        ),
    ] = False,
) -> None:
    """Serve optuna-dashboard for every study in the storage, until Ctrl-C."""
    from hpo.dashboard import (
        choose_credentials,
        default_artifact_dir,
        describe,
        make_server,
        serve,
    )
    from hpo.storage import resolve_storage_url

    storage_url = resolve_storage_url(storage)
    artifact_dir = artifacts or default_artifact_dir(storage_url)
    credentials, warning = choose_credentials(host, auth_file, no_auth)
    if warning:
        errors.print(warning, markup=False)
    server = make_server(
        storage_url,
        host=host,
        port=port,
        artifact_dir=artifact_dir,
        credentials=credentials,
        read_only=read_only,
    )
    summary = describe(
        storage_url, host, port, artifact_dir, auth=credentials is not None, read_only=read_only
    )
    console.print(summary, markup=False, soft_wrap=True)
    serve(server)


OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Directory for the PNG/HTML figures and summary.md. Default: ./reports/STUDY.",
        show_default=False,
    ),
]
AttachOption = Annotated[
    bool,
    typer.Option(
        "--attach/--no-attach",
        help="Also put the figures, PNGs and summary on the study for `hpo dashboard`.",
    ),
]
TopKOption = Annotated[
    int,
    typer.Option(
        "--top-k",
        min=1,
        help=(
            "Best complete trials per batch size the report draws from; those of them "
            "within 1% of the batch size's best average into its point of the "
            "lr* ∝ B^α fit."
        ),
    ),
]
CostToleranceOption = Annotated[
    float,
    typer.Option(
        "--cost-tolerance",
        min=0.0,
        help=(
            "How close to the best value (a share of it: 0.01 = within 1%) a faster "
            "trial must come to be named in the cost view's sentence."
        ),
    ),
]


@app.command()
@user_errors
def report(
    study: Annotated[str, typer.Option("--study", help="Name of a study in the storage.")],
    storage: StorageOption = None,
    out: OutOption = None,
    artifacts: ArtifactsOption = None,
    attach: AttachOption = True,
    top_k: TopKOption = 3,
    cost_tolerance: CostToleranceOption = 0.01,
    track: Annotated[
        bool,
        typer.Option(
            "--track",
            help="Also log the report's files to the study's MLflow parent run at "
            "$MLFLOW_TRACKING_URI, for a study tracked with --track (a study file's "
            "[tracking] mlflow is used without it).",
        ),
    ] = False,
) -> None:
    """Figures of how the best learning rate scales with batch size (α in lr* ∝ B^α), the
    objective over batch size × learning rate, generalization gap, learning curves,
    parameter importances, the gradient noise scale against the LR ridge (the critical
    batch size) and value vs time to train (the Pareto front), as PNG + HTML with a
    markdown summary."""
    from hpo.dashboard import default_artifact_dir
    from hpo.paths import check_writable_dir, safe_component
    from hpo.report import run_report
    from hpo.storage import resolve_storage_url

    storage_url = resolve_storage_url(storage)
    track_uri = _tracking_uri(track)  # before any file is written
    out_dir = out or Path("reports") / safe_component(study)
    check_writable_dir(out_dir, "--out")
    artifact_dir = (artifacts or default_artifact_dir(storage_url)) if attach else None
    result = run_report(
        study,
        storage_url,
        out_dir,
        artifact_dir=artifact_dir,
        top_k=top_k,
        cost_tolerance=cost_tolerance,
    )
    print_report(result, study, storage_url, attached=artifact_dir)
    _log_report_to_mlflow(study, storage_url, result.files, track_uri)


def _tracking_uri(track: bool) -> str | None:
    """``--track``'s MLflow tracking URI ($MLFLOW_TRACKING_URI); SettingsError without it."""
    from hpo.settings import MLFLOW_URI_ENV, SettingsError, env

    if not track:
        return None
    uri = env(MLFLOW_URI_ENV)
    if not uri:
        raise SettingsError(f"--track needs ${MLFLOW_URI_ENV} (the MLflow tracking URI)")
    return uri


def _log_report_to_mlflow(
    study: str, storage_url: str, files: list[Path], track_uri: str | None
) -> None:
    """The report's files on the study's MLflow parent run, for a study tracked there: at
    the study file's ``[tracking] mlflow``, else (``--track``) at ``track_uri``."""
    from hpo.api import load
    from hpo.errors import UserError

    try:
        uri = load(study, storage=storage_url).spec.tracking.mlflow
    except UserError:  # a study made by other means: no spec, no tracking
        uri = None
    uri = uri or track_uri
    if uri is not None:
        from hpo.tracking import log_report

        log_report(uri, study, files)
        console.print(f"logged {len(files)} report files to MLflow run of study {study}")
