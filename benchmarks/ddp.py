"""Data-parallel trials: samples/s of N ranks against 1 on the same global batch, and what
measuring the gradient noise scale costs on top of the update's own all-reduce.

Both on the demo task (small CNN, the device's precision and memory format), at the study
file's device (on CPU: gloo, the cores split evenly between the ranks, so N ranks use the
cores one process had):

1. one process trains ``--steps`` updates of the global batch B (``hpo.train.train_step``,
   no noise measurement) and reports samples/s;
2. N processes of one gloo/NCCL group (``hpo.distributed.RankGroup``, the step a
   data-parallel trial takes) train the same global batch, B/N each; their updates
   alternate between measuring the noise scale (the default, every update) and not
   (``measure_noise=False``: the same all-reduce, without the two squared norms), so the
   overhead is the ratio of the two medians (interleaved, the same load for both);
3. (not with ``--quick``) how long rank 0 takes to start its followers and form the group,
   which every data-parallel trial pays before its first step.

Run: ``uv run python benchmarks/ddp.py`` (``--quick``: a few steps at B = 32).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from hpo.settings import default_omp_wait_policy

# As at hpo's entry points, before torch is imported: idle OpenMP threads sleep, so the
# one-process run's threads do not spin against the load (docs/benchmarks.md).
default_omp_wait_policy()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from hpo.data import batch_indices, load_splits  # noqa: E402
from hpo.device import select_device  # noqa: E402
from hpo.distributed import RankGroup  # noqa: E402
from hpo.spec import TrialParams, load_spec  # noqa: E402
from hpo.train import build_run, prepare_data, train_step  # noqa: E402

WARMUP = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _first_batch(spec, setup, batch_size: int):  # noqa: ANN001, ANN202
    """The prepared splits and the indices of the first global batch (the same on every
    rank: no generator)."""
    data = prepare_data(load_splits(spec.dataset), setup, spec.training)
    indices = batch_indices(len(data.train), batch_size, generator=None, drop_last=True)
    return data, next(iter(indices))


def _single(study: str, batch_size: int, steps: int, threads: int) -> float:
    """Samples/s of one process training the global batch."""
    torch.set_num_threads(threads)
    spec = load_spec(study)
    setup = select_device(spec.training)
    data, indices = _first_batch(spec, setup, batch_size)
    run = build_run(spec, TrialParams(batch_size, 0.03, 1e-4), setup, seed=0)
    images, targets = data.batcher.take(data.train, indices)
    times = []
    for step in range(steps + WARMUP):
        _sync(setup.device)
        started = time.perf_counter()
        train_step(run.model, run.optimizer, run.scaler, setup, images, targets)
        _sync(setup.device)
        if step >= WARMUP:
            times.append(time.perf_counter() - started)
    return batch_size / statistics.median(times)


def _rank(rank: int, args: argparse.Namespace, port: int, out: Path) -> None:
    """One rank of the N-process run; rank 0 writes the figures to ``out``."""
    torch.set_num_threads(max(1, args.threads // args.ranks))
    spec = load_spec(args.study)
    setup = select_device(spec.training)
    backend = "gloo"
    if setup.device.type == "cuda":
        torch.cuda.set_device(rank)
        backend = "nccl"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.ranks, timeout=timedelta(seconds=300))  # fmt: skip
    group = RankGroup(rank, args.ranks)
    data, indices = _first_batch(spec, setup, args.batch_size)
    run = build_run(spec, TrialParams(args.batch_size, 0.03, 1e-4), setup, seed=0)
    images, targets = data.batcher.take(data.train, group.shard(indices))
    times: dict[bool, list[float]] = {True: [], False: []}
    for step in range(args.steps + WARMUP):
        for measure in (True, False) if step % 2 else (False, True):
            _sync(setup.device)
            started = time.perf_counter()
            group.update(run, setup, images, targets, None, measure_noise=measure)
            _sync(setup.device)
            if step >= WARMUP:
                times[measure].append(time.perf_counter() - started)
    if rank == 0:
        figures = {
            "samples_per_s_measured": args.batch_size / statistics.median(times[True]),
            "samples_per_s_plain": args.batch_size / statistics.median(times[False]),
            "noise_measurements": float(run.tally.noise.float_sums().get("n", 0.0)),
        }
        out.write_text(json.dumps(figures))
    dist.destroy_process_group()


def _group_start_seconds(study: str, ranks: int) -> float:
    """Seconds rank 0 takes to start its followers and form the group: what every
    data-parallel trial pays before its first step (the followers then load the data)."""
    setup = select_device(load_spec(study).training)
    started = time.perf_counter()
    group = RankGroup.start(ranks, setup)
    seconds = time.perf_counter() - started
    group.close(completed=False)
    return seconds


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="demo", help="study file name or path (demo)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch B (128)")
    parser.add_argument("--ranks", type=int, default=2, help="N processes (2)")
    parser.add_argument("--steps", type=int, default=30, help="timed updates (30)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads in all, split between the ranks (all cores)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="B = 32, 4 steps")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps = 32, 4
    # The ranks first: on CPU they are forked from this process before it has computed
    # anything (no OpenMP pool to inherit), which spares each a fresh import of torch.
    start_method = "spawn" if torch.cuda.is_available() else "fork"
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "ranks.json"
        mp.start_processes(_rank, args=(args, _free_port(), out), nprocs=args.ranks,
                           start_method=start_method)  # fmt: skip
        ranked = json.loads(out.read_text())
    single = _single(args.study, args.batch_size, args.steps, args.threads)
    group_start = None if args.quick else _group_start_seconds(args.study, args.ranks)
    figures = {
        "batch_size": float(args.batch_size),
        "ranks": float(args.ranks),
        "samples_per_s_1_rank": single,
        f"samples_per_s_{args.ranks}_ranks": ranked["samples_per_s_measured"],
        "speedup": ranked["samples_per_s_measured"] / single,
        "noise_overhead": ranked["samples_per_s_plain"] / ranked["samples_per_s_measured"] - 1,
        "noise_measurements": ranked["noise_measurements"],
    }
    if group_start is not None:
        figures["group_start_s"] = group_start
    print(
        f"B = {args.batch_size}: 1 rank {single:,.0f} samples/s, {args.ranks} ranks "
        f"{ranked['samples_per_s_measured']:,.0f} ({figures['speedup']:.2f}x); noise scale "
        f"on every update costs {figures['noise_overhead']:+.1%} of the {args.ranks}-rank "
        f"update ({ranked['samples_per_s_plain']:,.0f} samples/s without it)"
        + ("" if group_start is None else f"; a trial's group forms in {group_start:.1f} s"),
        flush=True,
    )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
