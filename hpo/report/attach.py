"""``attach_report``: put a written report on its study, where optuna-dashboard shows it.

Only public storage methods are used; the caller passes the storage and the study's id
(``load_study_for_report`` returns both), because an ``optuna.Study`` exposes neither.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

from hpo.report.figures import FIGURE_NAMES
from hpo.report.files import Report
from hpo.report.markdown import summary_markdown

# Prefix of the dashboard's graph-object ids and of the artifact files this module attaches,
# so re-running the report replaces its own figures and leaves others alone.
ATTACHED_PREFIX = "hpo-"


def attach_report(
    study: optuna.Study,
    report: Report,
    artifact_dir: Path,
    *,
    storage: BaseStorage,
    study_id: int,
) -> list[str]:
    """Put the report on the study so optuna-dashboard shows it: the plotly figures (as
    dashboard graph objects, stored in the study itself; the dashboard chooses their order),
    the PNGs (as study artifacts in the file-system store at ``artifact_dir``) and the
    summary (as the study's note, with the scaling PNG inline). Replaces what an earlier
    report attached. ``storage`` and ``study_id`` must be the study's own. Returns the
    graph-object ids.
    """
    from optuna_dashboard import save_note, save_plotly_graph_object

    from hpo.atomic import artifact_store

    artifact_dir.mkdir(parents=True, exist_ok=True)
    store = artifact_store(artifact_dir)

    graph_ids = []
    for name in FIGURE_NAMES:
        graph_id = f"{ATTACHED_PREFIX}{name}"
        save_plotly_graph_object(study, report.figures[name], graph_object_id=graph_id)
        graph_ids.append(graph_id)

    artifact_ids = {
        name: _upload_or_replace(
            study,
            store,
            report.png(name),
            f"{ATTACHED_PREFIX}{name}.png",
            storage.get_study_system_attrs(study_id),
        )
        for name in FIGURE_NAMES
    }

    note = summary_markdown(report.data, figure_links=False)
    note += (
        "\n![best learning rate per batch size]"
        f"(/artifacts/{study_id}/{artifact_ids['lr_scaling']})\n\n"
        "![value vs time to train]"
        f"(/artifacts/{study_id}/{artifact_ids['cost']})\n\n"
        "The interactive figures are on the study's main page, the PNGs under Study "
        "Artifacts there. Regenerate all of this with `hpo report`.\n"
    )
    save_note(study, note)
    return graph_ids


def _upload_or_replace(
    study: optuna.Study, store: Any, path: Path, filename: str, attrs: dict[str, Any]
) -> str:
    """Upload ``path`` as the study artifact ``filename``; if an earlier report attached one
    under that name (found in the study's system ``attrs``), overwrite its content in place
    (same id, so links to it stay valid).

    Deleting the old one instead is not an option: optuna-dashboard deletes by setting the
    meta attribute to null, which ``optuna.artifacts.get_all_artifact_meta`` cannot read.
    """
    from optuna.artifacts import upload_artifact

    for key, value in attrs.items():
        if not key.startswith("artifacts:") or not isinstance(value, str):
            continue
        meta = json.loads(value)
        if meta and meta.get("filename") == filename:
            with path.open("rb") as content:
                store.write(meta["artifact_id"], content)
            return str(meta["artifact_id"])
    # Optuna names the artifact after the file: a copy under that name, outside the
    # report's directory (which must hold only whole report files).
    with tempfile.TemporaryDirectory(prefix=".hpo-upload.") as scratch:
        named = Path(scratch) / filename
        named.write_bytes(path.read_bytes())
        return upload_artifact(artifact_store=store, file_path=str(named), study_or_trial=study)
