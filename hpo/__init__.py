"""hpo: batch-size-fair hyperparameter search on Optuna.

The names a trainer function and a script use, imported on first use (``import hpo``
loads neither torch nor optuna):

- ``hpo.TrialContext``: what a ``[trainer] function`` is called with (``hpo.context``);
- ``hpo.gradient_sq_norm(model)``: the squared gradient norm ``ctx.noise`` takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpo.context import TrialContext, gradient_sq_norm

__all__ = ["TrialContext", "gradient_sq_norm"]

_LAZY = {"TrialContext": "hpo.context", "gradient_sq_norm": "hpo.context"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpo' has no attribute {name!r}")
