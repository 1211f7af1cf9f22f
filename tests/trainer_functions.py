"""Trainer functions for tests/test_trainer.py and tests/test_extra_params.py: most end a
trial the way a misbehaving user's code might (``[trainer] function =
"tests.trainer_functions:NAME"``); ``records_params`` keeps what it was given."""

from __future__ import annotations

import math

import hpo


def raises(ctx: hpo.TrialContext) -> float:
    ctx.report(0.5)
    raise ValueError("the team's data loader broke")


def returns_nan(ctx: hpo.TrialContext) -> float:
    ctx.report(0.5)
    return math.nan


def reports_nan(ctx: hpo.TrialContext) -> float:
    ctx.report(math.nan)
    return 0.5


def never_reports(ctx: hpo.TrialContext) -> float:
    return 0.5


def returns_none(ctx: hpo.TrialContext) -> None:
    for report in range(ctx.budget.reports):
        ctx.report(0.25 * (report + 1), samples=100 * (report + 1), updates=10 * (report + 1))


def records_params(ctx: hpo.TrialContext) -> float:
    """Stores ``ctx.params`` (each value and its type's name) as user attrs."""
    for name, value in ctx.params.items():
        ctx.set_user_attr(f"seen_{name}", [value, type(value).__name__])
    ctx.report(0.5)
    return 0.5
