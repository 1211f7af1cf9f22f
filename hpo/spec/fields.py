"""What a value in a study file may be: the bounded number types, the path type, and the
base every table of the file derives from (unknown keys forbidden, frozen, finite).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict


# The base of every table: a key that is not a field is an error, not a silently ignored
# setting.
class Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The one place that says what a number in a study file is. Strict: TOML's `true` is not
# the integer 1. Finite: JSON, in which the spec is stored on the study, has no inf/nan,
# so an infinite bound would be stored as null and the study could never be loaded again.
# Bounded: every count has a ceiling far above any real study, so a typo of 10**12 is a
# field error here instead of a crash (or a memory exhaustion) inside a worker.
Int = Annotated[int, Strict(), Field(ge=-(2**31), le=2**31 - 1)]
Count = Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)]
PositiveInt = Annotated[int, Strict(), Field(gt=0, le=2**31 - 1)]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]


def IntIn(ge: int, le: int) -> Any:  # noqa: N802 - used as a type
    """An integer field bounded to [ge, le]. Bounds must sit in the type: ``Int =
    Field(3, ge=2)`` would lose ``ge=2`` to ``Int``'s own wider bounds (pydantic applies
    the type's constraints last)."""
    return Annotated[int, Strict(), Field(ge=ge, le=le)]


# numpy's and Optuna's samplers take seeds in [0, 2**32); a trial adds its number.
Seed = Annotated[int, Strict(), Field(ge=0, le=2**32 - 2**20)]
MAX_EPOCHS = 100_000
MAX_NAME_LENGTH = 100  # the name is part of file names (reports, checkpoints, cache)


def _usable_path(path: Path) -> Path:
    if "\x00" in str(path):
        raise ValueError("a path cannot contain a NUL character")
    if not str(path).strip():
        raise ValueError("a path cannot be empty")
    return path


FilePath = Annotated[Path, AfterValidator(_usable_path)]
