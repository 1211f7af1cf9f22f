"""The largest batch size known to fit each kind of device, stored on the study.

A study's batch-size range is written once, but the study runs on whatever devices join
it: B = 512 may fit an H100 and not a 16 GB card. The *cap* of a device kind is a study
user attr ``hpo_max_batch_size:<device name>`` (an int), set by ``hpo probe`` and lowered
after an out-of-memory trial. Two things keep trials inside it:

- ``BatchSizeCapSampler`` wraps every sampler a worker uses: a drawn ``log2_batch_size``
  above this device's cap is clamped to the cap before the trial starts, and the trial
  records ``batch_size_clamped_from``. The stored parameter is the clamped value, so TPE
  learns from what was actually trained.
- ``hpo.objective`` clamps once more with the cap read when the trial starts (an enqueued
  trial skips the sampler; another worker may have lowered the cap meanwhile), and after
  an OOM lowers the cap to half the failed batch size (``lower_batch_cap``).

The device name is ``cpu`` or the CUDA device's name (``NVIDIA H100 80GB HBM3``), so all
GPUs of one kind share a cap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from hpo.space import BATCH_PARAM
from hpo.storage import StudyRef

logger = logging.getLogger(__name__)

CAP_ATTR_PREFIX = "hpo_max_batch_size:"
PROBE_ATTR_PREFIX = "hpo_probe:"
CLAMPED_ATTR = "batch_size_clamped_from"


def cap_value(key: str, value: Any) -> int | None:
    """A stored cap as a batch size, or None when it is not a positive whole number.

    Anyone who can write the database can put anything in the attribute (a string, a
    list, 0): such a value is no cap, logged once per read, and the next OOM writes a
    valid one, instead of every trial failing on ``int(value)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        number = None
    else:
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number < 1 or number != int(number):
        logger.warning(
            "ignoring study attribute %s = %r: not a positive whole batch size", key, value
        )
        return None
    return int(number)


def read_batch_cap(study: StudyRef, device_name: str) -> int | None:
    """The largest batch size known to fit ``device_name``, or None when nothing is known."""
    key = CAP_ATTR_PREFIX + device_name
    value = study.user_attrs().get(key)
    return None if value is None else cap_value(key, value)


def write_batch_cap(study: StudyRef, device_name: str, batch_size: int) -> None:
    study.set_user_attr(CAP_ATTR_PREFIX + device_name, batch_size)


def lower_batch_cap(study: StudyRef, device_name: str, failed_batch_size: int) -> int:
    """After an OOM at ``failed_batch_size``: the cap becomes at most half of it (never
    below 1, never raised). Returns the new cap. Concurrent workers may race here; each
    only ever lowers, so the stored cap ends at or below every failure's half."""
    lowered = max(1, failed_batch_size // 2)
    current = read_batch_cap(study, device_name)
    new_cap = lowered if current is None else min(current, lowered)
    write_batch_cap(study, device_name, new_cap)
    return new_cap


def stored_caps(study: StudyRef) -> dict[str, int]:
    """Every device's cap stored on the study: ``{device name: batch size}``."""
    caps = {
        key.removeprefix(CAP_ATTR_PREFIX): cap_value(key, value)
        for key, value in study.user_attrs().items()
        if key.startswith(CAP_ATTR_PREFIX)
    }
    return {device: cap for device, cap in caps.items() if cap is not None}


def clamp_batch_size(batch_size: int, cap: int | None) -> int:
    """The largest power of two ≤ ``cap`` when ``batch_size`` exceeds it, else unchanged.
    The one clamp: the sampler and the objective both call it."""
    if cap is None or batch_size <= cap:
        return batch_size
    return 2 ** int(math.log2(max(cap, 1)))


class BatchSizeCapSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler so it never hands out a batch size above this device's cap.

    Everything is delegated to ``base``; only a ``log2_batch_size`` above the cap is
    clamped (and the trial gets user attr ``batch_size_clamped_from``). The cap is re-read
    from the storage for every trial: an OOM on another worker takes effect on the next
    trial here. The storage is held directly because samplers are handed a restricted
    view of the study (Hyperband's bracket study) that hides its user attrs.
    """

    def __init__(
        self,
        base: optuna.samplers.BaseSampler,
        storage: optuna.storages.BaseStorage,
        device_name: str,
    ) -> None:
        self.base = base
        self.storage = storage
        self.device_name = device_name

    def __str__(self) -> str:
        return f"BatchSizeCapSampler({self.base})"

    def _clamp(self, study: Study, trial: FrozenTrial, log2_batch_size: int, low: int) -> int:
        ref = StudyRef.by_name(self.storage, study.study_name)
        batch_size = 2 ** int(log2_batch_size)
        clamped = clamp_batch_size(batch_size, read_batch_cap(ref, self.device_name))
        if clamped == batch_size:
            return int(log2_batch_size)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(ref.study_id, trial.number)
        self.storage.set_trial_user_attr(trial_id, CLAMPED_ATTR, batch_size)
        return max(low, int(math.log2(clamped)))

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        params = self.base.sample_relative(study, trial, search_space)
        if BATCH_PARAM in params:
            params = dict(params)
            low = search_space[BATCH_PARAM].low  # type: ignore[attr-defined]
            params[BATCH_PARAM] = self._clamp(study, trial, params[BATCH_PARAM], low)
        return params

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        value = self.base.sample_independent(study, trial, param_name, param_distribution)
        if param_name == BATCH_PARAM:
            low = param_distribution.low  # type: ignore[attr-defined]
            value = self._clamp(study, trial, value, low)
        return value

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        if isinstance(self.base, optuna.samplers.GridSampler):
            # Its after_trial only calls study.stop() once the grid is done, which raises
            # outside study.optimize (hpo's worker runs its own ask/tell loop). The worker
            # asks GridSampler.is_exhausted before each claim instead (hpo.worker).
            return
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
