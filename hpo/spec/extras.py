"""Extra searched parameters for a user's trainer: ``[search.extra.NAME]`` tables.

Each one is either a range (``low``, ``high``, optional ``step`` and ``log``) or a list of
``choices``. A range is of integers when ``low``, ``high`` and ``step`` (if given) are all
integers in the file, of floats otherwise. The trainer reads the drawn values as
``ctx.params[NAME]``; hpo's built-in trainer has no use for them, so a study file with extras
must name its own ``[trainer] function`` (``hpo.spec.study_file``).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, Strict, model_validator

from hpo.spec.fields import Float, Int, Table

# The names hpo itself gives a trial's parameters: an extra may not take one of them.
RESERVED_PARAM_NAMES = frozenset({"batch_size", "lr", "weight_decay", "log2_batch_size"})
EXTRA_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_EXTRA_PARAMS = 32
MAX_CHOICES = 100

# What a choice may be: Optuna's categorical distribution stores these as they are.
Choice = Annotated[bool, Strict()] | Int | Float | Annotated[str, Field(max_length=200)]
ExtraValue = bool | int | float | str


class ExtraParam(Table):
    """One extra searched parameter: a range (``low``/``high``, ``step``, ``log``) or
    ``choices``."""

    low: Int | Float | None = None
    high: Int | Float | None = None
    step: Int | Float | None = None
    log: bool = False
    choices: list[Choice] | None = Field(None, max_length=MAX_CHOICES)

    @property
    def kind(self) -> str:
        """``"categorical"``, ``"int"`` or ``"float"``: how it is sampled."""
        if self.choices is not None:
            return "categorical"
        numbers = (self.low, self.high, self.step)
        return "int" if all(isinstance(n, int) for n in numbers if n is not None) else "float"

    @model_validator(mode="after")
    def _check_form(self) -> ExtraParam:
        if self.choices is not None:
            ranged = [k for k in ("low", "high", "step") if getattr(self, k) is not None]
            if ranged or self.log:
                raise ValueError(f"choices cannot be combined with {(ranged or ['log'])[0]}")
            if not self.choices:
                raise ValueError("choices is empty: give at least one value")
            if len({(type(c), c) for c in self.choices}) != len(self.choices):
                raise ValueError(f"choices {self.choices} has a value twice")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range) or choices (a list)")
        if self.low >= self.high:
            raise ValueError(f"low = {self.low} must be less than high = {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log = true needs low > 0 (got low = {self.low})")
        if self.step is not None:
            if self.step <= 0:
                raise ValueError(f"step = {self.step} must be positive")
            if self.step > self.high - self.low:
                raise ValueError(f"step = {self.step} is larger than high - low")
            if self.log and not (self.kind == "int" and self.step == 1):
                raise ValueError("step cannot be combined with log = true")
        return self


def check_extra_names(extra: dict[str, ExtraParam]) -> None:
    """Names must be identifiers and must not be one of hpo's own parameter names."""
    if len(extra) > MAX_EXTRA_PARAMS:
        raise ValueError(f"extra has {len(extra)} parameters; at most {MAX_EXTRA_PARAMS}")
    for name in extra:
        if not EXTRA_NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"extra.{name!r}: a name must be an identifier "
                "(letters, digits, underscores; not starting with a digit)"
            )
        if name in RESERVED_PARAM_NAMES:
            raise ValueError(
                f"extra.{name}: the name is hpo's own parameter "
                f"(reserved: {', '.join(sorted(RESERVED_PARAM_NAMES))})"
            )
