"""Pruning that cannot condemn a batch size wholesale: stratified comparison and a floor.

Built on hand-made trials (``optuna.trial.create_trial``), so each test states exactly
which trials a pruning decision is compared with.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from hpo.pruning import (
    BatchSizeFloorPruner,
    CatchUpPruner,
    FlooredHyperbandPruner,
    SameBatchSizePruner,
    forecast_upper_bound,
)
from hpo.space import BATCH_PARAM, make_pruner
from hpo.spec import SpecError, StudySpec, load_spec, parse_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

SMALL, LARGE = 4, 9  # log2 of B = 16 and B = 512
DISTRIBUTIONS = {
    BATCH_PARAM: IntDistribution(SMALL, LARGE),
    "lr": FloatDistribution(1e-4, 1.0, log=True),
}


def _spec(tiny_study: Path, **pruner: object) -> StudySpec:
    data = load_spec("tiny").model_dump()
    data["budget"]["epochs"] = 4
    data["pruner"].update(pruner)
    return StudySpec.model_validate(data)


def _add_complete(study: optuna.Study, log2_batch_size: int, value: float) -> None:
    """A finished trial of one batch size that reported ``value`` at every step 1-4."""
    study.add_trial(
        create_trial(
            params={BATCH_PARAM: log2_batch_size, "lr": 0.01},
            distributions=DISTRIBUTIONS,
            value=value,
            intermediate_values={step: value for step in range(1, 5)},
        )
    )


def _running(study: optuna.Study, log2_batch_size: int) -> optuna.Trial:
    study.enqueue_trial({BATCH_PARAM: log2_batch_size, "lr": 0.01})
    return study.ask(DISTRIBUTIONS)


def _decision(study: optuna.Study, log2_batch_size: int, value: float, step: int = 2) -> bool:
    trial = _running(study, log2_batch_size)
    trial.report(value, step)
    pruned = trial.should_prune()
    study.tell(trial, state=TrialState.FAIL)  # out of the way of the next decision
    return pruned


def _study(pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Five good small-batch trials (0.90) and two weaker large-batch ones (0.70, 0.72)."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for value in (0.90, 0.91, 0.92, 0.89, 0.90):
        _add_complete(study, SMALL, value)
    for value in (0.70, 0.72):
        _add_complete(study, LARGE, value)
    return study


def test_unstratified_median_prunes_a_large_batch_by_the_small_batches() -> None:
    """The failure this module exists for: a large-batch trial as good as its own kind is
    pruned because small batches look better at the same epoch."""
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1)
    assert _decision(_study(median), LARGE, 0.73)


def test_stratified_compares_a_large_batch_only_with_its_own_batch_size() -> None:
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1)
    study = _study(SameBatchSizePruner(median, BATCH_PARAM))
    assert not _decision(study, LARGE, 0.73)  # above the large-batch median (0.71)
    assert _decision(study, LARGE, 0.65)  # below it: pruned, stratified does prune
    assert _decision(study, SMALL, 0.85)  # small batches are judged by small batches


def test_stratified_startup_counts_complete_trials_of_the_same_batch_size() -> None:
    """With n_startup_trials = 3 and only two complete B = 512 trials, no B = 512 trial is
    pruned, however many small-batch trials are complete."""
    median = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    study = _study(SameBatchSizePruner(median, BATCH_PARAM))
    assert not _decision(study, LARGE, 0.10)
    assert _decision(study, SMALL, 0.10)


def test_floor_protects_a_batch_size_until_it_has_enough_complete_trials() -> None:
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1)
    study = optuna.create_study(
        direction="maximize", pruner=BatchSizeFloorPruner(median, BATCH_PARAM, min_complete=2)
    )
    for value in (0.90, 0.91, 0.92):
        _add_complete(study, SMALL, value)
    assert not _decision(study, LARGE, 0.50)  # no complete B = 512 yet
    _add_complete(study, LARGE, 0.70)
    assert not _decision(study, LARGE, 0.50)  # one
    _add_complete(study, LARGE, 0.71)
    assert _decision(study, LARGE, 0.50)  # two: the floor is met, the median decides
    assert _decision(study, SMALL, 0.50)  # a covered batch size was never protected


def test_floor_does_not_count_pruned_or_failed_trials() -> None:
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1)
    study = optuna.create_study(
        direction="maximize", pruner=BatchSizeFloorPruner(median, BATCH_PARAM, min_complete=1)
    )
    _add_complete(study, SMALL, 0.9)
    for state in (TrialState.PRUNED, TrialState.FAIL):
        study.add_trial(
            create_trial(
                params={BATCH_PARAM: LARGE, "lr": 0.01},
                distributions=DISTRIBUTIONS,
                state=state,
                intermediate_values={1: 0.1, 2: 0.1},
            )
        )
    assert not _decision(study, LARGE, 0.5)


def test_make_pruner_wraps_as_the_spec_says(tiny_study: Path) -> None:
    plain = make_pruner(_spec(tiny_study, kind="median"))
    assert type(plain) is optuna.pruners.MedianPruner  # defaults: exactly as before
    floor = make_pruner(
        _spec(tiny_study, kind="median", stratify_by_batch_size=True, min_trials_per_batch_size=2)
    )
    assert isinstance(floor, BatchSizeFloorPruner) and floor.min_complete == 2
    assert isinstance(floor.base, SameBatchSizePruner)
    assert isinstance(floor.base.base, optuna.pruners.MedianPruner)
    percentile = make_pruner(_spec(tiny_study, kind="percentile", percentile=75.0))
    assert isinstance(percentile, optuna.pruners.PercentilePruner)
    assert percentile._percentile == 75.0
    hyperband = make_pruner(_spec(tiny_study, kind="hyperband", min_trials_per_batch_size=1))
    # still a HyperbandPruner, so Optuna keeps giving samplers the bracket's trials only
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    assert isinstance(hyperband, FlooredHyperbandPruner) and hyperband.min_complete == 1


def test_floored_hyperband_protects_an_uncovered_batch_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hyperband's own decision (here: always prune) applies only to covered batch sizes."""
    monkeypatch.setattr(optuna.pruners.HyperbandPruner, "prune", lambda self, study, trial: True)
    hyperband = FlooredHyperbandPruner(
        param=BATCH_PARAM, min_complete=1, min_resource=1, max_resource=4, reduction_factor=2
    )
    study = optuna.create_study(direction="maximize", pruner=hyperband)
    _add_complete(study, SMALL, 0.9)
    assert not _decision(study, LARGE, 0.5, step=1)
    assert _decision(study, SMALL, 0.5, step=1)


def test_spec_stored_before_the_new_fields_loads_with_them_off(tiny_study: Path) -> None:
    stored = json.loads(load_spec("tiny").to_json())
    for field in (
        "percentile",
        "stratify_by_batch_size",
        "min_trials_per_batch_size",
        "compare_with_pruned",
        "min_trials_at_report",
    ):
        del stored["pruner"][field]
    spec = StudySpec.from_json(json.dumps(stored))
    assert not spec.pruner.stratify_by_batch_size
    assert spec.pruner.min_trials_per_batch_size == 0
    assert type(make_pruner(spec)) is optuna.pruners.MedianPruner


def test_stratify_cannot_apply_to_hyperband(tiny_study: Path) -> None:
    data = load_spec("tiny").model_dump(mode="json")
    data["pruner"].update(kind="hyperband", stratify_by_batch_size=True)
    with pytest.raises(SpecError, match="pruner: stratify_by_batch_size needs kind") as error:
        parse_spec(data, source="tiny.toml", default_name="tiny")
    assert "\n" not in str(error.value)


def _add_pruned(study: optuna.Study, log2_batch_size: int, values: dict[int, float]) -> None:
    """A trial of one batch size pruned after reporting ``values`` (step -> value)."""
    study.add_trial(
        create_trial(
            params={BATCH_PARAM: log2_batch_size, "lr": 0.01},
            distributions=DISTRIBUTIONS,
            state=TrialState.PRUNED,
            intermediate_values=values,
        )
    )


def _late_bloomer_study(pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The demo's seed-0 B = 128 at report 2: two complete survivors (0.693, 0.689) and three
    trials pruned at report 2 below them; a good small-batch crowd beside them."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for value in (0.72, 0.73, 0.74):
        _add_complete(study, SMALL, value)
    for value in (0.693, 0.689):
        _add_complete(study, LARGE, value)
    for value in (0.600, 0.620, 0.645):
        _add_pruned(study, LARGE, {1: value - 0.02, 2: value})
    return study


def test_a_late_bloomer_is_pruned_by_the_complete_survivors_alone() -> None:
    """The old rule (Optuna's: COMPLETE trials only): 0.674 is below the survivors' median."""
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=2)
    assert _decision(_late_bloomer_study(SameBatchSizePruner(median, BATCH_PARAM)), LARGE, 0.674)


def test_with_pruned_trials_counted_the_late_bloomer_is_kept() -> None:
    """Every B = 128 trial that reached report 2 (0.600, 0.620, 0.645, 0.689, 0.693): the
    median is 0.645 and 0.674 is above it; a poor trial is still pruned."""
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=2)
    study = _late_bloomer_study(SameBatchSizePruner(median, BATCH_PARAM, include_pruned=True))
    assert not _decision(study, LARGE, 0.674)
    assert _decision(study, LARGE, 0.630)


def test_a_pruned_trial_counts_only_at_the_reports_it_reached() -> None:
    """Trials pruned at report 2 have no value at report 3, so there the median is the two
    complete trials' (0.691) and a trial at 0.680 is pruned."""
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=2)
    study = _late_bloomer_study(SameBatchSizePruner(median, BATCH_PARAM, include_pruned=True))
    assert _decision(study, LARGE, 0.680, step=3)


def test_pruned_trials_of_other_batch_sizes_are_not_counted() -> None:
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=2)
    study = _late_bloomer_study(SameBatchSizePruner(median, BATCH_PARAM, include_pruned=True))
    for _ in range(5):
        _add_pruned(study, SMALL, {1: 0.1, 2: 0.1})
    assert _decision(study, LARGE, 0.630)  # the B = 128 median is still 0.645


def test_make_pruner_passes_compare_with_pruned_and_min_trials_at_report(
    tiny_study: Path,
) -> None:
    pruner = make_pruner(
        _spec(
            tiny_study,
            kind="median",
            stratify_by_batch_size=True,
            compare_with_pruned=True,
            min_trials_at_report=4,
        )
    )
    assert isinstance(pruner, SameBatchSizePruner) and pruner.include_pruned
    assert pruner.base._n_min_trials == 4
    assert not make_pruner(_spec(tiny_study, stratify_by_batch_size=True)).include_pruned


def test_compare_with_pruned_needs_stratification(tiny_study: Path) -> None:
    data = load_spec("tiny").model_dump(mode="json")
    data["pruner"].update(compare_with_pruned=True)
    with pytest.raises(SpecError, match="compare_with_pruned needs stratify_by_batch_size"):
        parse_spec(data, source="tiny.toml", default_name="tiny")


# ------------------------------------------------------------- successive halving


def _halving(*, min_resource: int = 1, reduction_factor: int = 2) -> optuna.pruners.BasePruner:
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=min_resource, reduction_factor=reduction_factor
    )


def _reached_rung(study: optuna.Study, log2_batch_size: int, value: float, step: int = 1) -> None:
    """A trial that reported ``value`` at ``step``, asked the pruner (so successive halving
    records it at the rung) and was then pruned."""
    trial = _running(study, log2_batch_size)
    trial.report(value, step)
    trial.should_prune()
    study.tell(trial, state=TrialState.PRUNED)


def test_stratified_halving_ranks_a_trial_only_among_its_own_batch_size() -> None:
    """Four large-batch trials stood at the first rung (0.60-0.66) beside four much better
    small-batch ones: with η = 2 a large-batch trial goes on if it is in the top half of
    its own batch size; unstratified, the small batches would condemn it."""
    study = optuna.create_study(
        direction="maximize", pruner=SameBatchSizePruner(_halving(), BATCH_PARAM)
    )
    for value in (0.90, 0.91, 0.92, 0.93):
        _reached_rung(study, SMALL, value)
    for value in (0.60, 0.62, 0.64, 0.66):
        _reached_rung(study, LARGE, value)
    assert not _decision(study, LARGE, 0.65, step=1)  # 2nd of 5 large-batch values
    assert _decision(study, LARGE, 0.61, step=1)  # bottom half
    assert _decision(study, SMALL, 0.85, step=1)  # small batches by small batches

    unstratified = optuna.create_study(direction="maximize", pruner=_halving())
    for value in (0.90, 0.91, 0.92, 0.93):
        _reached_rung(unstratified, SMALL, value)
    assert _decision(unstratified, LARGE, 0.65, step=1)


def test_halving_keeps_a_trial_below_its_first_rung() -> None:
    study = optuna.create_study(
        direction="maximize",
        pruner=SameBatchSizePruner(_halving(min_resource=2), BATCH_PARAM),
    )
    for value in (0.90, 0.91, 0.92):
        _reached_rung(study, LARGE, value, step=2)
    assert not _decision(study, LARGE, 0.10, step=1)  # report 1 is before the first rung
    assert _decision(study, LARGE, 0.10, step=2)


def test_the_floor_lets_halving_record_a_protected_trial_at_its_rung() -> None:
    """A trial kept by the floor still stands at the rung, so the next trial competes with
    it: without the record, a poor second trial would be alone at the rung and go on."""
    halving = SameBatchSizePruner(_halving(), BATCH_PARAM)
    floor = BatchSizeFloorPruner(halving, BATCH_PARAM, 1, consult_when_protected=True)
    study = optuna.create_study(direction="maximize", pruner=floor)
    protected = _running(study, LARGE)
    protected.report(0.70, 1)
    assert not protected.should_prune()  # no complete B = 512 trial yet: protected
    protected.report(0.72, 2)
    protected.should_prune()
    study.tell(protected, 0.75)
    frozen = study.trials[protected.number]
    assert frozen.system_attrs["completed_rung_0"] == 0.70
    assert _decision(study, LARGE, 0.65, step=1)  # below the protected trial's 0.70
    assert not _decision(study, LARGE, 0.71, step=1)


def test_a_floor_that_does_not_consult_leaves_no_rung_record() -> None:
    """The reason for ``consult_when_protected``: without it the protected trial never
    reaches the pruner, and a poor next trial is the only one at the rung."""
    floor = BatchSizeFloorPruner(SameBatchSizePruner(_halving(), BATCH_PARAM), BATCH_PARAM, 1)
    study = optuna.create_study(direction="maximize", pruner=floor)
    protected = _running(study, LARGE)
    protected.report(0.70, 1)
    assert not protected.should_prune()
    study.tell(protected, 0.75)
    assert "completed_rung_0" not in study.trials[protected.number].system_attrs
    assert not _decision(study, LARGE, 0.65, step=1)


def test_make_pruner_builds_stratified_halving_with_a_consulting_floor(tiny_study: Path) -> None:
    pruner = make_pruner(
        _spec(
            tiny_study,
            kind="successive_halving",
            min_epochs=1,
            reduction_factor=2,
            stratify_by_batch_size=True,
            min_trials_per_batch_size=2,
        )
    )
    assert isinstance(pruner, BatchSizeFloorPruner) and pruner.consult_when_protected
    assert isinstance(pruner.base, SameBatchSizePruner)
    halving = pruner.base.base
    assert isinstance(halving, optuna.pruners.SuccessiveHalvingPruner)
    assert halving._min_resource == 1 and halving._reduction_factor == 2
    median = make_pruner(_spec(tiny_study, kind="median", min_trials_per_batch_size=2))
    assert isinstance(median, BatchSizeFloorPruner) and not median.consult_when_protected
    plain = make_pruner(_spec(tiny_study, kind="successive_halving"))
    assert type(plain) is optuna.pruners.SuccessiveHalvingPruner


def test_compare_with_pruned_is_refused_for_halving(tiny_study: Path) -> None:
    data = load_spec("tiny").model_dump(mode="json")
    data["pruner"].update(
        kind="successive_halving", stratify_by_batch_size=True, compare_with_pruned=True
    )
    with pytest.raises(SpecError, match="pruner: compare_with_pruned does not apply") as error:
        parse_spec(data, source="tiny.toml", default_name="tiny")
    assert "\n" not in str(error.value)


def test_a_tiny_study_with_stratified_halving_prunes_and_covers_every_batch_size(
    tiny_study: Path, tmp_path: Path
) -> None:
    """End to end: a first round per batch size, then trials that the stratified
    halving pruner stops at its first rung; every batch size keeps its floor of one
    complete trial, and every trial that reached report 1 stands at rung 0."""
    from hpo.data import load_splits
    from hpo.study import create_or_load_study
    from tests.conftest import train_trial

    data = load_spec("tiny").model_dump()
    data["dataset"].update(train_size=128, val_size=64)
    data["budget"].update(epochs=1, reports=2, n_trials=8)
    data["pruner"].update(
        kind="successive_halving",
        min_epochs=1,
        reduction_factor=2,
        stratify_by_batch_size=True,
        min_trials_per_batch_size=1,
    )
    data["sampler"].update(cover_batch_sizes=True)
    spec = StudySpec.model_validate(data)
    loaded = create_or_load_study(spec, f"sqlite:///{tmp_path / 'halving.db'}")
    splits = load_splits(spec.dataset)
    loaded.study.optimize(lambda trial: train_trial(trial, spec, splits=splits), n_trials=8)
    trials = loaded.study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert {t.params[BATCH_PARAM] for t in complete} == {4, 5, 6}
    assert any(t.state == TrialState.PRUNED for t in trials)
    for trial in trials:
        if (
            trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and 1 in trial.intermediate_values
        ):
            assert trial.system_attrs["completed_rung_0"] == trial.intermediate_values[1]


# ------------------------------------------------------------- catch-up


def _add_curve(
    study: optuna.Study, log2_batch_size: int, curve: dict[int, float], lr: float = 0.01
) -> None:
    """A complete trial whose last report is its final value."""
    study.add_trial(
        create_trial(
            params={BATCH_PARAM: log2_batch_size, "lr": lr},
            distributions=DISTRIBUTIONS,
            value=curve[max(curve)],
            intermediate_values=curve,
        )
    )


def _on_a_line(pruner: optuna.pruners.BasePruner, direction: str = "maximize") -> optuna.Study:
    """Five complete B = 16 trials whose final value is their report-1 value + 0.2 exactly
    (no scatter: the forecast's bound is the line itself); the best ends at 0.73."""
    study = optuna.create_study(direction=direction, pruner=pruner)
    for start in (0.40, 0.45, 0.50, 0.52, 0.53):
        _add_curve(study, SMALL, {1: start, 2: start + 0.2})
    return study


def test_forecast_upper_bound_is_the_prediction_interval_by_hand() -> None:
    """(0,0) (1,2) (2,2) (3,4): line 0.2 + 1.2 x, s = √0.4, at x = 1.5 the spread is
    s √(1 + 1/4) and t(0.975, 2) = 4.303: 2 + 4.303 × 0.7071."""
    pairs = [(0.0, 0.0), (1.0, 2.0), (2.0, 2.0), (3.0, 4.0)]
    assert forecast_upper_bound(pairs, 1.5, 0.975) == pytest.approx(5.0424, abs=1e-4)
    assert forecast_upper_bound(pairs[:2], 1.5, 0.975) is None  # no scatter to measure
    assert forecast_upper_bound([(1.0, 0.0), (1.0, 1.0), (1.0, 2.0)], 1.0, 0.975) is None


def test_catch_up_prunes_only_a_trial_whose_forecast_cannot_reach_the_best() -> None:
    study = _on_a_line(CatchUpPruner(BATCH_PARAM, n_warmup_steps=1))
    assert _decision(study, SMALL, 0.52, step=1)  # forecast 0.72 < 0.73
    assert not _decision(study, SMALL, 0.535, step=1)  # forecast 0.735


def test_catch_up_keeps_a_trial_that_may_end_near_the_best() -> None:
    """With ``near_best`` 0.02 the target is 0.73 - 0.0146: a forecast of 0.72 is near
    enough to count as an estimate of the best LR; 0.71 is not."""
    study = _on_a_line(CatchUpPruner(BATCH_PARAM, n_warmup_steps=1, near_best=0.02))
    assert not _decision(study, SMALL, 0.52, step=1)
    assert _decision(study, SMALL, 0.51, step=1)


def test_catch_up_keeps_a_slow_starter_while_the_curves_scatter() -> None:
    """The demo's shape: a curve that starts low can end best (the grid's B = 16 at LR
    0.032: 0.615 after half an epoch, below the median of its batch size, then 0.730). Two
    complete trials off the line widen the forecast; the same 0.52 is no longer pruned,
    while Optuna's median of the batch size (0.50) would prune a trial at 0.49."""
    study = _on_a_line(CatchUpPruner(BATCH_PARAM, n_warmup_steps=1))
    _add_curve(study, SMALL, {1: 0.42, 2: 0.70})
    _add_curve(study, SMALL, {1: 0.51, 2: 0.66})
    assert not _decision(study, SMALL, 0.52, step=1)
    assert not _decision(study, SMALL, 0.49, step=1)
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1)
    assert _decision(_on_a_line(SameBatchSizePruner(median, BATCH_PARAM)), SMALL, 0.49, step=1)


def test_catch_up_lines_up_every_batch_size_and_aims_at_its_own() -> None:
    """The line comes from the B = 16 trials; the target of a B = 512 trial is B = 512's
    best (0.62), not the study's (0.73)."""
    study = _on_a_line(CatchUpPruner(BATCH_PARAM, n_warmup_steps=1))
    _add_curve(study, LARGE, {1: 0.42, 2: 0.62})
    assert not _decision(study, LARGE, 0.43, step=1)  # forecast 0.63 >= 0.62
    assert _decision(study, LARGE, 0.41, step=1)  # 0.61 < 0.62
    unstratified = _on_a_line(CatchUpPruner(None, n_warmup_steps=1))
    _add_curve(unstratified, LARGE, {1: 0.42, 2: 0.62})
    assert _decision(unstratified, LARGE, 0.43, step=1)  # against the study's 0.73


def test_catch_up_waits_for_its_warm_up_its_evidence_and_a_target() -> None:
    assert not _decision(_on_a_line(CatchUpPruner(BATCH_PARAM, n_warmup_steps=2)), SMALL, 0.1, 1)
    needy = _on_a_line(CatchUpPruner(BATCH_PARAM, n_warmup_steps=1, n_startup_trials=6))
    assert not _decision(needy, SMALL, 0.1, step=1)  # 5 complete trials, 6 needed
    assert not _decision(_on_a_line(CatchUpPruner(BATCH_PARAM)), LARGE, 0.1, step=1)  # none
    with pytest.raises(ValueError, match="n_startup_trials = 2 must be at least 3"):
        CatchUpPruner(BATCH_PARAM, n_startup_trials=2)


def test_catch_up_never_prunes_a_trial_already_at_the_best() -> None:
    """Complete trials that all lost value after report 1 forecast a loss; a trial whose
    value now is at least the best is still not pruned."""
    study = optuna.create_study(
        direction="maximize", pruner=CatchUpPruner(BATCH_PARAM, n_warmup_steps=1)
    )
    for start in (0.60, 0.70, 0.80):
        _add_curve(study, SMALL, {1: start, 2: start - 0.1})
    assert not _decision(study, SMALL, 0.705, step=1)  # above the best final value, 0.70
    assert _decision(study, SMALL, 0.69, step=1)


def test_catch_up_minimizes_a_loss() -> None:
    """Losses 0.40 … 0.53 at report 1 that end 0.2 lower: the best ends at 0.20."""
    study = optuna.create_study(
        direction="minimize", pruner=CatchUpPruner(BATCH_PARAM, n_warmup_steps=1)
    )
    for start in (0.40, 0.45, 0.50, 0.52, 0.53):
        _add_curve(study, SMALL, {1: start, 2: start - 0.2})
    assert not _decision(study, SMALL, 0.395, step=1)  # forecast 0.195
    assert _decision(study, SMALL, 0.41, step=1)  # 0.21 > 0.20


def test_make_pruner_builds_catch_up_with_its_own_stratification(tiny_study: Path) -> None:
    pruner = make_pruner(
        _spec(
            tiny_study,
            kind="catch_up",
            min_epochs=2,
            n_startup_trials=0,
            confidence=0.9,
            near_best=0.02,
            stratify_by_batch_size=True,
            min_trials_per_batch_size=2,
        )
    )
    assert isinstance(pruner, BatchSizeFloorPruner) and pruner.min_complete == 2
    assert isinstance(pruner.base, CatchUpPruner)  # not inside SameBatchSizePruner
    assert pruner.base.param == BATCH_PARAM
    assert (pruner.base.n_warmup_steps, pruner.base.n_startup_trials) == (2, 3)
    assert (pruner.base.confidence, pruner.base.near_best) == (0.9, 0.02)
    assert make_pruner(_spec(tiny_study, kind="catch_up")).param is None


def test_compare_with_pruned_is_refused_for_catch_up(tiny_study: Path) -> None:
    data = load_spec("tiny").model_dump(mode="json")
    data["pruner"].update(kind="catch_up", stratify_by_batch_size=True, compare_with_pruned=True)
    with pytest.raises(SpecError, match="compare_with_pruned does not apply to kind 'catch_up'"):
        parse_spec(data, source="tiny.toml", default_name="tiny")
