"""Is a worker's connection budget (1 kept + 1 overflow) enough for ``hpo dashboard``?

The dashboard is a threaded WSGI server on ``open_storage``'s pool. This starts it on a
private PostgreSQL (``tests/private_postgres.py``) with a study of 300 trials of 10
reports each, and lets ``--clients`` threads request its API endpoints back to back (no
think time: far more than a browser, which polls every few seconds) for ``--seconds``,
once per pool setting, twice each. Prints one JSON line per run: requests, errors (a
request that waited past SQLAlchemy's 30 s pool timeout would be one), p50 / p99 latency.

  uv run python benchmarks/dashboard_pool.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/private_postgres.py

from tests.private_postgres import private_postgres  # noqa: E402


def populate(url: str, trials: int) -> None:
    study = optuna.create_study(study_name="dash", storage=url)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -5, 5)
        y = trial.suggest_int("y", 1, 64, log=True)
        for epoch in range(10):
            trial.report(x * x + epoch, epoch)
        return x * x + y

    study.optimize(objective, n_trials=trials)


def measure(url: str, size: int, overflow: int, clients: int, seconds: float) -> dict:
    os.environ["HPO_DB_POOL_SIZE"], os.environ["HPO_DB_MAX_OVERFLOW"] = str(size), str(overflow)
    from hpo.dashboard import make_server

    artifacts = Path(tempfile.mkdtemp(prefix="hpo-dash-bench-"))
    server = make_server(url, host="127.0.0.1", port=0, artifact_dir=artifacts)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    paths = ["/api/studies", "/api/studies/1?after=0", "/api/studies/1/param_importances",
             "/api/meta"]  # fmt: skip
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                url_ = f"http://127.0.0.1:{port}{random.choice(paths)}"
                urllib.request.urlopen(url_, timeout=60).read()
                latencies.append(time.perf_counter() - started)
            except Exception as error:  # counted and shown
                errors.append(repr(error)[:100])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.shutdown()
    server.server_close()
    latencies.sort()
    return {
        "pool": f"{size}+{overflow}",
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "p50_ms": round(1000 * latencies[len(latencies) // 2]),
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--trials", type=int, default=300)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with private_postgres() as server:
        url = server.create_database("hpo_dashboard")
        populate(url, args.trials)
        for size, overflow in ((1, 1), (4, 4), (1, 1), (4, 4)):
            print(json.dumps(measure(url, size, overflow, args.clients, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
