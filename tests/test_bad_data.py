"""Bad data is found once, when it is loaded, never inside a trial (``hpo.datacheck``).

Broken files are generated in the real formats: HDF5 in torchvision's PCam layout (h5py),
images written by PIL in an ImageFolder. Each is a ``DataError`` naming the file (or the
spec field) in one line; through the CLI, ``hpo launch`` exits 2 in one line before the
study exists, and ``hpo worker`` exits 2 before it claims a trial.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import optuna
import pytest
import tomllib
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from hpo.cli import app
from hpo.data import DataError, load_splits
from hpo.spec import DatasetSpec, parse_spec
from hpo.study import create_or_load_study

from .conftest import tiny_study_text

PCAM_NAMES = {
    "train": "camelyonpatch_level_2_split_train",
    "val": "camelyonpatch_level_2_split_valid",
}
COUNTS = {"train": 16, "val": 8}
SIZE = 96  # PCam's patch size, as torchvision's layout has it
MANY = settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _x(folder: Path, split: str) -> Path:
    return folder / f"{PCAM_NAMES[split]}_x.h5"


def _y(folder: Path, split: str) -> Path:
    return folder / f"{PCAM_NAMES[split]}_y.h5"


def write_pcam(root: Path, *, compressed: bool = False) -> Path:
    """A valid PCam in torchvision's layout: <root>/pcam/<split>_x.h5 ('x', N×96×96×3
    uint8) and _y.h5 ('y', N×1×1×1 uint8, 0 or 1); returns the pcam folder."""
    folder = root / "pcam"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in COUNTS.items():
        images = rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)
        labels = (np.arange(count) % 2).astype(np.uint8).reshape(-1, 1, 1, 1)
        options = {"chunks": (4, SIZE, SIZE, 3), "compression": "gzip"} if compressed else {}
        with h5py.File(_x(folder, split), "w") as file:
            file.create_dataset("x", data=images, **options)
        with h5py.File(_y(folder, split), "w") as file:
            file.create_dataset("y", data=labels)
    return folder


def _rewrite(path: Path, key: str, data: np.ndarray | None) -> None:
    with h5py.File(path, "w") as file:
        if data is None:
            file.create_group(key)  # a group where a dataset should be
        else:
            file.create_dataset(key, data=data)


# Each PCam fault: (name, damage(folder, split, draw) -> the file the error must name).
def _truncate(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _not_hdf5(path: Path, junk: bytes) -> Path:
    path.write_bytes(junk)
    return path


def pcam_faults() -> st.SearchStrategy[tuple[str, Callable[[Path, str], Path]]]:
    """Generated damage to one split of a valid PCam folder; the callable returns the file
    the one-line error must name."""
    n = st.integers(1, 40)
    shapes = st.sampled_from(
        [(n_, 3, SIZE, SIZE) for n_ in (16, 8)]  # channels first
        + [(16, SIZE, SIZE), (16, SIZE, SIZE, 4), (16, SIZE, 48, 3), (16, SIZE, SIZE, 3, 1)]
        + [(16, SIZE, SIZE, 1), (16,), (16, 0, 0, 3)]
    )
    bad_dtypes = st.sampled_from(["float32", "float64", "uint16", "int8", "int32", "bool"])
    key = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(
        lambda k: k not in ("x", "y")
    )
    bad_labels = st.lists(
        st.integers(-128, 127).filter(lambda v: v not in (0, 1)), min_size=1, max_size=3
    )

    def count(split: str) -> int:
        return COUNTS[split]

    return st.one_of(
        st.floats(0.0, 0.95).map(lambda f: ("truncated x", lambda d, s: _truncate(_x(d, s), f))),
        st.floats(0.0, 0.95).map(lambda f: ("truncated y", lambda d, s: _truncate(_y(d, s), f))),
        st.binary(max_size=600).map(lambda b: ("not HDF5", lambda d, s: _not_hdf5(_x(d, s), b))),
        st.text(max_size=200).map(lambda t: ("text", lambda d, s: _not_hdf5(_y(d, s), t.encode()))),
        key.map(
            lambda k: (
                "wrong key x",
                lambda d, s: (
                    _rewrite(_x(d, s), k, np.zeros((count(s), SIZE, SIZE, 3), np.uint8)),
                    _x(d, s),
                )[1],
            )
        ),
        key.map(
            lambda k: (
                "wrong key y",
                lambda d, s: (
                    _rewrite(_y(d, s), k, np.zeros((count(s), 1, 1, 1), np.uint8)),
                    _y(d, s),
                )[1],
            )
        ),
        st.just(("group for x", lambda d, s: (_rewrite(_x(d, s), "x", None), _x(d, s))[1])),
        shapes.map(
            lambda shape: (
                f"shape {shape}",
                lambda d, s: (_rewrite(_x(d, s), "x", np.zeros(shape, np.uint8)), _x(d, s))[1],
            )
        ),
        bad_dtypes.map(
            lambda dtype: (
                f"x dtype {dtype}",
                lambda d, s: (
                    _rewrite(_x(d, s), "x", np.zeros((count(s), SIZE, SIZE, 3), dtype)),
                    _x(d, s),
                )[1],
            )
        ),
        n.filter(lambda k: k not in COUNTS.values()).map(
            lambda k: (
                f"{k} labels",
                lambda d, s: (_rewrite(_y(d, s), "y", np.zeros((k, 1, 1, 1), np.uint8)), _y(d, s))[
                    1
                ],
            )
        ),
        bad_labels.map(
            lambda values: (
                f"labels {values}",
                lambda d, s: (
                    _rewrite(
                        _y(d, s),
                        "y",
                        np.resize(np.array([0, 1, *values], np.int8), (count(s), 1, 1, 1)),
                    ),
                    _y(d, s),
                )[1],
            )
        ),
        st.sampled_from(["float32", "float64"]).map(
            lambda dtype: (
                f"y dtype {dtype}",
                lambda d, s: (
                    _rewrite(_y(d, s), "y", np.zeros((count(s), 1, 1, 1), dtype)),
                    _y(d, s),
                )[1],
            )
        ),
        st.just(
            (
                "two labels a patch",
                lambda d, s: (
                    _rewrite(_y(d, s), "y", np.zeros((count(s), 2), np.uint8)),
                    _y(d, s),
                )[1],
            )
        ),
        st.just(
            (
                "no patches",
                lambda d, s: (
                    _rewrite(_x(d, s), "x", np.zeros((0, SIZE, SIZE, 3), np.uint8)),
                    _rewrite(_y(d, s), "y", np.zeros((0, 1, 1, 1), np.uint8)),
                    _x(d, s),
                )[2],
            )
        ),
    )


def _one_line_naming(error: DataError, name: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert name in message, (name, message)


@MANY
@given(fault=pcam_faults(), split=st.sampled_from(["train", "val"]))
def test_a_damaged_pcam_file_is_one_line_naming_it(
    tmp_path_factory: pytest.TempPathFactory, fault, split: str
) -> None:
    root = tmp_path_factory.mktemp("pcam")
    name, damage = fault
    named = damage(write_pcam(root), split)
    with pytest.raises(DataError) as error:
        load_splits(DatasetSpec(kind="pcam", root=root))
    _one_line_naming(error.value, named.name)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    offset=st.integers(0, 10**6),
    junk=st.binary(min_size=1, max_size=64),
    target=st.sampled_from(["x", "y"]),
)
@example(offset=3000, junk=b"\xff" * 64, target="x")
def test_corrupted_bytes_in_a_pcam_file_load_or_fail_in_one_line(
    tmp_path_factory: pytest.TempPathFactory, offset: int, junk: bytes, target: str
) -> None:
    """Bytes overwritten anywhere in a (compressed, chunked) file: either the damage hit
    bytes nothing reads and the data loads, or a DataError names the file; never another
    exception from inside h5py."""
    root = tmp_path_factory.mktemp("pcam")
    folder = write_pcam(root, compressed=True)
    path = _x(folder, "train") if target == "x" else _y(folder, "train")
    data = bytearray(path.read_bytes())
    start = offset % len(data)
    data[start : start + len(junk)] = junk[: len(data) - start]
    path.write_bytes(bytes(data))
    try:
        train, _ = load_splits(DatasetSpec(kind="pcam", root=root))
    except DataError as error:
        _one_line_naming(error, path.name)
    else:
        assert len(train) == COUNTS["train"]


@pytest.mark.parametrize(
    ("field", "value", "split"),
    [("train_size", 17, "train"), ("train_size", 1000, "train"), ("val_size", 9, "val")],
)
def test_a_spec_asking_for_more_pcam_patches_than_the_file_holds_is_refused(
    tmp_path: Path, field: str, value: int, split: str
) -> None:
    folder = write_pcam(tmp_path)
    with pytest.raises(DataError) as error:
        load_splits(DatasetSpec(kind="pcam", root=tmp_path, **{field: value}))
    _one_line_naming(error.value, f"dataset.{field} = {value}")
    assert _x(folder, split).name in str(error.value)


@pytest.mark.parametrize("batch_size_max", [17, 32, 64])
def test_fewer_training_patches_than_the_largest_batch_size_is_refused(
    tmp_path: Path, batch_size_max: int
) -> None:
    write_pcam(tmp_path)
    with pytest.raises(DataError) as error:
        load_splits(DatasetSpec(kind="pcam", root=tmp_path), min_train_patches=batch_size_max)
    _one_line_naming(error.value, f"search.batch_size_max = {batch_size_max}")


# --------------------------------------------------------------------------- ImageFolder

FORMATS = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "WEBP": ".webp",
    "PPM": ".ppm",
}


def _image_bytes(image_format: str, size: int = 24, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def write_image_folder(root: Path, per_class: int = 6) -> None:
    for label, name in enumerate(["normal", "tumor"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            (root / name / f"{index}.png").write_bytes(
                _image_bytes("PNG", seed=label * 100 + index)
            )


def image_faults() -> st.SearchStrategy[tuple[str, Callable[[Path], Path]]]:
    """Generated damage to one file (or directory) of a valid image folder; the callable
    returns the path the one-line error must name."""

    def put(name: str, data: bytes) -> Callable[[Path], Path]:
        def damage(root: Path) -> Path:
            path = root / "tumor" / name
            path.write_bytes(data)
            return path

        return damage

    def truncated(image_format: str, fraction: float) -> Callable[[Path], Path]:
        data = _image_bytes(image_format, size=48)
        return put(f"cut{FORMATS[image_format]}", data[: int(len(data) * fraction)])

    def lying(actual: str, claimed: str) -> Callable[[Path], Path]:
        return put(f"lie{FORMATS[claimed]}", _image_bytes(actual))

    def empty_class(name: str) -> Callable[[Path], Path]:
        def damage(root: Path) -> Path:
            (root / name).mkdir()
            (root / name / "notes.txt").write_text("not an image")
            return root / name

        return damage

    extension = st.sampled_from(sorted(FORMATS.values()))
    pairs = st.tuples(st.sampled_from(sorted(FORMATS)), st.sampled_from(sorted(FORMATS))).filter(
        lambda pair: pair[0] != pair[1]
    )
    return st.one_of(
        st.tuples(st.text(max_size=300), extension).map(
            lambda te: ("text", put(f"text{te[1]}", te[0].encode()))
        ),
        st.tuples(st.binary(max_size=300), extension).map(
            lambda be: ("bytes", put(f"junk{be[1]}", be[0]))
        ),
        st.tuples(st.sampled_from(["PNG", "JPEG", "WEBP", "BMP", "TIFF"]), st.floats(0.0, 0.8)).map(
            lambda ff: (f"truncated {ff[0]}", truncated(*ff))
        ),
        pairs.map(lambda pair: (f"{pair[0]} named {FORMATS[pair[1]]}", lying(*pair))),
        st.sampled_from(["empty", ".ipynb_checkpoints", "zz"]).map(
            lambda name: (f"empty class {name}", empty_class(name))
        ),
    )


@MANY
@given(fault=image_faults())
def test_a_damaged_image_folder_is_one_line_naming_the_file(
    tmp_path_factory: pytest.TempPathFactory, fault
) -> None:
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root)
    name, damage = fault
    named = damage(root)
    with pytest.raises(DataError) as error:
        load_splits(DatasetSpec(kind="imagefolder", root=root, image_size=16))
    _one_line_naming(error.value, str(named))


def test_files_imagefolder_does_not_read_are_ignored(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    (tmp_path / "tumor" / "notes.txt").write_text("a note")
    (tmp_path / "tumor" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "normal" / "ok.jpeg").write_bytes(_image_bytes("JPEG"))
    train, val = load_splits(DatasetSpec(kind="imagefolder", root=tmp_path, image_size=16))
    assert len(train) + len(val) == 13


def test_an_imagefolder_train_size_beyond_its_split_is_refused(tmp_path: Path) -> None:
    write_image_folder(tmp_path)  # 12 images: 10 train, 2 val at val_fraction 0.2
    with pytest.raises(DataError, match=r"dataset.train_size = 11 exceeds the 10 patches"):
        load_splits(DatasetSpec(kind="imagefolder", root=tmp_path, image_size=16, train_size=11))


# --------------------------------------------------------------------------- the CLI


def _study_text(root: Path, kind: str) -> str:
    text = tiny_study_text(epochs=1)
    start, end = text.index("[dataset]"), text.index("[model]")
    dataset = f'[dataset]\nkind = "{kind}"\nroot = "{root}"\nimage_size = 16\n\n'
    text = text[:start] + dataset + text[end:]
    return text.replace("batch_size_min = 16", "batch_size_min = 2").replace(
        "batch_size_max = 64", "batch_size_max = 4"
    )


CLI_CASES = [
    ("pcam", lambda root: _truncate(_x(write_pcam(root), "train"), 0.5)),
    ("pcam", lambda root: _not_hdf5(_y(write_pcam(root), "val"), b"label,patch\n0,1\n")),
    (
        "pcam",
        lambda root: (
            _rewrite(_x(write_pcam(root), "train"), "x", np.zeros((16, 3, SIZE, SIZE), np.uint8)),
            _x(root / "pcam", "train"),
        )[1],
    ),
    (
        "pcam",
        lambda root: (
            _rewrite(_y(write_pcam(root), "train"), "y", np.full((16, 1, 1, 1), 2, np.uint8)),
            _y(root / "pcam", "train"),
        )[1],
    ),
    (
        "pcam",
        lambda root: (
            _rewrite(_x(write_pcam(root), "val"), "x", np.zeros((8, SIZE, SIZE, 3), np.float32)),
            _x(root / "pcam", "val"),
        )[1],
    ),
    (
        "pcam",
        lambda root: (
            _rewrite(_y(write_pcam(root), "train"), "y", np.zeros((15, 1, 1, 1), np.uint8)),
            _y(root / "pcam", "train"),
        )[1],
    ),
    (
        "imagefolder",
        lambda root: (
            write_image_folder(root),
            (root / "tumor" / "a.png").write_text("hello"),
            root / "tumor" / "a.png",
        )[2],
    ),
    (
        "imagefolder",
        lambda root: (
            write_image_folder(root),
            (root / "normal" / "b.jpg").write_bytes(_image_bytes("JPEG", 48)[:300]),
            root / "normal" / "b.jpg",
        )[2],
    ),
    (
        "imagefolder",
        lambda root: (
            write_image_folder(root),
            (root / "normal" / "c.png").write_bytes(_image_bytes("JPEG")),
            root / "normal" / "c.png",
        )[2],
    ),
    (
        "imagefolder",
        lambda root: (write_image_folder(root), (root / "empty").mkdir(), root / "empty")[2],
    ),
]


@pytest.mark.parametrize(("kind", "damage"), CLI_CASES)
def test_launch_with_bad_data_exits_2_in_one_line_before_the_study_exists(
    studies_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str, damage
) -> None:
    root = studies_dir.parent / "data"
    named = damage(root)
    (studies_dir / "tiny.toml").write_text(_study_text(root, kind))
    monkeypatch.setenv("HPO_CHECKPOINT_DIR", str(studies_dir.parent / "checkpoints"))
    result = CliRunner().invoke(app, ["launch", "--study", "tiny", "--storage", "sqlite:///x.db"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named.name in lines[0], lines
    assert "Traceback" not in result.output
    assert not Path("x.db").exists()
    assert not (studies_dir.parent / "checkpoints").exists()  # a failed launch leaves nothing


@pytest.mark.parametrize(
    ("kind", "damage"), [CLI_CASES[0], CLI_CASES[3], CLI_CASES[7], CLI_CASES[9]]
)
def test_a_worker_on_bad_data_exits_2_before_claiming_a_trial(
    studies_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str, damage
) -> None:
    good, bad = studies_dir.parent / "good", studies_dir.parent / "bad"
    (write_pcam(good) if kind == "pcam" else write_image_folder(good))
    spec = parse_spec(tomllib.loads(_study_text(good, kind)), source="t", default_name="tiny")
    url = "sqlite:///w.db"
    create_or_load_study(spec, url).storage.engine.dispose()
    named = damage(bad)
    monkeypatch.setenv("HPO_CHECKPOINT_DIR", str(studies_dir.parent / "checkpoints"))
    result = CliRunner().invoke(
        app, ["worker", "--study", "tiny", "--storage", url, "--data-root", str(bad)]
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and named.name in lines[0], lines
    assert optuna.load_study(study_name="tiny", storage=url).trials == []
    shutil.rmtree(bad)
