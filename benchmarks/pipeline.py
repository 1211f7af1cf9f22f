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

(c) end to end vs the step (``e2e_vs_step`` in the JSON): a trial as a worker runs it
    against its bare ``train_step``, with the per-epoch breakdown; what it measures and
    its options are in ``pipeline_e2e.py``.

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
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from optuna.trial import FixedTrial
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import PCAM

from hpo.data import DeviceBatcher, _draw_synthetic, batch_indices, channel_stats, load_splits
from hpo.device import select_device
from hpo.models import build_model
from hpo.objective import train_trial
from hpo.spec import StudySpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_e2e import PHASES, describe_e2e, e2e_vs_step, flat_e2e, sync_device  # noqa: E402 (sibling)

__all__ = ["PHASES", "GpuUtilization", "naive_loader", "write_pcam"]

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
    sync_device(device)
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
    sync_device(device)
    return count / (time.perf_counter() - start)


# --------------------------------------------------------------------------- hpo


def hpo_input(train_set, batcher: DeviceBatcher, batch_size: int, device: torch.device) -> float:
    generator = torch.Generator().manual_seed(0)
    start, count = time.perf_counter(), 0
    for indices in batch_indices(len(train_set), batch_size, generator=generator, drop_last=True):
        images, labels = batcher.take(train_set, indices, generator)
        count += len(indices)
    sync_device(device)
    return count / (time.perf_counter() - start)


def hpo_train_eval(spec: StudySpec, splits, batch_size: int) -> float:
    trial = FixedTrial(
        {"log2_batch_size": int(np.log2(batch_size)), "lr": 0.01, "weight_decay": 1e-4}
    )
    device = select_device(spec.training).device
    start = time.perf_counter()
    train_trial(trial, spec, splits=splits)
    sync_device(device)
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
