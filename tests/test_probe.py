"""`hpo probe`: which batch sizes fit, how fast, stored per device; samplers keep to it."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from typer.testing import CliRunner

from hpo.caps import (
    PROBE_ATTR_PREFIX,
    BatchSizeCapSampler,
    clamp_batch_size,
    read_batch_cap,
    stored_caps,
    write_batch_cap,
)
from hpo.cli import app
from hpo.probe import ProbeRow, probe_batch_sizes, store_probe
from hpo.space import make_sampler, sample_params
from hpo.spec import load_spec
from hpo.storage import StudyRef, open_storage
from hpo.study import create_or_load_study
from tests.conftest import tiny_study_text


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'probe.db'}"


def test_probe_times_every_power_of_two_of_the_space(tiny_study: Path) -> None:
    result = probe_batch_sizes(load_spec("tiny"), steps=1, warmup=0)

    assert result.device_name == "cpu"
    assert [row.batch_size for row in result.rows] == [16, 32, 64]
    assert all(row.fits and row.samples_per_s > 0 for row in result.rows)
    # Memory grows with the batch: activations dominate at these sizes.
    memory = [row.peak_memory_mib for row in result.rows]
    assert memory == sorted(memory) and memory[0] > 0
    assert result.max_batch_size == 64


def test_a_batch_size_that_runs_out_of_memory_stops_the_probe(tiny_study: Path) -> None:
    def measure(spec, setup, batch_size, steps, warmup) -> ProbeRow:
        if batch_size >= 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return ProbeRow(batch_size, True, 1000.0, 10.0)

    result = probe_batch_sizes(load_spec("tiny"), measure=measure)

    assert [(row.batch_size, row.fits) for row in result.rows] == [
        (16, True),
        (32, False),
        (64, False),
    ]
    assert "out of memory" in result.rows[1].note
    assert result.rows[2].note == "larger than 32"
    assert result.max_batch_size == 16


def test_the_probe_is_stored_on_the_study_per_device(tiny_study: Path, storage_url: str) -> None:
    loaded = create_or_load_study(load_spec("tiny"), storage_url)
    result = probe_batch_sizes(
        load_spec("tiny"),
        measure=lambda spec, setup, b, steps, warmup: ProbeRow(b, b <= 32, 1.0, 1.0),
    )

    store_probe(loaded.ref, result)

    assert stored_caps(loaded.ref) == {"cpu": 32}
    assert loaded.study.user_attrs[PROBE_ATTR_PREFIX + "cpu"]["max_batch_size"] == 32


@pytest.mark.parametrize("kind", ["tpe", "random", "grid"])
def test_samplers_never_propose_a_batch_size_above_the_device_cap(
    tiny_study: Path, storage_url: str, kind: str
) -> None:
    spec = load_spec("tiny").model_copy(deep=True)
    spec = spec.model_copy(update={"sampler": spec.sampler.model_copy(update={"kind": kind})})
    storage = open_storage(storage_url)
    sampler = BatchSizeCapSampler(make_sampler(spec), storage, "cpu")
    study = optuna.create_study(storage=storage, sampler=sampler)
    write_batch_cap(StudyRef.by_name(storage, study.study_name), "cpu", 32)

    study.optimize(lambda trial: sample_params(trial, spec).lr, n_trials=12)

    drawn = [t.params["log2_batch_size"] for t in study.trials]
    assert max(drawn) <= 5
    clamped = [
        t.user_attrs["batch_size_clamped_from"]
        for t in study.trials
        if t.user_attrs.get("batch_size_clamped_from")
    ]
    assert clamped and set(clamped) == {64}


def test_clamp_takes_the_largest_power_of_two_under_the_cap() -> None:
    assert clamp_batch_size(256, None) == 256
    assert clamp_batch_size(256, 256) == 256
    assert clamp_batch_size(256, 96) == 64


def test_hpo_probe_prints_the_table_and_stores_the_cap(tiny_study: Path, storage_url: str) -> None:
    result = CliRunner().invoke(
        app, ["probe", "--study", "tiny", "--storage", storage_url, "--steps", "1"]
    )

    assert result.exit_code == 0, result.output
    assert "batch sizes on cpu" in result.output
    assert "batch-size cap stored for 'cpu': 64" in result.output
    assert read_batch_cap(StudyRef.by_name(open_storage(storage_url), "tiny"), "cpu") == 64


def test_probe_builds_the_head_for_the_datasets_classes(
    studies_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3-class ImageFolder study is probed with the 3-wide head its trials train (the
    head and its gradients are part of the memory measured), on labels of all 3 classes."""
    from hpo import probe
    from tests.test_multiclass import write_three_class_folder

    write_three_class_folder(tmp_path / "patches", per_class=4)
    text = tiny_study_text(epochs=1).replace(
        'kind = "synthetic"\ntrain_size = 256\nval_size = 128\nimage_size = 32',
        f'kind = "imagefolder"\nroot = "{tmp_path / "patches"}"\nimage_size = 16',
    )
    (studies_dir / "tiny.toml").write_text(text)
    built: list[torch.nn.Module] = []

    def build_model_on(*args, **kwargs) -> torch.nn.Module:
        built.append(model := real_build_model_on(*args, **kwargs))
        return model

    real_build_model_on = probe.build_model_on
    monkeypatch.setattr(probe, "build_model_on", build_model_on)

    result = probe_batch_sizes(load_spec("tiny"), steps=1, warmup=0)

    assert all(row.fits for row in result.rows) and len(built) == len(result.rows) == 3
    heads = [[m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1] for model in built]
    assert {head.out_features for head in heads} == {3}
