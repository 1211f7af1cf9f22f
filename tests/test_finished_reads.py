"""A pruner's read of the finished trials (``hpo.compat.finished_trials_cache``) reads no
unfinished trial, and sees exactly what Optuna's own cache layer sees.

Every report of every worker asks the study for its COMPLETE (and, stratified, PRUNED)
trials. Optuna's cache layer answered that by re-reading every unfinished trial of the
study with all its rows: W workers, W^2 trial reads per epoch of the fleet.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import tomllib
from optuna.trial import FrozenTrial, TrialState

from hpo.spec import parse_spec
from hpo.storage import ReconnectingRDBStorage
from hpo.study import create_or_load_study, load_study

from .conftest import far_from_utc, tiny_study_text
from .databases import scratch_database, study_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.db)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hpo.db'}"
    else:
        with scratch_database("postgresql") as database:
            yield database


def _study(url: str):
    spec = parse_spec(tomllib.loads(tiny_study_text()), source="test", default_name="tiny")
    create_or_load_study(spec, url).storage.engine.dispose()
    return load_study("tiny", url)


@contextlib.contextmanager
def trials_read(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FrozenTrial]]:
    """Every trial read from the database with its rows (``_get_trials``), as read."""
    read: list[FrozenTrial] = []
    real = ReconnectingRDBStorage._get_trials

    def recorded(self, *args, **kwargs):
        trials = real(self, *args, **kwargs)
        read.extend(trials)
        return trials

    monkeypatch.setattr(ReconnectingRDBStorage, "_get_trials", recorded)
    yield read


def test_reading_finished_trials_reads_no_running_trial(url: str, monkeypatch) -> None:
    elsewhere = _study(url)
    running = [elsewhere.study.ask() for _ in range(20)]
    for trial in running:
        trial.report(0.5, 1)
    done = elsewhere.study.ask()
    elsewhere.study.tell(done, 0.7)
    pruner = load_study("tiny", url)  # a worker whose pruner reads at each report
    with trials_read(monkeypatch) as read:
        first = pruner.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        again = pruner.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        elsewhere.study.tell(running[3], state=TrialState.PRUNED)
        both = pruner.study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))

    assert [t.number for t in first] == [t.number for t in again] == [done.number]
    assert [(t.number, t.state) for t in both] == [
        (running[3].number, TrialState.PRUNED),
        (done.number, TrialState.COMPLETE),
    ]
    assert both[0].intermediate_values == {1: 0.5}
    # Optuna's cache layer would have read the 20 RUNNING trials on each of the three calls.
    assert sorted(t.number for t in read) == sorted([done.number, running[3].number])
    for loaded in (elsewhere, pruner):
        loaded.storage.engine.dispose()


def test_a_pruners_check_asks_only_for_the_trials_started_or_finished_since(
    url: str, monkeypatch
) -> None:
    # Every report's check asked for the id of every finished trial of the study (its mark
    # never moved): rows growing with the study, at every report of every worker. Now the
    # first look returns every trial, and later ones the trials above the last finished
    # one and those that finished since.
    elsewhere = _study(url)
    for _ in range(30):
        elsewhere.study.tell(elsewhere.study.ask(), 0.5)
    running = [elsewhere.study.ask() for _ in range(3)]
    pruner = load_study("tiny", url)
    answers: list[list[tuple[int, bool]]] = []
    real = ReconnectingRDBStorage.trial_states_since

    def recorded(self, *args):
        answers.append(real(self, *args))
        return answers[-1]

    monkeypatch.setattr(ReconnectingRDBStorage, "trial_states_since", recorded)
    complete = (TrialState.COMPLETE,)
    counts = [len(pruner.study.get_trials(deepcopy=False, states=complete)) for _ in "ab"]
    elsewhere.study.tell(running[1], 0.9)
    counts += [len(pruner.study.get_trials(deepcopy=False, states=complete)) for _ in "ab"]
    assert counts == [30, 30, 31, 31]
    assert [len(answer) for answer in answers] == [33, 3, 3, 1]
    assert answers[2] == [(t._trial_id, t is running[1]) for t in running]
    assert answers[3] == [(running[2]._trial_id, False)]
    for loaded in (elsewhere, pruner):
        loaded.storage.engine.dispose()


def test_finished_and_all_reads_agree_with_optunas_cache_layer(url: str) -> None:
    # Trials start and finish in random order in another process (a trial with a lower id
    # finishing after higher ones included); at every step the incremental cache, its full
    # read (Optuna's own path, on the same cache) and a plain Optuna study agree.
    rng = random.Random(0)
    elsewhere = _study(url)
    incremental = load_study("tiny", url)
    plain = optuna.load_study(study_name="tiny", storage=url)
    unfinished: list[optuna.Trial] = []
    for step in range(60):
        if unfinished and rng.random() < 0.5:
            trial = unfinished.pop(rng.randrange(len(unfinished)))
            state = rng.choice(FINISHED)
            value = rng.random() if state == TrialState.COMPLETE else None
            elsewhere.study.tell(trial, value, state=state)
        else:
            unfinished.append(elsewhere.study.ask())
            unfinished[-1].report(rng.random(), 1)
        states = rng.choice(
            [(TrialState.COMPLETE,), (TrialState.COMPLETE, TrialState.PRUNED), FINISHED, None]
        )
        got = incremental.study.get_trials(deepcopy=False, states=states)
        want = plain.get_trials(deepcopy=False, states=states)
        assert [(t.number, t.state, t.value) for t in got] == [
            (t.number, t.state, t.value) for t in want
        ], (step, states)
    for loaded in (elsewhere, incremental):
        loaded.storage.engine.dispose()


def test_the_incremental_cache_pickles_like_optunas(tmp_path: Path) -> None:
    # Optuna's cache layer defines __getstate__/__setstate__ for pickling a study's storage;
    # hpo's subclass must stay findable by name for that to work.
    import pickle

    loaded = _study(f"sqlite:///{tmp_path / 'hpo.db'}")
    done = loaded.study.ask()
    loaded.study.tell(done, 0.7)
    cache = pickle.loads(pickle.dumps(loaded.study._storage))
    assert type(cache).__name__ == "FinishedTrialsCache"
    trials = cache.get_all_trials(loaded.ref.study_id, states=(TrialState.COMPLETE,))
    assert [t.number for t in trials] == [done.number]
    loaded.storage.engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.db),
                                     pytest.param("mariadb", marks=pytest.mark.db)])  # fmt: skip
def test_hpos_trial_reads_return_what_optunas_own_return(backend: str, tmp_path: Path) -> None:
    # ReconnectingRDBStorage reads trials with its own statements (_read_trials); every
    # field must come back as Optuna's ORM builds it: every kind of distribution, values
    # that are not finite, attrs, multi-step intermediate values, every state, and the
    # start and end times (stored as naive UTC, handed out as local time: far from UTC, so
    # that a time handed out as stored would be off by hours).
    with contextlib.ExitStack() as stack:
        stack.enter_context(far_from_utc())
        url = stack.enter_context(study_storage(backend, tmp_path, "reads.db"))
        plain = optuna.storages.RDBStorage(url)
        study = optuna.create_study(storage=plain, study_name="reads", direction="maximize")
        values = [0.25, float("inf"), float("-inf"), float("nan"), -1.5, 3.0]  # 3.0: "3" in JSON
        for n in range(12):
            trial = study.ask()
            trial.suggest_float("lr", 1e-4, 1.0, log=True)
            trial.suggest_int("log2_batch_size", 3, 9)
            trial.suggest_categorical("optimizer", ["sgd", "adamw", None])
            trial.suggest_float("momentum", 0.0, 0.9, step=0.1)
            for step in range(n % 4):
                trial.report(values[(n + step) % len(values)], step)
            trial.set_user_attr("history", {"loss": [0.5, 0.25], "note": "é ü", "n": n})
            study._storage.set_trial_system_attr(trial._trial_id, "retry_history", [n])
            state = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, None][n % 4]
            if state is TrialState.COMPLETE:
                study.tell(trial, values[n % len(values)])
            elif state is not None:
                study.tell(trial, state=state)
        study.enqueue_trial({"lr": 0.01}, user_attrs={"queued": True})
        study_id = plain.get_study_id_from_name("reads")
        expected = plain.get_all_trials(study_id, deepcopy=False)
        hpo = ReconnectingRDBStorage(url)
        got = hpo.get_all_trials(study_id, deepcopy=False)
        some = {t._trial_id for t in expected[::3]}
        assert repr(hpo._get_trials(study_id, None, some, max(some))) == repr(
            plain._get_trials(study_id, None, some, max(some))
        )
        singles = [hpo.get_trial(t._trial_id) for t in expected]
        with pytest.raises(KeyError):
            hpo.get_trial(10_000)
        with pytest.raises(KeyError):
            hpo.get_all_trials(study_id + 1)
        hpo.engine.dispose()
        plain.engine.dispose()
    assert {t.state for t in expected} == set(TrialState)
    assert repr(got) == repr(expected)  # repr: NaN compares unequal to itself
    assert repr(singles) == repr(expected)
