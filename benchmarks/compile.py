"""``torch.compile`` against eager: compile time vs what it saves per trial.

For one model, image size and batch size, trained exactly as a trial trains it (the
node's device setup, ``hpo.train.train_step``, one prepared batch, so the input pipeline
is not in the figure), each in a fresh interpreter:

- ``eager``: seconds per training step, and per eval-mode forward of one batch;
- ``cold``: ``model.compile()`` (inductor) with an empty on-disk cache
  (``TORCHINDUCTOR_CACHE_DIR`` in a temporary directory): the first step's and the first
  eval forward's extra seconds (the compile), then seconds per step and per forward; and
  a second model instance in the same process (the next trial of a worker): its first
  step's extra seconds;
- ``warm``: a new process with the cache the cold one left (a later worker, or the next
  ``hpo launch``): the first step's extra seconds.

From these, per trial of ``--trial-steps`` steps and ``--trial-evals`` eval batches:
``saving_s`` = steps × (eager − compiled) + evals × (eager − compiled forward), against
the cold, warm and same-process compile; ``break_even_steps`` = compile / per-step
saving (inf when compiled is not faster). A different batch size, or the last partial
eval batch, is a new shape: dynamo recompiles once for it (then marks it dynamic), which
these figures leave out, so they are the best case for compile.

Run on an otherwise idle machine: ``uv run python benchmarks/compile.py --model small-cnn``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _time_steps(run, setup, images, targets, steps: int) -> float:
    from hpo.train import train_step

    start = time.perf_counter()
    for _ in range(steps):
        train_step(run.model, run.optimizer, run.scaler, setup, images, targets)
    _sync(setup)
    return (time.perf_counter() - start) / steps


def _sync(setup) -> None:
    import torch

    if setup.device.type == "cuda":
        torch.cuda.synchronize()


def _time_forward(model, setup, images, repeats: int) -> float:
    import torch

    from hpo.train import autocast

    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(repeats):
            with autocast(setup):
                model(images)
    _sync(setup)
    model.train()
    return (time.perf_counter() - start) / repeats


def measure(
    mode: str, model_name: str, image_size: int, batch_size: int, steps: int, device: str = "cpu"
) -> dict:
    """One process's figures (``mode`` eager or compiled); run in a child interpreter."""
    from hpo.settings import default_omp_wait_policy

    default_omp_wait_policy()
    import torch

    from hpo.data import DeviceBatcher
    from hpo.device import start_on_this_node
    from hpo.spec import TrialParams, load_spec
    from hpo.train import build_run

    demo = load_spec(Path(__file__).resolve().parents[1] / "studies" / "demo.toml")
    spec = demo.model_copy(
        update={
            "model": demo.model.model_copy(update={"name": model_name}),
            "training": demo.training.model_copy(update={"device": device}),
        }
    )
    setup = start_on_this_node(spec.training)
    params = TrialParams(batch_size=batch_size, lr=0.01, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    uint8 = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=generator)
    batcher = DeviceBatcher(torch.full((3,), 128.0), torch.full((3,), 64.0), setup.device,
                            channels_last=setup.channels_last)  # fmt: skip
    images, targets = batcher(uint8.to(torch.uint8), torch.randint(0, 2, (batch_size,)))
    result: dict[str, Any] = {"mode": mode, "precision": setup.precision,
                              "threads": torch.get_num_threads()}  # fmt: skip

    def first_and_steady(run) -> tuple[float, float, float, float]:
        first = _time_steps(run, setup, images, targets, 1)
        _time_steps(run, setup, images, targets, 2)
        step = statistics.median(_time_steps(run, setup, images, targets, steps) for _ in range(3))
        first_forward = _time_forward(run.model, setup, images, 1)
        _time_forward(run.model, setup, images, 2)
        forward = statistics.median(
            _time_forward(run.model, setup, images, steps) for _ in range(3)
        )
        return first, step, first_forward, forward

    runs = []
    for instance in range(2 if mode == "compiled" else 1):
        run = build_run(spec, params, setup, seed=instance)
        if mode == "compiled":
            run.model.compile()
        runs.append(first_and_steady(run))
    first, step, first_forward, forward = runs[0]
    result.update(step_s=step, forward_s=forward,
                  first_step_extra_s=max(first - step, 0.0),
                  first_forward_extra_s=max(first_forward - forward, 0.0))  # fmt: skip
    if len(runs) == 2:
        result["second_instance_first_step_extra_s"] = max(runs[1][0] - runs[1][1], 0.0)
    result["load_1min"] = os.getloadavg()[0]
    return result


def _child(mode: str, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    command = [sys.executable, __file__, "--child", mode, "--model", args.model,
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--device", args.device]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small-cnn", help="model name (small-cnn)")
    parser.add_argument("--image-size", type=int, default=48, help="patch side, px (48)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device (cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (64)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (10)")
    parser.add_argument(
        "--trial-steps",
        type=int,
        default=128,
        help="training steps per trial (128: the demo's 4 epochs of 2,048 at B=64)",
    )
    parser.add_argument(
        "--trial-evals",
        type=int,
        default=4 * 16 + 32,
        help="eval batches per trial (96: 4 x 1,024 val + 2,048 probe at 64)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--child", choices=["eager", "compiled"], default=None,
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.child is not None:
        figures = measure(
            args.child, args.model, args.image_size, args.batch_size, args.steps, args.device
        )
        print(json.dumps(figures), flush=True)
        return figures

    with tempfile.TemporaryDirectory(prefix="hpo-bench-compile-") as temporary:
        cache = Path(temporary) / "inductor"
        eager = _child("eager", args, cache)
        cold = _child("compiled", args, cache)
        warm = _child("compiled", args, cache)
    step_saving = eager["step_s"] - cold["step_s"]
    forward_saving = eager["forward_s"] - cold["forward_s"]
    saving = args.trial_steps * step_saving + args.trial_evals * forward_saving
    costs = {
        "cold": cold["first_step_extra_s"] + cold["first_forward_extra_s"],
        "warm": warm["first_step_extra_s"] + warm["first_forward_extra_s"],
        "same_process": cold["second_instance_first_step_extra_s"],
    }
    result: dict[str, Any] = {
        "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
        "precision": eager["precision"], "threads": eager["threads"],
        "eager": eager, "cold": cold, "warm": warm,
        "compiled_vs_eager_step": eager["step_s"] / cold["step_s"],
        "compiled_vs_eager_forward": eager["forward_s"] / cold["forward_s"],
        "trial_steps": args.trial_steps, "trial_evals": args.trial_evals,
        "saving_per_trial_s": saving,
        "compile_s": costs,
        "break_even_steps": {k: (v / step_saving if step_saving > 0 else float("inf"))
                             for k, v in costs.items()},
        "load_1min": os.getloadavg()[0],
    }  # fmt: skip
    print(
        f"compile {args.model} {args.image_size}px B={args.batch_size} {eager['precision']}: "
        f"step eager {eager['step_s'] * 1e3:.1f} ms, compiled {cold['step_s'] * 1e3:.1f} ms "
        f"({result['compiled_vs_eager_step']:.2f}x); forward {result['compiled_vs_eager_forward']:.2f}x; "
        f"compile cold {costs['cold']:.1f} s, warm {costs['warm']:.1f} s, next trial "
        f"{costs['same_process']:.1f} s; saving per trial of {args.trial_steps} steps "
        f"{saving:.1f} s; load {result['load_1min']:.1f}",
        flush=True,
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
