"""Images are read as what they show: 16-bit and float samples scaled into 8 bits (not
clipped white), and a split without one of the classes is refused instead of scored as
chance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpo.data import load_splits
from hpo.datacheck import DataError, decode_image
from hpo.spec import DatasetSpec
from tests.test_data import write_image_folder


@pytest.mark.parametrize(
    ("suffix", "pixels", "expected"),
    [
        (".png", np.full((8, 8), 32768, np.uint16), 128),  # 16-bit grey PNG (mode I;16)
        (".png", np.full((8, 8), 65535, np.uint16), 255),
        (".tif", np.full((8, 8), 4096, np.uint16), 16),
        (".tif", np.full((8, 8), 0.25, np.float32), 64),  # float in [0, 1] (mode F)
        (".tif", np.full((8, 8), 1000, np.int32), 4),  # 32-bit integer (mode I)
    ],
)
def test_wide_samples_are_scaled_not_clipped(
    tmp_path: Path, suffix: str, pixels: np.ndarray, expected: int
) -> None:
    path = tmp_path / f"x{suffix}"
    Image.fromarray(pixels).save(path)
    decoded = np.asarray(decode_image(path))
    assert decoded.shape == (8, 8, 3)
    assert abs(int(decoded.mean()) - expected) <= 1, (Image.open(path).mode, decoded.mean())


def test_a_16_bit_gradient_keeps_its_range(tmp_path: Path) -> None:
    gradient = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "g.png")
    decoded = np.asarray(decode_image(tmp_path / "g.png"))[..., 0]
    assert (decoded == 255).mean() < 0.01 and decoded.min() == 0 and decoded.max() == 255


def test_a_class_missing_from_validation_is_refused_naming_it(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=10)
    for extra in list((tmp_path / "tumor").iterdir())[1:]:
        extra.unlink()  # one tumour image: the stratified split keeps it for training
    spec = DatasetSpec(kind="imagefolder", root=tmp_path, val_fraction=0.2, image_size=32)
    with pytest.raises(DataError, match="val split has no patch of class 'tumor'"):
        load_splits(spec)
