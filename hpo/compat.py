"""Every private name of Optuna, torch and torchvision that hpo relies on, in one place.

Each has no public equivalent (the reason is beside it). ``tests/test_compat.py`` checks
that every one still exists in the installed versions, so an upgrade that removes one
fails there, loudly, instead of deep inside a trial. Everywhere else hpo uses public API
only (``tests/test_architecture.py`` enforces it).

Imports of torch and torchvision happen inside the functions: importing this module must
stay cheap for commands that never train.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

# Private methods of optuna.storages.RDBStorage that Optuna's own cache layer
# (``optuna.storages._CachedStorage``, which wraps every RDBStorage a Study holds) calls
# on its backend. ``hpo.storage.reconnect`` wraps each public *and* these private calls with the
# reconnect retry, or a database restart would surface through the cache layer's calls
# as a failed trial (seen: a PostgreSQL restart failed a trial in ``_get_trials``).
RDB_STORAGE_PRIVATE_METHODS: tuple[str, ...] = (
    "_get_stale_trial_ids",
    "_get_trials",
    "_create_new_trial",
    "_set_trial_param",
    "_get_best_trial_id",
)


# What Optuna names a study created without a name. ``hpo.storage.rdb`` chooses that name
# itself, before the first attempt, so that a retried ``create_new_study`` finds the study
# its first attempt committed instead of creating a second one.
def default_study_name_prefix() -> str:
    from optuna.storages._base import DEFAULT_STUDY_NAME_PREFIX

    return DEFAULT_STUDY_NAME_PREFIX


# RDBStorage's session, ORM models and in-transaction helpers. ``hpo.storage.new_trials`` writes a
# client token in the *same transaction* as a new trial or a trial claim (WAITING ->
# RUNNING), so that a retry after an ambiguous failure (commit landed, acknowledgement
# lost) can look for it; Optuna has no public way to add a row to its transaction, and its
# own ``_create_new_trial`` blindly repeats the insert when the commit raises.
def rdb_session(storage: Any) -> Any:
    """Optuna's session context for ``storage``: commits on exit, rolls back and wraps
    SQLAlchemy errors in ``StorageInternalError`` on failure."""
    from optuna.storages._rdb.storage import _create_scoped_session

    return _create_scoped_session(storage.scoped_session)


def rdb_models() -> Any:
    """The module of Optuna's ORM models (``TrialModel``, ``TrialSystemAttributeModel``...)."""
    from optuna.storages._rdb import models

    return models


def rdb_not_found_message() -> str:
    """The message of the KeyError Optuna's RDB storage raises for a missing study or trial."""
    return rdb_models().NOT_FOUND_MSG


def add_new_trial(storage: Any, session: Any, study_id: int, template_trial: Any) -> Any:
    """Insert a trial from ``template_trial`` in ``session`` (numbered, not committed)."""
    return storage._get_prepared_new_trial(study_id, template_trial, session)


def set_trial_system_attr_in_session(
    storage: Any, session: Any, trial_id: int, key: str, value: Any
) -> None:
    """Upsert a trial system attribute inside ``session`` (not committed)."""
    set_trial_attr_in_session(
        storage, session, rdb_models().TrialSystemAttributeModel, trial_id, key, value
    )


def set_trial_attr_in_session(
    storage: Any, session: Any, model_cls: Any, trial_id: int, key: str, value: Any
) -> None:
    """Upsert a trial attribute of ``model_cls`` (user or system) inside ``session`` (not
    committed), as Optuna's ``set_trial_user_attr`` / ``set_trial_system_attr`` do."""
    storage._set_trial_attr_without_commit(session, model_cls, trial_id, key, value)


# A running ``optuna.Trial``'s id, storage and cached copy (``Trial._trial_id``,
# ``Trial.storage``: the study's cache layer, ``_CachedStorage._backend``: the storage
# behind it, ``Trial._cached_frozen_trial``). ``set_trial_user_attrs`` writes many user
# attrs through the storage's batched write, which Optuna's Trial has no call for, and
# updates the cached copy as ``Trial.set_user_attr`` does.
def set_trial_user_attrs(trial: Any, attrs: dict[str, Any]) -> None:
    """Every one of ``attrs`` on the running ``trial``: in one transaction where its
    storage has a batched write (``set_trial_user_attrs``, hpo's RDB storage), else one
    ``set_user_attr`` each (Optuna's InMemoryStorage, JournalStorage, a FixedTrial)."""
    storage = getattr(trial, "storage", None)
    backend = getattr(storage, "_backend", storage)
    batched = getattr(backend, "set_trial_user_attrs", None)
    if batched is None or not hasattr(trial, "_cached_frozen_trial"):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    if attrs:
        batched(trial._trial_id, attrs)
        trial._cached_frozen_trial.user_attrs.update(attrs)


# The cache layer a Study keeps its storage behind (``Study._storage``, an
# ``optuna.storages._CachedStorage`` around an RDBStorage). hpo's claim creates a new trial
# through it, as ``Study.ask`` does: the cache then knows the trial, and ``suggest_*``
# (which writes through the cache) works without first re-reading every unfinished trial
# of the study. ``Study.ask`` itself cannot be used: it looks for waiting trials through
# that same re-read, under the study lock.
def study_storage(study: Any) -> Any:
    return study._storage


# The per-thread list of all trials that samplers read (``Study._get_trials(use_cache=True)``:
# TPE, GP, QMC, CMA-ES). ``Study.ask`` and ``Study.tell`` empty it so that each trial samples
# from the study as it is now; hpo's claim replaces ``ask`` and must empty it too, or a
# trial started after one that ended without a tell (re-queued on OOM or a signal) would
# sample from a history that misses every trial other workers finished meanwhile.
def forget_cached_trials(study: Any) -> None:
    study._thread_local.cached_all_trials = None


# The same cache layer, taught to answer a request for *finished* trials only (what a
# pruner asks: Median/Percentile read the COMPLETE trials, hpo's stratified wrapper the
# COMPLETE and PRUNED ones) without re-reading the unfinished ones. Optuna's
# ``get_all_trials`` re-reads every unfinished trial with all its rows on every call,
# whatever ``states`` asks for: with W workers each reporting every epoch that is W^2 trial
# reads per epoch of the fleet (a report's p99 was 8.8 s at 256 workers, against 1.0 s
# without a pruner). A finished trial never changes, so this asks the database which
# trials started or finished since the cache last looked (their ids and whether they
# finished: one query on the trials table), reads only the newly finished ones, and keeps
# Optuna's invariant (a trial at or below ``last_finished_trial_id`` that is not in
# ``unfinished_trial_ids`` is finished and cached) as Optuna's own read keeps it:
# unfinished ones join ``unfinished_trial_ids``, finished ones leave it and move
# ``last_finished_trial_id`` up. Trial ids grow in the order trials are committed within a
# study (every insert holds the study's row lock, Optuna's as hpo's), which that invariant
# already relies on. Were the mark never moved, every check would return the id of every
# finished trial of the study.
def finished_trials_cache(backend: Any) -> Any:
    """A ``_CachedStorage`` around ``backend`` (an ``hpo.storage.ReconnectingRDBStorage``)
    whose reads of finished trials only skip the unfinished ones."""
    return _finished_trials_cache_class()(backend)


@functools.cache
def _finished_trials_cache_class() -> type:
    """The class, built on first use (importing Optuna here would slow every import of this
    module); reachable as ``hpo.compat.FinishedTrialsCache`` (``__getattr__``), so that a
    pickled storage finds it again."""
    from optuna.storages._cached_storage import _CachedStorage, _StudyInfo

    class FinishedTrialsCache(_CachedStorage):
        def get_all_trials(
            self, study_id: int, deepcopy: bool = True, states: Any = None
        ) -> list[Any]:
            if states is None or not all(state.is_finished() for state in states):
                return super().get_all_trials(study_id, deepcopy=deepcopy, states=states)
            with self._lock:
                study = self._studies.setdefault(study_id, _StudyInfo())
                seen = self._backend.trial_states_since(
                    study_id, study.unfinished_trial_ids, study.last_finished_trial_id
                )
                new = {i for i, finished in seen if finished and not self._finished_in_cache(i)}
                if new:
                    # Above every id (trial ids are 32-bit INTEGER): only ``new`` is read.
                    trials = self._backend._get_trials(
                        study_id,
                        states=None,
                        included_trial_ids=new,
                        trial_id_greater_than=2**31 - 1,
                    )
                    self._add_trials_to_cache(study_id, trials)
                for trial_id, finished in seen:
                    if finished and self._finished_in_cache(trial_id):
                        study.unfinished_trial_ids.discard(trial_id)
                        study.last_finished_trial_id = max(study.last_finished_trial_id, trial_id)
                    else:  # looked at again next time
                        study.unfinished_trial_ids.add(trial_id)
                chosen = sorted(
                    (t for t in study.trials.values() if t.state in states),
                    key=lambda t: t.number,
                )
            return copy.deepcopy(chosen) if deepcopy else chosen

        def _finished_in_cache(self, trial_id: int) -> bool:
            place = self._trial_id_to_study_id_and_number.get(trial_id)
            if place is None:
                return False
            trial = self._studies[place[0]].trials.get(place[1])
            return trial is not None and trial.state.is_finished()

    FinishedTrialsCache.__module__ = __name__
    FinishedTrialsCache.__qualname__ = "FinishedTrialsCache"
    return FinishedTrialsCache


def __getattr__(name: str) -> Any:
    if name == "FinishedTrialsCache":
        return _finished_trials_cache_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_finished_trials_incrementally(study: Any) -> None:
    """Give ``study`` the cache layer of ``finished_trials_cache`` (a fresh one: call it
    before the study is used)."""
    study._storage = finished_trials_cache(study._storage._backend)


def grid_point_count(sampler: Any) -> int:
    """How many points a ``GridSampler``'s grid has (Optuna keeps the count private)."""
    return int(sampler._n_min_trials)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX).

    torch has no public query; ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` is what
    torch's own CPU autocast tests use. Without the instructions bf16 autocast on CPU is
    emulated and slower than fp32, so hpo uses it only when this is True.
    """
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pcam_file_names(split: str) -> tuple[str, str]:
    """The (images, targets) HDF5 file names torchvision's PCAM expects for ``split``.

    torchvision keeps them in the private ``PCAM._FILES`` table; hpo reads the files
    itself (memory-mapped, see ``hpo.data``) and names them in "not found" errors.
    """
    from torchvision.datasets import PCAM

    files = PCAM._FILES[split]
    return files["images"][0], files["targets"][0]


def pcam_folder(dataset: Any) -> Path:
    """The directory a ``torchvision.datasets.PCAM`` instance reads its files from.

    Only the private ``_base_folder`` says it (today ``root / "pcam"``); taking it from
    the dataset keeps hpo right if torchvision moves the files.
    """
    return Path(dataset._base_folder)
