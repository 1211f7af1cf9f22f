"""The input pipeline's features, and the benchmark scripts still run (``--quick``) and
write the figures the docs quote (smoke tests: at these sizes the figures mean nothing and
nothing is timed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from hpo.data import DeviceBatcher, load_splits
from hpo.spec import DatasetSpec
from tests.benchmark_scripts import BENCHMARKS, load_benchmark
from tests.databases import ADMIN_URLS, unreachable


def _mapped_file(address: int) -> str:
    """The file mapped at ``address`` in this process ('' when none; Linux only)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else ""
    return ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_uncompressed_pcam_is_memory_mapped_not_copied(tmp_path: Path) -> None:
    pipeline = load_benchmark("pipeline")
    pipeline.write_pcam(tmp_path, {"train": 40, "val": 20})
    with h5py.File(tmp_path / "pcam" / f"{pipeline.PCAM_FILES['train']}_x.h5") as f:
        stored = torch.from_numpy(f["x"][:]).permute(0, 3, 1, 2)

    train, val = load_splits(DatasetSpec(kind="pcam", root=tmp_path))

    assert torch.equal(train.images, stored)
    # Still the file's N×H×W×C bytes: a channels_last view, no copy made.
    assert train.images.is_contiguous(memory_format=torch.channels_last)
    assert _mapped_file(train.images.data_ptr()).endswith(f"{pipeline.PCAM_FILES['train']}_x.h5")
    assert len(val) == 20


def _batcher(jitter: float) -> DeviceBatcher:
    return DeviceBatcher(
        torch.full((3,), 100.0),
        torch.full((3,), 10.0),
        torch.device("cpu"),
        channels_last=True,
        color_jitter=jitter,
    )


def test_color_jitter_shifts_each_sample_and_channel_within_its_strength() -> None:
    images = torch.full((32, 3, 8, 8), 100, dtype=torch.uint8)
    out, _ = _batcher(0.1)(images, torch.zeros(32), torch.Generator().manual_seed(0))

    per_channel = out.mean(dim=(2, 3))
    assert torch.allclose(out, per_channel[..., None, None])  # one shift per channel
    assert per_channel.std() > 0.1  # and it differs between samples and channels
    # |gain - 1| <= 0.1 and |offset| <= 25.5 pixel units: at most (10 + 25.5) / 10 here.
    assert per_channel.abs().max() <= 3.55


def test_no_color_jitter_without_augmentation_or_strength() -> None:
    images = torch.full((4, 3, 8, 8), 110, dtype=torch.uint8)
    evaluated, _ = _batcher(0.1)(images, torch.zeros(4))
    plain, _ = _batcher(0.0)(images, torch.zeros(4), torch.Generator().manual_seed(0))

    assert torch.allclose(evaluated, torch.ones(1)) and torch.allclose(plain, torch.ones(1))


def _figures(path: Path) -> dict[str, float]:
    figures = json.loads(path.read_text())
    assert all(isinstance(value, int | float) for value in figures.values())
    return figures


def test_pipeline_benchmark_writes_speedups(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    pipeline = load_benchmark("pipeline")
    pipeline.main(["--quick", "--device", "cpu", "--json", str(out)])

    figures = _figures(out)
    assert {key for key in figures if not key.startswith("e2e_")} == {
        "input_speedup",
        "hpo_samples_per_s",
        "naive_samples_per_s",
        "speedup",
    }
    # The e2e breakdown: every phase of a trial timed, the training and evaluation seen.
    phases = {f"e2e_s_per_epoch_{p.replace(' ', '_')}" for p in pipeline.PHASES}
    assert phases <= set(figures)
    for phase in ("step", "eval", "gap_pass", "storage", "batch_prep"):
        assert figures[f"e2e_s_per_epoch_{phase}"] > 0, phase
    assert figures["e2e_storage_calls_per_epoch"] > 0
    assert 0 < figures["e2e_plain_step_share"] <= 1
    assert 0 < figures["e2e_vs_step"] <= 1.5


def test_cost_to_target_benchmark_writes_epochs(studies_dir: Path, tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parent.parent / "studies" / "demo.toml"
    out = tmp_path / "cost.json"
    load_benchmark("cost_to_target").main(["--quick", "--study", str(demo), "--json", str(out)])

    figures = _figures(out)
    assert set(figures) == {"grid_epochs", "random_epochs", "hpo_epochs", "hpo_fraction_of_grid"}
    assert figures["hpo_epochs"] <= figures["grid_epochs"]


def test_precision_check_writes_both_precisions(tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parent.parent / "studies" / "demo.toml"
    out = tmp_path / "precision.json"
    load_benchmark("precision").main(["--quick", "--study", str(demo), "--json", str(out)])

    assert {"bf16_mean", "fp32_mean", "mean_difference"} <= set(_figures(out))


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
