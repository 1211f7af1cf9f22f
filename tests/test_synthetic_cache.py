"""The synthetic-data cache: concurrent writers never collide, a damaged file is regenerated
with a warning, an unwritable directory only costs the cache."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hpo.data
from hpo.data import synthetic_patches

generate = synthetic_patches.__wrapped__  # past the per-process lru_cache: the file is tested
COUNT, SEED = 8, 3


@pytest.fixture(scope="module")
def fresh():
    return generate(COUNT, SEED, None)


def _equal(a, b) -> bool:
    return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_concurrent_writers_each_get_whole_patches(tmp_path: Path, fresh) -> None:
    results, failures = [], []

    def fill() -> None:
        try:
            results.append(generate(COUNT, SEED, tmp_path))
        except Exception as error:  # noqa: BLE001 - any error is the failure under test
            failures.append(error)

    threads = [threading.Thread(target=fill) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert all(_equal(result, fresh) for result in results)
    (cached,) = tmp_path.iterdir()  # one cache file, no temporary left
    assert cached.name.startswith("synthetic-") and cached.suffix == ".pt"
    assert _equal(generate(COUNT, SEED, tmp_path), fresh)


@settings(
    derandomize=True,
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(cut=st.floats(0.0, 0.999), junk=st.binary(max_size=64))
def test_a_damaged_cache_file_is_regenerated(
    tmp_path_factory, fresh, cut: float, junk: bytes
) -> None:
    directory = tmp_path_factory.mktemp("cache")
    generate(COUNT, SEED, directory)
    (path,) = directory.iterdir()
    whole = path.read_bytes()
    path.write_bytes(whole[: int(len(whole) * cut)] + junk)
    assert _equal(generate(COUNT, SEED, directory), fresh)
    stored = torch.load(path, weights_only=True)  # the file is whole again
    assert torch.equal(stored["images"], fresh.images)


def test_a_cache_dir_that_cannot_be_written_costs_only_the_cache(tmp_path: Path, fresh) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert _equal(generate(COUNT, SEED, afile / "cache"), fresh)


def test_a_cache_written_by_another_generator_version_is_not_reused(
    tmp_path: Path, fresh, monkeypatch
) -> None:
    # What an older generator left: same count and seed, other patches, its own version.
    monkeypatch.setattr(hpo.data, "SYNTHETIC_VERSION", "v1")
    monkeypatch.setattr(hpo.data, "_draw_synthetic", lambda count, seed: generate_zeros(count))
    old = generate(COUNT, SEED, tmp_path)
    monkeypatch.undo()
    assert _equal(generate(COUNT, SEED, tmp_path), fresh)  # not the old file's patches
    assert not _equal(old, fresh) and len(list(tmp_path.glob("synthetic-*.pt"))) == 2


def generate_zeros(count: int):
    return hpo.data.PatchSet(
        torch.zeros((count, 3, 96, 96), dtype=torch.uint8), torch.zeros(count, dtype=torch.long)
    )
