"""Datasets: synthetic is deterministic; PCam from HDF5 files in PCam's own format; ImageFolder."""

from __future__ import annotations

import ast
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import hpo.data as hpo_data
from hpo.data import (
    DataError,
    DeviceBatcher,
    _draw_synthetic,
    augment_batch,
    batch_indices,
    load_splits,
    synthetic_patches,
    to_device,
)
from hpo.spec import DatasetSpec

PCAM_FILES = {
    "train": "camelyonpatch_level_2_split_train",
    "val": "camelyonpatch_level_2_split_valid",
    "test": "camelyonpatch_level_2_split_test",
}


def write_pcam(root: Path, sizes: dict[str, int], seed: int = 0) -> None:
    """PCam's layout and format: <root>/pcam/<split>_x.h5 with dataset 'x' (N,96,96,3)
    uint8 and <split>_y.h5 with dataset 'y' (N,1,1,1) uint8, labels from synthetic patches."""
    folder = root / "pcam"
    folder.mkdir(parents=True, exist_ok=True)
    for offset, (split, count) in enumerate(sizes.items()):
        patches = _draw_synthetic(count, seed + offset)
        images = patches.images.permute(0, 2, 3, 1).numpy()
        labels = patches.labels.numpy().astype(np.uint8).reshape(-1, 1, 1, 1)
        with h5py.File(folder / f"{PCAM_FILES[split]}_x.h5", "w") as f:
            f.create_dataset(
                "x", data=images, chunks=(min(count, 32), 96, 96, 3), compression="gzip"
            )
        with h5py.File(folder / f"{PCAM_FILES[split]}_y.h5", "w") as f:
            f.create_dataset("y", data=labels)


def test_synthetic_is_deterministic_per_seed() -> None:
    a, b, c = _draw_synthetic(24, seed=3), _draw_synthetic(24, seed=3), _draw_synthetic(24, seed=4)
    assert a.images.dtype == torch.uint8 and a.images.shape == (24, 3, 96, 96)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_synthetic_looks_like_h_and_e_with_crowded_tumour_nuclei() -> None:
    patches = _draw_synthetic(400, seed=0)
    images = patches.images.float()
    red, green, blue = images[:, 0], images[:, 1], images[:, 2]
    # Eosin pink background: red above green, blue above green on average.
    assert red.mean() > green.mean() + 30 and blue.mean() > green.mean() + 10
    # Hematoxylin nuclei: dark purple pixels, about as many in either class, so a
    # threshold on nuclear area is close to chance (the old generator's easy feature).
    nuclear = ((red < 140) & (blue > green)).float()
    area = nuclear.mean(dim=(1, 2))
    tumour, normal = patches.labels == 1, patches.labels == 0
    assert 0.02 < area[normal].mean() < area[tumour].mean() < 1.1 * area[normal].mean()
    threshold = (area[tumour].mean() + area[normal].mean()) / 2
    assert ((area > threshold).long() == patches.labels).float().mean() < 0.6
    # Tumour nuclei are crowded: their pixels lie closer to their centre of mass...
    weights = nuclear / nuclear.sum(dim=(1, 2), keepdim=True).clamp_min(1)
    ys = torch.arange(96.0).view(1, 96, 1)
    xs = torch.arange(96.0).view(1, 1, 96)
    my, mx = (weights * ys).sum(dim=(1, 2)), (weights * xs).sum(dim=(1, 2))
    squared = (ys - my.view(-1, 1, 1)) ** 2 + (xs - mx.view(-1, 1, 1)) ** 2
    spread = (weights * squared).sum(dim=(1, 2)).sqrt()
    assert spread[tumour].mean() < 0.95 * spread[normal].mean()
    # ...but the classes overlap: a threshold on that spread alone is far from perfect.
    threshold = (spread[tumour].mean() + spread[normal].mean()) / 2
    accuracy = ((spread < threshold).long() == patches.labels).float().mean()
    assert 0.56 < accuracy < 0.85


def test_synthetic_is_cached_in_memory_and_on_disk(tmp_path: Path) -> None:
    first = synthetic_patches(16, 7, tmp_path)
    assert synthetic_patches(16, 7, tmp_path) is first  # in-process cache
    synthetic_patches.cache_clear()
    assert len(list(tmp_path.glob("synthetic-*.pt"))) == 1
    again = synthetic_patches(16, 7, tmp_path)  # reloaded from disk
    assert torch.equal(again.images, first.images)


def test_synthetic_splits_have_requested_sizes_and_image_size() -> None:
    train, val = load_splits(
        DatasetSpec(kind="synthetic", train_size=40, val_size=10, image_size=32)
    )
    assert train.images.shape == (40, 3, 32, 32) and val.images.shape == (10, 3, 32, 32)
    assert train.images.dtype == torch.uint8


def test_pcam_is_read_from_pcam_format_hdf5(tmp_path: Path) -> None:
    write_pcam(tmp_path, {"train": 48, "val": 16})
    train, val = load_splits(DatasetSpec(kind="pcam", root=tmp_path))
    assert train.images.shape == (48, 3, 96, 96) and len(val) == 16
    expected = _draw_synthetic(48, 0)
    assert torch.equal(train.images, expected.images)
    assert torch.equal(train.labels, expected.labels)


def test_pcam_subset_is_seeded(tmp_path: Path) -> None:
    write_pcam(tmp_path, {"train": 64, "val": 16})
    spec = DatasetSpec(kind="pcam", root=tmp_path, train_size=20, val_size=8, seed=5)
    a, _ = load_splits(spec)
    b, _ = load_splits(spec)
    assert len(a) == 20 and torch.equal(a.images, b.images)


def test_pcam_missing_files_error_names_them(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_splits(DatasetSpec(kind="pcam", root=tmp_path))
    message = str(error.value)
    assert "camelyonpatch_level_2_split_train_x.h5" in message
    assert "camelyonpatch_level_2_split_train_y.h5" in message
    assert str(tmp_path / "pcam") in message


def write_image_folder(root: Path, per_class: int = 10, size: int = 40) -> None:
    rng = np.random.default_rng(0)
    for label, name in enumerate(["normal", "tumor"]):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 120, (size, size, 3)) + 100 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index}.png")


def test_imagefolder_is_decoded_once_and_split_stratified(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=10)
    spec = DatasetSpec(kind="imagefolder", root=tmp_path, val_fraction=0.2, image_size=32, seed=1)
    train, val = load_splits(spec)
    assert train.images.shape == (16, 3, 32, 32) and len(val) == 4
    assert train.labels.sum() == 8 and val.labels.sum() == 2  # 20% of each class held out
    # Tumour images were drawn brighter: the labels follow the class directories.
    assert (
        train.images[train.labels == 1].float().mean()
        > train.images[train.labels == 0].float().mean() + 50
    )
    again, _ = load_splits(spec)
    assert torch.equal(again.images, train.images)


def test_imagefolder_with_one_class_is_refused(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "x.png")
    with pytest.raises(DataError, match="found 1 class"):
        load_splits(DatasetSpec(kind="imagefolder", root=tmp_path))


def test_training_batches_drop_the_partial_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = list(batch_indices(100, 32, generator=generator, drop_last=True))
    assert [len(b) for b in batches] == [32, 32, 32]
    assert len(torch.cat(batches).unique()) == 96
    assert [len(b) for b in batch_indices(100, 32, generator=None, drop_last=False)] == [
        32,
        32,
        32,
        4,
    ]


def test_augmentation_is_per_sample_dihedral_and_batched() -> None:
    images = torch.arange(64 * 3 * 8 * 8, dtype=torch.float32).reshape(64, 3, 8, 8)
    out = augment_batch(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    dihedral = []
    for k in range(4):
        dihedral.append(images.rot90(k, dims=(2, 3)))
        dihedral.append(images.flip(3).rot90(k, dims=(2, 3)))
    kinds = set()
    for index in range(64):
        matches = [
            i for i, candidate in enumerate(dihedral) if torch.equal(out[index], candidate[index])
        ]
        assert matches, "each sample is one of the 8 flips/rotations of itself"
        kinds.add(matches[0])
    assert len(kinds) >= 6  # decided per sample, not once per batch


def _flip_then_rotate(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The augmentation as flip, then rotate (no gather): the reference it must equal."""
    draws = torch.randint(0, 8, (images.shape[0],), generator=generator)
    flip = (draws & 4).bool().view(-1, 1, 1, 1)
    images = torch.where(flip, images.flip(3), images)
    out = images.clone()
    for k in (1, 2, 3):
        selected = torch.nonzero((draws & 3) == k).flatten()
        out[selected] = images[selected].rot90(k, dims=(2, 3))
    return out


@pytest.mark.parametrize(("count", "size", "seed"), [(64, 48, 0), (16, 96, 1), (7, 5, 2)])
def test_augmentation_draws_and_moves_pixels_exactly_as_flip_then_rotate(
    count: int, size: int, seed: int
) -> None:
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    ours, reference = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert torch.equal(augment_batch(images, ours), _flip_then_rotate(images, reference))
    assert torch.equal(ours.get_state(), reference.get_state())  # the same random stream


def test_device_batcher_normalizes_to_float_channels_last() -> None:
    images = torch.full((4, 3, 8, 8), 100, dtype=torch.uint8)
    batcher = DeviceBatcher(
        torch.tensor([100.0, 50.0, 0.0]),
        torch.tensor([10.0, 10.0, 10.0]),
        torch.device("cpu"),
        channels_last=True,
    )
    out, labels = batcher(images, torch.zeros(4, dtype=torch.long))
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out[:, 0], torch.zeros(1)) and torch.allclose(
        out[:, 1], torch.full((1,), 5.0)
    )


# ------------------------------------------------------------- host-to-device copies


def test_to_device_on_cuda_pins_and_queues_the_copy_without_blocking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A blocking host-to-device copy makes torch wait for the whole CUDA stream: each
    batch drawn that way left the GPU idle while the host prepared the next one."""
    calls: list[tuple[str, tuple, dict]] = []

    def pin_memory(self: torch.Tensor) -> torch.Tensor:
        calls.append(("pin_memory", (), {}))
        return self

    def to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(("to", args, kwargs))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    cuda = torch.device("cuda")
    to_device(torch.zeros(4), cuda)
    assert calls == [("pin_memory", (), {}), ("to", (cuda,), {"non_blocking": True})]


def test_to_device_on_cpu_is_a_plain_copy() -> None:
    tensor = torch.arange(6)
    assert torch.equal(to_device(tensor, torch.device("cpu")), tensor)


def test_a_batch_reaches_the_device_only_through_the_non_blocking_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """images, labels, the augmentation draw and the colour-jitter draws: five copies per
    augmented batch, all through ``to_device``; and no other ``.to(`` in hpo/data.py runs
    per batch (only the batcher's constructor and ``to_device`` itself hold one)."""
    copied: list[tuple[int, ...]] = []
    original = hpo_data.to_device

    def recording(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        copied.append(tuple(tensor.shape))
        return original(tensor, device)

    monkeypatch.setattr(hpo_data, "to_device", recording)
    batcher = DeviceBatcher(
        torch.full((3,), 128.0), torch.full((3,), 64.0), torch.device("cpu"),
        channels_last=False, color_jitter=0.05,
    )  # fmt: skip
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    batcher(images, torch.tensor([0, 1, 0, 1]), torch.Generator().manual_seed(0))
    assert sorted(copied) == sorted([(4, 3, 8, 8), (4,), (4,), (4, 3, 1, 1), (4, 3, 1, 1)])

    tree = ast.parse(Path(hpo_data.__file__).read_text())
    holders = {
        function.name
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        for call in ast.walk(function)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "to"
    }
    assert holders <= {"to_device", "__init__"}, holders
