"""Process start to first training step of one ``hpo worker``, as every worker pays it.

Each round starts a fresh interpreter running ``hpo worker --spec <demo study file>`` (a
new study per round, SQLite in a temporary directory), exactly as ``hpo launch
--workers N`` starts its children (``sys.executable -m hpo worker``), and stops it at the
first call of ``hpo.train.train_step``. What is timed, from before ``Popen``:

- ``imports_s``: interpreter start + importing hpo's worker path (torch, optuna,
  sqlalchemy, sklearn, ...);
- ``first_step_s``: everything up to the first training step: imports, creating the
  study, loading the (cached) data, building the model.

``--no-bytecode`` points ``PYTHONPYCACHEPREFIX`` at an empty directory, so no compiled
``.pyc`` is found and every module is compiled from source: the figure before
``[tool.uv] compile-bytecode`` (this environment sets PYTHONDONTWRITEBYTECODE).

Run: ``uv run python benchmarks/startup.py --rounds 3``
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

REPO = Path(__file__).resolve().parents[1]

# The child: note when imports are done, stop at the first training step.
CHILD = """
import os, sys, time
import hpo.train, hpo.worker, hpo.cli
print("IMPORTED", time.time(), flush=True)
def first_step(*args, **kwargs):
    print("FIRST_STEP", time.time(), flush=True)
    os._exit(0)
hpo.train.train_step = first_step
sys.argv = ["hpo", *sys.argv[1:]]
hpo.cli.main()
"""


def one_round(directory: Path, study: str, env: dict[str, str]) -> dict[str, float]:
    (directory / f"{study}.toml").write_text((REPO / "studies/demo.toml").read_text())
    command = [sys.executable, "-c", CHILD, "worker", "--study", study, "--spec", f"{study}.toml"]
    command += ["--n-trials", "1"]
    started = time.time()
    completed = subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, timeout=600
    )
    marks = {}
    for line in completed.stdout.splitlines():
        name, _, value = line.partition(" ")
        if name in ("IMPORTED", "FIRST_STEP"):
            marks[name] = float(value) - started
    if "FIRST_STEP" not in marks:
        raise SystemExit(f"worker did not reach a training step:\n{completed.stderr[-2000:]}")
    return {"imports_s": marks["IMPORTED"], "first_step_s": marks["FIRST_STEP"]}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (3)")
    parser.add_argument(
        "--no-bytecode", action="store_true", help="ignore compiled .pyc (the 'before' figure)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hpo-bench-startup-") as temporary:
        directory = Path(temporary)
        env = {**os.environ, "HPO_STORAGE": f"sqlite:///{directory / 'hpo.db'}"}
        env.pop("HPO_STUDIES_DIR", None)
        if args.no_bytecode:
            env["PYTHONPYCACHEPREFIX"] = str(directory / "no-pyc")
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        # The first round also generates the demo's data cache; later rounds read it, as
        # every worker after the first does.
        cold = one_round(directory, "startup-cold", env)
        rounds = [one_round(directory, f"startup{index}", env) for index in range(args.rounds)]

    result: dict[str, object] = {
        "bytecode": not args.no_bytecode,
        "cold_data_first_step_s": cold["first_step_s"],
        "imports_s": statistics.median(r["imports_s"] for r in rounds),
        "first_step_s": statistics.median(r["first_step_s"] for r in rounds),
        "rounds": rounds,
        "load_1min": os.getloadavg()[0],
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"worker start ({'compiled bytecode' if result['bytecode'] else 'no bytecode'}), "
        f"median of {args.rounds}, load {result['load_1min']:.1f}: imports "
        f"{result['imports_s']:.1f} s, first training step {result['first_step_s']:.1f} s "
        f"(first worker, data cache cold: {cold['first_step_s']:.1f} s)"
    )
    return result


if __name__ == "__main__":
    main()
