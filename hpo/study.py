"""Creating and loading a study (one way for every command), and where it stands.

The validated spec is stored on the study (user attr ``hpo_spec``) when it is created, so
a worker anywhere needs only the study name and the storage URL. A study gets the
spec's sampler and pruner; a worker then wraps the sampler in its device's batch-size cap
(``LoadedStudy.keep_batch_sizes_within_cap``).

Retry lineage lives here too: Optuna's ``RetryHeartbeatStaleTrialCallback`` re-queues a
failed trial under a new number with system attrs ``failed_trial`` (the first trial of the
chain) and ``retry_history``; the budget and the checkpoints follow those.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo import compat
from hpo.caps import BatchSizeCapSampler
from hpo.retry import superseded_trials
from hpo.space import COVER_ATTR, COVER_VALUE, first_round, make_pruner, make_sampler
from hpo.spec import StudySpec, load_spec, spec_differences
from hpo.sqlite_guard import require_sqlite_file
from hpo.storage import (
    SPEC_ATTR,
    ReconnectingRDBStorage,
    StorageError,
    StudyNotFound,
    StudyRef,
    open_storage,
    require_study,
    study_lock,
)

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# Study user attr: patches per class in each split, {"train": {"normal": n, ...}, "val": ...},
# written by every worker once its data is loaded (hpo.data.class_counts).
CLASS_COUNTS_ATTR = "hpo_class_counts"


@dataclass(frozen=True)
class LoadedStudy:
    """An Optuna study with the storage it was opened on and the spec stored on it."""

    study: optuna.Study
    storage: ReconnectingRDBStorage  # what open_storage returns
    spec: StudySpec
    ref: StudyRef

    def __post_init__(self) -> None:
        # A pruner's read of the finished trials, at every report, skips the unfinished
        # ones (W workers: W^2 trial reads per epoch of the fleet otherwise).
        compat.read_finished_trials_incrementally(self.study)

    @property
    def name(self) -> str:
        return self.study.study_name

    def trial_id(self, trial: optuna.Trial | FrozenTrial) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.ref.study_id, trial.number)

    def keep_batch_sizes_within_cap(self, device_name: str) -> None:
        """Wrap the study's sampler in ``device_name``'s batch-size cap (workers only:
        the device is known once the worker has resolved it). A study that accumulates
        above the cap (``training.above_cap``) keeps the drawn batch sizes."""
        if self.spec.training.above_cap == "accumulate":
            return
        if not isinstance(self.study.sampler, BatchSizeCapSampler):
            self.study.sampler = BatchSizeCapSampler(self.study.sampler, self.storage, device_name)


def create_or_load_study(
    spec: StudySpec, storage_url: str, *, parallel: bool = False
) -> LoadedStudy:
    """Create the study from the spec, or load it if it exists (launching twice continues).

    Refuses a spec that differs from the one stored on an existing study: the trials
    already there were drawn from the stored space. Several processes may call this at
    once for the same study (two ``launch``es, workers started by compose): the spec is
    stored under the study lock, so all of them agree on one.
    """
    storage = open_storage(storage_url)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        direction=spec.objective.direction,
        sampler=make_sampler(spec, parallel=parallel),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    ref = StudyRef.by_name(storage, spec.name)
    with study_lock(storage, spec.name):
        stored = ref.user_attrs().get(SPEC_ATTR)
        if stored is None:
            ref.set_user_attr(SPEC_ATTR, spec.to_json())
            name_the_objective(study, spec.objective.metric)
            if spec.sampler.cover_batch_sizes and spec.sampler.kind != "grid":
                for params in first_round(spec):
                    study.enqueue_trial(params, user_attrs={COVER_ATTR: COVER_VALUE})
        else:
            check_same_spec(
                StudySpec.from_json(stored, source=f"the spec stored on study {spec.name!r}"),
                spec,
            )
    return LoadedStudy(study, storage, spec, ref)


def stored_class_counts(study: optuna.Study) -> dict[str, dict[str, int]]:
    """The patches per class of each split stored on the study (``CLASS_COUNTS_ATTR``);
    ``{}`` before a worker has loaded the data, or when what is stored is not that shape
    (a study another tool wrote)."""
    counts = study.user_attrs.get(CLASS_COUNTS_ATTR)
    if not isinstance(counts, dict) or not all(
        isinstance(split, dict) and all(isinstance(n, int) for n in split.values())
        for split in counts.values()
    ):
        return {}
    return counts


def name_the_objective(study: optuna.Study, metric: str) -> None:
    """Name the objective on the study (optuna-dashboard shows ``val_auc``, not
    "Objective 0"). ``set_metric_names`` is marked experimental since Optuna 3.2 and has
    kept its signature since; its warning says nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric])


def check_same_spec(stored: StudySpec, local: StudySpec) -> None:
    differences = spec_differences(stored, local)
    if differences:
        raise StorageError(
            f"study {stored.name!r} was created from a different spec; differing fields: "
            f"{', '.join(differences)} (use a new study name, or the stored spec)"
        )


def open_study(study_name: str, storage_url: str, hint: str = "") -> tuple[optuna.Study, StudyRef]:
    """Any study in the storage, hpo's or not, for reading (no sampler, no pruner).
    Raises StudyNotFound naming the studies that are there."""
    require_sqlite_file(storage_url, study_name)
    storage = open_storage(storage_url)
    require_study(storage, study_name, storage_url, hint)
    study = optuna.load_study(study_name=study_name, storage=storage)
    return study, StudyRef.by_name(storage, study_name)


def load_study(
    study_name: str,
    storage_url: str,
    *,
    parallel: bool = False,
    local_spec: StudySpec | None = None,
) -> LoadedStudy:
    """Join an existing study; its spec comes from the study itself.

    With ``local_spec`` (``hpo worker --spec``) a missing study is created from it, and an
    existing one is refused if its stored spec differs (the message names the fields).
    """
    if local_spec is not None:
        if local_spec.name != study_name:
            raise StorageError(
                f"--spec defines study {local_spec.name!r}, not {study_name!r} (--study)"
            )
        return create_or_load_study(local_spec, storage_url, parallel=parallel)
    require_sqlite_file(storage_url, study_name)
    storage = open_storage(storage_url)
    require_study(storage, study_name, storage_url, "create it with 'hpo launch', or pass --spec")
    ref = StudyRef.by_name(storage, study_name)
    stored = ref.user_attrs().get(SPEC_ATTR)
    if stored is None:
        raise StudyNotFound(f"study {study_name!r} has no hpo spec stored; was it made by hpo?")
    spec = StudySpec.from_json(stored, source=f"the spec stored on study {study_name!r}")
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=make_sampler(spec, parallel=parallel),
        pruner=make_pruner(spec),
    )
    return LoadedStudy(study, storage, spec, ref)


# --------------------------------------------------------------------------- lineage


def trial_system_attrs(trial: optuna.Trial | FrozenTrial) -> dict:
    """A trial's system attrs. A live ``optuna.Trial`` does not expose them, so read its
    frozen copy from its study (it is RUNNING)."""
    if isinstance(trial, FrozenTrial):
        return dict(trial.system_attrs)
    study = getattr(trial, "study", None)  # absent on optuna.trial.FixedTrial
    if study is None:
        return {}
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number == trial.number:
            return dict(frozen.system_attrs)
    return {}


def original_trial_number(trial: optuna.Trial | FrozenTrial) -> int:
    """The number of the first trial in a retry chain (the trial's own number if not a retry)."""
    return int(trial_system_attrs(trial).get("failed_trial", trial.number))


def retried_from(trial: optuna.Trial | FrozenTrial) -> int | None:
    """The trial this one retries (the last of its retry history), or None."""
    history = trial_system_attrs(trial).get("retry_history") or []
    return int(history[-1]) if history else None


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """Where a study stands against its total (re-queued failures not counted)."""

    finished: int
    running: int
    waiting: int


def study_budget(study: optuna.Study) -> Budget:
    trials = study.get_trials(deepcopy=False)
    replaced = superseded_trials(trials)
    counted = [t for t in trials if t.number not in replaced]
    return Budget(
        finished=sum(t.state in FINISHED_STATES for t in counted),
        running=sum(t.state == TrialState.RUNNING for t in counted),
        waiting=sum(t.state == TrialState.WAITING for t in counted),
    )


def count_finished(study: optuna.Study) -> int:
    """Finished trials toward ``--n-trials`` (a failed trial that was re-queued is not one)."""
    return study_budget(study).finished


@dataclass(frozen=True)
class Outcome:
    """How the trials of one run ended: counts by state, and fail reasons with counts."""

    states: Counter[str] = field(default_factory=Counter)
    fail_reasons: Counter[str] = field(default_factory=Counter)

    @property
    def achieved_anything(self) -> bool:
        """True when a trial finished COMPLETE or PRUNED, or none finished at all."""
        finished = sum(self.states[s.name] for s in FINISHED_STATES)
        return finished == 0 or bool(self.states["COMPLETE"] + self.states["PRUNED"])

    def describe_failures(self) -> str:
        reasons = ", ".join(f"{reason} ×{n}" for reason, n in self.fail_reasons.most_common())
        return f"no trial finished COMPLETE or PRUNED: fail {self.states['FAIL']} ({reasons})"


def outcome_of(trials: list[FrozenTrial]) -> Outcome:
    states = Counter(t.state.name for t in trials)
    reasons = Counter(
        str(t.user_attrs.get("fail_reason", "no reason recorded"))
        for t in trials
        if t.state == TrialState.FAIL
    )
    return Outcome(states, reasons)


def run_outcome(study: optuna.Study, first_number: int) -> Outcome:
    """The outcome of the trials numbered ``first_number`` and up (one run's trials)."""
    return outcome_of([t for t in study.get_trials(deepcopy=False) if t.number >= first_number])


def load_or_create_study(study_name: str, storage_url: str) -> LoadedStudy:
    """The study in the storage; when it is not there yet but a study file of that name
    exists, the study is created from the file (as ``hpo launch`` would). Raises
    SpecError naming the file when there is neither."""
    try:
        return load_study(study_name, storage_url)
    except StudyNotFound:
        spec = load_spec(study_name, check_paths=False)
        return create_or_load_study(spec, storage_url)
