"""The device a worker trains on: chosen once at start, one out-of-memory predicate, and
freeing memory after an OOM.

``select_device`` only decides (it changes nothing in the process); ``configure_process``
applies the process-wide settings that go with the decision (thread count, cuDNN/TF32
flags, glibc's allocator thresholds) and is called by entry points only: the CLI commands
and the worker's main. CUDA gets AMP (bf16 where supported, else fp16 with a grad scaler),
channels_last and cudnn.benchmark; a CPU gets channels_last and bf16 autocast when it has
bf16 instructions. On this project's reference CPU (AMD EPYC, avx512_bf16) that was 3.9×
for a small CNN and 1.9× for ResNet-18 over fp32 NCHW; ``training.mixed_precision = false``
turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
from dataclasses import dataclass

import torch

from hpo.compat import cpu_supports_bf16
from hpo.errors import UserError
from hpo.settings import CUDA_VISIBLE_ENV, env
from hpo.spec import TrainingSpec


class DeviceUnavailable(UserError):
    """The study (or this node's ``--device``) asks for a device this node does not have."""


@dataclass(frozen=True)
class DeviceSetup:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    @property
    def name(self) -> str:
        """A device kind name (``cpu``, ``NVIDIA H100 80GB HBM3``) for stored results and
        per-device batch-size caps: all GPUs of one kind share a name."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    @property
    def uses_grad_scaler(self) -> bool:
        return self.device.type == "cuda" and self.amp_dtype == torch.float16

    @property
    def precision(self) -> str:
        """``bfloat16``, ``float16`` or ``float32``: what the forward pass computes in."""
        return str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "float32"


def select_device(training: TrainingSpec) -> DeviceSetup:
    """The device and numerics a trial runs with, from the spec and what is present.

    Raises DeviceUnavailable (one line, exit 2 in the CLI) when CUDA is asked for and no
    GPU is visible. Changes nothing in the process (see ``configure_process``).
    """
    want_cuda = training.device == "cuda" or (
        training.device == "auto" and torch.cuda.is_available()
    )
    if want_cuda:
        if not torch.cuda.is_available():
            visible = env(CUDA_VISIBLE_ENV)
            raise DeviceUnavailable(
                "training.device: cuda requested but no GPU is visible on this node"
                + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
                + "; run this worker on a GPU node, or set --device cpu / HPO_DEVICE=cpu here"
            )
        amp = None
        if training.mixed_precision:
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return DeviceSetup(torch.device("cuda"), amp, training.channels_last)
    amp = torch.bfloat16 if training.mixed_precision and cpu_supports_bf16() else None
    return DeviceSetup(torch.device("cpu"), amp, training.channels_last)


def configure_process(setup: DeviceSetup, num_threads: int | None = None) -> None:
    """Process-wide settings for training on ``setup``. Entry points only."""
    if num_threads:
        torch.set_num_threads(num_threads)
    if setup.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory_in_process()


@functools.cache
def keep_freed_memory_in_process() -> None:
    """Stop glibc from handing freed blocks over 128 KiB back to the OS (Linux, CPU training).

    On CPU every batch and activation is such a block: glibc unmaps it when freed and the
    next step page-faults fresh zeroed pages back in. Raising the mmap and trim thresholds
    (what jemalloc/tcmalloc do for PyTorch's CPU recipes) keeps them in the heap. Measured
    here: input pipeline (64×3×96×96 batches, 2 threads) 4.5k → 11k samples/s.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's maximum on 64-bit
    libc.mallopt(m_trim_threshold, 1 * 2**30)


def is_out_of_memory(error: BaseException) -> bool:
    """The one test for "this ran out of memory": CUDA's OOM, Python's MemoryError, or a
    CPU allocation failure (which torch raises as a plain RuntimeError)."""
    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def release_device_memory(device_type: str) -> None:
    """Drop unreachable tensors and hand cached CUDA blocks back after an OOM. Call it
    outside the ``except`` block: the traceback holds the activations until then."""
    gc.collect()
    if device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def start_on_this_node(training: TrainingSpec) -> DeviceSetup:
    """``select_device`` then ``configure_process``: what an entry point calls once
    before it trains or measures (raises DeviceUnavailable before anything runs)."""
    setup = select_device(training)
    configure_process(setup, training.num_threads)
    return setup


def autocast(setup: DeviceSetup) -> torch.autocast:
    """The autocast context a forward pass runs under: ``setup``'s AMP dtype, or off."""
    if setup.amp_dtype is None:
        return torch.autocast(setup.device.type, enabled=False)
    return torch.autocast(setup.device.type, dtype=setup.amp_dtype)
