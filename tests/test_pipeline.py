"""The benchmark scripts still run (``--quick``) and write the figures the docs quote.

They are smoke tests: the figures at these sizes mean nothing and nothing is timed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.databases import ADMIN_URLS, unreachable

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _figures(path: Path) -> dict[str, float]:
    figures = json.loads(path.read_text())
    assert all(isinstance(value, int | float) for value in figures.values())
    return figures


def test_pipeline_benchmark_writes_speedups(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    _script("pipeline").main(["--quick", "--device", "cpu", "--json", str(out)])

    assert set(_figures(out)) == {
        "input_speedup",
        "hpo_samples_per_s",
        "naive_samples_per_s",
        "speedup",
    }


def test_cost_to_target_benchmark_writes_epochs(studies_dir: Path, tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parent.parent / "studies" / "demo.toml"
    out = tmp_path / "cost.json"
    _script("cost_to_target").main(["--quick", "--study", str(demo), "--json", str(out)])

    figures = _figures(out)
    assert set(figures) == {"grid_epochs", "random_epochs", "hpo_epochs", "hpo_fraction_of_grid"}
    assert figures["hpo_epochs"] <= figures["grid_epochs"]


@pytest.mark.db
def test_storage_load_benchmark_writes_latencies_and_losses(tmp_path: Path) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(ADMIN_URLS["postgresql"])
    try:
        psycopg.connect(host=url.host, port=url.port or 5432, user=url.username,
                        password=url.password, dbname=url.database, connect_timeout=5).close()  # fmt: skip
    except psycopg.OperationalError as error:
        unreachable("postgresql", error)
    out = tmp_path / "storage.json"
    command = [sys.executable, str(BENCHMARKS / "storage_load.py"), "--quick", "--json", str(out)]
    subprocess.run(command + ["--url", ADMIN_URLS["postgresql"]], check=True, timeout=300)

    figures = _figures(out)
    keys = {"ask_tell_median_ms", "ask_tell_p99_ms", "lost", "duplicated"}
    assert set(figures) == keys | {f"tpe_{key}" for key in keys}
    assert figures["lost"] == figures["duplicated"] == 0
