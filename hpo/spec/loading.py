"""Finding and loading a study file: a name or a path to the validated ``StudySpec``, the
check that its directories exist on this node, and which fields two specs differ in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomllib
from pydantic import ValidationError

from hpo.settings import STUDIES_DIR_ENV, env
from hpo.spec.errors import (
    MAX_NESTING,
    TOML_TOKENS,
    SpecError,
    format_validation_error,
    too_deep,
)
from hpo.spec.study_file import NODE_LOCAL_FIELDS, STUDY_NAME_PATTERN, StudySpec
from hpo.trust import trust_module


def resolve_study_path(study: str, studies_dir: Path | None = None) -> Path:
    """Find the study file for ``--study``.

    ``study`` is a name (``histo`` → ``$HPO_STUDIES_DIR/histo.toml`` or
    ``./studies/histo.toml``) or a path ending in ``.toml``. Names are restricted to
    ``[a-z0-9][a-z0-9_-]*`` so a name can never walk out of the studies directory.
    """
    if study.endswith(".toml"):
        path = Path(study)
    else:
        if not STUDY_NAME_PATTERN.fullmatch(study):
            raise SpecError(
                f"study name {study!r} is not allowed: use [a-z0-9][a-z0-9_-]* "
                "or a path ending in .toml"
            )
        directory = studies_dir or Path(env(STUDIES_DIR_ENV) or "studies")
        path = directory / f"{study}.toml"
    if not path.is_file():
        raise SpecError(f"{path}: study file not found")
    return path


def parse_spec(data: dict[str, Any], *, source: str, default_name: str) -> StudySpec:
    """Validate a parsed study table; ``source`` names the file in error messages."""
    data = dict(data)
    data.setdefault("name", default_name)
    try:
        return StudySpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{source}: {format_validation_error(error)}") from None


def load_spec(
    study: str | Path, studies_dir: Path | None = None, *, check_paths: bool = True
) -> StudySpec:
    """Load and validate a study file by name or path; raises SpecError with one clear line.

    ``check_paths=False`` skips the check that ``dataset.root`` exists here, for a node
    that overrides the data root (``--data-root``); ``check_data_root`` checks it later.
    """
    path = resolve_study_path(str(study), studies_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise SpecError(f"{path}: cannot be read ({error.strerror})") from None
    line = too_deep(text, TOML_TOKENS)
    if line is not None:
        raise SpecError(
            f"{path}: not a study file (nested more than {MAX_NESTING} deep on line {line})"
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: not valid TOML ({error})") from None
    spec = parse_spec(data, source=str(path), default_name=path.stem)
    # This node's own file: its operator chose the code it names.
    if spec.model is not None and spec.model.factory is not None:
        trust_module(spec.model.factory.partition(":")[0])
    if spec.trainer.function is not None:
        trust_module(spec.trainer.function.partition(":")[0])
    if check_paths:
        check_data_root(spec, source=str(path))
    return spec


def check_data_root(spec: StudySpec, *, source: str) -> None:
    """Raise SpecError unless the spec's ``dataset.root`` (if any) is a directory here and
    its ``dataset.cache_dir`` (if any) is not something else than a directory."""
    if spec.dataset is None:
        return
    root = spec.dataset.root
    if root is not None and not root.is_dir():
        raise SpecError(f"{source}: dataset.root: directory {str(root)!r} does not exist")
    cache = spec.dataset.cache_dir
    if cache is not None and cache.exists() and not cache.is_dir():
        raise SpecError(f"{source}: dataset.cache_dir: {str(cache)!r} is not a directory")


def spec_differences(a: StudySpec, b: StudySpec) -> list[str]:
    """Dotted names of the fields where two specs differ (for 'local spec differs' errors).

    Node-local fields (``NODE_LOCAL_FIELDS``) are not compared: they may differ per node.
    """

    def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                out.update(flatten(item, f"{prefix}{key}."))
            return out
        return {prefix.rstrip("."): value}

    left = flatten(json.loads(a.to_json()))
    right = flatten(json.loads(b.to_json()))
    keys = (left.keys() | right.keys()) - NODE_LOCAL_FIELDS
    return sorted(key for key in keys if left.get(key) != right.get(key))
