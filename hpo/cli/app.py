"""The Typer application, the options commands share, and how errors reach the user.

Every error a user can cause (bad study file, missing data, unreachable storage, a device
this node lacks) is printed as one line naming the file or field, with exit code 2 and no
traceback; a run that cannot go on (``RunAborted``: the SQLite file deleted under it) is
one line and exit code 1.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console

from hpo.errors import RunAborted, UserError
from hpo.secrets import mask_secrets
from hpo.settings import NodeSettings

app = typer.Typer(
    name="hpo",
    help=(
        "Hyperparameter optimization for CNNs on histopathology patches: joint search over "
        "batch size (powers of two), learning rate and weight decay, on Optuna with SQL storage."
    ),
    no_args_is_help=True,
    # Markdown: the help reflows each docstring paragraph to the terminal instead of keeping
    # the source's line breaks (every command's summary spans several source lines).
    rich_markup_mode="markdown",
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
StoredStudyOption = Annotated[str, typer.Option("--study", help="Name of a study in the storage.")]
StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="SQLAlchemy URL of the study storage. Default: $HPO_STORAGE, else sqlite:///./hpo.db.",
        show_default=False,
    ),
]
DataRootOption = Annotated[
    Path | None,
    typer.Option(
        "--data-root",
        help="This node's dataset directory, in place of the study's dataset.root (default: $HPO_DATA_ROOT). Node-local: never a spec difference.",
        show_default=False,
    ),
]
DeviceOption = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="auto, cpu or cuda on this node, in place of the study's training.device (default: $HPO_DEVICE).",
        show_default=False,
    ),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads for training on this node (default: $HPO_NUM_THREADS, else the study's training.num_threads, else torch's choice).",
        show_default=False,
    ),
]
CheckpointDirOption = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint-dir",
        help="Checkpoint directory on this node (default: $HPO_CHECKPOINT_DIR, else the study's training.checkpoint_dir, else ./hpo-checkpoints). Must be shared for retries to resume on another node.",
        show_default=False,
    ),
]


TrackOption = Annotated[
    bool,
    typer.Option(
        "--track",
        help="Track the trials in MLflow at $MLFLOW_TRACKING_URI when the study file has no [tracking] mlflow (needs hpo[mlflow]).",
    ),
]


def node_settings(
    data_root: Path | None,
    device: str | None,
    threads: int | None,
    checkpoint_dir: Path | None,
    track: bool = False,
) -> NodeSettings:
    return NodeSettings.from_env(
        data_root=data_root, device=device, num_threads=threads, checkpoint_dir=checkpoint_dir,
        track=track,
    )  # fmt: skip


def setup_logging() -> None:
    """Worker log lines as plain messages; Optuna's own INFO lines off (hpo prints its own)."""
    import optuna

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_mask_record)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _mask_record(record: logging.LogRecord) -> bool:
    """Every log line without a password in it (a driver's message may quote a URL)."""
    record.msg, record.args = mask_secrets(record.getMessage()), None
    return True


def one_line(message: str) -> str:
    """A message as one line, however it was built (a file name or a value from the file
    may hold a newline or a control character): escaped, secrets masked, and cut at 1000
    characters."""
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in message)
    text = mask_secrets(text)
    return text if len(text) <= 1000 else text[:997] + "..."


def user_errors(function: F) -> F:
    """Turn the errors a user can cause into one line on stderr and exit code 2."""

    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return function(*args, **kwargs)
        except UserError as error:
            errors.print(f"error: {one_line(str(error))}", markup=False)
            raise typer.Exit(2) from None
        except RunAborted as error:
            errors.print(f"error: {one_line(str(error))}", markup=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            errors.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
