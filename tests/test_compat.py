"""Every private upstream name hpo relies on (``hpo/compat.py``) still exists.

If one of these fails after an upgrade, the named library moved something hpo needs:
fix ``hpo/compat.py`` (and only it)."""

from __future__ import annotations

import inspect

import optuna
import pytest

from hpo import compat


@pytest.mark.parametrize("name", compat.RDB_STORAGE_PRIVATE_METHODS)
def test_rdb_storage_still_has_the_private_methods_its_cache_layer_calls(name: str) -> None:
    import inspect

    from optuna.storages import _cached_storage

    assert callable(getattr(optuna.storages.RDBStorage, name, None)), name
    assert f"self._backend.{name}(" in inspect.getsource(_cached_storage), name


def test_torch_still_answers_whether_the_cpu_has_bf16() -> None:
    assert isinstance(compat.cpu_supports_bf16(), bool)


def test_torchvision_pcam_still_names_its_files_and_folder(tmp_path) -> None:
    from torchvision.datasets import PCAM

    from tests.test_data import write_pcam

    write_pcam(tmp_path, {"train": 4, "val": 4})
    dataset = PCAM(tmp_path, split="train", download=False)
    folder = compat.pcam_folder(dataset)
    for name in compat.pcam_file_names("train"):
        assert (folder / name).is_file(), name


def test_optuna_still_has_what_hpo_writes_its_retry_tokens_with(tmp_path) -> None:
    """hpo.storage writes a token in the same transaction as a new trial or a claim."""
    assert compat.default_study_name_prefix() == "no-name-"
    models = compat.rdb_models()
    for name in ("StudyModel", "TrialModel", "TrialSystemAttributeModel"):
        assert hasattr(models, name), name
    for name in ("_get_prepared_new_trial", "_set_trial_attr_without_commit"):
        assert callable(getattr(optuna.storages.RDBStorage, name, None)), name
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'compat.db'}")
    with compat.rdb_session(storage) as session:
        assert session.query(models.StudyModel).count() == 0
    storage.engine.dispose()


def test_a_study_still_keeps_its_storage_behind_optunas_cache_layer() -> None:
    """hpo's claim creates a new trial through it, as Study.ask does."""
    storage = optuna.storages.RDBStorage("sqlite://")
    study = optuna.create_study(storage=storage)
    cache = compat.study_storage(study)
    assert isinstance(cache, optuna.storages._CachedStorage)
    trial_id = cache.create_new_trial(storage.get_study_id_from_name(study.study_name))
    optuna.Trial(study, trial_id).suggest_float("x", 0.0, 1.0)  # writes through the cache


def test_a_study_still_caches_all_trials_per_thread_for_its_samplers() -> None:
    """hpo's claim empties that cache as Study.ask does (``compat.forget_cached_trials``)."""
    study = optuna.create_study(storage=optuna.storages.RDBStorage("sqlite://"))
    study.enqueue_trial({})
    study._get_trials(deepcopy=False, use_cache=True)
    assert study._thread_local.cached_all_trials is not None
    compat.forget_cached_trials(study)
    assert study._thread_local.cached_all_trials is None


def test_optunas_cache_layer_still_has_what_the_finished_trials_read_uses() -> None:
    """``compat.finished_trials_cache`` subclasses it and keeps its per-study bookkeeping
    (tests/test_finished_reads.py checks the behaviour against Optuna's own reads)."""
    from optuna.storages._cached_storage import _CachedStorage, _StudyInfo

    info = _StudyInfo()
    assert isinstance(info.trials, dict) and isinstance(info.unfinished_trial_ids, set)
    assert isinstance(info.last_finished_trial_id, int)
    cache = _CachedStorage(optuna.storages.RDBStorage("sqlite://"))
    for name in ("_studies", "_lock", "_trial_id_to_study_id_and_number", "_backend"):
        assert hasattr(cache, name), name
    assert callable(cache._add_trials_to_cache)
    assert (
        "included_trial_ids" in inspect.signature(optuna.storages.RDBStorage._get_trials).parameters
    )


def test_the_storage_subclass_overrides_only_pinned_private_methods_with_optunas_signature() -> (
    None
):
    """``hpo.storage.rdb.ReconnectingRDBStorage`` is the one subclass that overrides
    Optuna's private methods: each is listed in ``compat.RDB_STORAGE_PRIVATE_METHODS``
    and takes the parameters Optuna's own takes, so an upgrade that renames or reshapes
    one fails here."""
    from hpo.storage.rdb import ReconnectingRDBStorage

    overridden = {
        name
        for name, member in vars(ReconnectingRDBStorage).items()
        if name.startswith("_") and not name.startswith("__") and callable(member)
        if hasattr(optuna.storages.RDBStorage, name)
    }
    assert overridden <= set(compat.RDB_STORAGE_PRIVATE_METHODS)
    assert {"_create_new_trial", "_set_trial_param", "_get_trials"} <= overridden
    for name in overridden:
        ours = inspect.signature(getattr(ReconnectingRDBStorage, name)).parameters
        theirs = inspect.signature(getattr(optuna.storages.RDBStorage, name)).parameters
        assert list(ours) == list(theirs), name


def test_a_running_trial_still_has_the_id_storage_and_cached_copy_the_batched_attrs_use() -> None:
    """``compat.set_trial_user_attrs`` writes through the storage behind the trial's cache
    layer and updates the trial's cached copy, as ``Trial.set_user_attr`` does."""
    study = optuna.create_study(storage=optuna.storages.RDBStorage("sqlite://"))
    trial = study.ask()
    assert isinstance(trial._trial_id, int)
    assert isinstance(trial.storage._backend, optuna.storages.RDBStorage)
    source = inspect.getsource(optuna.Trial.set_user_attr)
    assert "self._cached_frozen_trial.user_attrs[key] = value" in source
