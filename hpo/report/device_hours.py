"""What a study cost in device-hours: per study, per device kind and per batch size.

Every trial a worker runs records the device kind it ran on (user attr ``device``: ``cpu``
or the GPU's name, shared by all GPUs of one kind) and the device-seconds it held that
device in one user attr (``hpo.objective.record_device_time``), ``device_seconds`` =
{``held``: the whole of it (the parts below, the data preparation, resume and checkpoint
writes), ``train`` (training steps), ``eval`` (evaluation), ``idle`` (the worker waiting
for the claim that gave it this trial)}. Studies written before the attr held all four
store them flat: ``device_seconds`` (the whole) and ``device_seconds_train``, ``_eval``,
``_idle``; both are read. The study's total is the sum over its
trials of any state: a pruned or failed trial spent its device time too. Time no trial
records is not counted: a worker killed mid-trial (its attempt records nothing; the retry
records its own) and a worker's wait after its last trial. Pure: reads, draws nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from optuna.trial import FrozenTrial

from hpo.report.cost import device_kind, finite_number

# The user attr a trial's device time is stored in (hpo.objective.record_device_time).
DEVICE_SECONDS_ATTR = "device_seconds"
DEVICE_PARTS = ("train", "eval", "idle")
SECONDS_PER_HOUR = 3600.0


def device_seconds(trial: FrozenTrial) -> float | None:
    """The device-seconds a trial recorded; None when it recorded none (a trial still
    running, one from before hpo counted device time, or another tool's)."""
    return device_parts(trial).get("held")


def device_parts(trial: FrozenTrial) -> dict[str, float]:
    """The trial's device-seconds by part (``held``, the whole, and whichever of
    ``DEVICE_PARTS`` it recorded), from the one attr or the flat attrs of older studies;
    negative, non-finite or non-numeric values (another tool's) are left out."""
    attrs = trial.user_attrs
    stored = attrs.get(DEVICE_SECONDS_ATTR)
    if isinstance(stored, dict):
        parts = {key: finite_number(stored, key) for key in ("held", *DEVICE_PARTS)}
    else:
        parts = {"held": finite_number(attrs, DEVICE_SECONDS_ATTR)}
        for part in DEVICE_PARTS:
            parts[part] = finite_number(attrs, f"{DEVICE_SECONDS_ATTR}_{part}")
    return {key: value for key, value in parts.items() if value is not None and value >= 0}


@dataclass(frozen=True)
class DeviceHours:
    """A study's device-hours: in all, per device kind, per batch size (device kind
    within), per part (train, eval, idle, other), and how many trials recorded it."""

    hours: float = 0.0
    by_device: dict[str, float] = field(default_factory=dict)
    by_batch_size: dict[int, dict[str, float]] = field(default_factory=dict)
    by_part: dict[str, float] = field(default_factory=dict)
    n_trials: int = 0

    def batch_size_hours(self, batch_size: int) -> float | None:
        """Device-hours of one batch size's trials on every device kind together."""
        kinds = self.by_batch_size.get(batch_size)
        return sum(kinds.values()) if kinds else None

    def describe(self) -> str:
        """The study's cost in one sentence."""
        if not self.n_trials:
            return "Device-hours: no trial records its device time (device_seconds)."
        kinds = ", ".join(f"{kind} {hours:.3g} h" for kind, hours in self.by_device.items())
        parts = ", ".join(f"{part} {hours:.3g} h" for part, hours in self.by_part.items())
        return (
            f"Device-hours: {self.hours:.3g} over {self.n_trials} trials ({kinds}); "
            f"of which {parts}."
        )

    def as_export(self) -> dict[str, object]:
        """``{"device_hours": h, "by_device": {kind: h}}``, rounded to the second."""
        return {
            "device_hours": _round(self.hours),
            "by_device": {kind: _round(hours) for kind, hours in self.by_device.items()},
        }


def _round(hours: float) -> float:
    return round(hours, 6)


def device_hours(
    trials: Iterable[FrozenTrial], batch_size_of: Callable[[FrozenTrial], int | None]
) -> DeviceHours:
    """Sum the device time the ``trials`` recorded; kinds and batch sizes in sorted order,
    the parts in the order train, eval, idle, other. A trial that records seconds but no
    device kind counts under ``unknown``."""
    total, n_trials = 0.0, 0
    by_device: dict[str, float] = {}
    by_batch: dict[int, dict[str, float]] = {}
    parts = dict.fromkeys((*DEVICE_PARTS, "other"), 0.0)
    for trial in trials:
        recorded = device_parts(trial)
        seconds = recorded.get("held")
        if seconds is None:
            continue
        n_trials += 1
        total += seconds
        kind = device_kind(trial) or "unknown"
        by_device[kind] = by_device.get(kind, 0.0) + seconds
        batch_size = batch_size_of(trial)
        if batch_size is not None:
            mine = by_batch.setdefault(batch_size, {})
            mine[kind] = mine.get(kind, 0.0) + seconds
        counted = 0.0
        for part in DEVICE_PARTS:
            value = recorded.get(part, 0.0)
            parts[part] += value
            counted += value
        parts["other"] += max(0.0, seconds - counted)
    hour = SECONDS_PER_HOUR
    return DeviceHours(
        hours=total / hour,
        by_device={kind: by_device[kind] / hour for kind in sorted(by_device)},
        by_batch_size={
            b: {kind: s / hour for kind, s in sorted(by_batch[b].items())} for b in sorted(by_batch)
        },
        by_part={part: seconds / hour for part, seconds in parts.items()},
        n_trials=n_trials,
    )
