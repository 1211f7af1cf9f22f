"""Many workers, one PostgreSQL: ask/tell latency and whether any trial is lost or duplicated.

``--workers`` processes (8) share one study in a fresh database on PostgreSQL and run
``--trials`` trials (500) of a trivial objective between them, through hpo's own storage
layer (``hpo.storage.open_storage``), sampler (``hpo.space.make_sampler`` in ``hpo.caps``' batch-size
cap wrapper around Optuna's sampler, with constant liar) and ``hpo.space.sample_params``
(log2 batch size, lr, weight decay). All processes start together behind a barrier.

Per trial, latency = ``study.ask()`` + the three suggestions + ``study.tell()``; the
objective itself takes no time. Run once with the random sampler (the storage's cost
alone) and once with TPE (storage + TPE's modelling over the trials so far).

- lost: trials a worker told that the storage does not hold as COMPLETE, plus trials
  missing from the expected total;
- duplicated: trial numbers handed to more than one worker, plus trials beyond the total.

The database (``hpo_bench_<pid>_<sampler>``) is created on the server of ``--url`` and
dropped afterwards. Run: ``uv run python benchmarks/storage_load.py --json storage.json``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import time
from collections import Counter
from pathlib import Path

import optuna
from sqlalchemy.engine import make_url

from hpo.caps import BatchSizeCapSampler
from hpo.space import make_sampler, sample_params
from hpo.spec import StudySpec
from hpo.storage import mask_url, open_storage

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
STUDY = "storage-load"


def bench_spec(sampler: str) -> StudySpec:
    return StudySpec.model_validate({
        "name": STUDY,
        "dataset": {"kind": "synthetic", "train_size": 1024, "val_size": 256},
        "model": {"name": "small-cnn"},
        "search": {"batch_size_min": 16, "batch_size_max": 512, "lr_low": 1e-4, "lr_high": 1.0,
                   "weight_decay_low": 1e-6, "weight_decay_high": 1e-2},
        "budget": {"epochs": 2},
        "sampler": {"kind": sampler, "seed": None, "n_startup_trials": 10},
    })  # fmt: skip


def _admin(url: str, statement: str) -> None:
    import psycopg

    parsed = make_url(url)
    with psycopg.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username,
        password=parsed.password, dbname="postgres", autocommit=True,
    ) as connection:  # fmt: skip
        connection.execute(statement)


def _worker(url: str, sampler: str, n_trials: int, barrier, results) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = bench_spec(sampler)
    storage = open_storage(url)
    study = optuna.load_study(
        study_name=STUDY,
        storage=storage,
        sampler=BatchSizeCapSampler(make_sampler(spec, parallel=True), storage, "cpu"),
    )
    barrier.wait()
    began, cpu_began = time.time(), time.process_time()
    latencies, numbers, errors = [], [], []
    for _ in range(n_trials):
        try:
            start = time.perf_counter()
            trial = study.ask()
            params = sample_params(trial, spec)
            asked = time.perf_counter()
            value = (params.lr - 0.01) ** 2 + params.weight_decay  # the trivial objective
            computed = time.perf_counter()
            study.tell(trial, value)
            latencies.append((asked - start) + (time.perf_counter() - computed))
            numbers.append(trial.number)
        except Exception as error:  # counted and shown: a storage error is a finding here
            errors.append(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    cpu = time.process_time() - cpu_began
    results.put((latencies, numbers, began, time.time(), errors, cpu))


def run_load(url: str, sampler: str, workers: int, trials: int) -> dict[str, float]:
    """One load test in a fresh database; returns median/p99 ms, lost, duplicated."""
    database = f"hpo_bench_{os.getpid()}_{sampler}"
    target = make_url(url).set(database=database).render_as_string(hide_password=False)
    _admin(url, f'DROP DATABASE IF EXISTS "{database}"')
    _admin(url, f'CREATE DATABASE "{database}"')
    try:
        optuna.create_study(study_name=STUDY, storage=open_storage(target), direction="minimize")
        context = multiprocessing.get_context("spawn")
        barrier, results = context.Barrier(workers), context.Queue()
        shares = [trials // workers + (i < trials % workers) for i in range(workers)]
        processes = [
            context.Process(target=_worker, args=(target, sampler, share, barrier, results))
            for share in shares
        ]
        for process in processes:
            process.start()
        gathered = []
        while len(gathered) < len(processes):
            try:
                gathered.append(results.get(timeout=1.0))
            except queue.Empty:
                failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if failed:
                    raise RuntimeError(f"a worker process failed (exit codes {failed})") from None
        for process in processes:
            process.join()
        # From the barrier to the last tell (process start-up excluded).
        wall = max(g[3] for g in gathered) - min(g[2] for g in gathered)
        latencies = sorted(seconds * 1000 for g in gathered for seconds in g[0])
        told = [number for g in gathered for number in g[1]]
        errors = [error for g in gathered for error in g[4]]
        cpu_ms_per_trial = 1000 * sum(g[5] for g in gathered) / max(1, len(told))
        stored = optuna.load_study(study_name=STUDY, storage=open_storage(target)).get_trials(
            deepcopy=False
        )
    finally:
        _admin(url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    complete = {t.number for t in stored if t.state == optuna.trial.TrialState.COMPLETE}
    handed_twice = sum(count - 1 for count in Counter(told).values() if count > 1)
    stored_twice = sum(
        count - 1 for count in Counter(t.number for t in stored).values() if count > 1
    )
    return {
        "ask_tell_median_ms": statistics.median(latencies),
        "ask_tell_p99_ms": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "lost": len(set(told) - complete) + max(0, trials - len(stored)),
        "duplicated": handed_twice + stored_twice + max(0, len(stored) - trials),
        "wall_s": wall,
        "errors": errors,
        "cpu_ms_per_trial": cpu_ms_per_trial,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("HPO_BENCH_PG", DEFAULT_URL),
                        help="a PostgreSQL URL; its server gets a temporary database "
                        f"($HPO_BENCH_PG, else {DEFAULT_URL})")  # fmt: skip
    parser.add_argument("--workers", type=int, default=8, help="worker processes (8)")
    parser.add_argument("--trials", type=int, default=500, help="trials in all (500)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="2 workers, 24 trials")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.trials = 2, 24

    result: dict[str, float] = {}
    walls, cpu = {}, {}
    for sampler, prefix in (("random", ""), ("tpe", "tpe_")):
        figures = run_load(args.url, sampler, args.workers, args.trials)
        walls[sampler] = figures.pop("wall_s")
        cpu[sampler] = figures.pop("cpu_ms_per_trial")
        errors = figures.pop("errors")
        for error, count in Counter(errors).most_common():
            print(f"{sampler}: {count} x {error}")
        result.update({prefix + key: value for key, value in figures.items()})
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    load = os.getloadavg()[0]
    print(
        f"storage_load {args.workers} workers x {args.trials} trials on {mask_url(args.url)} "
        f"(load {load:.1f}): random ask+tell median {result['ask_tell_median_ms']:.1f} ms, "
        f"p99 {result['ask_tell_p99_ms']:.1f} ms, lost {result['lost']}, duplicated "
        f"{result['duplicated']}, {args.trials / walls['random']:.0f} trials/s, worker CPU "
        f"{cpu['random']:.0f} ms/trial; TPE median "
        f"{result['tpe_ask_tell_median_ms']:.1f} ms, p99 {result['tpe_ask_tell_p99_ms']:.1f} ms, "
        f"lost {result['tpe_lost']}, duplicated {result['tpe_duplicated']}, "
        f"{args.trials / walls['tpe']:.0f} trials/s, worker CPU {cpu['tpe']:.0f} ms/trial"
    )
    return result


if __name__ == "__main__":
    main()
