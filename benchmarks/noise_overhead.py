"""What does measuring the gradient noise scale cost in training samples/s?

Two figures on the demo task (small CNN, the device's precision and memory format):
1. per step: the time of a measured update (``hpo.noise.noise_scale_step``: two half-batch
   passes, two gradient norms) over a plain ``train_step``, interleaved, median of many;
   the overhead at measuring every k-th update is then (ratio − 1) / k;
2. end to end: train epochs with ``noise_every = 0`` and ``= k`` alternately and compare
   the samples/s the Tally records (median over repeats).

With ``--micro-batch M`` both figures are for an accumulated update (micro-batches of M,
``training.above_cap = "accumulate"``): the measured kind is ``train_step_accumulated``
taking its two gradient norms, the plain kind the same update without them.

A batch size below ``hpo.noise_probe.NOISE_PROBE_MIN_TRAIN_BATCH`` measures by probes
instead (``hpo.noise_probe``): for it, one trial of ``--epochs`` epochs is trained with
its probes planned as in a study, and the figure is the probes' seconds (each timed, the
training bit-identical with or without them) over the rest of its training time, with the
probes' count and examples; and one probe of the most passes against a plain step.

Run: ``uv run python benchmarks/noise_overhead.py``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hpo.data import batch_indices, load_splits
from hpo.device import select_device
from hpo.noise import NOISE_SCALE_EVERY, NoiseScaleEstimate, noise_every_for, noise_scale_step
from hpo.noise_probe import noise_probe_for, run_probe, uses_probe
from hpo.resource import TrainingBudget
from hpo.spec import TrialParams, load_spec
from hpo.train import (
    autocast,
    build_run,
    prepare_data,
    train_epoch,
    train_step,
    train_step_accumulated,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="demo", help="study file name or path (demo)")
    parser.add_argument("--batch-sizes", default="32,128", help="comma-separated (32,128)")
    parser.add_argument("--every", type=int, default=NOISE_SCALE_EVERY, help="k (default)")
    parser.add_argument("--steps", type=int, default=60, help="step pairs per batch size (60)")
    parser.add_argument("--repeats", type=int, default=4, help="epoch pairs (4)")
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="accumulate in micro-batches of this size"
    )
    parser.add_argument("--epochs", type=int, default=2, help="a probing trial's epochs (2)")
    args = parser.parse_args(argv)
    micro = args.micro_batch

    spec = load_spec(args.study)
    setup = select_device(spec.training)
    data = prepare_data(load_splits(spec.dataset), setup, spec.training)
    figures: dict[str, float] = {}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        if uses_probe(batch_size, micro, None):
            figures.update(_probe_figures(spec, setup, data, batch_size, args.epochs))
            continue
        params = TrialParams(batch_size=batch_size, lr=0.03, weight_decay=1e-4)
        run = build_run(spec, params, setup, seed=0)
        estimate = NoiseScaleEstimate()
        plain, measured = [], []
        batches = batch_indices(len(data.train), batch_size, generator=None, drop_last=True)
        images, targets = data.batcher.take(data.train, next(iter(batches)))
        for step in range(args.steps + 5):
            for kind in ("plain", "measured") if step % 2 else ("measured", "plain"):
                _sync(setup.device)
                started = time.perf_counter()
                if micro is not None:
                    train_step_accumulated(
                        run.model, run.optimizer, run.scaler, setup, images, targets, micro,
                        estimate if kind == "measured" else None,
                    )  # fmt: skip
                elif kind == "plain":
                    train_step(run.model, run.optimizer, run.scaler, setup, images, targets)
                else:
                    noise_scale_step(
                        run.model, run.optimizer, run.scaler, autocast(setup), images, targets,
                        estimate,
                    )  # fmt: skip
                _sync(setup.device)
                if step >= 5:  # warm-up
                    (plain if kind == "plain" else measured).append(time.perf_counter() - started)
        ratio = statistics.median(measured) / statistics.median(plain)
        per_step = (ratio - 1) / args.every

        speeds: dict[int, list[float]] = {0: [], args.every: []}
        for repeat in range(args.repeats):
            order = (0, args.every) if repeat % 2 else (args.every, 0)
            for every in order:
                before = (run.tally.train_samples, run.tally.train_seconds)
                train_epoch(run, data, setup, batch_size=batch_size, augment=False,
                            on_step=lambda loss: None, noise_every=every,
                            micro_batch_size=micro)  # fmt: skip
                samples = run.tally.train_samples - before[0]
                speeds[every].append(samples / (run.tally.train_seconds - before[1]))
        off = statistics.median(speeds[0])
        on = statistics.median(speeds[args.every])
        end_to_end = 1 - on / off
        how = "" if micro is None else f", accumulated in {micro}s"
        print(
            f"B={batch_size}{how} ({setup.name}, {setup.precision}): measured step "
            f"{ratio:.2f}x a plain step -> {per_step:.1%} at k={args.every}; epochs: "
            f"{off:,.0f} vs {on:,.0f} samples/s ({end_to_end:+.1%} slower); "
            f"B_simple {run.tally.noise.b_simple()}",
            flush=True,
        )
        figures[f"step_ratio_b{batch_size}"] = ratio
        figures[f"overhead_per_step_b{batch_size}"] = per_step
        figures[f"overhead_end_to_end_b{batch_size}"] = end_to_end
    print(json.dumps(figures))
    return figures


def _probe_figures(spec, setup, data, batch_size: int, epochs: int) -> dict[str, float]:
    """A trial of ``epochs`` epochs at ``batch_size`` with its probes planned as in a study:
    their seconds over the rest of its training; and one 8-pass probe over a plain step."""
    params = TrialParams(batch_size=batch_size, lr=0.03, weight_decay=1e-4)
    run = build_run(spec, params, setup, seed=0)
    budget = TrainingBudget("epochs", epochs, 1, len(data.train) // batch_size)
    probe = noise_probe_for(run, data, setup, budget, batch_size, False, None)
    every = noise_every_for(budget.total_updates)
    for _ in range(epochs):  # train_to_report's loop, one report per epoch
        train_epoch(run, data, setup, batch_size=batch_size, augment=False,
                    on_step=lambda loss: None, noise_every=every, noise_probe=probe)  # fmt: skip
    tally = run.tally
    probe_seconds, other = tally.noise_seconds, tally.train_seconds - tally.noise_seconds
    count, examples = tally.noise_probes, tally.noise_probe_examples
    overhead = probe_seconds / other
    plain, probes = [], []
    images, targets = data.batcher.take(data.train, torch.arange(batch_size))
    for _ in range(12):
        _sync(setup.device)
        started = time.perf_counter()
        train_step(run.model, run.optimizer, run.scaler, setup, images, targets)
        _sync(setup.device)
        plain.append(time.perf_counter() - started)
        before = tally.noise_seconds
        run_probe(run, data, setup, augment=False, allowance=float("inf"))
        probes.append(tally.noise_seconds - before)
    ratio = statistics.median(probes) / statistics.median(plain)
    print(
        f"B={batch_size} ({setup.name}, {setup.precision}): {epochs}-epoch trial, "
        f"{tally.updates} updates, {count} probe(s) of {examples} examples in all: "
        f"{probe_seconds:.3f} s = {overhead:.2%} of its other {other:.2f} s of training; "
        "an 8-pass probe "
        f"{ratio:.1f}x a plain step",
        flush=True,
    )
    return {
        f"probe_overhead_b{batch_size}": overhead,
        f"probes_b{batch_size}": count,
        f"probe_examples_b{batch_size}": examples,
        f"probe_step_ratio_b{batch_size}": ratio,
    }


if __name__ == "__main__":
    main()
