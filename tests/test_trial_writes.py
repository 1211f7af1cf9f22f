"""What a running trial writes: a parameter at every ``suggest_*``, an intermediate value at
every ``report``. On PostgreSQL each is one statement in autocommit (Optuna's ORM version
is five round trips and most of the call's client CPU); elsewhere Optuna's own code runs.
Optuna's storage tests (tests/test_optuna_storage_suite.py) check the same semantics
against this storage; these check what they cannot see: the statements, and the paths
that hand a call back to Optuna."""

from __future__ import annotations

import datetime

import pytest
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.trial import TrialState

from hpo.storage import open_storage

from .databases import scratch_database

pytestmark = pytest.mark.db


@pytest.fixture
def storage():
    with scratch_database("postgresql") as url:
        storage = open_storage(url)
        yield storage
        storage.engine.dispose()


def _statements(storage) -> list[str]:
    sent: list[str] = []
    sqlalchemy.event.listen(
        storage.engine, "before_cursor_execute", lambda *args: sent.append(args[2])
    )
    return sent


def test_a_parameter_and_an_intermediate_value_are_one_statement_each(storage) -> None:
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "s")
    first, second = storage.create_new_trial(study_id), storage.create_new_trial(study_id)
    sent = _statements(storage)
    x = FloatDistribution(0.0, 1.0)
    storage.set_trial_param(first, "x", 0.25, x)  # looks back for the study's "x"
    storage.set_trial_param(second, "x", 0.5, x)  # finds it, the same
    storage._set_trial_param(second, "y", 2.0, FloatDistribution(0.0, 4.0), None)
    storage._set_trial_param(
        first, "y", 3.0, FloatDistribution(0.0, 4.0), FloatDistribution(0.0, 4.0)
    )
    storage.set_trial_intermediate_value(first, 1, 0.5)
    storage.set_trial_intermediate_value(first, 1, 0.75)  # the step's value replaced
    storage.set_trial_intermediate_value(first, 2, float("nan"))
    assert len(sent) == 7, sent
    assert storage.get_trial(first).params == {"x": 0.25, "y": 3.0}
    assert storage.get_trial(second).params == {"x": 0.5, "y": 2.0}
    steps = storage.get_trial(first).intermediate_values
    assert steps[1] == 0.75 and steps[2] != steps[2]  # nan stored as nan


def test_a_repeated_parameter_is_ignored_as_optuna_ignores_it(storage) -> None:
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "s")
    trial = storage.create_new_trial(study_id)
    storage.set_trial_param(trial, "x", 0.25, FloatDistribution(0.0, 1.0))
    storage.set_trial_param(trial, "x", 0.75, FloatDistribution(0.0, 1.0))
    assert storage.get_trial(trial).params == {"x": 0.25}


def test_a_compatible_but_different_distribution_is_stored_by_optunas_own_path(storage) -> None:
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "s")
    first, second = storage.create_new_trial(study_id), storage.create_new_trial(study_id)
    storage.set_trial_param(first, "x", 0.25, FloatDistribution(0.0, 1.0))
    sent = _statements(storage)
    storage.set_trial_param(second, "x", 1.5, FloatDistribution(0.0, 2.0))  # wider: compatible
    assert len(sent) > 1  # the one statement inserted nothing; Optuna's path did
    assert storage.get_trial(second).distributions == {"x": FloatDistribution(0.0, 2.0)}
    third = storage.create_new_trial(study_id)
    with pytest.raises(ValueError):  # not the same kind: incompatible, as in Optuna
        storage.set_trial_param(third, "x", 0, CategoricalDistribution(["a"]))
    assert storage.get_trial(third).params == {}


def test_writes_to_a_finished_or_missing_trial_raise_optunas_errors(storage) -> None:
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "s")
    trial = storage.create_new_trial(study_id)
    storage.set_trial_state_values(trial, TrialState.COMPLETE, [1.0])
    with pytest.raises(UpdateFinishedTrialError):
        storage.set_trial_param(trial, "x", 0.5, FloatDistribution(0.0, 1.0))
    with pytest.raises(UpdateFinishedTrialError):
        storage.set_trial_intermediate_value(trial, 1, 0.5)
    with pytest.raises(KeyError):
        storage.set_trial_param(trial + 1, "x", 0.5, FloatDistribution(0.0, 1.0))
    with pytest.raises(KeyError):
        storage.set_trial_intermediate_value(trial + 1, 1, 0.5)
    assert (
        storage.get_trial(trial).params == {} and storage.get_trial(trial).intermediate_values == {}
    )


def test_a_waiting_trial_takes_parameters_as_in_optuna(storage) -> None:
    # Optuna's enqueue_trial stores the fixed parameters on a WAITING trial.
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "s")
    template = storage.get_trial(storage.create_new_trial(study_id))
    template.state = TrialState.WAITING
    waiting = storage.create_new_trial(study_id, template_trial=template)
    storage.set_trial_param(waiting, "x", 0.5, FloatDistribution(0.0, 1.0))
    assert storage.get_trial(waiting).params == {"x": 0.5}


def test_a_heartbeat_is_one_statement_that_sets_the_servers_time(storage) -> None:
    beat = sqlalchemy.text("SELECT heartbeat, now()::timestamp FROM trial_heartbeats")
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "s")
    trial = storage.create_new_trial(study_id)
    sent = _statements(storage)
    storage.record_heartbeat_once(trial)  # its row made
    with storage.engine.connect() as connection:
        ((first, _),) = connection.execute(beat).all()
    storage.record_heartbeat_once(trial)  # its row set again
    storage.record_heartbeat_once(trial + 1)  # no such trial: ignored, as Optuna does
    assert len([s for s in sent if s != str(beat)]) == 3, sent
    with storage.engine.connect() as connection:
        ((second, now),) = connection.execute(beat).all()
    assert first < second <= now
    assert storage._get_stale_trial_ids(study_id) == []


def test_a_trial_attribute_is_one_statement_and_replaces_the_earlier_value(storage) -> None:
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "s")
    trial = storage.create_new_trial(study_id)
    sent = _statements(storage)
    storage.set_trial_user_attr(trial, "worker", "node-1:10")
    storage.set_trial_user_attr(trial, "worker", {"node": 2})
    storage.set_trial_system_attr(trial, "fixed_params", {"x": 0.5})
    assert len(sent) == 3, sent
    stored = storage.get_trial(trial)
    assert stored.user_attrs == {"worker": {"node": 2}}
    assert stored.system_attrs == {"fixed_params": {"x": 0.5}}
    storage.set_trial_state_values(trial, TrialState.FAIL)
    with pytest.raises(UpdateFinishedTrialError):
        storage.set_trial_user_attr(trial, "worker", "late")
    with pytest.raises(KeyError):
        storage.set_trial_system_attr(trial + 1, "k", 1)


@pytest.mark.parametrize(
    "values", [[0.75], [0.75, float("inf"), -float("inf")]], ids=["one", "three"]
)
def test_a_tell_is_one_statement_that_stores_state_values_and_end(storage, values) -> None:
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE] * len(values), "s")
    trial = storage.create_new_trial(study_id)
    sent = _statements(storage)
    before = datetime.datetime.now()
    assert storage.set_trial_state_values(trial, TrialState.COMPLETE, values)
    assert len(sent) == 1, sent
    stored = storage.get_trial(trial)
    assert stored.state == TrialState.COMPLETE and stored.values == values
    assert before <= stored.datetime_complete <= datetime.datetime.now()
    with pytest.raises(UpdateFinishedTrialError):
        storage.set_trial_state_values(trial, TrialState.FAIL)
    with pytest.raises(KeyError):
        storage.set_trial_state_values(trial + 1, TrialState.FAIL)
    assert storage.get_trial(trial).state == TrialState.COMPLETE


def test_a_tell_without_values_is_one_statement(storage) -> None:
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "s")
    trial = storage.create_new_trial(study_id)
    sent = _statements(storage)
    assert storage.set_trial_state_values(trial, TrialState.PRUNED)
    assert len(sent) == 1
    assert storage.get_trial(trial).state == TrialState.PRUNED


def test_a_trial_read_is_one_statement(storage) -> None:
    # Optuna's Study.tell reads the trial twice, and a pruner reads each newly finished
    # trial: seven round trips each before. Floats come back floats (a whole double is
    # "2" in PostgreSQL's JSON), enums Optuna's, attributes decoded.
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "s")
    trial = storage.create_new_trial(study_id)
    storage.set_trial_param(trial, "x", 2.0, FloatDistribution(0.0, 4.0))
    storage.set_trial_param(trial, "c", 1, CategoricalDistribution(["a", None]))
    storage.set_trial_intermediate_value(trial, 1, 1.0)
    storage.set_trial_intermediate_value(trial, 2, float("-inf"))
    storage.set_trial_user_attr(trial, "u", {"note": "é", "n": [1, 2]})
    storage.set_trial_system_attr(trial, "s", 3)
    storage.set_trial_state_values(trial, TrialState.COMPLETE, [0.0])
    bare = storage.create_new_trial(study_id)
    sent = _statements(storage)
    got = storage.get_trial(trial)
    assert len(sent) == 1, sent
    assert got.params == {"x": 2.0, "c": None} and type(got.params["x"]) is float
    assert got.values == [0.0] and type(got.values[0]) is float
    assert got.intermediate_values == {1: 1.0, 2: float("-inf")}
    assert type(got.intermediate_values[1]) is float
    assert got.user_attrs == {"u": {"note": "é", "n": [1, 2]}} and got.system_attrs == {"s": 3}
    assert got.state == TrialState.COMPLETE and got.datetime_complete is not None
    trials = storage.get_all_trials(study_id)
    assert len(sent) == 3, sent  # the study's row checked (KeyError if missing), one read
    assert [t._trial_id for t in trials] == [trial, bare]
    assert trials[0] == got and trials[1].params == {} and trials[1].values is None
    assert trials[1].state == TrialState.RUNNING
