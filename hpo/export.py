"""The answer, out: a study's best configuration as plain data for the user's own training code.

``best_configuration`` reads the finished trials (nothing is trained) and returns a dict of
plain values: the batch size, learning rate and weight decay of the best complete trial (or
of the best one at a given batch size), the fixed settings it trained with (optimizer,
momentum, epochs, model, precision), the metric and its value, the trial's number, and the
best-per-batch-size table. ``dump_configuration`` writes it as JSON or TOML, chosen by the
file's extension. Keys whose value is unknown (a batch size with no complete trial) are left
out rather than written as null, so the JSON and the TOML forms hold the same data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo import atomic
from hpo.errors import UserError

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from hpo.report.summary import BatchSizeRow, StudySummary
    from hpo.spec import StudySpec

FORMATS = {".json": "json", ".toml": "toml"}


class ExportError(UserError):
    """Nothing to export (no complete trial, no trial at the asked batch size) or an output
    file whose format is not known."""


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


# The prediction's keys an export at a trained batch size gives beside its trial's values.
BESIDE_THE_TRIAL = (
    "lr_interval",
    "weight_decay_interval",
    "extrapolated",
    "model_of_scaling",
    "model_of_weight_decay",
)


def best_configuration(
    study: optuna.Study, spec: StudySpec, *, batch_size: int | None = None
) -> dict[str, Any]:
    """The best complete trial's configuration, or the best at ``batch_size`` (the batch
    size the trial actually trained with, after any device cap).

    Raises ExportError when the study has no complete trial, or none at ``batch_size``
    (the message lists the batch sizes that have one).
    """
    from hpo.report.analysis import summarize, trial_batch_size

    metric = spec.objective.metric
    summary = summarize(study, metric)
    if summary.best is None:
        raise ExportError(
            f"study {summary.study_name!r} has no complete trial yet: nothing to export"
        )
    if batch_size is not None and not _has_complete(summary, batch_size):
        return _predicted_configuration(study, spec, summary, batch_size)
    best = summary.best if batch_size is None else _best_at(study, summary, batch_size)

    model = None if spec.model is None else spec.model.model_dump(mode="json", exclude_none=True)
    configuration: dict[str, Any] = {
        "study": summary.study_name,
        "trial": best.number,
        "metric": metric,
        # Past two classes, what the metric is (as hpo status and the report say it).
        "metric_description": (
            summary.metric_description if summary.metric_description != metric else None
        ),
        "direction": summary.direction,
        "value": best.value,
        "batch_size": trial_batch_size(best),
        "lr": best.params.get("lr"),
        "weight_decay": best.params.get("weight_decay"),
        "optimizer": spec.search.optimizer,
        "momentum": spec.search.momentum if spec.search.optimizer == "sgd" else None,
        "epochs": spec.budget.epochs,
        "epochs_completed": best.user_attrs.get("epochs_completed"),
        "precision": best.user_attrs.get("precision"),
        "model": model,
        "trainer": spec.trainer.function,  # None (left out): hpo's built-in trainer
        # The study file's [search.extra.NAME] values of this trial (left out: none).
        "extra": {name: best.params[name] for name in spec.search.extra if name in best.params}
        or None,
        "by_batch_size": [_row(row) for row in summary.by_batch_size],
    }
    evidence = _evidence(study, summary, trial_batch_size(best))
    configuration["source"] = "trial"
    prediction = evidence.pop("prediction", None)
    if prediction is not None:  # the model's intervals at this batch size, beside the trial
        for key in BESIDE_THE_TRIAL:
            configuration[key] = prediction.get(key)
    configuration["prediction"] = prediction
    configuration.update(evidence)
    return _without_none(configuration) | study_cost(summary)


def _has_complete(summary: StudySummary, batch_size: int) -> bool:
    return any(
        r.batch_size == batch_size and r.best_trial is not None for r in summary.by_batch_size
    )


def _evidence(study: optuna.Study, summary: StudySummary, batch_size: int | None) -> dict[str, Any]:
    """What backs the answer at ``batch_size``: the scaling model's prediction there (LR and
    weight decay with 80% intervals, the model's name, whether it extrapolates) and the
    critical batch size two ways with the verdict (``hpo.report.critical_batch``), and the
    seed-to-seed spread (``seed_spread``, ``hpo.report.noise_floor``; without replicates,
    why there is none).
    All of it but the spread from the search's trials (replicates left out)."""
    from hpo.replicates import without_replicates
    from hpo.report.analysis import trial_batch_size
    from hpo.report.critical_batch import (
        direct_verdict,
        measured_interval,
        ridge_interval,
        verdict,
    )
    from hpo.report.noise_scale import fit_lr_ridge, measured_b_simple
    from hpo.report.prediction import predict_from_fit, stored_optimizer
    from hpo.report.scaling import fit_lr_scaling
    from hpo.report.steps_to_target import measure_steps_to_target
    from hpo.report.weight_decay import weight_decay_view

    spread = seed_spread(study, summary)
    study = without_replicates(study)
    fit = fit_lr_scaling(study)
    trials = study.get_trials(deepcopy=False)
    maximize = summary.direction == "maximize"
    view = weight_decay_view(trials, maximize, summary.class_counts)
    ridge = fit_lr_ridge(list(fit.points))
    measured = measured_b_simple(study, top_k=fit.top_k, batch_size_of=trial_batch_size)
    direct = measure_steps_to_target(trials, maximize, trial_batch_size)
    evidence: dict[str, Any] = {
        "critical_batch_size": _without_none(
            {
                "steps_to_target": _steps_to_target(direct),
                "b_simple": _value_interval(measured.value, measured_interval(measured)),
                "verdict": direct_verdict(direct, measured).word,  # steps to target vs B_simple
                "ridge_b_noise": _value_interval(ridge.b_noise, ridge_interval(ridge)),
                "ridge_verdict": verdict(ridge, measured).word,
            }
        )
    }
    if batch_size is not None:
        optimizer = stored_optimizer(study.user_attrs)
        prediction = predict_from_fit(fit, batch_size, view, optimizer)
        if prediction is not None:
            evidence["prediction"] = _prediction_keys(prediction)
    evidence["seed_spread"] = spread
    return evidence


def seed_spread(study: optuna.Study, summary: StudySummary) -> dict[str, Any]:
    """The noise floor as plain data (``NoiseFloor.as_dict``): without replicates, why
    (``none``)."""
    from hpo.replicates import why_no_replicates
    from hpo.report.noise_floor import noise_floor

    maximize = summary.direction == "maximize"
    trials = study.get_trials(deepcopy=False)
    why = why_no_replicates(study)
    return noise_floor(trials, summary.by_batch_size, maximize, why_none=why).as_dict()


def _value_interval(
    value: float | None, interval: tuple[float, float] | None
) -> dict[str, Any] | None:
    """{value, interval [low, high]}: an interval with no upper end has high None (JSON
    null; ``inf`` in TOML) and gives its ``lower_bound`` too; no interval, None."""
    if value is None:
        return None
    return {"value": value} | _interval(interval)


def _interval(interval: tuple[float, float] | None) -> dict[str, Any]:
    if interval is None:
        return {"interval": None}
    low, high = interval
    if math.isfinite(high):
        return {"interval": [low, high]}
    return {"interval": [low, None], "lower_bound": low}


def _steps_to_target(direct: Any) -> dict[str, Any] | None:
    """B_crit from steps to target as {value, interval}; above the studied range, no finite
    value (None) and an interval with only its lower end."""
    if direct.b_crit is not None and math.isfinite(direct.b_crit):
        return _value_interval(direct.b_crit, direct.interval)
    if direct.low is not None and math.isfinite(direct.low):
        return {"value": None} | _interval((direct.low, math.inf))
    return None


def _prediction_keys(prediction: Any) -> dict[str, Any]:
    return _without_none(
        {
            "lr": prediction.lr,
            "lr_interval": list(prediction.lr_interval) if prediction.lr_interval else None,
            "weight_decay": prediction.weight_decay,
            "weight_decay_interval": (
                list(prediction.weight_decay_interval) if prediction.weight_decay_interval else None
            ),
            "weight_decay_note": prediction.weight_decay_note,
            "extrapolated": prediction.extrapolated,
            "model_of_scaling": prediction.model_of_scaling,
            "model_of_weight_decay": prediction.model_of_weight_decay,
            "weight_decay_leave_one_batch_size_out_error_log2": (
                prediction.weight_decay_leave_one_out_error
            ),
            "leave_one_batch_size_out_error_log2": prediction.leave_one_out_error,
        }
    )


def _predicted_configuration(
    study: optuna.Study, spec: StudySpec, summary: StudySummary, batch_size: int
) -> dict[str, Any]:
    """The configuration predicted at a batch size no complete trial trained (inside or
    outside the studied range); ExportError when the study cannot predict (fewer than three
    batch sizes with complete trials)."""
    evidence = _evidence(study, summary, batch_size)
    prediction = evidence.pop("prediction", None)
    if prediction is None:
        known = ", ".join(
            str(r.batch_size) for r in summary.by_batch_size if r.best_trial is not None
        )
        raise ExportError(
            f"--batch-size {batch_size}: no complete trial at that batch size in study "
            f"{summary.study_name!r} (batch sizes with one: {known or 'none'}), and a prediction "
            "needs complete trials at three or more batch sizes"
        )
    configuration: dict[str, Any] = {
        "study": summary.study_name,
        "source": "prediction",
        "metric": spec.objective.metric,
        "direction": summary.direction,
        "batch_size": batch_size,
        **prediction,
        "optimizer": spec.search.optimizer,
        "momentum": spec.search.momentum if spec.search.optimizer == "sgd" else None,
        "epochs": spec.budget.epochs,
        "model": None
        if spec.model is None
        else spec.model.model_dump(mode="json", exclude_none=True),
        "trainer": spec.trainer.function,
        **evidence,
        "by_batch_size": [_row(row) for row in summary.by_batch_size],
    }
    return _without_none(configuration) | study_cost(summary)


def study_cost(summary: StudySummary) -> dict[str, Any]:
    """``{"cost": {"device_hours": h, "by_device": {device kind: h}}}``: what the study
    that produced the answer cost, over all its trials (``hpo.report.device_hours``); empty
    when no trial records its device time."""
    if not summary.device.n_trials:
        return {}
    return {"cost": summary.device.as_export()}


def _best_at(study: optuna.Study, summary: StudySummary, batch_size: int) -> FrozenTrial:
    """The best complete trial at ``batch_size``; ExportError listing the batch sizes that
    have one when it has none."""
    rows = {row.batch_size: row for row in summary.by_batch_size if row.best_trial is not None}
    if batch_size not in rows:
        known = ", ".join(str(b) for b in sorted(rows)) or "none"
        raise ExportError(
            f"--batch-size {batch_size}: no complete trial at that batch size in study "
            f"{summary.study_name!r} (batch sizes with one: {known})"
        )
    return next(
        t for t in study.get_trials(deepcopy=False) if t.number == rows[batch_size].best_trial
    )


def _row(row: BatchSizeRow) -> dict[str, Any]:
    """One batch size's line of the exported table (unknown values left out)."""
    return _without_none(
        {
            "batch_size": row.batch_size,
            "n_complete": row.n_complete,
            "n_pruned": row.n_pruned,
            "best_value": row.best_value,
            "lr": row.best_lr,
            "weight_decay": row.best_weight_decay,
            "trial": row.best_trial,
        }
    )


def export_format(path: Path) -> str:
    """``json`` or ``toml`` from the file's extension; ExportError naming the file otherwise."""
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise ExportError(
            f"--out {path}: unknown format {path.suffix or '(no extension)'!r}; "
            "use a file ending in .json or .toml"
        ) from None


def dumps_configuration(configuration: dict[str, Any], fmt: str) -> str:
    """The configuration as JSON (indented, for ``jq``) or TOML text."""
    if fmt == "json":
        return json.dumps(configuration, indent=2) + "\n"
    import tomli_w

    return tomli_w.dumps(_for_toml(configuration))


def _for_toml(value: Any) -> Any:
    """TOML has no null: a None entry of a table is left out, a None in an array (an
    interval's missing upper end) is ``inf``."""
    if isinstance(value, dict):
        return {k: _for_toml(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [math.inf if v is None else _for_toml(v) for v in value]
    return value


def write_configuration(configuration: dict[str, Any], path: Path) -> None:
    """Write the configuration to ``path`` in the format its extension names."""
    text = dumps_configuration(configuration, export_format(path))
    atomic.write_text(path, text, "--out")


def write_trials_csv(study: optuna.Study, path: Path) -> int:
    """Every trial as one CSV row through Optuna's own ``trials_dataframe``: number, state,
    value, start/end/duration, the sampled params (``params_lr``, ``params_log2_batch_size``,
    …) and the user attrs (``user_attrs_batch_size``, the per-epoch metrics,
    ``user_attrs_fail_reason``, …). Returns the number of rows."""
    frame = study.trials_dataframe(
        attrs=(
            "number",
            "state",
            "value",
            "datetime_start",
            "datetime_complete",
            "duration",
            "params",
            "user_attrs",
        )
    )
    with atomic.atomic_path(path, "--trials-csv") as temporary:
        frame.to_csv(temporary, index=False)
    return len(frame)
