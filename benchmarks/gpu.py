"""GPU benchmark: hpo's pipeline against the naive one on CUDA.

On generated PCam-format files (96 px, uncompressed HDF5, as torchvision leaves PCam), for
ResNet-18 and VGG-16 and batch sizes 64, 256 and 1024:

- ``samples_per_s``: training steps fed by the real input path, for 30 s at most per
  cell (``--seconds``): hpo = batches by index from the uint8 split, prepared on the GPU by
  ``DeviceBatcher`` (bf16 autocast, channels_last, ``hpo.train.train_step``); naive =
  torchvision ``PCAM`` + ``DataLoader(num_workers=<cores>, pin_memory)`` + fp32 NCHW;
- ``compute_limit_samples_per_s``: the same steps on one batch prepared once (the bound an
  input path can reach), and ``input_stall`` = 1 − samples_per_s / compute limit;
- ``gpu_busy_pct``: NVML utilization (nvidia-ml-py's ``pynvml``; else
  ``torch.cuda.utilization``, else ``nvidia-smi``) sampled every 0.1 s while training;
- ``peak_memory_mib``: ``torch.cuda.max_memory_allocated`` for that cell;

then ``hpo probe`` of a ResNet-18 study on the GPU (subprocess, as a user runs it) and a
4-trial study launched with 2 worker processes sharing the GPU (``hpo launch --workers
2``), each timed. Prints JSON (and writes it with ``--json``).

Target on an H100: ResNet-18 B=256 bf16 ≥ 40,000 samples/s with the GPU ≥ 90% busy.

Run on a GPU node (about 6 minutes on an H100):
``PYTHONUNBUFFERED=1 python benchmarks/gpu.py --json gpu.json``.
``--quick`` runs every part on CPU at toy sizes (small-cnn, B 16/32): a smoke test.
"""

from __future__ import annotations

# ruff: noqa: E402
from hpo.settings import default_omp_wait_policy

default_omp_wait_policy()  # as hpo's entry points do, before torch is imported

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import GpuUtilization, naive_loader, write_pcam  # noqa: E402  (the sibling benchmark)

from hpo.data import batch_indices, load_splits  # noqa: E402
from hpo.device import (  # noqa: E402
    DeviceSetup,
    is_out_of_memory,
    release_device_memory,
    start_on_this_node,
)
from hpo.models import build_model  # noqa: E402
from hpo.spec import StudySpec, TrialParams  # noqa: E402
from hpo.train import (  # noqa: E402
    TrainingData,
    TrainingRun,
    build_run,
    prepare_data,
    train_step,
)

# --------------------------------------------------------------------------- measuring


class GpuBusy(GpuUtilization):
    """pipeline's GPU utilization sampler, every 0.1 s, reading NVML when ``pynvml`` is
    installed (else pipeline's reading: torch's, else nvidia-smi's); empty on CPU."""

    interval_s = 0.1

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        nvml = self._nvml_reader() if device.type == "cuda" else None
        if nvml is not None:
            self._read = nvml  # type: ignore[method-assign]

    def _nvml_reader(self) -> Callable[[], float | None] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(
    step: Callable[[torch.Tensor, torch.Tensor], object],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    seconds: float,
    max_steps: int,
    warmup: int = 3,
) -> dict[str, float | None]:
    """samples/s of ``step`` over ``batches`` for up to ``seconds`` (after ``warmup``), the
    GPU's mean utilization meanwhile, and the peak memory."""
    for _ in range(warmup):
        step(*next(batches))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples, steps = 0, 0
    with GpuBusy(device) as busy:
        start = time.perf_counter()
        while steps < max_steps and time.perf_counter() - start < seconds:
            images, targets = next(batches)
            step(images, targets)
            samples += len(targets)
            steps += 1
            if steps % 8 == 0:
                _sync(device)  # keep the clock honest without a sync per step
        _sync(device)
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"samples_per_s": samples / elapsed, "gpu_busy_pct": busy.mean, "peak_memory_mib": peak}


def _repeat(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield batch


def _cell(real: dict[str, Any], limit: dict[str, Any]) -> dict[str, Any]:
    stall = 1.0 - real["samples_per_s"] / limit["samples_per_s"]
    return {
        **real,
        "compute_limit_samples_per_s": limit["samples_per_s"],
        "input_stall": max(0.0, stall),
    }


def trial_step(run: TrainingRun, data: TrainingData, setup: DeviceSetup, batch_size: int) -> tuple[
    Callable[[torch.Tensor, torch.Tensor], object],
    Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
]:  # fmt: skip
    """``run``'s training step as a trial takes it, and an endless stream of its batches as
    a trial draws them (by index from the uint8 split, augmented by ``DeviceBatcher``)."""

    def step(images: torch.Tensor, targets: torch.Tensor) -> object:
        return train_step(run.model, run.optimizer, run.scaler, setup, images, targets)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            for indices in batch_indices(
                len(data.train), batch_size, generator=run.generator, drop_last=True
            ):
                yield data.batcher.take(data.train, indices, run.generator)

    return step, batches


def hpo_cell(spec: StudySpec, setup: DeviceSetup, splits, batch_size: int, seconds: float,
             max_steps: int) -> dict[str, Any]:  # fmt: skip
    """hpo's path: ``DeviceBatcher`` batches (augmented, on the device) into ``train_step``."""
    params = TrialParams(batch_size=batch_size, lr=0.01, weight_decay=1e-4)
    run = build_run(spec, params, setup, seed=0)
    run.model.train()
    step, batches = trial_step(run, prepare_data(splits, setup, spec.training), setup, batch_size)
    limit = timed_steps(step, _repeat(next(batches())), setup.device,
                        seconds=seconds, max_steps=max_steps)  # fmt: skip
    real = timed_steps(step, batches(), setup.device, seconds=seconds, max_steps=max_steps)
    return _cell(real, limit)


def naive_cell(model_name: str, root: Path, device: torch.device, batch_size: int,
               workers: int, seconds: float, max_steps: int) -> dict[str, Any]:  # fmt: skip
    """The naive path: torchvision ``PCAM`` + ``DataLoader`` feeding an fp32 NCHW model,
    with torch's default backend flags (no cudnn.benchmark, no TF32 matmuls), as a plain
    script runs."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = False, False
    try:
        return _naive_cell(model_name, root, device, batch_size, workers, seconds, max_steps)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = flags


def _naive_cell(model_name: str, root: Path, device: torch.device, batch_size: int,
                workers: int, seconds: float, max_steps: int) -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(0)
    model = build_model(model_name).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    # Normalization constants do not change the cost; ImageNet's are what a script would use.
    loader = naive_loader(root, "train", batch_size, workers, train=True,
                          mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                          pin=device.type == "cuda")  # fmt: skip

    def step(images: torch.Tensor, targets: torch.Tensor) -> object:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from loader

    first = next(batches())
    limit = timed_steps(step, _repeat((first[0].to(device), first[1].to(device))), device,
                        seconds=seconds, max_steps=max_steps)  # fmt: skip
    real = timed_steps(step, batches(), device, seconds=seconds, max_steps=max_steps)
    return _cell(real, limit)


def guarded(measure: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """A cell's figures, or ``{"error": "out of memory"}`` when the batch does not fit."""
    try:
        return measure()
    except Exception as error:
        if not is_out_of_memory(error):
            raise
    release_device_memory(device.type)
    return {"error": "out of memory"}


# --------------------------------------------------------------------------- hpo commands

STUDY = """
seed = 0

[dataset]
kind = "pcam"
root = "{root}"
train_size = {train_size}
val_size = {val_size}

[model]
name = "{model}"

[search]
batch_size_min = {batch_min}
batch_size_max = {batch_max}
lr_low = 1e-3
lr_high = 0.3
weight_decay_low = 1e-6
weight_decay_high = 1e-3
optimizer = "sgd"

[budget]
epochs = 1
n_trials = 4

[pruner]
kind = "none"

[sampler]
kind = "random"
seed = 0

[training]
device = "{device}"
"""


def hpo_command(args: list[str], directory: Path) -> dict[str, Any]:
    """``python -m hpo ARGS`` in ``directory``, timed; its exit code and last lines."""
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "hpo", *args],
        cwd=directory,
        env={**os.environ, "HPO_STORAGE": f"sqlite:///{directory / 'gpu.db'}"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    return {
        "command": "hpo " + " ".join(args),
        "exit_code": completed.returncode,
        "wall_s": time.perf_counter() - start,
        "output_tail": (completed.stdout + completed.stderr).strip().splitlines()[-12:],
    }


def run_hpo_commands(directory: Path, root: Path, batch_sizes: list[int],
                     args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """``hpo probe`` on the device, then 4 trials by 2 worker processes sharing it."""
    model, sizes = ("small-cnn", (64, 32)) if args.quick else ("resnet18", (8192, 1024))
    (directory / "gpu-bench.toml").write_text(
        textwrap.dedent(STUDY).format(
            root=root,
            train_size=sizes[0],
            val_size=sizes[1],
            model=model,
            batch_min=min(batch_sizes),
            batch_max=max(batch_sizes),
            device=args.device,
        )  # fmt: skip
    )
    probe = ["probe", "--study", "gpu-bench.toml", "--device", args.device]
    launch = ["launch", "--study", "gpu-bench.toml", "--workers", "2", "--n-trials", "4"]
    return {
        "probe": hpo_command(probe, directory),
        "two_workers": hpo_command([*launch, "--device", args.device], directory),
    }


def bench_spec(name: str, root: Path, model: str, batch_size_min: int, batch_size_max: int,
               device: str) -> StudySpec:  # fmt: skip
    """A one-epoch study over PCam-format files at ``root``, for timing steps only."""
    return StudySpec.model_validate({
        "name": name,
        "dataset": {"kind": "pcam", "root": str(root)},
        "model": {"name": model},
        "search": {"batch_size_min": batch_size_min, "batch_size_max": batch_size_max,
                   "lr_low": 1e-3, "lr_high": 0.1,
                   "weight_decay_low": 1e-5, "weight_decay_high": 1e-3},
        "budget": {"epochs": 1},
        "pruner": {"kind": "none"},
        "training": {"device": device},
    })  # fmt: skip


def model_cells(model: str, root: Path, batch_sizes: list[int],
                args: argparse.Namespace) -> list[dict[str, Any]]:  # fmt: skip
    """hpo's and the naive pipeline's figures for ``model`` at every batch size."""
    spec = bench_spec("gpu-bench", root, model, min(batch_sizes), max(batch_sizes), args.device)
    setup = start_on_this_node(spec.training)  # as a worker: cudnn.benchmark, TF32, ...
    splits = load_splits(spec.dataset)
    measure = (args.seconds, args.max_steps)
    cells = []
    for batch_size in batch_sizes:
        cell = {
            "model": model,
            "batch_size": batch_size,
            "precision": setup.precision,
            "hpo": guarded(
                lambda b=batch_size: hpo_cell(spec, setup, splits, b, *measure), setup.device
            ),
            "naive": guarded(
                lambda b=batch_size: naive_cell(
                    model, root, setup.device, b, args.workers, *measure
                ),  # fmt: skip
                setup.device,
            ),
        }
        cells.append(cell)
        print(json.dumps(cell), flush=True)
        release_device_memory(setup.device.type)
    return cells


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,vgg16", help="resnet18,vgg16")
    parser.add_argument("--batch-sizes", default="64,256,1024", help="64,256,1024")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per cell (8)")
    parser.add_argument("--max-steps", type=int, default=400, help="timed steps per cell at most")
    parser.add_argument("--n-train", type=int, default=16384, help="generated training patches")
    parser.add_argument("--n-val", type=int, default=2048, help="generated validation patches")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="naive DataLoader workers (cores)")  # fmt: skip
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--data", type=Path, default=None, help="where the HDF5 files go")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--skip-commands", action="store_true",
                        help="only the throughput cells, not hpo probe / launch")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="CPU, small-cnn, B 16/32, toy sizes: a smoke test")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.device = "small-cnn", "16,32", "cpu"
        args.seconds, args.max_steps, args.n_train, args.n_val = 0.5, 4, 96, 32
        args.workers = 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/gpu.py: no CUDA device here (use --quick to smoke-test on CPU)"
        )
    models = args.models.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="hpo-bench-gpu-") as temporary:
        directory = Path(temporary)
        data_dir = args.data or directory / "data"
        start = time.perf_counter()
        root = write_pcam(data_dir, {"train": args.n_train, "val": args.n_val})
        generate_s = time.perf_counter() - start
        result: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__,
            "data_generation_s": generate_s,
            "cells": [],
        }
        for model in models:
            result["cells"] += model_cells(model, root, batch_sizes, args)
        if not args.skip_commands:
            result.update(run_hpo_commands(directory, root, batch_sizes, args))
    return emit(result, args.json)


def emit(result: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """``result`` with the load average, printed as JSON and written to ``path`` if given."""
    result["load_1min"] = os.getloadavg()[0]
    text = json.dumps(result, indent=2)
    print(text)
    if path is not None:
        path.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
