"""hpo: batch-size-fair hyperparameter search on Optuna.

The names a trainer function and a script use, imported on first use (``import hpo``
loads neither torch nor optuna):

- ``hpo.launch(study, ...)`` and ``hpo.load(study, ...)``: run or read a study, returning
  a ``hpo.StudyResult`` (``.best``, ``.per_batch_size()``, ``.export()``, ``.report()``;
  ``hpo.api``, docs/python-api.md);
- ``hpo.TrialContext``: what a ``[trainer] function`` is called with (``hpo.context``);
- ``hpo.gradient_sq_norm(model)``: the squared gradient norm ``ctx.noise`` takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpo.api import StudyResult, launch, load
    from hpo.context import TrialContext, gradient_sq_norm

__all__ = ["StudyResult", "TrialContext", "gradient_sq_norm", "launch", "load"]

_LAZY = {
    "StudyResult": "hpo.api",
    "launch": "hpo.api",
    "load": "hpo.api",
    "TrialContext": "hpo.context",
    "gradient_sq_norm": "hpo.context",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpo' has no attribute {name!r}")
