"""Where a GPU training step loses time, and which lever wins it back.

``benchmarks/gpu.py`` measured ResNet-18 at 96 px, B = 256, bf16 on an H200: hpo's step
on one prepared batch ran at 26,346 samples/s with the GPU only 49% busy, while B = 1024
kept it 97% busy at 67,746/s. A step that leaves the GPU idle half the time is bound by
the host launching kernels, not by the GPU. This benchmark times, in one process, the
same step (``hpo.train.train_step`` on a run from ``hpo.train.build_run``) under each lever:

- ``eager``: as hpo trains today (SGD with momentum, torch's default foreach kernels);
- ``eager_fused``: the same SGD with ``fused=True`` (one kernel per parameter group);
- ``compile``: ``model.compile()`` (inductor, default mode);
- ``compile_reduce_overhead``: ``model.compile(mode="reduce-overhead")``: inductor plus
  CUDA graphs, so a step is a few graph launches instead of hundreds of kernel launches.

For each: compile seconds (the first steps' extra time), steady samples/s on one prepared
batch (``limit``) and on hpo's real batches (``DeviceBatcher`` from the uint8 split, as a
trial draws them), the GPU's busy % meanwhile (NVML), peak memory, and the host-GPU
synchronizations per update (torch's sync debug mode). Then the cost of
one checkpoint of that run (serialize, write + fsync, rename), which a trial pays per
report. Prints JSON (and writes it with ``--json``).

Run on a GPU node: ``PYTHONUNBUFFERED=1 python benchmarks/gpu_step.py --json step.json``
(about 3 minutes on an H200). ``--quick``: small-cnn on CPU at toy sizes, eager variants
only (a smoke test; inductor's first compile alone takes about a minute on a CPU).
"""

from __future__ import annotations

# ruff: noqa: E402
from hpo.settings import default_omp_wait_policy

default_omp_wait_policy()  # as hpo's entry points do, before torch is imported

import argparse
import io
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import _repeat, _sync, bench_spec, emit, timed_steps, trial_step  # noqa: E402  (the sibling benchmark)
from pipeline import write_pcam  # noqa: E402

from hpo.checkpoint import TrialCheckpoint  # noqa: E402
from hpo.data import load_splits  # noqa: E402
from hpo.device import DeviceSetup, start_on_this_node  # noqa: E402
from hpo.spec import StudySpec, TrialParams  # noqa: E402
from hpo.train import TrainingRun, build_run, prepare_data  # noqa: E402

VARIANTS = ("eager", "eager_fused", "compile", "compile_reduce_overhead")
WARM_STEPS = 4


def variant_run(
    spec: StudySpec, setup: DeviceSetup, params: TrialParams, variant: str
) -> TrainingRun:
    """A fresh seeded run as a trial builds it, with ``variant``'s lever applied."""
    torch._dynamo.reset()  # each compiled variant compiles from scratch
    run = build_run(spec, params, setup, seed=0)
    if variant == "eager_fused":
        group = run.optimizer.param_groups[0]
        run.optimizer = torch.optim.SGD(
            run.model.parameters(), lr=group["lr"], momentum=group["momentum"],
            weight_decay=group["weight_decay"], nesterov=group["nesterov"], fused=True,
        )  # fmt: skip
    elif variant == "compile":
        run.model.compile()
    elif variant == "compile_reduce_overhead":
        run.model.compile(mode="reduce-overhead")
    run.model.train()
    return run


def measure_variant(spec: StudySpec, setup: DeviceSetup, splits, batch_size: int,
                    variant: str, seconds: float, max_steps: int) -> dict[str, Any]:  # fmt: skip
    params = TrialParams(batch_size=batch_size, lr=0.01, weight_decay=1e-4)
    run = variant_run(spec, setup, params, variant)
    step, batches = trial_step(run, prepare_data(splits, setup, spec.training), setup, batch_size)
    first = next(batches())
    start = time.perf_counter()
    for _ in range(WARM_STEPS):  # compile; CUDA graphs warm up, then record, then replay
        step(*first)
    _sync(setup.device)
    warm_s = time.perf_counter() - start
    limit = timed_steps(step, _repeat(first), setup.device, seconds=seconds, max_steps=max_steps)
    real = timed_steps(step, batches(), setup.device, seconds=seconds, max_steps=max_steps)
    steady_step_s = batch_size / limit["samples_per_s"]
    syncs = syncs_per_step(step, batches(), setup.device)
    return {
        "variant": variant,
        "compile_s": max(0.0, warm_s - WARM_STEPS * steady_step_s),
        "limit_samples_per_s": limit["samples_per_s"],
        "limit_gpu_busy_pct": limit["gpu_busy_pct"],
        "samples_per_s": real["samples_per_s"],
        "gpu_busy_pct": real["gpu_busy_pct"],
        "peak_memory_mib": real["peak_memory_mib"],
        "host_syncs_per_step": syncs,
        "run": run,
    }


def syncs_per_step(step, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                   device: torch.device, steps: int = 8) -> float | None:  # fmt: skip
    """Operations that make the host wait for the GPU, per update with real batches, as
    torch's sync debug mode reports them (a blocking host-to-device copy is one): each
    one idles the GPU while the host prepares and launches what comes next. None on CPU."""
    if device.type != "cuda":
        return None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step(*next(batches))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return len(caught) / steps


def checkpoint_cost(run: TrainingRun, directory: Path, repeats: int = 3) -> dict[str, float]:
    """Seconds for one ``TrialCheckpoint.save`` of ``run`` (the median of ``repeats``), and
    for its in-memory serialization alone; the file's size."""
    checkpoint = TrialCheckpoint(directory / "trial-0" / "checkpoint.pt")
    saves, serialize = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        checkpoint.save(run)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()},
                   io.BytesIO())  # fmt: skip
        serialize.append(time.perf_counter() - start)
    return {
        "save_s": sorted(saves)[len(saves) // 2],
        "serialize_s": sorted(serialize)[len(serialize) // 2],
        "file_mib": checkpoint.path.stat().st_size / 2**20,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="model (resnet18)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (256)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=",".join(VARIANTS))
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measure (5)")
    parser.add_argument("--max-steps", type=int, default=400, help="timed steps at most (400)")
    parser.add_argument("--n-train", type=int, default=8192, help="generated training patches")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test, eager variants")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.device = "small-cnn", 16, "cpu"
        args.variants, args.seconds, args.max_steps, args.n_train = "eager,eager_fused", 0.3, 3, 64
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_step.py: no CUDA device here (--quick runs on CPU)")

    with tempfile.TemporaryDirectory(prefix="hpo-bench-step-") as temporary:
        directory = Path(temporary)
        root = write_pcam(directory / "data", {"train": args.n_train, "val": 64})
        spec = bench_spec("gpu-step", root, args.model, args.batch_size, 2 * args.batch_size,
                          args.device)  # fmt: skip
        setup = start_on_this_node(spec.training)
        splits = load_splits(spec.dataset)
        result: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__,
            "model": args.model,
            "batch_size": args.batch_size,
            "precision": setup.precision,
            "variants": [],
        }
        for variant in args.variants.split(","):
            try:
                figures = measure_variant(spec, setup, splits, args.batch_size, variant,
                                          args.seconds, args.max_steps)  # fmt: skip
            except Exception as error:  # a lever that fails here is a finding, not a crash
                figures = {"variant": variant, "error": f"{type(error).__name__}: {error}"[:800]}
            run = figures.pop("run", None)
            if run is not None and variant == "eager":
                result["checkpoint"] = checkpoint_cost(run, directory / "ckpt")
            result["variants"].append(figures)
            print(json.dumps(figures), flush=True)
            del run
    return emit(result, args.json)


if __name__ == "__main__":
    main()
