"""Worker processes on this machine: one per GPU (``--gpus``), or per group of
``training.gpus_per_trial`` GPUs (a data-parallel trial's ranks, ``hpo.distributed``), or
CPU workers sharing cores.

Each child is ``python -m hpo worker``; the storage URL and this node's settings go to it
in the environment, so a password never shows in ``ps``. SIGTERM/SIGINT are passed on to
the children, which re-queue their running trials and exit. ``prepare_launch`` is what
``hpo launch`` checks on this node before the study exists.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING

from hpo.errors import RunAborted, UserError
from hpo.settings import (
    CUDA_VISIBLE_ENV,
    LABEL_ENV,
    STORAGE_ENV,
    THREADS_SOURCES,
    TRUSTED_MODULES_ENV,
    NodeSettings,
    available_cores,
    check_cpu_count,
    env,
    environment,
)
from hpo.spec import StudySpec, check_data_root
from hpo.trust import trusted_modules

if TYPE_CHECKING:
    from hpo.data import PatchSet


class LaunchFailed(RunAborted):
    """A worker process could not be started (out of processes or memory)."""


class GpuSelectionError(UserError):
    """``--gpus`` names GPUs this node does not have."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` values."""
    visible = env(CUDA_VISIBLE_ENV)
    if visible is not None:
        return [device.strip() for device in visible.split(",") if device.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def resolve_gpus(gpus: str) -> list[str]:
    """``all``, or indices and ranges like ``0-3,6`` → CUDA_VISIBLE_DEVICES values, one per
    GPU. Indices count the GPUs this process sees (within an existing
    ``CUDA_VISIBLE_DEVICES``). ``all`` on a node without GPUs gives an empty list."""
    available = visible_gpus()
    if gpus.strip() == "all":
        return available
    chosen = []
    for part in gpus.split(","):
        first, dash, last = part.strip().partition("-")
        bounds = (first, last) if dash else (first, first)
        if not all(bound.isdigit() and int(bound) < len(available) for bound in bounds):
            raise GpuSelectionError(
                f"--gpus {gpus!r}: {part.strip()!r} is not a GPU index or range here (this "
                f"node sees {len(available)} GPU(s): indices 0..{len(available) - 1}; "
                "or use 'all')"
            )
        chosen += [available[i] for i in range(int(bounds[0]), int(bounds[1]) + 1)]
    if not chosen or len(set(chosen)) != len(chosen):
        raise GpuSelectionError(f"--gpus {gpus!r} names no GPU, or one GPU twice")
    return chosen


def gpu_groups(gpus: list[str], per_trial: int) -> list[str]:
    """``gpus`` in groups of ``per_trial`` (``training.gpus_per_trial``), one per worker
    process: a comma-separated ``CUDA_VISIBLE_DEVICES`` value each, ⌊len(gpus) / per_trial⌋
    of them; GPUs left over are not used. GpuSelectionError when there is not one group."""
    if len(gpus) < per_trial:
        raise GpuSelectionError(
            f"training.gpus_per_trial = {per_trial} but --gpus gives {len(gpus)} GPU(s)"
        )
    count = len(gpus) // per_trial
    return [",".join(gpus[i * per_trial : (i + 1) * per_trial]) for i in range(count)]


def python_module_command() -> list[str]:
    """``python -m hpo`` that does not put the working directory first on ``sys.path``
    (``-P``), so a stray ``x.py`` where the launch ran is never imported by a child, and
    a child imports exactly what a plain ``hpo worker`` would. (Python 3.10 has no
    ``-P``: the same by dropping the entry ``-c`` adds.)"""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", "hpo"]
    return [sys.executable, "-c", "import sys; del sys.path[0]; from hpo.cli import main; main()"]


def die_with_parent() -> dict[str, object]:
    """``Popen`` options that make a child get SIGTERM when this process dies, however it
    dies (SIGKILL, OOM killer): it then re-queues its trial and stops, instead of running
    on orphaned. Linux's ``PR_SET_PDEATHSIG``; elsewhere nothing (SIGTERM/SIGINT are still
    forwarded while this process lives)."""
    if not sys.platform.startswith("linux"):
        return {}
    parent = os.getpid()

    def arm() -> None:  # runs in the child, between fork and exec
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return {"preexec_fn": arm}


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """SIGTERM/SIGINT held back for the block and handled after it, by the handlers in
    place before it. Start a child and store its handle inside the block: a stop signal
    that arrives while the child starts is then handled once the handle is where the
    cleanup (``stop_children``) finds it. Without that, a handler that raises
    (``hpo.worker.StopSignal``) inside ``Popen`` leaves a started child nobody stops.

    Python runs signal handlers in the main thread whichever thread the signal reached,
    so the block swaps in a handler that only records; elsewhere than the main thread
    (where handlers cannot be set) it holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {
        number: signal.signal(number, lambda n, frame: arrived.append(n)) for number in STOP_SIGNALS
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(arrived):
            _deliver(number, previous[number])


def start_child(
    children: list[subprocess.Popen[bytes]], command: list[str], env: dict[str, str]
) -> None:
    """Start ``command`` so that it dies with this process (``die_with_parent``) and add
    its handle to ``children`` before a stop signal arriving meanwhile is handled
    (``stop_signals_held``): the caller's cleanup then always reaches it."""
    with stop_signals_held():
        children.append(subprocess.Popen(command, env=env, **die_with_parent()))


def _deliver(number: int, handler: object) -> None:
    """Handle signal ``number`` now, as ``handler`` (what ``signal.signal`` returned)
    would have when it arrived."""
    if callable(handler):
        handler(number, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), number)


def worker_command(study_name: str, total_trials: int, timeout_s: float | None) -> list[str]:
    """The ``hpo worker`` command line of one child (the storage URL goes in the
    environment, so a password never shows in ``ps``)."""
    command = [*python_module_command(), "worker", "--study", study_name]
    command += ["--n-trials", str(total_trials)]
    if timeout_s is not None:
        command += ["--timeout", str(timeout_s)]
    return command


def _child_env(
    storage_url: str, node: NodeSettings, device: str | None, index: int, threads: int
) -> dict[str, str]:
    child = environment() | node.to_env()
    child[STORAGE_ENV] = storage_url
    # The study file this launch read is the operator's: its factory module is trusted
    # in the children too (they read the spec from the storage).
    child[TRUSTED_MODULES_ENV] = ",".join(sorted(trusted_modules()))
    # Every child gets its share of the cores, a GPU worker too: its CPU ops (the batch
    # draw, the optimizer's bookkeeping) would otherwise each start one thread per core.
    child.setdefault("OMP_NUM_THREADS", str(threads))
    if device is None:
        child[LABEL_ENV] = f"[w{index}] "
    else:
        child[LABEL_ENV] = f"[gpu{device}] "  # a data-parallel group: [gpu0,1]
        child[CUDA_VISIBLE_ENV] = device
    return child


def run_worker_processes(
    study_name: str,
    storage_url: str,
    *,
    total_trials: int,
    timeout_s: float | None,
    devices: list[str | None],
    node: NodeSettings | None = None,
) -> int:
    """One ``hpo worker`` child per entry of ``devices``: a GPU (``CUDA_VISIBLE_DEVICES``
    set to it) or None (a CPU worker). The cores this process may use are split between
    all the children. Returns the worst exit code of the children."""
    node = node or NodeSettings()
    threads = max(1, available_cores() // max(len(devices), 1))
    command = worker_command(study_name, total_trials, timeout_s)
    children: list[subprocess.Popen[bytes]] = []
    for index, device in enumerate(devices):
        try:
            child_env = _child_env(storage_url, node, device, index, threads)
            start_child(children, command, child_env)
        except OSError as error:
            # The children already started would run on, orphaned: stop them (they
            # re-queue their trials) before giving up.
            stop_children(children)
            raise LaunchFailed(
                f"could not start worker {index + 1} of {len(devices)} ({error.strerror}); "
                f"stopped the {len(children)} already started"
            ) from None

    def forward(number: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(number)

    previous = {
        number: signal.signal(number, forward) for number in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        codes = [child.wait() for child in children]
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return max(codes, key=abs)


def stop_children(children: list[subprocess.Popen[bytes]], grace_s: float = 30.0) -> None:
    """SIGTERM each running child, wait up to ``grace_s`` for all, then SIGKILL the rest."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def local_devices(workers: int, per_trial: int = 1) -> list[str | None]:
    """Devices for ``workers`` local processes: a group of ``per_trial`` GPUs each when
    this machine has that many (round-robin over the groups when fewer than workers), else
    None (CPU) for all."""
    gpus = resolve_gpus("all")
    groups = gpu_groups(gpus, per_trial) if len(gpus) >= per_trial else []
    return [groups[i % len(groups)] if groups else None for i in range(workers)]


def prepare_launch(
    spec: StudySpec, node: NodeSettings, workers: int
) -> tuple[PatchSet, PatchSet] | None:
    """Everything ``hpo launch`` checks before the study exists, on the spec as this node
    runs it (``node``'s overrides applied): the device, the checkpoint directory, threads
    and ``workers`` against this node's cores, the data root, the model with the dataset's
    head, and the data itself. Raises a UserError (exit 2) at the first that fails, before
    anything is written. Returns the splits, loaded and checked (``hpo.datacheck``): an
    in-process worker trains on these tensors, child workers load (and check) their own.
    With ``[trainer] function``, the trainer's module is imported instead of the model and
    data checks (the trainer loads its own), and None is returned."""
    from hpo.checkpoint import check_checkpoint_dir, checkpoint_root
    from hpo.data import num_classes, study_splits
    from hpo.device import select_device
    from hpo.models import check_model

    here = spec.on_node(node)  # the spec as this node runs it
    select_device(here.training)  # a GPU this node lacks: exit 2 before anything
    check_checkpoint_dir(checkpoint_root(here))  # likewise a checkpoint dir
    check_cpu_count(here.training.num_threads, THREADS_SOURCES)
    # GPU or not, each worker is a process that draws and uploads its batches on a core:
    # more workers than cores only queue for them (and 10000 fail to fork).
    check_cpu_count(workers, "--workers")
    # Before the study exists, with the head the trials will train (this node's data).
    check_data_root(here, source=f"study {spec.name!r} on this node")
    if here.trainer.function is not None:
        from hpo.context import load_trainer

        load_trainer(here.trainer.function)
        return None
    assert spec.model is not None and spec.dataset is not None and here.dataset is not None
    check_model(
        spec.model, image_size=spec.dataset.image_size, num_classes=num_classes(here.dataset)
    )
    return study_splits(here)
