"""Datasets held as uint8 tensors, and batches built on the device.

Training never decodes images one by one: every split is loaded once into a
``uint8`` tensor of shape N×3×H×W (PCam from its HDF5 files, ImageFolder decoded once,
synthetic generated once per process). A batch is drawn by index, moved to the device,
converted to float, normalized and augmented there in whole-batch operations. On this
project's reference CPU that input path is 14× faster than torchvision's per-sample
``PCAM`` + ``DataLoader`` pipeline.

Nothing here knows about Optuna.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hpo.compat import pcam_file_names, pcam_folder
from hpo.datacheck import (
    DataError,
    check_requested,
    check_splits,
    decode_image,
    image_files,
    pcam_split,
    reading,
)
from hpo.resource import check_reports_fit
from hpo.spec import DatasetSpec, StudySpec

__all__ = ["DataError", "PatchSet", "class_counts", "class_names", "load_splits", "study_splits"]

logger = logging.getLogger(__name__)

PATCH_SIZE = 96  # PCam's patch size; the synthetic generator draws at this size too.
# Part of the synthetic cache's file name: bumped with every change to what
# ``_draw_synthetic`` draws, so a cache written by an older generator is never reused.
# v2: crowding instead of nucleus count, size and darkness carries the label.
SYNTHETIC_VERSION = "v2"


@dataclass(frozen=True)
class PatchSet:
    """A split held in memory: ``images`` uint8 N×3×H×W, ``labels`` int64 N (1 = tumour)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> PatchSet:
        return PatchSet(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class PreparedPatches:
    """A split already normalized on the device, as ``DeviceBatcher.take`` returns its
    batches without augmentation (float, the batcher's memory format), so evaluating it
    again is forward passes only. ``images[i:j]`` of a channels_last tensor stays
    channels_last. Built by ``DeviceBatcher.prepare``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- synthetic


def _smooth_noise(rng: np.random.Generator, count: int, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = torch.from_numpy(rng.random((count, 1, cells, cells), dtype=np.float32))
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    return fine[:, 0].numpy()


def _nucleus_mask(
    rng: np.random.Generator, a: float, yy: np.ndarray, xx: np.ndarray, size: int
) -> np.ndarray:
    """The nuclei of one patch with atypia ``a`` as a soft mask in [0, 1]: that share of
    them crowded around one focus, the rest anywhere, more varied in size and outline the
    higher ``a``. ``yy``/``xx`` are the patch's pixel coordinates."""
    n_nuclei = rng.poisson(14)
    mask = np.zeros((size, size), dtype=np.float32)
    focus = rng.uniform(size * 0.2, size * 0.8, 2)
    for _ in range(n_nuclei):
        if rng.random() < a:  # crowded around the focus
            cy, cx = np.clip(focus + rng.normal(0, size * 0.25, 2), 0, size - 1)
        else:
            cy, cx = rng.uniform(0, size, 2)
        radius = float(np.clip(rng.normal(3.4, 0.6 + 0.8 * a), 1.5, 10))
        elongation = 1.0 + rng.gamma(1.0 + 2.5 * a, 0.12)
        angle = rng.uniform(0, np.pi)
        lobes = rng.integers(2, 6)
        wobble = (0.05 + 0.3 * a) * rng.uniform(0.3, 1.0)
        phase = rng.uniform(0, 2 * np.pi)
        # Rasterize in the nucleus's bounding box only (the whole patch is 30x slower).
        reach = int(np.ceil(radius * elongation * (1 + wobble))) + 2
        y0, y1 = max(0, int(cy) - reach), min(size, int(cy) + reach + 1)
        x0, x1 = max(0, int(cx) - reach), min(size, int(cx) + reach + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        r = np.sqrt((u * elongation) ** 2 + (v / elongation) ** 2)
        boundary = radius * (1 + wobble * np.sin(lobes * np.arctan2(v, u) + phase))
        # Soft edge; the max lets nuclei overlap like real clusters.
        np.maximum(mask[y0:y1, x0:x1], np.clip(boundary - r + 0.5, 0, 1), out=mask[y0:y1, x0:x1])
    return mask


def _draw_synthetic(count: int, seed: int, size: int = PATCH_SIZE) -> PatchSet:
    """H&E-like patches: pink eosin stroma with purple hematoxylin nuclei.

    Each patch has a latent "atypia" score drawn from overlapping class distributions.
    Tumour patches (label 1) are told apart by *crowding*: the score is the share of
    nuclei packed around one focus of the patch (the rest are scattered), and it also
    makes nuclei more varied in size (pleomorphism) and more elongated and irregular.
    The amount of nuclear material carries no signal: the nucleus count (Poisson, mean
    14), mean radius and darkness are the same in both classes, so a model cannot get
    far by counting purple pixels; it has to learn where they are, which takes a
    well-tuned learning rate (measured: with count, size and darkness rising with the
    score, every LR within a decade of the best reached the same val AUC in 2 epochs).
    The overlap of the score's class distributions and 3% label noise keep the Bayes
    accuracy well below 100%.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=count)
    atypia = np.clip(rng.normal(0.32 + 0.36 * labels, 0.16), 0.0, 1.0)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    background = _smooth_noise(rng, count, size, cells=6)
    texture = _smooth_noise(rng, count, size, cells=24)
    images = np.empty((count, size, size, 3), dtype=np.float32)
    eosin = np.array([236.0, 170.0, 205.0], dtype=np.float32)
    stroma = np.array([205.0, 120.0, 170.0], dtype=np.float32)
    hematoxylin = np.array([72.0, 40.0, 128.0], dtype=np.float32)

    for i in range(count):
        a = atypia[i]
        mix = (0.55 * background[i] + 0.45 * texture[i])[..., None]
        tissue = eosin * (1 - mix) + stroma * mix
        mask = _nucleus_mask(rng, a, yy, xx, size)[..., None]
        darkness = np.clip(rng.normal(0.75, 0.1), 0.4, 1.0)
        nucleus = hematoxylin * darkness + (1 - darkness) * 190.0
        images[i] = tissue * (1 - mask) + nucleus * mask

    images += rng.normal(0.0, 9.0, images.shape).astype(np.float32)
    images *= rng.normal(1.0, 0.06, (count, 1, 1, 3)).astype(np.float32)  # stain variation
    flipped = rng.random(count) < 0.03
    labels = np.where(flipped, 1 - labels, labels)
    tensor = torch.from_numpy(np.clip(images, 0, 255).astype(np.uint8)).permute(0, 3, 1, 2)
    return PatchSet(tensor.contiguous(), torch.from_numpy(labels).long())


@functools.lru_cache(maxsize=4)
def synthetic_patches(count: int, seed: int, cache_dir: Path | None = None) -> PatchSet:
    """``count`` synthetic patches for ``seed``: generated once per process (and, with
    ``cache_dir``, once per machine: the tensors are saved there and reloaded)."""
    if cache_dir is None:
        return _draw_synthetic(count, seed)
    key = hashlib.sha1(
        f"synthetic-{SYNTHETIC_VERSION}-{count}-{seed}-{PATCH_SIZE}".encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"synthetic-{key}.pt"
    if path.is_file():
        try:
            stored = torch.load(path, weights_only=True)
            images, labels = stored["images"], stored["labels"]
            if images.dtype != torch.uint8 or images.shape[0] != count or len(labels) != count:
                raise ValueError(f"holds {tuple(images.shape)} {images.dtype} images")
            return PatchSet(images, labels)
        except Exception as error:  # truncated, corrupt, another format: regenerate it
            logger.warning("synthetic cache %s unreadable (%s); regenerating it", path,
                           f"{type(error).__name__}: {error}".splitlines()[0][:200])  # fmt: skip
    patches = _draw_synthetic(count, seed)
    # A name no other process uses, then an atomic rename: two workers filling the cache
    # at once each write their own file, and the last rename wins with a whole file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": patches.images, "labels": patches.labels}, temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # a full or read-only disk: train uncached
        logger.warning("synthetic cache %s not written (%s)", path, error)
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    return patches


# --------------------------------------------------------------------------- PCam


def _read_pcam_split(root: Path, split: str, limit: int | None, seed: int) -> PatchSet:
    import h5py
    from torchvision.datasets import PCAM

    names = list(pcam_file_names(split))
    try:
        dataset = PCAM(root, split=split, download=False)
    except RuntimeError:
        expected = ", ".join(names)
        raise DataError(
            f"PCam {split} split not found: expected {expected} in {Path(root) / 'pcam'} "
            "(download PatchCamelyon there, or set dataset.root to the directory that "
            "contains 'pcam/')"
        ) from None
    folder = pcam_folder(dataset)
    x_path, y_path = folder / names[0], folder / names[1]
    with contextlib.ExitStack() as files:
        with reading(x_path):
            x_file = files.enter_context(h5py.File(x_path, "r"))
        with reading(y_path):
            y_file = files.enter_context(h5py.File(y_path, "r"))
        images, labels = pcam_split(x_file, y_file, x_path, y_path)
        total = images.shape[0]
        check_requested(f"{split}_size", limit, total, str(x_path))
        with reading(x_path):
            mapped = _memory_map(images)
            if limit is None or limit == total:
                x, y = (images[:] if mapped is None else mapped), labels
            else:
                # A seeded subset read in sorted order: h5py reads ascending indices fast.
                generator = np.random.default_rng(seed)
                chosen = np.sort(generator.choice(total, size=limit, replace=False))
                x, y = (images[chosen] if mapped is None else mapped[chosen]), labels[chosen]
    # N×H×W×C viewed as N×C×H×W: channels_last in memory, no copy (a mapped file stays
    # mapped, shared by every worker process on the node through the page cache).
    tensor = torch.from_numpy(x).permute(0, 3, 1, 2)
    return PatchSet(tensor, torch.from_numpy(y))


def _memory_map(dataset) -> np.ndarray | None:
    """An HDF5 dataset stored contiguous and uncompressed (PCam's files once torchvision
    has unpacked them) as a copy-on-write memory map, else None (it must be read).

    PCam's training split is 7.2 GB of uint8: mapped, one copy in the page cache serves
    all the worker processes of a node instead of one 7.2 GB read per process.
    """
    offset = dataset.id.get_offset()
    if dataset.chunks is not None or dataset.compression is not None or offset is None:
        return None
    return np.memmap(
        dataset.file.filename, dtype=dataset.dtype, mode="c", offset=offset, shape=dataset.shape
    )


# --------------------------------------------------------------------------- ImageFolder


def _stratified_split(
    labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split that keeps each class's share the same in train and val."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = max(1, round(len(members) * val_fraction)) if len(members) > 1 else 0
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _read_imagefolder(root: Path, size: int) -> PatchSet:
    """Every image under ``root``'s class directories, decoded once (each checked by
    ``hpo.datacheck.decode_image``) and resized to ``size``."""
    from torchvision.transforms.functional import pil_to_tensor

    classes = class_names_in(root)
    samples = image_files(root, classes)
    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    for index, (path, _) in enumerate(samples):
        image = pil_to_tensor(decode_image(path))
        if image.shape[1:] != (size, size):
            image = (
                F.interpolate(
                    image[None].float(), size=(size, size), mode="bilinear", antialias=True
                )[0]
                .round()
                .clamp(0, 255)
                .byte()
            )
        images[index] = image
    return PatchSet(images, torch.tensor([label for _, label in samples], dtype=torch.long))


def class_names_in(root: Path) -> list[str]:
    """The class directories of an ImageFolder at ``root``, sorted (their labels, in order).
    Raises DataError unless there are at least two."""
    from torchvision.datasets.folder import find_classes

    try:
        classes = find_classes(str(root))[0]
    except (FileNotFoundError, NotADirectoryError, PermissionError) as error:
        raise DataError(
            f"{root}: not an image folder (expected one sub-directory per class with "
            f"images in it): {error}"
        ) from None
    if len(classes) < 2:
        raise DataError(
            f"{root}: found {len(classes)} class {classes}; a classifier needs "
            "at least two class directories (e.g. normal/ and tumor/)"
        )
    return classes


# --------------------------------------------------------------------------- entry point


def _resize(patches: PatchSet, size: int) -> PatchSet:
    if patches.images.shape[-1] == size:
        return patches
    resized = F.interpolate(
        patches.images.float(), size=(size, size), mode="bilinear", antialias=True
    )
    return PatchSet(resized.round().clamp(0, 255).byte(), patches.labels)


def _take(patches: PatchSet, limit: int | None, seed: int) -> PatchSet:
    if limit is None or limit >= len(patches):
        return patches
    generator = torch.Generator().manual_seed(seed)
    return patches.subset(torch.randperm(len(patches), generator=generator)[:limit])


def load_splits(dataset: DatasetSpec, *, min_train_patches: int = 1) -> tuple[PatchSet, PatchSet]:
    """The (train, val) splits the spec describes, as uint8 tensors at ``image_size``.

    Every kind passes through ``hpo.datacheck``: raises DataError (one line naming the
    file or field) when files are missing, unreadable or malformed, when the spec asks for
    more patches than there are, or when the training split has fewer than
    ``min_train_patches`` (pass the study's ``search.batch_size_max``).
    """
    if dataset.kind == "synthetic":
        assert dataset.train_size is not None and dataset.val_size is not None
        # One draw split in two, so train and val come from the same distribution.
        both = synthetic_patches(
            dataset.train_size + dataset.val_size, dataset.seed, dataset.cache_dir
        )
        indices = torch.arange(len(both))
        train = both.subset(indices[: dataset.train_size])
        val = both.subset(indices[dataset.train_size :])
    elif dataset.kind == "pcam":
        assert dataset.root is not None
        train = _read_pcam_split(dataset.root, "train", dataset.train_size, dataset.seed)
        val = _read_pcam_split(dataset.root, "val", dataset.val_size, dataset.seed + 1)
    else:
        assert dataset.root is not None
        everything = _read_imagefolder(dataset.root, dataset.image_size)
        train_idx, val_idx = _stratified_split(
            everything.labels, dataset.val_fraction, dataset.seed
        )
        where = f"{dataset.root} after dataset.val_fraction = {dataset.val_fraction}"
        check_requested("train_size", dataset.train_size, len(train_idx), f"{where} (train)")
        check_requested("val_size", dataset.val_size, len(val_idx), f"{where} (val)")
        train = _take(everything.subset(train_idx), dataset.train_size, dataset.seed)
        val = _take(everything.subset(val_idx), dataset.val_size, dataset.seed + 1)
    train, val = _resize(train, dataset.image_size), _resize(val, dataset.image_size)
    num_classes = len(class_names(dataset))
    check_splits(dataset, train, val, num_classes=num_classes, min_train_patches=min_train_patches)
    return train, val


def study_splits(spec: StudySpec) -> tuple[PatchSet, PatchSet]:
    """The splits a study trains on, checked against its largest batch size and budget
    (what a worker and ``hpo launch`` load, once, before any trial)."""
    train, val = load_splits(spec.dataset, min_train_patches=spec.search.batch_size_max)
    check_reports_fit(spec.budget, len(train), spec.search.batch_size_max)
    return train, val


BINARY_CLASSES = ("normal", "tumor")  # PCam's labels 0 and 1; the synthetic set mimics them


def class_names(dataset: DatasetSpec) -> list[str]:
    """The class of each label, in label order: ImageFolder's sorted class directories,
    else PCam's two (normal, tumor). DataError when the ImageFolder root has no class
    directory (or is not there)."""
    if dataset.kind != "imagefolder":
        return list(BINARY_CLASSES)
    assert dataset.root is not None
    return class_names_in(dataset.root)


def num_classes(dataset: DatasetSpec) -> int:
    """How many outputs the model's head has: one per class of ``class_names``. Every
    command that builds a model for a study (a trial, ``hpo probe``, the model check)
    asks this, so a head is never sized for a different dataset."""
    return len(class_names(dataset))


def class_counts(
    dataset: DatasetSpec, splits: tuple[PatchSet, PatchSet]
) -> dict[str, dict[str, int]]:
    """Patches per class in each split, as plain data for the study: ``{"train": {"normal":
    n, ...}, "val": {...}}``. A class with no patch in a split counts 0."""
    names = class_names(dataset)
    counts = {}
    for split, patches in zip(("train", "val"), splits, strict=True):
        per_label = torch.bincount(patches.labels, minlength=len(names)).tolist()
        counts[split] = {name: int(n) for name, n in zip(names, per_label, strict=True)}
    return counts


def channel_stats(images: torch.Tensor, sample: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (in 0..255 units) from the first ``sample`` images."""
    pixels = images[:sample].float()
    return pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)).clamp_min(1.0)


# --------------------------------------------------------------------------- batches


def batch_indices(
    count: int, batch_size: int, *, generator: torch.Generator | None, drop_last: bool
) -> Iterator[torch.Tensor]:
    """Index tensors of one epoch: shuffled when a generator is given.

    Training drops the last partial batch so every optimizer update sees exactly
    ``batch_size`` samples, which is what a batch-size study measures.
    """
    order = (
        torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    )
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips and 90° rotations, decided per sample, applied in
    whole-batch ops. Histology has no canonical orientation, so all 8 dihedral
    transforms are label-preserving. ``generator`` lives on the CPU (seeded per trial).

    Draw ``d`` in 0..7: a horizontal flip when ``d & 4``, then ``d & 3`` quarter turns.
    Done as one gather of every sample's pixels through its transform's index map
    (``_dihedral_maps``): the same pixels as flipping and rotating, 3.7 → 1.3 ms per
    64×3×48×48 uint8 batch in one thread (load 14; docs/benchmarks.md) against the former
    flip + per-turn ``index_put``."""
    count, channels, height, width = images.shape
    if height != width:
        raise ValueError(f"90° rotations need square patches, got {height}×{width}")
    draws = to_device(torch.randint(0, 8, (count,), generator=generator), images.device)
    index = _dihedral_maps(height, images.device)[draws].unsqueeze(1)
    pixels = images.flatten(2).gather(2, index.expand(count, channels, -1))
    return pixels.view(count, channels, height, width)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor copied to ``device`` without stalling the host: a plain ``.to(cuda)``
    from pageable memory waits for the whole stream (torch syncs after a blocking host-to-
    device copy), so a batch drawn while the previous update is still queued would leave
    the GPU idle until the host had prepared and launched the next one. Pinned, the copy
    is queued like a kernel. On the H200, ResNet-18 at B = 256 with CUDA graphs ran
    65,872 samples/s on a prepared batch and 46,217 with batches drawn per update
    (docs/benchmarks.md); the per-batch augmentation draw was such a copy."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=8)
def _dihedral_maps(size: int, device: torch.device) -> torch.Tensor:
    """8 × size² source indices: row ``d`` is where each pixel of draw ``d``'s transform
    (flip when ``d & 4``, then ``d & 3`` quarter turns) comes from."""
    grid = torch.arange(size * size, device=device).view(1, 1, size, size)
    maps = []
    for draw in range(8):
        flipped = grid.flip(3) if draw & 4 else grid
        maps.append(flipped.rot90(draw & 3, dims=(2, 3)).reshape(-1))
    return torch.stack(maps)


def color_jitter(
    count: int, strength: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel gain in [1 - s, 1 + s] and offset in [-s, s] × 255: a light
    stain/scanner colour shift (H&E colour varies between labs and scanners). Shapes
    N×3×1×1, drawn on the CPU from the trial's generator."""
    draws = torch.rand((2, count, 3, 1, 1), generator=generator) * 2 - 1
    return 1 + strength * draws[0], 255 * strength * draws[1]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch's CPU ops in one thread inside the block.

    A batch's ops are short and memory-bound: a second thread gains little, and when
    another process holds a core every op waits (spinning) for the descheduled thread at
    OpenMP's barrier. Measured here on 2 shared cores, batches drawn and prepared per
    second with 2 threads vs switched to one (load 3–6.7): 64×3×96×96 843 → 8,543 and
    289 → 1,011; 16×3×48×48 233 → 3,726; 16×3×16×16 684 → 10,807. The switch itself
    (``set_num_threads`` there and back) is the price: ~8.5 ms under that load.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class DeviceBatcher:
    """Turns uint8 CPU batches into normalized float batches on the device.

    Pinned memory + ``non_blocking`` on CUDA so copies overlap compute; the uint8→float
    conversion, normalization and augmentation all run on the device. Normalization (and
    the optional colour jitter, folded into it) is one multiply-add on the NCHW batch:
    on CPU, per-channel broadcasts over a channels_last tensor were 9× slower (measured
    2.9 ms vs 0.33 ms for 64×3×96×96), so the batch becomes channels_last last.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        device: torch.device,
        *,
        channels_last: bool,
        color_jitter: float = 0.0,
    ) -> None:
        self.device = device
        self.scale = (1.0 / std).view(1, -1, 1, 1).to(device)
        self.shift = (-mean / std).view(1, -1, 1, 1).to(device)
        self.color_jitter = color_jitter
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu":
            with _one_thread():
                return self._prepare(images, labels, generator)
        return self._prepare(images, labels, generator)

    def take(
        self, patches: PatchSet, indices: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch ``indices`` of ``patches``, drawn and prepared (on CPU: in one thread,
        the draw included)."""
        if self.device.type == "cpu":
            with _one_thread():
                return self._prepare(patches.images[indices], patches.labels[indices], generator)
        return self._prepare(patches.images[indices], patches.labels[indices], generator)

    def prepare(
        self, patches: PatchSet, *, max_bytes: int, chunk: int = 256
    ) -> PreparedPatches | None:
        """All of ``patches`` prepared for evaluation once (``take`` without augmentation,
        ``chunk`` at a time), or None when the float copy would exceed ``max_bytes`` (the
        caller then prepares batch by batch). Each patch is normalized on its own, so every
        value equals what ``take`` gives that patch in any batch."""
        count = len(patches)
        if count == 0 or count * patches.images[0].numel() * 4 > max_bytes:
            return None
        parts = [
            self.take(patches, indices)
            for indices in batch_indices(count, chunk, generator=None, drop_last=False)
        ]
        images = torch.cat([images for images, _ in parts])
        labels = torch.cat([labels for _, labels in parts])
        return PreparedPatches(images.contiguous(memory_format=self.memory_format), labels)

    def _prepare(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = to_device(images, self.device), to_device(labels, self.device)
        images = images.contiguous()  # NCHW (a mapped PCam batch arrives channels_last)
        scale, shift = self.scale, self.shift
        if generator is not None:
            images = augment_batch(images, generator)
            if self.color_jitter > 0:
                gain, offset = color_jitter(images.shape[0], self.color_jitter, generator)
                gain, offset = to_device(gain, self.device), to_device(offset, self.device)
                scale, shift = gain * scale, offset * scale + shift
        images = images.float().mul_(scale).add_(shift)
        return images.contiguous(memory_format=self.memory_format), labels
