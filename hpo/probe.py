"""Which batch sizes fit this device, how fast each trains, and the per-device cap.

A study's batch-size range is written once, but the study runs on whatever devices join
it: B = 512 may fit an H100 and not a 16 GB card. ``hpo probe`` runs a few training steps
at every power-of-two batch size of the space on this device and stores, on the study, a
table per device name and the largest batch size that fitted (the *cap*). Two things
keep trials inside the cap:

- ``BatchSizeCapSampler`` wraps every sampler ``hpo`` builds: a drawn ``log2_batch_size``
  above this device's cap is clamped to the cap before the trial starts, and the trial
  records ``batch_size_clamped_from``. The stored parameter is the clamped value, so TPE
  learns from what was actually trained.
- A trial that still runs out of CUDA memory fails with ``fail_reason = "oom"`` and
  lowers the cap to half its batch size (``lower_batch_cap``); see ``hpo.train``.

Caps are study user attributes ``hpo_max_batch_size:<device name>`` (an int); probe tables
are ``hpo_probe:<device name>``. The device name is ``cpu`` or the CUDA device's name
(``NVIDIA H100 80GB HBM3``), so all GPUs of one kind share a cap. Torch is imported inside
the functions that measure, so the sampler wrapper stays cheap to import.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from hpo.spec import StudySpec

CAP_ATTR_PREFIX = "hpo_max_batch_size:"
PROBE_ATTR_PREFIX = "hpo_probe:"
BATCH_PARAM = "log2_batch_size"
CLAMPED_ATTR = "batch_size_clamped_from"


# --------------------------------------------------------------------------- caps


def _study_attrs(study: Study) -> dict[str, Any]:
    # Through the storage: Hyperband hands samplers a bracket view that hides user_attrs.
    return study._storage.get_study_user_attrs(study._study_id)


def read_batch_cap(study: Study, device_name: str) -> int | None:
    """The largest batch size known to fit ``device_name``, or None when nothing is known."""
    value = _study_attrs(study).get(CAP_ATTR_PREFIX + device_name)
    return None if value is None else int(value)


def write_batch_cap(study: Study, device_name: str, batch_size: int) -> None:
    study._storage.set_study_user_attr(study._study_id, CAP_ATTR_PREFIX + device_name, batch_size)


def lower_batch_cap(study: Study, device_name: str, failed_batch_size: int) -> int:
    """After an OOM at ``failed_batch_size``: the cap becomes at most half of it (never
    below 1, never raised). Returns the new cap. Concurrent workers may race here; each
    only ever lowers, so the stored cap ends at or below every failure's half."""
    lowered = max(1, failed_batch_size // 2)
    current = read_batch_cap(study, device_name)
    new_cap = lowered if current is None else min(current, lowered)
    write_batch_cap(study, device_name, new_cap)
    return new_cap


def clamp_batch_size(batch_size: int, cap: int | None) -> int:
    """The largest power of two ≤ ``cap`` when ``batch_size`` exceeds it, else unchanged."""
    if cap is None or batch_size <= cap:
        return batch_size
    return 2 ** int(math.log2(max(cap, 1)))


class BatchSizeCapSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler so it never hands out a batch size above this device's cap.

    Everything is delegated to ``base``; only a ``log2_batch_size`` above the cap is
    clamped (and the trial gets user attr ``batch_size_clamped_from``). ``device_name``
    may be a callable, resolved on first use, so building the sampler does not touch the
    device. The cap is re-read from the study for every trial: an OOM on another worker
    takes effect on the next trial here.
    """

    def __init__(
        self, base: optuna.samplers.BaseSampler, device_name: str | Callable[[], str]
    ) -> None:
        self.base = base
        self._device_name = device_name

    @property
    def device_name(self) -> str:
        if callable(self._device_name):
            self._device_name = self._device_name()
        return self._device_name

    def __str__(self) -> str:
        return f"BatchSizeCapSampler({self.base})"

    def _clamp(self, study: Study, trial: FrozenTrial, log2_batch_size: int) -> int:
        cap = read_batch_cap(study, self.device_name)
        batch_size = 2 ** int(log2_batch_size)
        clamped = clamp_batch_size(batch_size, cap)
        if clamped == batch_size:
            return int(log2_batch_size)
        study._storage.set_trial_user_attr(trial._trial_id, CLAMPED_ATTR, batch_size)
        return int(math.log2(clamped))

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
            params[BATCH_PARAM] = max(low, self._clamp(study, trial, params[BATCH_PARAM]))
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
            value = max(low, self._clamp(study, trial, value))
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
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


# --------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class ProbeRow:
    """One batch size on one device. ``peak_memory_mib`` is CUDA's peak allocation, or on
    CPU an estimate (parameters, gradients, optimizer state, input and the activations
    autograd saved), since CPU allocations have no resettable peak counter."""

    batch_size: int
    fits: bool
    samples_per_s: float | None
    peak_memory_mib: float | None
    note: str = ""


@dataclass(frozen=True)
class ProbeResult:
    device_name: str
    memory_method: str
    rows: list[ProbeRow]

    @property
    def max_batch_size(self) -> int | None:
        """The largest batch size that fitted (None when none did)."""
        fitting = [row.batch_size for row in self.rows if row.fits]
        return max(fitting) if fitting else None

    def to_attr(self) -> dict[str, Any]:
        return {
            "device_name": self.device_name,
            "memory_method": self.memory_method,
            "max_batch_size": self.max_batch_size,
            "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rows": [asdict(row) for row in self.rows],
        }


def release_device_memory(device_type: str) -> None:
    """Drop unreachable tensors and hand cached CUDA blocks back after an OOM."""
    import torch

    gc.collect()
    if device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA OOM, or a CPU allocation failure (which torch raises as RuntimeError)."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def _measure(spec: StudySpec, setup: Any, batch_size: int, steps: int, warmup: int) -> ProbeRow:
    """Time ``steps`` training steps at ``batch_size`` on random patches (after ``warmup``)."""
    import torch
    import torch.nn.functional as F

    from hpo.data import DeviceBatcher
    from hpo.models import build_model

    size = spec.dataset.image_size
    device = setup.device
    torch.manual_seed(0)
    model = build_model(spec.model.name).to(device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = math.sqrt(spec.search.lr_low * spec.search.lr_high)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=spec.search.momentum)
    batcher = DeviceBatcher(
        torch.full((3,), 128.0), torch.full((3,), 64.0), device, channels_last=setup.channels_last
    )
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 2, (batch_size,))
    generator = torch.Generator().manual_seed(0)
    saved_bytes = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved_bytes
        saved_bytes += tensor.numel() * tensor.element_size()
        return tensor

    autocast = (
        torch.autocast(device.type, dtype=setup.amp_dtype)
        if setup.amp_dtype is not None
        else torch.autocast(device.type, enabled=False)
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elapsed = 0.0
    for step in range(warmup + steps):
        saved_bytes = 0
        start = time.perf_counter()
        batch, targets = batcher(images, labels, generator)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
            loss = F.cross_entropy(model(batch).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss.detach())  # waits for the device
        if step >= warmup:
            elapsed += time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        peak = 3 * state_bytes + saved_bytes + images.numel() * 4  # param, grad, momentum
    return ProbeRow(batch_size, True, steps * batch_size / elapsed, peak / 2**20)


def probe_batch_sizes(
    spec: StudySpec,
    *,
    steps: int = 3,
    warmup: int = 1,
    measure: Callable[..., ProbeRow] | None = None,
) -> ProbeResult:
    """Try every power-of-two batch size of the study's space on this device, smallest
    first. A size that runs out of memory is freed and recorded as not fitting, and larger
    sizes are not tried (they would not fit either)."""
    from hpo.train import select_device

    setup = select_device(spec.training)
    measure = measure or _measure
    rows: list[ProbeRow] = []
    failed_at: int | None = None
    for batch_size in spec.search.batch_sizes:
        if failed_at is not None:
            rows.append(ProbeRow(batch_size, False, None, None, f"larger than {failed_at}"))
            continue
        out_of_memory = ""
        try:
            rows.append(measure(spec, setup, batch_size, steps, warmup))
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            out_of_memory = str(error).splitlines()[0][:120] if str(error) else "out of memory"
        if out_of_memory:  # outside the handler: the traceback's tensors are gone now
            release_device_memory(setup.device.type)
            rows.append(ProbeRow(batch_size, False, None, None, out_of_memory))
            failed_at = batch_size
    method = "cuda max_memory_allocated" if setup.device.type == "cuda" else "cpu estimate"
    return ProbeResult(setup.name, method, rows)


def store_probe(study: Study, result: ProbeResult) -> None:
    """Store the table and set this device's cap to the largest size that fitted.

    A new probe replaces the cap (it is a fresh measurement); OOMs in trials lower it
    again afterwards.
    """
    study.set_user_attr(PROBE_ATTR_PREFIX + result.device_name, result.to_attr())
    if result.max_batch_size is not None:
        write_batch_cap(study, result.device_name, result.max_batch_size)


def stored_caps(study: Study) -> dict[str, int]:
    """Every device's cap stored on the study: ``{device name: batch size}``."""
    return {
        key.removeprefix(CAP_ATTR_PREFIX): int(value)
        for key, value in _study_attrs(study).items()
        if key.startswith(CAP_ATTR_PREFIX)
    }


def probe_study(
    study: str, storage_url: str, *, steps: int = 3, warmup: int = 1
) -> tuple[ProbeResult, int | None]:
    """``hpo probe``: probe the study's batch sizes on this device and store the result.

    ``study`` names a study in the storage; when it is not there yet but a study file of
    that name exists, the study is created from the file (as ``hpo launch`` would), so a
    device can be probed before the first trial. Returns the result and the cap now
    stored for this device.
    """
    from hpo.spec import load_spec
    from hpo.worker import StudyNotFound, create_or_load_study, load_study

    try:
        loaded, spec = load_study(study, storage_url, parallel=False)
    except StudyNotFound:
        spec = load_spec(study)  # raises SpecError naming the file when there is none
        loaded = create_or_load_study(spec, storage_url, parallel=False)
    result = probe_batch_sizes(spec, steps=steps, warmup=warmup)
    store_probe(loaded, result)
    return result, read_batch_cap(loaded, result.device_name)
