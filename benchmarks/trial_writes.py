"""Storage writes per worker trial: the calls hpo's worker makes into its storage
(``ReconnectingRDBStorage``) for each trial of a tiny study on a SQLite file, by method,
and the transactions they commit.

A worker trial of hpo's own loop writes its parameters, an intermediate value per report,
its user attrs (the record of what it trained: ``hpo.cnn_trainer.record_tally``, the
device time, the worker) and the tell. Each write is a transaction on SQLite and MariaDB
and one statement in autocommit on PostgreSQL; the count is the same on every backend.

  uv run python benchmarks/trial_writes.py --trials 2
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import sqlalchemy

WRITES = (
    "_create_new_trial",
    "_set_trial_param",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_user_attrs",
    "set_trial_system_attr",
    "set_trial_state_values",
    "record_heartbeat",
)

STUDY = """
    name = "writes"
    seed = 0

    [dataset]
    kind = "synthetic"
    train_size = 256
    val_size = 128
    image_size = 32

    [model]
    name = "small-cnn"

    [search]
    batch_size_min = 16
    batch_size_max = 64
    lr_low = 1e-3
    lr_high = 0.3
    weight_decay_low = 1e-6
    weight_decay_high = 1e-3

    [budget]
    epochs = 2
    n_trials = {trials}

    [pruner]
    kind = "none"

    [sampler]
    kind = "random"
    seed = 0
"""


def count_writes(trials: int) -> dict[str, Any]:
    """Run ``trials`` trials in one worker on a new SQLite study; the storage writes per
    trial by method, and COMMITs per trial (every transaction, reads included)."""
    from hpo.spec import load_spec
    from hpo.storage import ReconnectingRDBStorage
    from hpo.study import create_or_load_study
    from hpo.worker import run_worker

    calls: collections.Counter[str] = collections.Counter()
    keys: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(ReconnectingRDBStorage, name, None) for name in WRITES}

    def counted(name: str, method: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            if name == "set_trial_user_attr":
                keys[kwargs.get("key", args[1] if len(args) > 1 else None)] += 1
            elif name == "set_trial_user_attrs":
                keys.update(list(kwargs.get("attrs", args[1] if len(args) > 1 else {})))
            return method(self, *args, **kwargs)

        return wrapper

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / "studies").mkdir()
        (root / "studies" / "writes.toml").write_text(textwrap.dedent(STUDY.format(trials=trials)))
        os.chdir(root)
        url = f"sqlite:///{root / 'hpo.db'}"
        loaded = create_or_load_study(load_spec("writes"), url)
        loaded.storage.dispose()
        commits = [0]
        sqlalchemy.event.listen(
            sqlalchemy.engine.Engine, "commit", lambda *_: commits.__setitem__(0, commits[0] + 1)
        )
        for name, method in originals.items():
            if method is not None:
                setattr(ReconnectingRDBStorage, name, counted(name, method))
        try:
            run_worker("writes", url, total_trials=trials)
        finally:
            for name, method in originals.items():
                if method is not None:
                    setattr(ReconnectingRDBStorage, name, method)
    per_trial = {name: calls[name] / trials for name in WRITES if calls[name]}
    return {
        "trials": trials,
        "writes_per_trial": per_trial,
        "all_writes_per_trial": sum(per_trial.values()),
        "commits_per_trial": commits[0] / trials,
        "user_attrs_per_trial": sum(keys.values()) / trials,
        "user_attr_keys": sorted(keys),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = count_writes(args.trials)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
