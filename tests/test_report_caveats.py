"""The report's caveats, generated from the numbers: weight decay that barely acted in the
epochs trained, parameters not varied (left out of the importances) or varied in few
trials, and whole epochs counted apart from reports."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import create_trial

from hpo.report.analysis import collect, describe_variation, importances, variation
from hpo.report.markdown import summary_markdown
from hpo.report.weight_decay import weight_decay_view
from hpo.space import BATCH_PARAM
from hpo.spec import StudySpec, load_spec
from tests.conftest import train_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)

DISTRIBUTIONS = {
    BATCH_PARAM: IntDistribution(3, 7),
    "lr": FloatDistribution(1e-3, 1.0, log=True),
    "weight_decay": FloatDistribution(1e-5, 1e-1, log=True),
}
COUNTS = {"train": {"a": 2048, "b": 2048}}  # N = 4096


def _trial(log2: int, lr: float, weight_decay: float, value: float, epochs: float = 2.0):
    return create_trial(
        params={BATCH_PARAM: log2, "lr": lr, "weight_decay": weight_decay},
        distributions=DISTRIBUTIONS,
        value=value,
        user_attrs={"batch_size": 2**log2, "train_epochs": epochs},
    )


def _grid(lr: float, decays: tuple[float, float]) -> list:
    """Two weight decays at each of B = 16, 32, 64; the larger one wins."""
    return [
        _trial(log2, lr * 2 ** (log2 - 4), decay, 0.7 + 0.01 * k)
        for log2 in (4, 5, 6)
        for k, decay in enumerate(decays)
    ]


def test_weight_decay_that_barely_acted_in_the_epochs_trained_is_said_to() -> None:
    # τ = B/(η·λ·N) = 16/(0.01 · 2e-4 · 4096) ≈ 1,950 epochs against 2 trained
    view = weight_decay_view(_grid(0.01, (1e-4, 2e-4)), True, COUNTS)
    assert view.epochs_trained == 2.0
    assert "Weight decay barely acted at every batch size" in view.describe()
    assert "over 10× the 2 epochs each trial trained" in view.describe()
    assert "toward zero by at most 0.1% (1 − exp(−epochs/τ))" in view.describe()


def test_weight_decay_that_acted_gets_no_such_sentence() -> None:
    # τ = 16/(0.2 · 0.1 · 4096) ≈ 0.2 epochs: the weights forget within an epoch
    view = weight_decay_view(_grid(0.2, (0.05, 0.1)), True, COUNTS)
    assert view.rows and all(r.tau_epoch is not None for r in view.rows)
    assert "barely acted" not in view.describe()


def test_a_parameter_run_at_one_value_is_left_out_of_the_importances_and_named() -> None:
    study = optuna.create_study(direction="maximize")
    for k, log2 in enumerate((3, 4, 5, 6, 3, 4, 5, 6)):
        study.add_trial(_trial(log2, 0.01 * (1 + k), 1e-4, 0.6 + 0.02 * k))
    values, _ = importances(study)
    assert "weight_decay" not in values and "lr" in values
    data = collect(study, "val_auc")
    assert data.variation["weight_decay"] == 0
    markdown = summary_markdown(data, figure_links=False)
    assert "Not varied (one value in every complete trial), so left out: weight_decay." in (
        markdown
    )


def test_a_parameter_varied_in_few_trials_is_flagged_beside_its_importance() -> None:
    trials = [_trial(4, 0.01 * (1 + k), 1e-4, 0.6 + 0.01 * k) for k in range(10)]
    trials += [_trial(5, 0.02, 1e-3, 0.7), _trial(6, 0.03, 1e-2, 0.72)]
    moved = variation(trials)
    assert (moved[BATCH_PARAM], moved["lr"], moved["weight_decay"]) == (2, 10, 2)
    text = describe_variation({"lr": 0.5, "weight_decay": 0.37}, moved, len(trials))
    assert "weight_decay in 2 of 12" in text and "lr in" not in text
    assert "Not varied" not in text


def test_epochs_completed_counts_whole_epochs_not_reports(tiny_study: Path) -> None:
    data = load_spec("tiny").model_dump()
    data["dataset"].update(train_size=128, val_size=64)
    data["budget"].update(epochs=2, reports=4)
    spec = StudySpec.model_validate(data)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({BATCH_PARAM: 5, "lr": 0.01, "weight_decay": 1e-4})
    study.optimize(lambda trial: train_trial(trial, spec), n_trials=1)
    attrs = study.trials[0].user_attrs
    assert (attrs["reports_completed"], attrs["epochs_completed"]) == (4, 2)
