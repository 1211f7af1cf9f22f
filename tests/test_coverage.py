"""sampler.cover_batch_sizes: a first round of one trial per batch size, queued once."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import hpo.claim
from hpo.claim import claim_trial
from hpo.data import load_splits
from hpo.space import (
    BATCH_PARAM,
    COVER_RETRIES,
    coverage_may_need,
    coverage_retries,
    first_round,
)
from hpo.spec import StudySpec, load_spec
from hpo.study import create_or_load_study
from hpo.worker import requeue
from tests.conftest import train_trial
from tests.databases import scratch_database, study_storage
from tests.test_finished_reads import trials_read

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _spec(tiny_study: Path, *, cover: bool, **search: object) -> StudySpec:
    data = load_spec("tiny").model_dump()
    data["sampler"]["cover_batch_sizes"] = cover
    data["search"].update(search)
    data["dataset"].update(train_size=128, val_size=64)
    data["budget"]["epochs"] = 1
    data["pruner"].update(min_epochs=1, stratify_by_batch_size=True, min_trials_per_batch_size=1)
    return StudySpec.model_validate(data)


def test_first_round_is_one_trial_per_batch_size_inside_the_space(tiny_study: Path) -> None:
    spec = _spec(tiny_study, cover=True, batch_size_min=16, batch_size_max=64)
    round_ = first_round(spec)
    assert [p[BATCH_PARAM] for p in round_] == [4, 5, 6]
    lrs = [p["lr"] for p in round_]
    assert lrs[1] == pytest.approx(math.sqrt(1e-3 * 0.3))  # the middle B gets the middle LR
    assert lrs[2] / lrs[1] == pytest.approx(math.sqrt(2))  # square-root rule
    assert all(spec.search.lr_low <= lr <= spec.search.lr_high for lr in lrs)


def test_first_round_lr_stays_inside_a_narrow_range(tiny_study: Path) -> None:
    spec = _spec(tiny_study, cover=True, lr_low=0.01, lr_high=0.011, batch_size_max=128)
    lrs = [p["lr"] for p in first_round(spec)]
    assert min(lrs) == 0.01 and max(lrs) == 0.011


def test_a_two_lr_round_brackets_the_rules_lr_at_every_batch_size(tiny_study: Path) -> None:
    spec = _spec(tiny_study, cover=True, batch_size_min=16, batch_size_max=64)
    at_the_rule = {p[BATCH_PARAM]: p["lr"] for p in first_round(spec)}
    two = spec.model_copy(
        update={"sampler": spec.sampler.model_copy(update={"first_round_lrs": 2})}
    )
    round_ = first_round(two)
    assert [p[BATCH_PARAM] for p in round_] == [4, 5, 6, 4, 5, 6]  # lower LRs first
    for low, high in zip(round_[:3], round_[3:], strict=True):
        assert low["lr"] == pytest.approx(at_the_rule[low[BATCH_PARAM]] / 2)
        assert high["lr"] == pytest.approx(at_the_rule[high[BATCH_PARAM]] * 2)


def test_a_three_lr_round_refines_the_same_bracket(tiny_study: Path) -> None:
    """3 LRs span the same ×½ … ×2 as 2 do, an octave apart, the rule's LR in the middle;
    lower LRs first, so a floor of 2 trains the ×½ and ×1 trials to the end."""
    spec = _spec(tiny_study, cover=True, batch_size_min=16, batch_size_max=64)
    at_the_rule = {p[BATCH_PARAM]: p["lr"] for p in first_round(spec)}
    three = spec.model_copy(
        update={"sampler": spec.sampler.model_copy(update={"first_round_lrs": 3})}
    )
    round_ = first_round(three)
    assert [p[BATCH_PARAM] for p in round_] == [4, 5, 6] * 3
    for index, factor in enumerate((0.5, 1.0, 2.0)):
        for trial in round_[3 * index : 3 * index + 3]:
            assert trial["lr"] == pytest.approx(at_the_rule[trial[BATCH_PARAM]] * factor)


def _with(spec: StudySpec, **sampler: object) -> StudySpec:
    return spec.model_copy(update={"sampler": spec.sampler.model_copy(update=sampler)})


@pytest.mark.parametrize("count", [2, 3])
def test_the_rounds_weight_decays_are_a_latin_hypercube_over_the_round(
    tiny_study: Path, count: int
) -> None:
    """One weight decay per stratum at every batch size, and over the round each of the
    count × K sub-strata used exactly once (at its centre): the batch sizes do not all try
    the same few values."""
    spec = _with(
        _spec(tiny_study, cover=True, batch_size_min=8, batch_size_max=128), first_round_lrs=count
    )
    low = math.log(spec.search.weight_decay_low)
    width = math.log(spec.search.weight_decay_high) - low
    sizes = len(spec.search.batch_sizes)
    by_batch: dict[int, list[float]] = {}
    for params in first_round(spec):
        by_batch.setdefault(int(params[BATCH_PARAM]), []).append(float(params["weight_decay"]))
    cells = []
    for decays in by_batch.values():
        positions = sorted((math.log(wd) - low) / width for wd in decays)
        assert [math.floor(p * count) for p in positions] == list(range(count))
        cells += [p * count * sizes - 0.5 for p in positions]
    assert sorted(round(c, 6) for c in cells) == list(range(count * sizes))


def test_the_rounds_weight_decays_follow_the_sampler_seed(tiny_study: Path) -> None:
    spec = _with(
        _spec(tiny_study, cover=True, batch_size_min=8, batch_size_max=128), first_round_lrs=2
    )
    same = [first_round(_with(spec, seed=7)) for _ in range(2)]
    assert same[0] == same[1]  # queued once per study, but the same round from any process
    decays = {
        seed: [p["weight_decay"] for p in first_round(_with(spec, seed=seed))] for seed in range(4)
    }
    assert len({tuple(values) for values in decays.values()}) > 1
    lrs = {seed: [p["lr"] for p in first_round(_with(spec, seed=seed))] for seed in range(4)}
    assert len({tuple(values) for values in lrs.values()}) == 1  # the LRs do not move


def test_a_two_lr_round_in_a_narrow_range_queues_no_duplicate(tiny_study: Path) -> None:
    spec = _spec(tiny_study, cover=True, lr_low=0.01, lr_high=0.011, batch_size_max=32)
    two = spec.model_copy(
        update={"sampler": spec.sampler.model_copy(update={"first_round_lrs": 2})}
    )
    round_ = first_round(two)
    assert len(round_) == len({(p[BATCH_PARAM], p["lr"]) for p in round_}) == 4


def test_a_new_study_queues_the_round_once(tiny_study: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cover.db'}"
    spec = _spec(tiny_study, cover=True)
    study = create_or_load_study(spec, url).study
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(t.system_attrs["fixed_params"][BATCH_PARAM] for t in waiting) == [4, 5, 6]
    assert {t.user_attrs["queued_by"] for t in waiting} == {"cover_batch_sizes"}
    again = create_or_load_study(spec, url).study  # a second launch, or a second worker
    assert len(again.get_trials()) == 3


def test_without_the_setting_nothing_is_queued(tiny_study: Path, tmp_path: Path) -> None:
    study = create_or_load_study(_spec(tiny_study, cover=False), f"sqlite:///{tmp_path / 'o.db'}")
    assert study.study.get_trials() == []


def test_every_batch_size_completes_in_a_tiny_study(tiny_study: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_study, cover=True)
    loaded = create_or_load_study(spec, f"sqlite:///{tmp_path / 'e2e.db'}")
    splits = load_splits(spec.dataset)
    loaded.study.optimize(lambda trial: train_trial(trial, spec, splits=splits), n_trials=4)
    complete = loaded.study.get_trials(states=(TrialState.COMPLETE,))
    assert {t.params[BATCH_PARAM] for t in complete} == {4, 5, 6}


def test_a_grid_queues_no_round(tiny_study: Path, tmp_path: Path) -> None:
    data = _spec(tiny_study, cover=True).model_dump()
    data["sampler"]["kind"] = "grid"
    data["pruner"]["kind"] = "none"
    loaded = create_or_load_study(StudySpec.model_validate(data), f"sqlite:///{tmp_path / 'g.db'}")
    assert loaded.study.get_trials() == []


# ---------------------------------------------------------------- coverage holds


def _claim_and_end(loaded, state: TrialState) -> optuna.trial.FrozenTrial:
    """Claim the next trial as a worker does and end it without training it."""
    trial = claim_trial(loaded, total_trials=20)
    assert not isinstance(trial, str)
    trial.suggest_int(BATCH_PARAM, 4, 6)
    trial.suggest_float("lr", 1e-3, 0.3, log=True)
    trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    if state == TrialState.COMPLETE:
        return loaded.study.tell(trial, 0.8)
    return loaded.study.tell(trial, state=state)


def _cover_trials(study: optuna.Study, log2: int) -> list[optuna.trial.FrozenTrial]:
    return [
        t
        for t in study.get_trials()
        if t.user_attrs.get("queued_by") == "cover_batch_sizes"
        and t.system_attrs["fixed_params"][BATCH_PARAM] == log2
    ]


def test_a_diverged_first_round_trial_gets_one_retry_at_a_lower_lr(
    tiny_study: Path, tmp_path: Path
) -> None:
    loaded = create_or_load_study(_spec(tiny_study, cover=True), f"sqlite:///{tmp_path / 'r.db'}")
    first = _claim_and_end(loaded, TrialState.PRUNED)  # B = 16 diverged (pruned)
    assert first.params[BATCH_PARAM] == 4
    for _ in range(2):  # B = 32 and B = 64 complete; each claim checks coverage
        _claim_and_end(loaded, TrialState.COMPLETE)
    retries = _cover_trials(loaded.study, 4)
    assert len(retries) == 2  # the first round's trial and exactly one retry
    retry = retries[1]
    assert retry.state == TrialState.WAITING and retry.user_attrs["cover_attempt"] == 1
    assert retry.system_attrs["fixed_params"]["lr"] == pytest.approx(first.params["lr"] / 4)
    assert {t.system_attrs["fixed_params"][BATCH_PARAM] for t in
            loaded.study.get_trials(states=(TrialState.WAITING,))} == {4}  # fmt: skip


def test_a_coverage_trial_stopped_by_a_signal_keeps_its_attempt(
    tiny_study: Path, tmp_path: Path
) -> None:
    # SIGTERM re-queues a running trial (hpo.worker.requeue): the stop is no attempt, so the
    # retry is the same coverage trial, and only its own end counts.
    loaded = create_or_load_study(_spec(tiny_study, cover=True), f"sqlite:///{tmp_path / 's.db'}")
    trial = claim_trial(loaded, total_trials=20)
    assert not isinstance(trial, str)
    trial.suggest_int(BATCH_PARAM, 4, 6)
    first_lr = trial.suggest_float("lr", 1e-3, 0.3, log=True)
    trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    requeue(loaded, trial, "worker stopped (SIGTERM)")
    (retry,) = loaded.study.get_trials(states=(TrialState.WAITING,))[-1:]
    assert retry.user_attrs["queued_by"] == "cover_batch_sizes"
    assert retry.user_attrs.get("cover_attempt", 0) == 0
    assert coverage_retries(loaded.spec, loaded.study.get_trials(), room=5) == []
    # The retry (claimed last: the other batch sizes' round trials are ahead of it) prunes.
    for _ in range(3):
        _claim_and_end(
            loaded, TrialState.COMPLETE if _next_log2(loaded) != 4 else TrialState.PRUNED
        )
    ((params, attempt),) = coverage_retries(loaded.spec, loaded.study.get_trials(), room=5)
    assert attempt == 1  # before: 2, the stop counted as an attempt
    assert params[BATCH_PARAM] == 4 and params["lr"] == pytest.approx(first_lr / 4)


def _next_log2(loaded) -> int:
    """The batch size (log2) of the WAITING trial the next claim takes (Optuna: oldest)."""
    waiting = loaded.study.get_trials(states=(TrialState.WAITING,))
    return int(waiting[0].system_attrs["fixed_params"][BATCH_PARAM])


def test_coverage_retries_are_bounded(tiny_study: Path, tmp_path: Path) -> None:
    loaded = create_or_load_study(
        _spec(tiny_study, cover=True, batch_size_max=32), f"sqlite:///{tmp_path / 'b.db'}"
    )
    for _ in range(8):  # B = 16 fails every time, B = 32 completes
        trial = claim_trial(loaded, total_trials=20)
        assert not isinstance(trial, str)
        log2 = trial.suggest_int(BATCH_PARAM, 4, 5)
        trial.suggest_float("lr", 1e-3, 0.3, log=True)
        trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
        if log2 == 4:
            loaded.study.tell(trial, state=TrialState.FAIL)
        else:
            loaded.study.tell(trial, 0.8)
    cover = _cover_trials(loaded.study, 4)
    assert len(cover) == 1 + COVER_RETRIES
    assert [t.user_attrs.get("cover_attempt", 0) for t in cover] == [0, 1, 2]
    lrs = [t.params["lr"] for t in cover]
    assert lrs[1] == pytest.approx(lrs[0] / 4)
    assert lrs[2] == max(1e-3, lrs[0] / 16)  # kept inside the range


def test_a_complete_trial_at_the_batch_size_ends_the_need(tiny_study: Path) -> None:
    spec = _spec(tiny_study, cover=True, batch_size_max=32)
    study = optuna.create_study(direction="maximize")
    for log2, state in ((4, TrialState.PRUNED), (4, TrialState.COMPLETE), (5, TrialState.FAIL)):
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=0.8 if state == TrialState.COMPLETE else None,
                params={BATCH_PARAM: log2, "lr": 0.01, "weight_decay": 1e-4},
                distributions={
                    BATCH_PARAM: optuna.distributions.IntDistribution(4, 5),
                    "lr": optuna.distributions.FloatDistribution(1e-3, 0.3, log=True),
                    "weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True),
                },
                user_attrs={"queued_by": "cover_batch_sizes"},
            )
        )
    retries = coverage_retries(spec, study.get_trials(), room=5)
    assert [(params[BATCH_PARAM], attempt) for params, attempt in retries] == [(5, 1)]
    assert coverage_retries(spec, study.get_trials(), room=0) == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_concurrent_claims_queue_one_retry_per_need(
    backend: str, tiny_study: Path, tmp_path: Path
) -> None:
    with study_storage(backend, tmp_path, "c.db", prefix="h9r_") as url:
        _one_retry_from_concurrent_claims(tiny_study, url)


def _one_retry_from_concurrent_claims(tiny_study: Path, url: str) -> None:
    spec = _spec(tiny_study, cover=True, batch_size_max=32)
    loaded = create_or_load_study(spec, url)
    _claim_and_end(loaded, TrialState.PRUNED)
    workers = [create_or_load_study(spec, url) for _ in range(4)]  # each its own storage
    with ThreadPoolExecutor(len(workers)) as pool:
        claimed = list(pool.map(lambda w: claim_trial(w, total_trials=20), workers))
    assert all(not isinstance(trial, str) for trial in claimed)
    assert len(_cover_trials(loaded.study, 4)) == 2  # one retry, claimed by one worker


def test_a_worker_retries_a_diverged_first_round_batch_size_until_it_completes(
    tiny_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end through ``run_worker``: B = 16's first-round trial diverges (training is
    stubbed out: the question is which trials the worker runs, not how they train)."""
    from hpo.objective import Objective
    from hpo.worker import run_worker

    def train(self: Objective, trial: optuna.Trial, ctx: object) -> float:
        if ctx.trial_params.batch_size == 16 and "cover_attempt" not in trial.user_attrs:
            trial.set_user_attr("fail_reason", "diverged")
            raise optuna.TrialPruned("diverged")
        return 0.8

    monkeypatch.setattr(Objective, "_train", train)
    url = f"sqlite:///{tmp_path / 'w.db'}"
    spec = _spec(tiny_study, cover=True)
    create_or_load_study(spec, url)
    run = run_worker(spec.name, url, total_trials=5)
    assert run.states == {"COMPLETE": 4, "PRUNED": 1}
    study = optuna.load_study(study_name=spec.name, storage=url)
    trials = study.get_trials()
    assert [t.params[BATCH_PARAM] for t in trials[:4]] == [4, 5, 6, 4]  # the retry is next
    assert trials[3].state == TrialState.COMPLETE
    assert trials[3].user_attrs["cover_attempt"] == 1
    assert trials[3].params["lr"] == pytest.approx(trials[0].params["lr"] / 4)


# ------------------------------------------------- the claim's read of coverage


def _trial_at(log2: int, state: TrialState, rng, *, cover: bool) -> optuna.trial.FrozenTrial:
    value = rng.choice([0.8, math.inf]) if state == TrialState.COMPLETE else None
    fixed = {BATCH_PARAM: log2, "lr": 0.01, "weight_decay": 1e-4}
    sampled = state != TrialState.WAITING and rng.random() < 0.7  # else not sampled yet
    return optuna.trial.create_trial(
        state=state,
        value=value,
        params=fixed if sampled else {},
        distributions={
            BATCH_PARAM: optuna.distributions.IntDistribution(4, 6),
            "lr": optuna.distributions.FloatDistribution(1e-3, 0.3, log=True),
            "weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True),
        }
        if sampled
        else {},
        user_attrs={"queued_by": "cover_batch_sizes"} if cover else {},
        system_attrs={"fixed_params": fixed} if cover else {},
    )


def test_coverage_is_never_needed_where_the_finished_trials_say_it_cannot_be(
    tiny_study: Path,
) -> None:
    # coverage_may_need reads only finished trials (the claim skips the RUNNING ones with
    # it); it must be True wherever coverage_retries would queue, over many studies that
    # keep the first-round invariant (every batch size has a trial).
    import random

    spec = _spec(tiny_study, cover=True)
    states = list(TrialState)
    skipped = 0
    for seed in range(400):
        rng = random.Random(seed)
        trials = [_trial_at(log2, rng.choice(states), rng, cover=True) for log2 in (4, 5, 6)]
        trials += [
            _trial_at(rng.choice((4, 5, 6)), rng.choice(states), rng, cover=rng.random() < 0.5)
            for _ in range(rng.randrange(6))
        ]
        for number, trial in enumerate(trials):
            trial.number = number
        finished = [t for t in trials if t.state.is_finished()]
        if coverage_retries(spec, trials, room=10):
            assert coverage_may_need(spec, finished), seed
        elif not coverage_may_need(spec, finished):
            skipped += 1
    assert skipped >= 20  # and it does rule needs out (30 of these 400 studies)


def test_a_claim_in_a_covered_study_reads_no_running_trial(
    tiny_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPO_GRACE_S", "3600")  # the RUNNING trials here have no worker
    url = f"sqlite:///{tmp_path / 'c.db'}"
    spec = _spec(tiny_study, cover=True)
    loaded = create_or_load_study(spec, url)
    for _ in range(3):  # the first round, one complete trial per batch size
        _claim_and_end(loaded, TrialState.COMPLETE)
    _claim_and_end(loaded, TrialState.PRUNED)
    elsewhere = create_or_load_study(spec, url)
    for _ in range(12):
        trial = claim_trial(elsewhere, total_trials=100)
        trial.suggest_int(BATCH_PARAM, 4, 6)
        trial.report(0.5, 1)
    monkeypatch.setattr(hpo.claim, "_build_trial", lambda study, trial_id, was_queued: trial_id)
    with trials_read(monkeypatch) as read:
        assert isinstance(claim_trial(loaded, total_trials=100), int)
    assert TrialState.RUNNING not in [t.state for t in read], read


@pytest.mark.db
def test_a_covered_study_claims_in_one_message_once_no_batch_size_can_need_a_retry(
    tiny_study: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shipped studies keep their batch sizes covered. While a batch size has only
    # trials that ended without a result, a claim sends no message: the long way queues
    # its retry under the lock (keep_batch_sizes_covered). A waiting trial (the first
    # round) also sends the claim the long way. Otherwise the claim is one message.
    import hpo.storage.one_message

    messages, long_way = [], []
    real_rows, real_lock = hpo.storage.one_message.rows_of, hpo.claim.study_lock

    def recorded(connection, message: str):
        messages.append(message)
        return real_rows(connection, message)

    def counted(*args, **kwargs):
        long_way.append(1)
        return real_lock(*args, **kwargs)

    monkeypatch.setattr(hpo.storage.one_message, "rows_of", recorded)
    monkeypatch.setattr(hpo.claim, "study_lock", counted)
    with scratch_database("postgresql", prefix="h9r_") as url:
        loaded = create_or_load_study(_spec(tiny_study, cover=True, batch_size_max=32), url)
        first = _claim_and_end(loaded, TrialState.COMPLETE)  # the round: 16, then 32
        second = _claim_and_end(loaded, TrialState.PRUNED)
        assert (len(messages), len(long_way)) == (2, 2)  # tried; the round was waiting
        retry = _claim_and_end(loaded, TrialState.COMPLETE)  # 32 needs one: no message
        assert (len(messages), len(long_way)) == (2, 3)
        assert retry.params[BATCH_PARAM] == second.params[BATCH_PARAM] != first.params[BATCH_PARAM]
        _claim_and_end(loaded, TrialState.COMPLETE)  # covered: one message, no lock wait
        assert (len(messages), len(long_way)) == (3, 3)
        numbers = sorted(t.number for t in loaded.study.get_trials())
        loaded.storage.dispose()
    assert numbers == list(range(4))
