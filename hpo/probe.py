"""``hpo probe``: which of the study's batch sizes fit this device, and how fast each trains.

A few training steps at every power-of-two batch size of the space, with the study's own
model, optimizer (SGD with momentum, or AdamW with its two moment buffers) and precision,
through ``hpo.train.train_step``, the step trials use. The table is stored on the study
per device name (``hpo_probe:<device name>``) and the largest size that fitted becomes
this device's batch-size cap (``hpo.caps``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hpo.caps import PROBE_ATTR_PREFIX, read_batch_cap, write_batch_cap
from hpo.data import DeviceBatcher, num_classes
from hpo.device import DeviceSetup, is_out_of_memory, release_device_memory, select_device
from hpo.errors import UserError
from hpo.spec import StudySpec, TrialParams
from hpo.storage import StudyRef
from hpo.train import build_model_on, make_optimizer, train_step


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


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _measure(
    spec: StudySpec, setup: DeviceSetup, batch_size: int, steps: int, warmup: int
) -> ProbeRow:
    """Time ``steps`` training steps at ``batch_size`` on random patches (after ``warmup``)."""
    size, device = spec.dataset.image_size, setup.device
    classes = num_classes(spec.dataset)  # the head the trials train, so the same memory
    torch.manual_seed(0)
    model = build_model_on(spec.model, setup, num_classes=classes)
    lr = math.sqrt(spec.search.lr_low * spec.search.lr_high)
    weight_decay = math.sqrt(spec.search.weight_decay_low * spec.search.weight_decay_high)
    optimizer = make_optimizer(model, spec.search, TrialParams(batch_size, lr, weight_decay))
    scaler = torch.amp.GradScaler("cuda", enabled=setup.uses_grad_scaler)
    batcher = DeviceBatcher(
        torch.full((3,), 128.0), torch.full((3,), 64.0), device, channels_last=setup.channels_last
    )
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, classes, (batch_size,))
    generator = torch.Generator().manual_seed(0)
    saved_bytes = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved_bytes
        saved_bytes += tensor.numel() * tensor.element_size()
        return tensor

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elapsed = 0.0
    for step in range(warmup + steps):
        saved_bytes = 0
        start = time.perf_counter()
        batch, targets = batcher(images, labels, generator)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = train_step(model, optimizer, scaler, setup, batch, targets)
        float(loss)  # waits for the device
        if step >= warmup:
            elapsed += time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        parameters = list(model.parameters())
        state = [value for entry in optimizer.state.values() for value in entry.values()]
        peak = 2 * _tensor_bytes(parameters) + _tensor_bytes(state)  # params, grads, state
        peak += saved_bytes + images.numel() * 4
    return ProbeRow(batch_size, True, steps * batch_size / elapsed, peak / 2**20)


def probe_batch_sizes(
    spec: StudySpec,
    *,
    setup: DeviceSetup | None = None,
    steps: int = 3,
    warmup: int = 1,
    measure: Callable[..., ProbeRow] | None = None,
) -> ProbeResult:
    """Try every power-of-two batch size of the study's space on this device, smallest
    first. A size that runs out of memory is freed and recorded as not fitting, and larger
    sizes are not tried (they would not fit either)."""
    setup = setup or select_device(spec.training)
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


def store_probe(study: StudyRef, result: ProbeResult) -> int | None:
    """Store the table and set this device's cap to the largest size that fitted; returns
    the cap now stored. A new probe replaces the cap (it is a fresh measurement); OOMs in
    trials lower it again afterwards."""
    study.set_user_attr(PROBE_ATTR_PREFIX + result.device_name, result.to_attr())
    if result.max_batch_size is not None:
        write_batch_cap(study, result.device_name, result.max_batch_size)
    return read_batch_cap(study, result.device_name)


def probe_study(
    study: StudyRef, spec: StudySpec, setup: DeviceSetup, *, steps: int = 3
) -> tuple[ProbeResult, int | None]:
    """``hpo probe``: probe ``spec``'s batch sizes on ``setup`` and store the result on
    the study. Returns the result and the cap now stored for this device. Raises a
    UserError for a study with ``[trainer] function``: the probe times hpo's own step,
    which says nothing of another trainer's memory."""
    if spec.trainer.function is not None:
        raise UserError(
            f"study {spec.name!r} trains with trainer.function = {spec.trainer.function!r}: "
            "hpo probe measures hpo's built-in trainer only (an out-of-memory trial of your "
            "trainer lowers this device's batch-size cap by itself)"
        )
    result = probe_batch_sizes(spec, setup=setup, steps=steps)
    return result, store_probe(study, result)
