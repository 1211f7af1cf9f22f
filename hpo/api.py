"""hpo from Python: ``hpo.launch`` and ``hpo.load``, both returning a ``StudyResult``.

``hpo launch`` and ``hpo status``/``export``/``report`` are these functions with a terminal
around them: the same study, the same checks (a bad study file or a storage that cannot be
opened raises a ``UserError`` with the one line the CLI prints), the same answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    import pandas

    from hpo.objective import TrialProgress
    from hpo.settings import NodeSettings
    from hpo.spec import StudySpec
    from hpo.study import Outcome


@dataclass
class StudyResult:
    """A study as ``hpo status``, ``hpo export`` and ``hpo report`` read it. After
    ``launch``, ``exit_code`` and ``outcome`` say how that run's trials ended (as the
    CLI's exit code does: 1 when trials ran and none finished COMPLETE or PRUNED)."""

    name: str
    storage: str
    study: optuna.Study
    spec: StudySpec
    exit_code: int = 0
    outcome: Outcome | None = field(default=None, repr=False)

    @property
    def best(self) -> dict[str, Any] | None:
        """The best complete trial: ``batch_size`` (as trained, after any device cap),
        ``lr``, ``weight_decay``, ``value`` and ``trial`` (its number); None before any
        trial completed."""
        from hpo.report.analysis import summarize, trial_batch_size

        best = summarize(self.study, self.spec.objective.metric).best
        if best is None:
            return None
        return {
            "batch_size": trial_batch_size(best),
            "lr": best.params["lr"],
            "weight_decay": best.params["weight_decay"],
            "value": best.value,
            "trial": best.number,
        }

    def per_batch_size(self) -> pandas.DataFrame:
        """The table ``hpo status`` prints, one row per batch size, as numbers: trials
        complete and pruned, the budget spent (in the study's unit), and the best trial's
        value, lr, weight decay, train − val gap, b_simple and number (NaN where none)."""
        import pandas

        from hpo.report.analysis import summarize

        summary = summarize(self.study, self.spec.objective.metric)
        rows = [
            {
                "batch_size": row.batch_size,
                "complete": row.n_complete,
                "pruned": row.n_pruned,
                f"{summary.budget_unit}_spent": row.spent,
                f"best_{summary.metric}": row.best_value,
                "lr": row.best_lr,
                "weight_decay": row.best_weight_decay,
                "gap": row.generalization_gap,
                "b_simple": row.best_b_simple,
                "trial": row.best_trial,
            }
            for row in summary.by_batch_size
        ]
        return pandas.DataFrame(rows).set_index("batch_size") if rows else pandas.DataFrame()

    def export(self, batch_size: int | None = None) -> dict[str, Any]:
        """The dict ``hpo export`` writes: the best configuration (or the best at
        ``batch_size``) and the best-per-batch-size table. Raises ExportError when there
        is no complete trial (at that batch size)."""
        from hpo.export import best_configuration

        return best_configuration(self.study, self.spec, batch_size=batch_size)

    def report(self, out: str | Path, *, attach: bool = False) -> Path:
        """Write ``hpo report``'s files (summary.md, PNG and HTML figures) to ``out``;
        returns the summary's path. ``attach`` also puts them on the study for the
        dashboard (the artifact store beside a SQLite file, else ./hpo-artifacts). A study
        tracked in MLflow also gets the files on its parent run."""
        from hpo.dashboard import default_artifact_dir
        from hpo.paths import check_writable_dir
        from hpo.report import run_report

        out_dir = Path(out)
        check_writable_dir(out_dir, "out")
        artifacts = default_artifact_dir(self.storage) if attach else None
        written = run_report(self.name, self.storage, out_dir, artifact_dir=artifacts)
        if self.spec.tracking.mlflow is not None:
            from hpo.tracking import log_report

            log_report(self.spec.tracking.mlflow, self.name, written.files)
        return written.summary_path


def load(study: str, *, storage: str | None = None) -> StudyResult:
    """The stored study named ``study`` (``storage``: a URL, else ``$HPO_STORAGE``, else
    ./hpo.db). Raises StudyNotFound (a UserError) when it is not there."""
    from hpo.storage import resolve_storage_url
    from hpo.study import load_study

    url = resolve_storage_url(storage)
    loaded = load_study(study, url)
    return StudyResult(loaded.name, url, loaded.study, loaded.spec)


def launch(
    study: str | Path,
    *,
    storage: str | None = None,
    n_trials: int | None = None,
    workers: int = 1,
    timeout_s: float | None = None,
    node: NodeSettings | None = None,
    progress: Callable[[int], TrialProgress] | None = None,
    announce: Callable[[str], None] | None = None,
) -> StudyResult:
    """Create the study from its file (a name in ./studies or a path to a .toml) or
    continue it, and run ``n_trials`` more (default ``budget.n_trials``) in ``workers``
    local processes (1: in this process). Everything this node needs is checked first
    (UserError, nothing written). ``progress(n_trials)`` makes the in-process worker's
    progress display, ``announce`` is told what is about to run (the CLI prints both)."""
    from hpo.launcher import local_devices, prepare_launch, run_worker_processes
    from hpo.settings import NodeSettings
    from hpo.spec import load_spec
    from hpo.storage import mask_url, resolve_storage_url
    from hpo.study import count_finished, create_or_load_study, run_outcome
    from hpo.worker import run_worker

    node = node or NodeSettings()
    spec = load_spec(study, check_paths=node.data_root is None)
    url = resolve_storage_url(storage)  # a bad URL before any data is read
    splits = prepare_launch(spec, node, workers)  # every check before the study exists
    loaded = create_or_load_study(spec, url, parallel=workers > 1)
    already = count_finished(loaded.study)
    first_number = len(loaded.study.get_trials(deepcopy=False))
    new_trials = n_trials or spec.budget.n_trials
    if announce is not None:
        announce(
            f"study {spec.name} in {mask_url(url)}: {already} finished trials; running "
            f"{new_trials} more with {workers} worker(s)"
        )
    run = dict(total_trials=already + new_trials, timeout_s=timeout_s or spec.budget.timeout_s)
    # The worker (in this process or in each child) opens its own pool: close this one's
    # idle connection, or it sits on the database for the whole run (docs/scale.md).
    loaded.storage.dispose()
    if workers == 1:
        shown = progress(new_trials) if progress is not None else None
        with contextlib.ExitStack() as stack:
            if hasattr(shown, "__enter__"):  # a live display (the CLI's bar) opens and closes
                stack.enter_context(shown)  # type: ignore[arg-type]
            result = run_worker(spec.name, url, progress=shown, node=node, splits=splits, **run)
        code = result.exit_code
    else:
        del splits  # each child holds its own copy
        devices = local_devices(workers, spec.training.gpus_per_trial)
        code = run_worker_processes(spec.name, url, devices=devices, node=node, **run)
    outcome = run_outcome(loaded.study, first_number)
    return StudyResult(spec.name, url, loaded.study, spec, code, outcome)
