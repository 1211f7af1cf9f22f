"""hpo's trial end to end against its bare step: part (c) of ``pipeline.py``.

(c) end to end vs the step (``e2e_vs_step`` in the JSON): at the demo's settings
    (studies/demo.toml; ``--e2e-train-size``, ``--e2e-val-size``, ``--e2e-epochs`` and
    ``--e2e-reports`` change its shape and budget, e.g. to histo.toml's one report per epoch),
    a trial's training samples over its wall time (one trial as a worker runs it on
    SQLite: ask, fit, report/prune, a checkpoint per epoch, user attrs, tell) divided by
    the bare ``train_step``'s samples/s on one prepared batch, same model, precision, batch
    size and process; medians over ``--e2e-rounds``, alternating. One more, instrumented,
    trial gives the per-epoch breakdown: step, noise step, batch prep, eval, gap pass, checkpoint,
    storage (every call into the SQL storage), other (building the run, Python overhead).
    The ratio is taken against the steps inside the trial (see ``e2e_vs_step``).

Run through ``pipeline.py --only e2e``.
"""

from __future__ import annotations

# ruff: noqa: E402
from hpo.settings import default_omp_wait_policy

default_omp_wait_policy()  # as hpo's entry points do, before torch is imported

import contextlib
import inspect
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import optuna
import torch

import hpo.cnn_trainer as hpo_cnn_trainer
import hpo.train as hpo_train
from hpo.checkpoint import TrialCheckpoint
from hpo.data import DeviceBatcher, load_splits
from hpo.device import start_on_this_node
from hpo.objective import Objective
from hpo.spec import StudySpec, TrialParams, load_spec
from hpo.study import create_or_load_study
from hpo.train import build_run, prepare_data, train_step


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DEMO_STUDY = Path(__file__).resolve().parents[1] / "studies" / "demo.toml"
PHASES = ("step", "noise step", "batch prep", "eval", "gap pass", "checkpoint", "storage", "other")


class PhaseClock:
    """Exclusive wall time per phase: entering a phase pauses the one around it (batch
    preparation inside an evaluation counts as batch prep). On CUDA each phase ends with a
    sync, so this run's total is not the uninstrumented one; only its shares are used."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, dict.fromkeys(PHASES, 0.0)
        self.calls = dict.fromkeys(PHASES, 0)
        self._stack: list[tuple[str, float]] = []

    def wrap(self, phase: str | Callable[..., str], function: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            name = phase(*args, **kwargs) if callable(phase) else phase
            self.calls[name] += 1
            now = time.perf_counter()
            if self._stack:
                outer, since = self._stack[-1]
                self.seconds[outer] += now - since
            self._stack.append((name, now))
            try:
                return function(*args, **kwargs)
            finally:
                sync_device(self.device)
                now = time.perf_counter()
                _, since = self._stack.pop()
                self.seconds[name] += now - since
                if self._stack:
                    self._stack[-1] = (self._stack[-1][0], now)

        return timed


def demo_spec(model: str, epochs: int | None, device: str, reports: int | None = None) -> StudySpec:
    """studies/demo.toml (no data cache on disk), with ``model`` and ``device``; ``epochs``
    and ``reports`` replace the demo's budget where given."""
    spec = load_spec(DEMO_STUDY)
    budget = {"epochs": epochs or spec.budget.epochs, "reports": reports or spec.budget.reports}
    return spec.model_copy(
        update={
            "dataset": spec.dataset.model_copy(update={"cache_dir": None}),
            "model": spec.model.model_copy(update={"name": model}),
            "budget": spec.budget.model_copy(update=budget),
            "training": spec.training.model_copy(update={"device": device}),
        }
    )


def bare_step_samples_per_s(spec: StudySpec, setup, splits, batch_size: int) -> float:
    """``train_step`` alone on one prepared batch, as many steps as a training epoch has."""
    params = TrialParams(batch_size=batch_size, lr=0.01, weight_decay=1e-4)
    run = build_run(spec, params, setup, seed=0)
    data = prepare_data(splits, setup, spec.training)
    images, targets = data.batcher.take(data.train, torch.arange(batch_size))
    run.model.train()
    for _ in range(3):
        train_step(run.model, run.optimizer, run.scaler, setup, images, targets)
    steps = len(data.train) // batch_size
    sync_device(setup.device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(run.model, run.optimizer, run.scaler, setup, images, targets)
    sync_device(setup.device)
    return steps * batch_size / (time.perf_counter() - start)


def one_trial(spec: StudySpec, setup, splits, batch_size: int, directory: Path,
              name: str, clock: PhaseClock | None) -> float:  # fmt: skip
    """One trial as a worker runs it (ask, fit with report/prune and a checkpoint after every
    epoch, user attrs, tell) on SQLite; returns its wall seconds. With ``clock``, the
    phases are timed by wrapping the functions a trial calls."""
    # Only the trial enqueued here: no first round per batch size (sampler.cover_batch_sizes).
    sampler = spec.sampler.model_copy(update={"cover_batch_sizes": False})
    spec = spec.model_copy(update={"name": name, "sampler": sampler})
    loaded = create_or_load_study(spec, f"sqlite:///{directory / 'e2e.db'}")
    loaded.study.enqueue_trial(
        {"log2_batch_size": int(np.log2(batch_size)), "lr": 0.01, "weight_decay": 1e-4}
    )
    objective = Objective(spec, setup, splits, study=loaded.ref, checkpoint_root=directory / name)
    with contextlib.ExitStack() as stack:
        if clock is not None:
            captured: dict[str, Any] = {}

            def prepare(*args: Any, **kwargs: Any) -> Any:
                captured["data"] = hpo_train.prepare_data(*args, **kwargs)
                return captured["data"]

            def evaluation(model, patches, *args: Any, **kwargs: Any) -> str:
                return "gap pass" if patches is captured["data"].train_probe else "eval"

            patches = [
                (hpo_cnn_trainer, "prepare_data", prepare),
                (hpo_train, "train_step", clock.wrap("step", hpo_train.train_step)),
                # Every NOISE_SCALE_EVERY-th update: an update that also measures
                # the gradient noise scale (two half-batch backward passes).
                (
                    hpo_train,
                    "noise_scale_step",
                    clock.wrap("noise step", hpo_train.noise_scale_step),
                ),
                (hpo_train, "evaluate", clock.wrap(evaluation, hpo_train.evaluate)),
                (DeviceBatcher, "take", clock.wrap("batch prep", DeviceBatcher.take)),
                (TrialCheckpoint, "save", clock.wrap("checkpoint", TrialCheckpoint.save)),
            ]
            # Every call into the SQL storage, whoever makes it (Optuna or hpo).
            for storage_class in (optuna.storages.RDBStorage, type(loaded.storage)):
                for method, value in vars(storage_class).items():
                    if not method.startswith("__") and inspect.isfunction(value):
                        patches.append((storage_class, method, clock.wrap("storage", value)))
            for owner, attribute, replacement in patches:
                stack.enter_context(mock.patch.object(owner, attribute, replacement))
        start = time.perf_counter()
        loaded.study.optimize(objective, n_trials=1)
        sync_device(setup.device)
        wall = time.perf_counter() - start
    state = loaded.study.trials[-1].state
    if state != optuna.trial.TrialState.COMPLETE:
        raise RuntimeError(f"e2e trial ended {state.name}")
    if clock is not None:
        clock.seconds["other"] += wall - sum(clock.seconds.values())
    return wall


def e2e_vs_step(model: str, batch_size: int, rounds: int, device: str, *, epochs: int | None = None,
                train_size: int | None = None, val_size: int | None = None,
                reports: int | None = None) -> dict[str, Any]:  # fmt: skip
    """A trial's training samples/s end to end over the bare ``train_step``'s, same model,
    precision, batch size and process, at the demo's settings, with the per-epoch
    breakdown.

    Every round times a trial with its phases clocked (on CPU the wrappers cost
    microseconds) and, before it, ``train_step`` alone on one prepared batch. On a
    shared 2-core machine the load swung the separately timed bare step 4.5x between two rounds
    minutes apart (54 vs 245 samples/s), so the headline ratio uses the steps inside the
    trial itself, timed under the same load: ``e2e_vs_step`` = (samples / trial wall) /
    (samples of the plain updates / time in ``train_step``). Every 32nd update is a
    noise-scale step (``hpo.noise``, phase "noise step"): its samples are training samples,
    its time is overhead beside the plain step's rate (counted in "other", the ratio would
    leave those samples out: 1/32 = 3% low at B = 64). The ratio to the
    separately timed step is reported beside it (``e2e_vs_separate_step``). On CUDA each
    clocked phase ends with a sync, which the uninstrumented loop does not have."""
    spec = demo_spec(model, epochs, device, reports)
    sizes = {"train_size": train_size, "val_size": val_size}
    sizes = {key: value for key, value in sizes.items() if value is not None}
    spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update=sizes)})
    setup = start_on_this_node(spec.training)  # as a worker does
    splits = load_splits(spec.dataset)
    samples = spec.budget.epochs * (len(splits[0]) // batch_size) * batch_size
    measured = []
    with tempfile.TemporaryDirectory(prefix="hpo-bench-e2e-") as temporary:
        directory = Path(temporary)
        one_trial(spec, setup, splits, batch_size, directory, "warm-up", None)
        for index in range(rounds):
            bare = bare_step_samples_per_s(spec, setup, splits, batch_size)
            clock = PhaseClock(setup.device)
            wall = one_trial(spec, setup, splits, batch_size, directory, f"e2e{index}", clock)
            measured.append({"bare_step": bare, "trial": samples / wall,
                             "seconds": dict(clock.seconds), "wall": wall,
                             "plain_steps": clock.calls["step"],
                             "storage_calls": clock.calls["storage"]})  # fmt: skip
    for entry in measured:
        # The plain steps' rate; the trial's samples include the noise-scale updates'.
        entry["in_trial_step"] = entry["plain_steps"] * batch_size / entry["seconds"]["step"]
        entry["e2e_vs_step"] = entry["trial"] / entry["in_trial_step"]
    ratios = [entry["e2e_vs_step"] for entry in measured]
    middle = measured[ratios.index(statistics.median_low(ratios))]
    epochs_run = spec.budget.epochs
    bare_median = statistics.median(entry["bare_step"] for entry in measured)
    trial_median = statistics.median(entry["trial"] for entry in measured)
    return {
        "model": model,
        "batch_size": batch_size,
        "epochs": epochs_run,
        "reports": spec.budget.report_count,
        "train_size": len(splits[0]),
        "val_size": len(splits[1]),
        "image_size": spec.dataset.image_size,
        "precision": setup.precision,
        "e2e_vs_step": middle["e2e_vs_step"],
        "trial_samples_per_s": middle["trial"],
        "in_trial_step_samples_per_s": middle["in_trial_step"],
        "separate_step_samples_per_s": bare_median,
        "e2e_vs_separate_step": trial_median / bare_median,
        "rounds": [
            {key: entry[key] for key in ("e2e_vs_step", "trial", "in_trial_step", "bare_step")}
            for entry in measured
        ],
        "seconds_per_epoch": {k: v / epochs_run for k, v in middle["seconds"].items()},
        "share_of_trial": {k: v / middle["wall"] for k, v in middle["seconds"].items()},
        # Calls into the SQL storage (Optuna's and hpo's, nested ones included) per epoch.
        "storage_calls_per_epoch": middle["storage_calls"] / epochs_run,
        # The trial's samples trained in plain steps (the rest: noise-scale updates).
        "plain_step_share": middle["plain_steps"] * batch_size / samples,
    }


def flat_e2e(e2e: dict[str, Any]) -> dict[str, float]:
    """The (c) figures as flat numbers for ``--json``: the ratios, the samples/s and the
    seconds per epoch of each phase (``e2e_s_per_epoch_gap_pass``, ...)."""
    flat = {
        "e2e_vs_step": e2e["e2e_vs_step"],
        "e2e_vs_separate_step": e2e["e2e_vs_separate_step"],
        "e2e_trial_samples_per_s": e2e["trial_samples_per_s"],
        "e2e_in_trial_step_samples_per_s": e2e["in_trial_step_samples_per_s"],
        "e2e_separate_step_samples_per_s": e2e["separate_step_samples_per_s"],
        "e2e_storage_calls_per_epoch": e2e["storage_calls_per_epoch"],
        "e2e_plain_step_share": e2e["plain_step_share"],
    }
    for phase, seconds in e2e["seconds_per_epoch"].items():
        flat[f"e2e_s_per_epoch_{phase.replace(' ', '_')}"] = seconds
    return flat


def describe_e2e(result: dict[str, Any]) -> str:
    shares = ", ".join(
        f"{phase} {result['seconds_per_epoch'][phase]:.2f} s ({result['share_of_trial'][phase]:.0%})"
        for phase in PHASES
    )
    return (
        f"e2e {result['model']} B={result['batch_size']} {result['precision']}, "
        f"{result['epochs']} epochs, {result['reports']} reports: trial "
        f"{result['trial_samples_per_s']:,.0f}/s vs its steps {result['in_trial_step_samples_per_s']:,.0f}/s "
        f"= {result['e2e_vs_step']:.2f} (vs the separately timed step "
        f"{result['separate_step_samples_per_s']:,.0f}/s: {result['e2e_vs_separate_step']:.2f}); "
        f"per epoch: {shares}; {result['storage_calls_per_epoch']:.0f} storage calls"
    )
