"""A retry queued by an older hpo (or by Optuna's own callback) still holds everything its
predecessor had: ``fail_reason``, metrics, worker. It is cleaned when it is claimed
(``hpo.storage``'s claim, ``hpo.retry.clean_retry_attrs``), so it never ends with an
inherited ``fail_reason``."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from hpo.caps import CLAMPED_ATTR
from hpo.retry import PARAMETER_ATTRS, RETRY_REASON_ATTR, clean_retry_attrs
from hpo.settings import NodeSettings
from hpo.spec import parse_spec
from hpo.storage import ReconnectingRDBStorage, open_storage
from hpo.study import create_or_load_study
from hpo.worker import run_worker

from .conftest import tiny_study_text

pytestmark = [
    pytest.mark.filterwarnings(f"ignore::{ExperimentalWarning.__module__}.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed"),
]

KEYS = ["fail_reason", "val_auc", "worker", "epochs_completed", "device", "resumed_from_epoch",
        "checkpoint_unreadable", "batch_size", CLAMPED_ATTR, RETRY_REASON_ATTR]  # fmt: skip
VALUES = st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=False), st.none())


def _queue_old_style_retry(study: optuna.Study, attrs: dict) -> None:
    """A failed trial with ``attrs``, re-queued the way older hpo versions did: Optuna's
    own callback, which copies every user attr to the retry."""
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    study.tell(trial, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, study.trials[-1])
    assert study.trials[-1].user_attrs == attrs  # the old behaviour, inherited whole


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> ReconnectingRDBStorage:
    """One database for every generated case (a study each): creating Optuna's tables
    is most of a case's time."""
    return open_storage(f"sqlite:///{tmp_path_factory.mktemp('old') / 'hpo.db'}")


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attrs=st.dictionaries(st.sampled_from(KEYS), VALUES))
def test_a_claimed_old_retry_keeps_only_what_a_retry_may_start_with(
    storage: ReconnectingRDBStorage, attrs: dict
) -> None:
    study = optuna.create_study(storage=storage)
    _queue_old_style_retry(study, attrs)

    with storage.claiming():  # as hpo's worker claims (hpo.claim.claim_trial)
        retry = study.ask()  # the queued retry: WAITING -> RUNNING
    study.tell(retry, 0.5)

    claimed = study.trials[-1]
    assert claimed.state == TrialState.COMPLETE
    assert claimed.user_attrs == clean_retry_attrs(attrs)
    assert "fail_reason" not in claimed.user_attrs
    assert set(claimed.user_attrs) <= PARAMETER_ATTRS | {RETRY_REASON_ATTR}
    reason = attrs.get("fail_reason")  # the predecessor's: the latest reason
    reason = attrs.get(RETRY_REASON_ATTR) if reason is None else reason
    assert claimed.user_attrs.get(RETRY_REASON_ATTR) == reason


def test_an_enqueued_trial_that_is_no_retry_keeps_its_attrs(
    storage: ReconnectingRDBStorage,
) -> None:
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({}, user_attrs={"note": "by hand", "fail_reason": "not a retry"})
    with storage.claiming():
        trial = study.ask()
    assert trial.user_attrs == {"note": "by hand", "fail_reason": "not a retry"}


def test_outside_hpos_claim_a_retry_keeps_what_optunas_callback_copied(
    storage: ReconnectingRDBStorage,
) -> None:
    """Optuna's own semantics (and its storage tests) hold outside ``claiming``."""
    study = optuna.create_study(storage=storage)
    _queue_old_style_retry(study, {"fail_reason": "old", "worker": "w"})
    assert study.ask().user_attrs == {"fail_reason": "old", "worker": "w"}


def test_a_worker_completing_an_old_retry_leaves_no_inherited_reason(tmp_path: Path) -> None:
    text = tiny_study_text(epochs=1, train_size=128, val_size=64, pruner="none")
    spec = parse_spec(tomllib.loads(text), source="test", default_name="tiny")
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    loaded = create_or_load_study(spec, url)
    params = {"log2_batch_size": 5, "lr": 0.05, "weight_decay": 1e-4}
    loaded.study.enqueue_trial(params)
    trial = loaded.study.ask()
    inherited = {"fail_reason": "worker stopped (SIGINT)", "worker": "old:1", "batch_size": 32}
    for key, value in inherited.items():
        trial.set_user_attr(key, value)
    loaded.study.tell(trial, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(
        loaded.study, loaded.study.trials[-1]
    )

    node = NodeSettings(checkpoint_dir=tmp_path / "ckpt", num_threads=1)
    result = run_worker("tiny", url, total_trials=1, node=node)

    assert result.exit_code == 0
    retry = optuna.load_study(study_name="tiny", storage=url).trials[-1]
    assert retry.state == TrialState.COMPLETE
    assert "fail_reason" not in retry.user_attrs
    assert retry.user_attrs[RETRY_REASON_ATTR] == "worker stopped (SIGINT)"
    assert retry.user_attrs["worker"] != "old:1"
