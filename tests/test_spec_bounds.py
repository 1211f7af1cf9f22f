"""Every bound a study file's field declares is enforced: a value just outside it is
refused (a bound given on a field whose type carries its own wide bounds used to be
silently replaced by them, so ``reduction_factor = 1`` passed its ``ge=2``)."""

from __future__ import annotations

import inspect
import math
from typing import Annotated, Any

import annotated_types as at
import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from hpo.spec import tables


def _bounded_fields() -> list[tuple[str, Any, list[Any]]]:
    found = []
    for _, model in inspect.getmembers(tables, inspect.isclass):
        if not (issubclass(model, BaseModel) and model.__module__ == tables.__name__):
            continue
        for name, field in model.model_fields.items():
            bounds = [m for m in field.metadata if isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt))]
            if bounds:
                found.append((f"{model.__name__}.{name}", field, bounds))
    return found


def _outside(bounds: list[Any], integer: bool) -> list[float]:
    """Values just outside the tightest declared bounds."""
    values = []
    lows = [(b.ge, True) for b in bounds if isinstance(b, at.Ge)]
    lows += [(b.gt, False) for b in bounds if isinstance(b, at.Gt)]
    highs = [(b.le, True) for b in bounds if isinstance(b, at.Le)]
    highs += [(b.lt, False) for b in bounds if isinstance(b, at.Lt)]
    if lows:
        low, inclusive = max(lows)
        values.append(low - (1 if integer else max(1e-9, abs(low) * 1e-6)) if inclusive else low)
    if highs:
        high, inclusive = min(highs)
        values.append(high + (1 if integer else max(1e-9, abs(high) * 1e-6)) if inclusive else high)
    return [int(v) if integer else v for v in values if math.isfinite(v)]


FIELDS = _bounded_fields()


@pytest.mark.parametrize(("name", "field", "bounds"), FIELDS, ids=[f[0] for f in FIELDS])
def test_a_value_outside_a_declared_bound_is_refused(name: str, field: Any, bounds: list) -> None:
    adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)])
    integer = field.annotation is int
    for value in _outside(bounds, integer):
        with pytest.raises(ValidationError):
            adapter.validate_python(value)


def test_reduction_factor_one_is_refused() -> None:
    with pytest.raises(ValidationError, match="reduction_factor"):
        tables.PrunerSpec(kind="hyperband", reduction_factor=1)


def test_more_reports_than_steps_and_absurd_budgets_are_refused() -> None:
    with pytest.raises(ValidationError, match="reports = 4 is more than steps = 1"):
        tables.BudgetSpec(unit="steps", steps=1, reports=4)
    tables.BudgetSpec(unit="steps", steps=4, reports=4)
    for field in ("seconds", "timeout_s"):
        with pytest.raises(ValidationError, match=field):
            tables.BudgetSpec(unit="seconds", **{"seconds": 60.0, field: 1e12})


def test_a_cap_attribute_that_is_no_batch_size_is_no_cap() -> None:
    import optuna

    from hpo.caps import CAP_ATTR_PREFIX, lower_batch_cap, read_batch_cap, stored_caps
    from hpo.storage import StudyRef

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="caps")
    ref = StudyRef.by_name(storage, "caps")
    for junk in ("abc", [64], True, 0, -8, 3.5, "nan", {"x": 1}):
        study.set_user_attr(CAP_ATTR_PREFIX + "cpu", junk)
        assert read_batch_cap(ref, "cpu") is None and stored_caps(ref) == {}
    study.set_user_attr(CAP_ATTR_PREFIX + "cpu", "64")
    assert read_batch_cap(ref, "cpu") == 64
    study.set_user_attr(CAP_ATTR_PREFIX + "cpu", "abc")
    assert lower_batch_cap(ref, "cpu", 32) == 16 and read_batch_cap(ref, "cpu") == 16


def test_more_reports_than_updates_at_the_largest_batch_size_is_refused() -> None:
    from hpo.resource import check_reports_fit
    from hpo.spec import SpecError

    budget = tables.BudgetSpec(unit="epochs", epochs=1, reports=10)
    with pytest.raises(SpecError, match="budget.reports = 10 is more than the 4 optimizer updates"):
        check_reports_fit(budget, train_size=256, batch_size=64)
    check_reports_fit(budget, train_size=640, batch_size=64)
    check_reports_fit(tables.BudgetSpec(unit="seconds", seconds=5.0, reports=99), 64, 64)
