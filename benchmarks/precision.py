"""Does bf16 autocast reach the same val metric as fp32 on the demo task?

The same fixed config (batch 64, lr 0.03, weight decay 1e-4, the demo's epochs) is trained
with ``training.mixed_precision`` on and off for each seed (spec seed = model init and
batch order), alternating. Prints the final val metric per seed and precision, the mean
difference and the seed-to-seed spread it is compared with.

Run: ``uv run python benchmarks/precision.py --json precision.json``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from optuna.trial import FixedTrial

from hpo.data import load_splits
from hpo.device import select_device
from hpo.objective import train_trial
from hpo.spec import load_spec

CONFIG = {"log2_batch_size": 6, "lr": 0.03, "weight_decay": 1e-4}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="demo", help="study file name or path (demo)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (3)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, 256 patches")
    args = parser.parse_args(argv)

    spec = load_spec(args.study)
    if args.quick:
        args.seeds = 1
        data = json.loads(spec.to_json())
        data["dataset"].update(train_size=256, val_size=128, image_size=16, cache_dir=None)
        data["budget"]["epochs"], data["pruner"]["min_epochs"] = 1, 1
        data["search"]["batch_size_max"] = 64
        spec = type(spec).model_validate(data)
    splits = load_splits(spec.dataset)
    metric = spec.objective.metric
    values: dict[str, list[float]] = {"bf16": [], "fp32": []}
    speed: dict[str, list[float]] = {"bf16": [], "fp32": []}
    for seed in range(args.seeds):
        for name in ("bf16", "fp32") if seed % 2 == 0 else ("fp32", "bf16"):
            data = json.loads(spec.to_json())
            data["seed"] = seed
            data["training"]["mixed_precision"] = name == "bf16"
            run_spec = type(spec).model_validate(data)
            trial = FixedTrial(CONFIG)
            values[name].append(train_trial(trial, run_spec, splits=splits))
            speed[name].append(trial.user_attrs["samples_per_s"])
            print(f"seed {seed} {name} ({trial.user_attrs['precision']}): {metric} "
                  f"{values[name][-1]:.4f}, {speed[name][-1]:,.0f} train samples/s", flush=True)  # fmt: skip
    differences = [b - f for b, f in zip(values["bf16"], values["fp32"], strict=True)]
    result = {
        "bf16_mean": statistics.fmean(values["bf16"]),
        "fp32_mean": statistics.fmean(values["fp32"]),
        "mean_difference": statistics.fmean(differences),
        "seed_spread": statistics.stdev(values["fp32"]) if args.seeds > 1 else 0.0,
        "bf16_samples_per_s": statistics.median(speed["bf16"]),
        "fp32_samples_per_s": statistics.median(speed["fp32"]),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    bf16_available = select_device(spec.training).amp_dtype is not None
    print(
        f"precision on {spec.name} ({args.seeds} seeds, bf16 "
        f"{'available' if bf16_available else 'NOT available: both runs are fp32'}, load "
        f"{os.getloadavg()[0]:.1f}): {metric} bf16 {result['bf16_mean']:.4f} vs fp32 "
        f"{result['fp32_mean']:.4f}, difference {result['mean_difference']:+.4f} (per seed "
        f"{', '.join(f'{d:+.4f}' for d in differences)}; fp32 seed spread "
        f"{result['seed_spread']:.4f}); train {result['bf16_samples_per_s']:,.0f} vs "
        f"{result['fp32_samples_per_s']:,.0f} samples/s"
    )
    return result


if __name__ == "__main__":
    main()
