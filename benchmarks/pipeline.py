"""hpo's input pipeline and training loop against the naive torchvision one, on the same data.

Both sides read the same generated PCam-format HDF5 files (uncompressed, as torchvision
leaves PCam after download). Rounds alternate A/B, so a neighbour's load hits both sides;
the figures are medians over rounds.

(a) input pipeline alone, one epoch of the training split at ``--batch-size``:
    naive = torchvision ``PCAM`` + ``DataLoader(num_workers=<cores>)`` with per-sample
    flips, ``ToTensor``, ``Normalize``; hpo = the split read once into a uint8 tensor
    (``hpo.data.load_splits``), batches by index, flips/rotations and normalization in
    whole-batch ops on the device (``DeviceBatcher``). The one-time read is timed apart.
(b) train + eval, one epoch of training plus one pass over the validation split:
    naive = that DataLoader feeding the same model in fp32 NCHW; hpo = ``hpo.objective.train_trial``
    (bf16 autocast where supported, channels_last, inference-mode eval; it also evaluates
    up to 2,048 training patches for the generalization gap, which is not counted as work).
    samples/s = (train + val patches) / wall time.

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

Run: ``uv run python benchmarks/pipeline.py --json pipeline.json``
(``--only e2e`` for (c) alone)
(``--model resnet18``; ``--device cuda --batch-size 256`` on a GPU node, which also
samples GPU utilization). Prints one summary line at the end.
"""

from __future__ import annotations

# ruff: noqa: E402
from hpo.settings import default_omp_wait_policy

default_omp_wait_policy()  # as hpo's entry points do, before torch is imported

import argparse
import contextlib
import inspect
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import h5py
import numpy as np
import optuna
import torch
import torch.nn.functional as F
from optuna.trial import FixedTrial
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import PCAM

import hpo.cnn_trainer as hpo_cnn_trainer
import hpo.train as hpo_train
from hpo.checkpoint import TrialCheckpoint
from hpo.data import DeviceBatcher, _draw_synthetic, batch_indices, channel_stats, load_splits
from hpo.device import select_device, start_on_this_node
from hpo.models import build_model
from hpo.objective import Objective, train_trial
from hpo.spec import StudySpec, TrialParams, load_spec
from hpo.study import create_or_load_study
from hpo.train import build_run, prepare_data, train_step

PCAM_FILES = {
    "train": "camelyonpatch_level_2_split_train",
    "val": "camelyonpatch_level_2_split_valid",
}


def write_pcam(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """PCam's layout and format (uncompressed): <root>/pcam/<split>_{x,y}.h5. Reused if there."""
    folder = root / "pcam"
    folder.mkdir(parents=True, exist_ok=True)
    for offset, (split, count) in enumerate(sizes.items()):
        x_path = folder / f"{PCAM_FILES[split]}_x.h5"
        y_path = folder / f"{PCAM_FILES[split]}_y.h5"
        if x_path.is_file() and y_path.is_file():
            with h5py.File(x_path, "r") as f:
                if f["x"].shape[0] == count:
                    continue
        patches = _draw_synthetic(count, seed + offset)
        with h5py.File(x_path, "w") as f:
            f.create_dataset("x", data=patches.images.permute(0, 2, 3, 1).numpy())
        with h5py.File(y_path, "w") as f:
            f.create_dataset("y", data=patches.labels.numpy().astype(np.uint8).reshape(-1, 1, 1, 1))
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuUtilization:
    """Samples GPU utilization (%) every 0.2 s while active: torch.cuda.utilization (NVML),
    else nvidia-smi. Empty on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5, check=True,
                ).stdout  # fmt: skip
                return float(out.split()[self.device.index or 0])
            except Exception:
                return None

    interval_s = 0.2

    def __enter__(self) -> GpuUtilization:
        if self.device.type == "cuda":

            def loop() -> None:
                while not self._stop.wait(self.interval_s):
                    value = self._read()
                    if value is not None:
                        self.samples.append(value)

            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


# --------------------------------------------------------------------------- naive


def naive_loader(root: Path, split: str, batch_size: int, workers: int, *, train: bool,
                 mean: list[float], std: list[float], pin: bool) -> DataLoader:  # fmt: skip
    steps = [transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip()] if train else []
    transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
    dataset = PCAM(str(root), split=split, transform=transform, download=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=workers,
                      pin_memory=pin, drop_last=train, persistent_workers=False)  # fmt: skip


def naive_input(loader: DataLoader, device: torch.device) -> float:
    start, count = time.perf_counter(), 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        count += len(labels)
    _sync(device)
    return count / (time.perf_counter() - start)


def naive_train_eval(
    model_name: str, train: DataLoader, val: DataLoader, device: torch.device
) -> float:
    """One epoch + one validation pass, fp32 NCHW, as a plain PyTorch script would."""
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    start, count = time.perf_counter(), 0
    model.train()
    for images, labels in train:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        count += len(labels)
    model.eval()
    with torch.no_grad():
        for images, labels in val:
            images, labels = (
                images.to(device, non_blocking=True),
                labels.to(device, non_blocking=True),
            )
            F.cross_entropy(model(images), labels)
            count += len(labels)
    _sync(device)
    return count / (time.perf_counter() - start)


# --------------------------------------------------------------------------- hpo


def hpo_input(train_set, batcher: DeviceBatcher, batch_size: int, device: torch.device) -> float:
    generator = torch.Generator().manual_seed(0)
    start, count = time.perf_counter(), 0
    for indices in batch_indices(len(train_set), batch_size, generator=generator, drop_last=True):
        images, labels = batcher.take(train_set, indices, generator)
        count += len(indices)
    _sync(device)
    return count / (time.perf_counter() - start)


def hpo_train_eval(spec: StudySpec, splits, batch_size: int) -> float:
    trial = FixedTrial(
        {"log2_batch_size": int(np.log2(batch_size)), "lr": 0.01, "weight_decay": 1e-4}
    )
    device = select_device(spec.training).device
    start = time.perf_counter()
    train_trial(trial, spec, splits=splits)
    _sync(device)
    return (len(splits[0]) // batch_size * batch_size + len(splits[1])) / (
        time.perf_counter() - start
    )


def make_spec(
    root: Path, model: str, batch_size: int, n_train: int, n_val: int, device: str
) -> StudySpec:
    return StudySpec.model_validate({
        "name": "bench",
        "dataset": {"kind": "pcam", "root": str(root), "train_size": n_train, "val_size": n_val},
        "model": {"name": model},
        "search": {"batch_size_min": batch_size, "batch_size_max": 2 * batch_size,
                   "lr_low": 1e-3, "lr_high": 0.1, "weight_decay_low": 1e-5, "weight_decay_high": 1e-3},
        "budget": {"epochs": 1},
        "pruner": {"kind": "none"},
        "training": {"device": device},
    })  # fmt: skip


# --------------------------------------------------------------------------- e2e vs step

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
                _sync(self.device)
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
    _sync(setup.device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(run.model, run.optimizer, run.scaler, setup, images, targets)
    _sync(setup.device)
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
        _sync(setup.device)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="small-cnn", help="small-cnn, resnet18 or vgg16 (small-cnn)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size (64)")
    parser.add_argument("--n-input", type=int, default=4096, help="patches for (a) (4096)")
    parser.add_argument("--n-train", type=int, default=2048, help="training patches for (b) (2048)")
    parser.add_argument("--n-val", type=int, default=512, help="validation patches for (b) (512)")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds, alternating (3)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="naive DataLoader workers (cores)")  # fmt: skip
    parser.add_argument("--data", type=Path, default=None,
                        help="where the generated HDF5 files go (a temporary directory)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round (smoke test)")
    parser.add_argument("--only", choices=["all", "naive", "e2e"], default="all",
                        help="run only (a)+(b) against naive, or only (c) e2e vs step (all)")  # fmt: skip
    parser.add_argument("--e2e-rounds", type=int, default=3, help="(c) rounds (3)")
    parser.add_argument("--e2e-epochs", type=int, default=None, help="(c) epochs (the demo's)")
    parser.add_argument("--e2e-reports", type=int, default=None,
                        help="(c) reports per trial (the demo's, 4; histo.toml: one per epoch)")  # fmt: skip
    parser.add_argument("--e2e-train-size", type=int, default=None,
                        help="(c) training patches (the demo's)")  # fmt: skip
    parser.add_argument("--e2e-val-size", type=int, default=None,
                        help="(c) validation patches (the demo's)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.n_input, args.n_train, args.n_val, args.rounds = 128, 64, 32, 1
        args.batch_size = min(args.batch_size, 32)
        args.e2e_rounds, args.e2e_epochs, args.e2e_train_size = 1, 1, 128
        args.e2e_val_size = 64

    result: dict[str, Any] = {}
    if args.only != "e2e":
        result.update(versus_naive(args))
    if args.only != "naive":
        e2e = e2e_vs_step(args.model, args.batch_size, args.e2e_rounds, args.device,
                          epochs=args.e2e_epochs, train_size=args.e2e_train_size,
                          val_size=args.e2e_val_size, reports=args.e2e_reports)  # fmt: skip
        result.update(flat_e2e(e2e))
        print(describe_e2e(e2e) + f"; load {_load():.1f}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def versus_naive(args: argparse.Namespace) -> dict[str, Any]:
    """(a) and (b): hpo against the naive torchvision pipeline, A/B rounds."""
    temporary = None
    if args.data is None:
        temporary = tempfile.TemporaryDirectory(prefix="hpo-bench-pcam-")
        args.data = Path(temporary.name)
    n_train = max(args.n_input, args.n_train)
    root = write_pcam(args.data, {"train": n_train, "val": args.n_val})

    spec = make_spec(root, args.model, args.batch_size, args.n_train, args.n_val, args.device)
    setup = select_device(spec.training)
    device = setup.device
    pin = device.type == "cuda"

    start = time.perf_counter()
    input_set, _ = load_splits(spec.dataset.model_copy(update={"train_size": args.n_input}))
    hpo_read_s = time.perf_counter() - start
    splits = load_splits(spec.dataset)
    mean, std = channel_stats(input_set.images)
    batcher = DeviceBatcher(mean, std, device, channels_last=setup.channels_last)
    mean01, std01 = (mean / 255).tolist(), (std / 255).tolist()

    def loaders(n: int) -> tuple[DataLoader, DataLoader]:
        train = naive_loader(root, "train", args.batch_size, args.workers, train=True,
                             mean=mean01, std=std01, pin=pin)  # fmt: skip
        val = naive_loader(root, "val", args.batch_size, args.workers, train=False,
                           mean=mean01, std=std01, pin=pin)  # fmt: skip
        return _limit(train, n), val

    rounds: dict[str, list[float]] = {k: [] for k in ("hpo_in", "naive_in", "hpo", "naive")}
    utilization = GpuUtilization(device)
    for index in range(args.rounds):
        naive_first = index % 2 == 1
        for side in ("naive", "hpo") if naive_first else ("hpo", "naive"):
            if side == "hpo":
                rounds["hpo_in"].append(hpo_input(input_set, batcher, args.batch_size, device))
            else:
                rounds["naive_in"].append(naive_input(loaders(args.n_input)[0], device))
        for side in ("naive", "hpo") if naive_first else ("hpo", "naive"):
            if side == "hpo":
                with utilization:
                    rounds["hpo"].append(hpo_train_eval(spec, splits, args.batch_size))
            else:
                train, val = loaders(args.n_train)
                rounds["naive"].append(naive_train_eval(args.model, train, val, device))
        print(f"round {index + 1}/{args.rounds}: " + ", ".join(
            f"{k} {v[-1]:,.0f}/s" for k, v in rounds.items()), flush=True)  # fmt: skip

    median = {k: statistics.median(v) for k, v in rounds.items()}
    result = {
        "input_speedup": median["hpo_in"] / median["naive_in"],
        "hpo_samples_per_s": median["hpo"],
        "naive_samples_per_s": median["naive"],
        "speedup": median["hpo"] / median["naive"],
    }
    if device.type == "cuda":
        result["gpu_utilization_pct"] = utilization.mean
    print(
        f"pipeline {args.model} B={args.batch_size} on {setup.name} "
        f"({'bf16' if setup.amp_dtype == torch.bfloat16 else setup.amp_dtype or 'fp32'}, "
        f"{'channels_last' if setup.channels_last else 'NCHW'}), {args.rounds} A/B rounds, "
        f"load {_load():.1f}: input hpo {median['hpo_in']:,.0f}/s vs naive {median['naive_in']:,.0f}/s "
        f"= {result['input_speedup']:.1f}x (one-time read {hpo_read_s:.2f} s); train+eval hpo "
        f"{median['hpo']:,.0f}/s vs naive {median['naive']:,.0f}/s = {result['speedup']:.2f}x"
        + (f"; GPU utilization {result['gpu_utilization_pct']}%" if device.type == "cuda" else "")
    )
    if temporary is not None:
        temporary.cleanup()
    return result


def _limit(loader: DataLoader, n: int) -> DataLoader:
    """The loader over the first ``n`` patches of its dataset (same settings)."""
    subset = torch.utils.data.Subset(loader.dataset, range(min(n, len(loader.dataset))))
    return DataLoader(subset, batch_size=loader.batch_size, shuffle=True,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last)  # fmt: skip


if __name__ == "__main__":
    main()
