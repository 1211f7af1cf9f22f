"""Hostile study files, generated: a spec is either valid (and then it round-trips through the
storage and its sampler and pruner can be built) or one line naming the field, exit 2, never
a traceback, and nothing written to storage.

The documents are the tiny study with random fields replaced by random TOML values (and
random keys added), plus random bytes; ``hypothesis`` shrinks any failure to its smallest.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import optuna
import pytest
import tomllib
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hpo.cli import app
from hpo.space import make_pruner, make_sampler
from hpo.spec import SpecError, StudySpec, load_spec
from hpo.storage import SPEC_ATTR
from hpo.study import create_or_load_study

from .conftest import tiny_study_text

BASE = tomllib.loads(tiny_study_text())
FIELDS = {
    "": ["name", "seed"],
    "dataset": ["kind", "root", "train_size", "val_size", "val_fraction", "image_size",
                "cache_dir", "seed"],
    "model": ["name", "pretrained"],
    "search": ["batch_size_min", "batch_size_max", "lr_low", "lr_high", "weight_decay_low",
               "weight_decay_high", "optimizer", "momentum"],
    "budget": ["epochs", "n_trials", "timeout_s"],
    "pruner": ["kind", "min_epochs", "n_startup_trials", "reduction_factor"],
    "sampler": ["kind", "seed", "n_startup_trials", "grid_lr", "grid_weight_decay"],
    "objective": ["metric"],
    "training": ["device", "mixed_precision", "channels_last", "eval_batch_size", "augment",
                 "color_jitter", "num_threads", "checkpoint_dir"],
}  # fmt: skip
PLACES = [(table, key) for table, keys in FIELDS.items() for key in keys]

scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63, 2**64]),
    st.floats(),
    st.sampled_from([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e-320, 1e308]),
    st.text(max_size=30),
    st.sampled_from(["", "tiny", "grid", "synthetic", "pcam", "cpu", "cuda", "README.md", "/"]),
)
# Values close to valid ones, so that many generated files pass and are then checked for
# round-tripping and for samplers and pruners that can be built.
plausible = st.one_of(
    st.integers(-3, 300),
    st.sampled_from([2**k for k in range(12)]),
    st.floats(-1.0, 2.0),
    st.floats(1e-8, 1.0),
    st.sampled_from(["tpe", "gp", "random", "grid", "median", "hyperband", "none", "adamw",
                     "val_loss", "small-cnn", "auto", "cpu", "checkpoints", "tiny"]),
    st.lists(st.floats(1e-6, 0.3), max_size=3),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    escaped = "".join(
        ch if ch.isprintable() and ch not in '"\\' else f"\\U{ord(ch):08X}" for ch in text
    )
    return f'"{escaped}"'


def _toml_key(key: str) -> str:
    return _toml_string(key)  # a quoted key: any string is a key


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def to_toml(document: dict) -> str:
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}" for k, v in document.items() if not isinstance(v, dict)
    ]
    for table, body in document.items():
        if isinstance(body, dict):
            lines.append(f"[{_toml_key(table)}]")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def near(value: object) -> st.SearchStrategy:
    """Values of the same type close to a valid ``value`` (the field's value in BASE)."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(0, 2 * value + 2) | st.sampled_from([2**k for k in range(10)])
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        low, high = sorted((value / 10, value * 10))
        return st.floats(low, high)
    return plausible


@st.composite
def documents(draw) -> dict:
    """The tiny study with 1-3 fields replaced (or removed), and maybe an unknown key."""
    document = json.loads(json.dumps(BASE))
    for table, key in draw(
        st.lists(st.sampled_from(PLACES), min_size=1, max_size=draw(st.sampled_from([1, 1, 2, 3])))
    ):
        target = document if table == "" else document.setdefault(table, {})
        if draw(st.integers(0, 9)) == 0:
            target.pop(key, None)
        else:
            choice = draw(st.integers(0, 2))
            current = target.get(key)
            target[key] = draw(
                values if choice == 0 else plausible if choice == 1 else near(current)
            )
    if draw(st.integers(0, 9)) == 0:
        document[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return document


def check_contract(path: Path) -> StudySpec | None:
    """A valid spec that survives the storage, or a one-line SpecError naming the file."""
    try:
        spec = load_spec(path)
    except SpecError as error:
        message = str(error)
        assert message.startswith(str(path)), message
        event("one-line SpecError")
        return None
    event("valid spec")
    assert StudySpec.from_json(spec.to_json()) == spec
    make_sampler(spec)
    make_pruner(spec)
    return spec


@settings(
    derandomize=True,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(document=documents())
@example(document={**BASE, "search": {**BASE["search"], "lr_high": math.inf}})
@example(document={**BASE, "budget": {**BASE["budget"], "epochs": True}})
@example(document={**BASE, "sampler": {**BASE["sampler"], "seed": -1}})
@example(document={**BASE, "sampler": {**BASE["sampler"], "seed": 2**32}})
@example(document={**BASE, "sampler": {**BASE["sampler"], "kind": "grid", "grid_lr": []}})
@example(document={**BASE, "name": "a" * 300})
@example(document={**BASE, "budget": {**BASE["budget"], "epochs": 10**12}})
@example(document={**BASE, "dataset": {**BASE["dataset"], "cache_dir": "tiny.toml"}})
@example(document={**BASE, "training": {"checkpoint_dir": "a\x00b"}})
def test_a_generated_study_file_is_valid_or_one_clear_error(
    studies_dir: Path, document: dict
) -> None:
    path = studies_dir / "tiny.toml"
    path.write_text(to_toml(document))
    check_contract(path)


@settings(
    derandomize=True,
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.builds(lambda n: b"a = " + b"[" * n, st.integers(100, 5000)),
        st.builds(lambda n: b"a = " + b"{b = " * n, st.integers(100, 5000)),
        st.builds(lambda prefix, junk: prefix + junk, st.just(tiny_study_text().encode()),
                  st.binary(min_size=1, max_size=20)),
    )
)  # fmt: skip
@example(data=b"\xff\xfe")
@example(data=tiny_study_text().encode("utf-16"))
def test_random_bytes_as_a_study_file_are_one_clear_error(studies_dir: Path, data: bytes) -> None:
    path = studies_dir / "tiny.toml"
    path.write_bytes(data)
    check_contract(path)


def test_a_directory_named_like_a_study_file_is_one_clear_error(studies_dir: Path) -> None:
    (studies_dir / "odd.toml").mkdir()
    with pytest.raises(SpecError, match="odd.toml"):
        load_spec(studies_dir / "odd.toml")


class Created(Exception):
    """Stands in for the first write to storage."""


@settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(document=documents())
def test_launch_with_a_generated_study_file_exits_2_in_one_line_before_the_study_exists(
    studies_dir: Path, monkeypatch: pytest.MonkeyPatch, document: dict
) -> None:
    path = studies_dir / "tiny.toml"
    path.write_text(to_toml(document))
    monkeypatch.setenv("HPO_DEVICE", "cpu")  # a generated "cuda" must not need a GPU here

    def reached_storage(*args, **kwargs):
        raise Created

    monkeypatch.setattr("hpo.study.create_or_load_study", reached_storage)
    result = CliRunner().invoke(app, ["launch", "--study", "tiny", "--storage", "sqlite:///x.db"])
    if isinstance(result.exception, Created):
        return  # a valid spec: every check passed before the first write
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not Path("x.db").exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda spec: {**spec, "search": {**spec["search"], "lr_high": None}},
        lambda spec: {**spec, "budget": {**spec["budget"], "epochs": "many"}},
        lambda spec: {**spec, "unknown": 1},
        lambda spec: [1, 2],
    ],
)
def test_a_stored_spec_that_no_longer_validates_is_exit_2_for_every_command(
    studies_dir: Path, damage
) -> None:
    (studies_dir / "tiny.toml").write_text(tiny_study_text())
    spec = load_spec("tiny")
    url = "sqlite:///stored.db"
    loaded = create_or_load_study(spec, url)
    loaded.ref.set_user_attr(SPEC_ATTR, json.dumps(damage(json.loads(spec.to_json()))))
    runner = CliRunner()
    for command in (
        ["status", "--study", "tiny", "--storage", url],
        ["worker", "--study", "tiny", "--storage", url],
        ["launch", "--study", "tiny", "--storage", url],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "stored on study 'tiny'" in lines[0], (command, lines)
    assert optuna.load_study(study_name="tiny", storage=url).trials == []


def deepest_call_stack(function, *args) -> int:
    """How many frames deeper than the caller ``function(*args)`` went."""
    depth = deepest = 0

    def profile(frame, event, arg):
        nonlocal depth, deepest
        if event in ("call", "c_call"):
            depth += 1
            deepest = max(deepest, depth)
        elif event in ("return", "c_return", "c_exception"):
            depth -= 1

    sys.setprofile(profile)
    try:
        function(*args)
    except Exception:
        pass
    finally:
        sys.setprofile(None)
    return deepest


@pytest.mark.parametrize(
    "text",
    ["a = " + "[" * 5000, "a = " + "{b = " * 5000, "[[a]]\nb = " + "[" * 40 + "]" * 40],
    ids=["arrays", "inline-tables", "just-over-the-limit"],
)
def test_a_deeply_nested_study_file_is_refused_without_nearing_the_recursion_limit(
    studies_dir: Path, text: str
) -> None:
    # A parser stopped by the recursion limit leaves no stack for a finalizer the garbage
    # collector runs at that depth: refused before parsing, the call stays shallow.
    path = studies_dir / "deep.toml"
    path.write_text(text)
    with pytest.raises(
        SpecError, match=r"deep\.toml: not a study file \(nested more than 32 deep on line \d"
    ):
        load_spec(path)
    assert deepest_call_stack(load_spec, path) < 100


def test_brackets_in_comments_and_strings_do_not_count_as_nesting(studies_dir: Path) -> None:
    path = studies_dir / "tiny.toml"
    many = "[{" * 50
    path.write_text(f"# {many}\n" + tiny_study_text() + f"# '''{many}\n")
    assert load_spec(path).name == "tiny"
    for value in (f'"{many}"', f"'{many}'", f'"""\n{many}\n"""', f"'''\n{many}\n'''"):
        path.write_text(tiny_study_text() + f"note = {value}\n")
        with pytest.raises(SpecError) as raised:
            load_spec(path)
        assert "nested" not in str(raised.value) and "note" in str(raised.value)


def test_a_stored_spec_nested_too_deeply_is_one_clear_error() -> None:
    with pytest.raises(
        SpecError, match=r"stored spec is not a JSON study spec \(nested more than 32"
    ):
        StudySpec.from_json("[" * 100_000)
