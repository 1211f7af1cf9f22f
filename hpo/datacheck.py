"""Checks that a dataset is something hpo can train on, made once when it is loaded.

Every loader in ``hpo.data`` passes through here: each file is read inside ``reading``
(any decode or read error becomes a ``DataError`` naming the file), PCam's HDF5 files are
checked for their keys, shapes, dtypes and label values (``pcam_split``), each image of
an ImageFolder for its format against its extension (``decode_image``), and the loaded
splits for their counts against what the spec asks (``check_splits``). All of it runs when
a worker loads its data and in ``hpo launch`` before the study is created, never inside a
trial: bad data found by a trial fails every trial the same way, and a training split
smaller than the batch size lets a trial "complete" with no update at all (its metrics
those of the untrained model).

The checks are cheap: shapes and dtypes come from the HDF5 headers, PCam's labels are one
byte a patch, and ImageFolder images are decoded once anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from hpo.spec import DatasetSpec

# PIL's format names for each file extension torchvision's ImageFolder reads. A file whose
# content is another format (text named .png, a JPEG named .png) is refused: which file
# was mislabelled is easier to see than what it does to training.
EXTENSION_FORMATS: dict[str, frozenset[str]] = {
    ".jpg": frozenset({"JPEG", "MPO"}),  # MPO: a JPEG with extra frames, as cameras write
    ".jpeg": frozenset({"JPEG", "MPO"}),
    ".png": frozenset({"PNG"}),
    ".ppm": frozenset({"PPM"}),
    ".pgm": frozenset({"PPM"}),  # PIL's PPM plugin reads PGM and PBM too
    ".bmp": frozenset({"BMP", "DIB"}),
    ".tif": frozenset({"TIFF"}),
    ".tiff": frozenset({"TIFF"}),
    ".webp": frozenset({"WEBP"}),
}


class DataError(UserError):
    """Data that cannot be trained on; the message names the file (or directory, or spec
    field) and what is wrong."""


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0].strip()
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def reading(path: Path | str) -> Iterator[None]:
    """Turn any error raised while reading ``path`` into a DataError naming it.

    Any ``Exception``, not a list of types: h5py, numpy and PIL's many format plugins raise
    OSError, ValueError, KeyError, SyntaxError, struct.error, zlib.error, EOFError... on
    damaged files, and which one depends on where the damage is.
    """
    try:
        yield
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"{path}: cannot be read ({_describe(error)})") from None


# --------------------------------------------------------------------------- PCam


def _dataset(file: Any, key: str, path: Path, holds: str) -> Any:
    import h5py

    item = file.get(key)
    if not isinstance(item, h5py.Dataset):
        found = ", ".join(repr(name) for name in sorted(file.keys())[:5]) or "nothing"
        raise DataError(
            f"{path}: no HDF5 dataset {key!r} (found {found}); PCam's file holds {holds} "
            f"in dataset {key!r}"
        )
    return item


def pcam_split(x_file: Any, y_file: Any, x_path: Path, y_path: Path) -> tuple[Any, np.ndarray]:
    """PCam's images dataset (h5py, not read) and its labels (int64, N) after checking
    that they are what torchvision's layout says: ``x`` uint8 N×H×W×3 with H = W (96 in
    PCam), ``y`` N labels (N×1×1×1 in PCam) of an integer type, each 0 or 1."""
    import numpy as np

    # Each file's metadata read inside its own ``reading``: damage names the damaged file.
    with reading(x_path):
        images = _dataset(x_file, "x", x_path, "the images (N×96×96×3 uint8)")
        shape, dtype = tuple(images.shape), images.dtype
    with reading(y_path):
        targets = _dataset(y_file, "y", y_path, "the labels (N×1×1×1, 0 or 1)")
        label_shape, label_dtype = tuple(targets.shape), targets.dtype
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or shape[1] == 0:
        order = " (channels first; PCam stores channels last)" if len(shape) == 4 else ""
        raise DataError(
            f"{x_path}: dataset 'x' has shape {shape}{order}; expected N×H×W×3 patches with "
            "H = W (PCam's are N×96×96×3)"
        )
    if dtype != np.uint8:
        raise DataError(f"{x_path}: dataset 'x' holds {dtype} values; expected uint8")
    if shape[0] == 0:
        raise DataError(f"{x_path}: dataset 'x' holds no patches")
    if not label_shape or int(np.prod(label_shape[1:])) != 1:
        raise DataError(
            f"{y_path}: dataset 'y' has shape {label_shape}; expected one label a patch "
            "(PCam's are N×1×1×1)"
        )
    if label_shape[0] != shape[0]:
        raise DataError(
            f"{y_path}: {label_shape[0]} labels for the {shape[0]} patches of {x_path.name}; "
            "the two files must hold the same number"
        )
    if label_dtype.kind not in "iub":
        raise DataError(f"{y_path}: dataset 'y' holds {label_dtype} values; expected integers")
    with reading(y_path):
        labels = np.asarray(targets[:]).reshape(-1).astype(np.int64)
    outside = np.setdiff1d(np.unique(labels), [0, 1])
    if outside.size:
        shown = ", ".join(str(int(value)) for value in outside[:5])
        raise DataError(
            f"{y_path}: labels must be 0 (normal) or 1 (tumor); found {shown}"
            f"{', ...' if outside.size > 5 else ''}"
        )
    return images, labels


# --------------------------------------------------------------------------- ImageFolder


def decode_image(path: Path | str) -> Image.Image:
    """The image at ``path`` decoded whole, as RGB. Raises DataError naming the file when
    it is not an image, is truncated, or holds another format than its extension says."""
    from PIL import Image

    with reading(path), Image.open(path) as image:
        allowed = EXTENSION_FORMATS.get(Path(path).suffix.lower())
        if allowed is not None and image.format not in allowed:
            raise DataError(
                f"{path}: holds a {image.format} image, not what its extension "
                f"{Path(path).suffix!r} says (rename it, or convert it)"
            )
        image.load()  # decodes every byte: a truncated file raises here, not in training
        return to_rgb8(image)


# Modes whose samples are wider than 8 bits, and the full scale of each: PIL's
# ``convert("RGB")`` clips them at 255 instead of scaling (a 16-bit grey PNG turns white).
WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, samples wider than 8 bits scaled from their full range
    (16-bit and 32-bit integer: 0..65535; float: 0..1, or 0..65535 when it goes above 1)."""
    if image.mode not in WIDE_MODES:
        return image.convert("RGB")
    import numpy as np
    from PIL import Image

    samples = np.asarray(image, dtype=np.float64)
    scale = WIDE_MODES[image.mode]
    if scale == 1.0 and samples.size and np.nanmax(samples) > 1.0:
        scale = 65535
    eight = np.clip(np.nan_to_num(samples / scale * 255.0), 0, 255).round().astype(np.uint8)
    return Image.fromarray(eight, mode="L").convert("RGB")


def image_files(root: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) of every image file under ``root``'s class directories, as
    torchvision's ImageFolder lists them. Raises DataError naming a class directory that
    holds no image file (an empty class would give a label no patch has)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    class_to_index = {name: index for index, name in enumerate(classes)}
    with reading(root):
        samples = make_dataset(
            str(root), class_to_index, extensions=IMG_EXTENSIONS, allow_empty=True
        )
    found = {label for _, label in samples}
    for name, index in class_to_index.items():
        if index not in found:
            raise DataError(
                f"{root / name}: class directory holds no image file (read: "
                f"{', '.join(IMG_EXTENSIONS)}); add images or remove the directory"
            )
    return samples


# --------------------------------------------------------------------------- splits


def check_splits(
    dataset: DatasetSpec,
    train: Any,
    val: Any,
    *,
    num_classes: int,
    min_train_patches: int = 1,
) -> None:
    """The loaded (train, val) ``PatchSet``s hold what training needs: uint8 N×3×S×S images
    at ``dataset.image_size``, one int64 label in [0, ``num_classes``) per image, at least
    one validation patch, and at least ``min_train_patches`` training patches (the largest
    batch size searched: with fewer, a trial at that batch size makes no update)."""
    import torch

    where = f"dataset ({dataset.kind}{f' at {dataset.root}' if dataset.root else ''})"
    size = dataset.image_size
    for split, patches in (("train", train), ("val", val)):
        images, labels = patches.images, patches.labels
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, size, size):
            raise DataError(
                f"{where}: {split} images are {images.dtype} {tuple(images.shape)}; "
                f"expected uint8 N×3×{size}×{size}"
            )
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise DataError(f"{where}: {split} labels do not match its {images.shape[0]} images")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise DataError(f"{where}: {split} labels outside [0, {num_classes})")
    if len(val) == 0:
        raise DataError(f"{where}: the validation split is empty (check dataset.val_fraction)")
    for split, patches in (("train", train), ("val", val)):
        present = set(torch.unique(patches.labels).tolist())
        missing = [label for label in range(num_classes) if label not in present]
        if missing:
            # Without a class, validation scores it as chance (AUC 0.5) and the trial would
            # still be stored COMPLETE; training without it never learns it.
            raise DataError(
                f"{where}: the {split} split has no patch of class {_class_label(dataset, missing[0])}"
                f" ({len(patches)} {split} patches); add images of it or change "
                "dataset.val_fraction / dataset.train_size / dataset.val_size"
            )
    if len(train) < min_train_patches:
        raise DataError(
            f"{where}: the training split has {len(train)} patches, fewer than "
            f"search.batch_size_max = {min_train_patches} (a trial at that batch size would "
            "make no update); lower search.batch_size_max or add patches"
        )


def _class_label(dataset: DatasetSpec, label: int) -> str:
    """``'name' (label N)`` for an ImageFolder class, else ``label N``."""
    if dataset.kind == "imagefolder" and dataset.root is not None:
        try:
            names = sorted(p.name for p in Path(dataset.root).iterdir() if p.is_dir())
            return f"{names[label]!r} (label {label})"
        except (OSError, IndexError):
            pass
    return f"label {label}"


def check_requested(field: str, requested: int | None, available: int, where: str) -> None:
    """Refuse ``dataset.<field>`` asking for more patches than ``where`` holds (silently
    training on fewer would make the study's budget and results mean something else)."""
    if requested is not None and requested > available:
        raise DataError(f"dataset.{field} = {requested} exceeds the {available} patches of {where}")
