"""What an epoch checkpoint costs the training, written in the background or not, as a share
of an epoch at PCam's size.

A trial checkpoints once per report. Written synchronously (``training.checkpoint_async =
false``) training waits for serialize + write + fsync + rename: ``sync_save_s``. Written
in the background (the default, ``hpo.checkpoint.CheckpointWriter``) training waits only
for the host copy of the state (``async_call_s``), but the writer thread competes with it
for the host meanwhile; so the cost that counts is measured on the training itself:
``async_cost_s`` = the time of the steps run while the write is in flight (the save call
included) minus the time of as many steps without a write (medians over ``--repeats``).
An epoch is ``--epoch-size`` training samples (PCam's 262,144) at the trial step's
measured samples/s; the ratios are those costs over it (goal: async ≤ 0.02).

Run: ``uv run python benchmarks/checkpoint.py --json ckpt.json`` (CPU, ResNet-18 at B = 64);
on a GPU node ``python benchmarks/checkpoint.py --device cuda --batch-size 256``.
``--quick``: small-cnn at toy sizes (a smoke test).
"""

from __future__ import annotations

# ruff: noqa: E402
from hpo.settings import default_omp_wait_policy

default_omp_wait_policy()  # as hpo's entry points do, before torch is imported

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import _sync, bench_spec, emit, timed_steps, trial_step  # noqa: E402
from pipeline import write_pcam  # noqa: E402

from hpo.checkpoint import CheckpointWriter, TrialCheckpoint  # noqa: E402
from hpo.data import load_splits  # noqa: E402
from hpo.device import start_on_this_node  # noqa: E402
from hpo.spec import TrialParams  # noqa: E402
from hpo.train import TrainingRun, build_run, prepare_data  # noqa: E402

PCAM_TRAIN = 262_144
Step = Callable[[torch.Tensor, torch.Tensor], object]


def _steps(step: Step, batches: Iterator, device: torch.device, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        step(*next(batches))
    _sync(device)
    return time.perf_counter() - start


def sync_save(run: TrainingRun, path: Path, repeats: int) -> float:
    """Median seconds of one synchronous save (training waits for all of it)."""
    checkpoint = TrialCheckpoint(path)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        checkpoint.save(run)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def async_save(
    run: TrainingRun, path: Path, step: Step, batches: Iterator, repeats: int
) -> dict[str, float]:
    """Medians over ``repeats`` of: the save call (host copy, thread start), the write in
    the background, the steps that ran meanwhile, and what the write cost them."""
    device = next(run.model.parameters()).device
    writer = CheckpointWriter()
    checkpoint = TrialCheckpoint(path, writer)
    calls, writes, costs, overlapped = [], [], [], []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        checkpoint.save(run)
        calls.append(time.perf_counter() - start)
        count = 0
        while writer.busy or count == 0:
            step(*next(batches))
            count += 1
            _sync(device)
        with_write = time.perf_counter() - start
        writer.wait()
        writes.append(with_write)  # at most: the write ended during the last step
        costs.append(with_write - _steps(step, batches, device, count))
        overlapped.append(count)
    return {
        "async_call_s": statistics.median(calls),
        "async_write_s_at_most": statistics.median(writes),
        "async_cost_s": max(0.0, statistics.median(costs)),
        "steps_during_write": statistics.median(overlapped),
        "file_mib": path.stat().st_size / 2**20,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="model (resnet18)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (64)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epoch-size", type=int, default=PCAM_TRAIN, help="samples an epoch")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds of steps")
    parser.add_argument("--repeats", type=int, default=3, help="saves timed (3)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="small-cnn smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.seconds, args.repeats = "small-cnn", 16, 0.3, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/checkpoint.py: no CUDA device here")
    with tempfile.TemporaryDirectory(prefix="hpo-bench-ckpt-") as temporary:
        directory = Path(temporary)
        root = write_pcam(directory / "data", {"train": 8 * args.batch_size, "val": 64})
        spec = bench_spec("checkpoint", root, args.model, args.batch_size, 2 * args.batch_size,
                          args.device)  # fmt: skip
        setup = start_on_this_node(spec.training)
        data = prepare_data(load_splits(spec.dataset), setup, spec.training)
        run = build_run(spec, TrialParams(args.batch_size, 0.01, 1e-4), setup, seed=0)
        step, batches = trial_step(run, data, setup, args.batch_size)
        stream = batches()
        rate = timed_steps(step, stream, setup.device, seconds=args.seconds, max_steps=10**6)
        epoch_s = args.epoch_size / rate["samples_per_s"]
        path = directory / "ckpt" / "trial-0" / "checkpoint.pt"
        synchronous = sync_save(run, path, args.repeats)
        background = async_save(run, path, step, stream, args.repeats)
        result: dict[str, Any] = {
            "device": setup.name,
            "precision": setup.precision,
            "model": args.model,
            "batch_size": args.batch_size,
            "samples_per_s": rate["samples_per_s"],
            "epoch_size": args.epoch_size,
            "epoch_s": epoch_s,
            "sync_save_s": synchronous,
            **background,
            "sync_vs_epoch": synchronous / epoch_s,
            "async_vs_epoch": background["async_cost_s"] / epoch_s,
            "async_call_vs_epoch": background["async_call_s"] / epoch_s,
        }
    return emit(result, args.json)


if __name__ == "__main__":
    main()
