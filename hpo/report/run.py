"""What ``hpo report`` does, callable from Python: load the study once, write the files,
attach them."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import optuna
from optuna.storages import BaseStorage

from hpo.errors import UserError
from hpo.report.analysis import DEFAULT_CONFIDENCE, DEFAULT_TOP_K
from hpo.report.attach import attach_report
from hpo.report.cost import DEFAULT_COST_TOLERANCE
from hpo.report.files import Report, write_report


class ReportError(UserError):
    """A study ``hpo report`` cannot answer for (one line, exit 2)."""


def load_study_for_report(
    study_name: str, storage_url: str
) -> tuple[optuna.Study, BaseStorage, int, str]:
    """The study, its storage and id (which ``attach_report`` needs), and the name of its
    objective (from the spec ``hpo launch`` stored on it; "objective" for a study made by
    other means). Raises StudyNotFound if it is not there."""
    from hpo.storage import SPEC_ATTR
    from hpo.study import open_study

    study, ref = open_study(study_name, storage_url)
    if len(study.directions) != 1:
        raise ReportError(
            f"study {study_name!r} has {len(study.directions)} objectives: hpo report answers "
            "studies of one objective (the batch-size/LR answer is about one metric)"
        )
    metric = "objective"
    stored = study.user_attrs.get(SPEC_ATTR)
    if isinstance(stored, str):
        with contextlib.suppress(ValueError, AttributeError):
            metric = json.loads(stored).get("objective", {}).get("metric", metric)
    return study, ref.storage, ref.study_id, metric


def run_report(
    study_name: str,
    storage_url: str,
    out_dir: Path,
    *,
    artifact_dir: Path | None,
    top_k: int = DEFAULT_TOP_K,
    confidence: float = DEFAULT_CONFIDENCE,
    cost_tolerance: float = DEFAULT_COST_TOLERANCE,
) -> Report:
    """What ``hpo report`` does: load the study, write the files, and attach them to the
    study unless ``artifact_dir`` is None."""
    study, storage, study_id, metric = load_study_for_report(study_name, storage_url)
    report = write_report(
        study, out_dir, metric, top_k=top_k, confidence=confidence, cost_tolerance=cost_tolerance
    )
    if artifact_dir is not None:
        attach_report(study, report, artifact_dir, storage=storage, study_id=study_id)
    return report
