"""What keeps a trial near the compute limit: metrics computed without slow
imports, and the generalization-gap pass that stays a faithful train − val measure."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from sklearn.metrics import roc_auc_score

import hpo.train as hpo_train
from hpo.data import load_splits
from hpo.device import select_device
from hpo.spec import StudySpec, TrialParams, load_spec
from hpo.train import (
    CPU_EVAL_BATCH_MAX,
    TRAIN_EVAL_SAMPLES,
    TrainingData,
    TrainingRun,
    binary_auc,
    build_run,
    evaluate,
    fit,
    prepare_data,
)
from tests.benchmark_scripts import load_benchmark
from tests.conftest import train_trial


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auc_equals_sklearn_with_ties(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (300,), generator=generator)
    # Scores rounded to a few levels, so many are tied (within and across classes).
    score = (torch.rand(300, generator=generator) + 0.3 * label).mul(8).round().div(8)
    assert binary_auc(score, label) == pytest.approx(roc_auc_score(label, score), abs=1e-12)


def test_binary_auc_of_a_perfect_a_reversed_and_a_constant_score() -> None:
    label = torch.tensor([0, 0, 1, 1])
    assert binary_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), label) == 1.0
    assert binary_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), label) == 0.0
    assert binary_auc(torch.full((4,), 0.5), label) == 0.5


def test_binary_auc_with_one_class_is_one_half() -> None:
    assert binary_auc(torch.tensor([0.1, 0.9]), torch.tensor([1, 1])) == 0.5


# ------------------------------------------------------------ the generalization-gap pass


def _fitted(tiny_study: Path, epochs: int = 2) -> tuple[StudySpec, TrainingRun, TrainingData]:
    spec = load_spec(tiny_study)
    spec = spec.model_copy(update={"budget": spec.budget.model_copy(update={"epochs": epochs})})
    setup = select_device(spec.training)
    data = prepare_data(load_splits(spec.dataset), setup, spec.training)
    params = TrialParams(batch_size=32, lr=0.05, weight_decay=1e-5)
    run = build_run(spec, params, setup, seed=0)
    fit(run, data, setup, spec, params)
    return spec, run, data


def test_train_accuracy_is_measured_after_the_last_epoch_only(tiny_study: Path) -> None:
    spec, run, data = _fitted(tiny_study)
    history = run.tally.history
    assert [m.train_acc is None for m in history] == [True, False]
    setup = select_device(spec.training)
    _, accuracy, _ = evaluate(run.model, data.train_probe, data.batcher, setup, 64)
    assert history[-1].train_acc == pytest.approx(accuracy)
    # No more probe patches than validation patches (128 of the 256 here).
    assert len(data.train_probe) == min(len(data.train), len(data.val), TRAIN_EVAL_SAMPLES)
    assert len(data.train_probe) == len(data.val) < len(data.train)


def test_a_gap_pass_changes_neither_the_model_nor_the_random_stream(tiny_study: Path) -> None:
    """Why skipping it before the last epoch keeps the last epoch's gap what it was: the
    eval-mode pass updates no weight or BatchNorm statistic and draws no random number."""
    spec, run, data = _fitted(tiny_study, epochs=1)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    generator_state, torch_state = run.generator.get_state(), torch.get_rng_state()
    evaluate(run.model, data.train_probe, data.batcher, select_device(spec.training), 64)
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(run.generator.get_state(), generator_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_a_pruned_trial_records_no_generalization_gap(tiny_study: Path) -> None:
    spec = load_spec(tiny_study)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"log2_batch_size": 5, "lr": 0.05, "weight_decay": 1e-5})

    def prune_after_first_epoch(trial: optuna.Trial) -> float:
        trial.should_prune = lambda: True  # type: ignore[method-assign]
        return train_trial(trial, spec)

    study.optimize(prune_after_first_epoch, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["epochs_completed"] == 1
    assert "train_acc" not in trial.user_attrs and "generalization_gap" not in trial.user_attrs
    assert "val_acc" in trial.user_attrs


# ------------------------------------------------------------------ the benchmark scripts


def test_pipeline_reports_e2e_vs_step_with_a_breakdown_that_adds_up(tmp_path: Path) -> None:
    """Smoke test (toy sizes: the figures mean nothing): the key and the phases are there,
    and the phases account for the instrumented trial's whole wall time."""
    out = tmp_path / "pipeline.json"
    load_benchmark("pipeline").main(["--only", "e2e", "--quick", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["e2e_vs_step"] > 0
    phases = ("step", "noise_step", "batch_prep", "eval", "gap_pass", "checkpoint", "storage")
    per_epoch = {phase: result[f"e2e_s_per_epoch_{phase}"] for phase in (*phases, "other")}
    trial_seconds = result["e2e_in_trial_step_samples_per_s"] / result["e2e_trial_samples_per_s"]
    # The phases add up to the trial's wall time (one epoch here, --quick); the in-trial
    # step rate counts the plain steps' samples only.
    wall = trial_seconds * per_epoch["step"] / result["e2e_plain_step_share"]
    assert sum(per_epoch.values()) == pytest.approx(wall, rel=1e-6)
    assert all(per_epoch[phase] > 0 for phase in ("step", "eval", "gap_pass", "storage"))


def test_gpu_benchmark_runs_on_cpu_with_quick(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    load_benchmark("gpu").main(["--quick", "--skip-commands", "--json", str(out)])
    cells = json.loads(out.read_text())["cells"]
    assert [(c["model"], c["batch_size"]) for c in cells] == [("small-cnn", 16), ("small-cnn", 32)]
    for cell in cells:
        for side in ("hpo", "naive"):
            assert cell[side]["samples_per_s"] > 0
            assert 0.0 <= cell[side]["input_stall"] <= 1.0


def test_gpu_step_lever_benchmark_runs_on_cpu_with_quick(tmp_path: Path) -> None:
    """benchmarks/gpu_step.py's smoke test: each lever's step is timed on hpo's real run,
    the fused optimizer really replaces the run's SGD, and one checkpoint is costed."""
    out = tmp_path / "step.json"
    load_benchmark("gpu_step").main(["--quick", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [v["variant"] for v in result["variants"]] == ["eager", "eager_fused"]
    for variant in result["variants"]:
        assert "error" not in variant, variant
        assert variant["samples_per_s"] > 0 and variant["limit_samples_per_s"] > 0
    assert result["checkpoint"]["save_s"] > 0 and result["checkpoint"]["file_mib"] > 0


def test_gpu_step_fused_variant_keeps_the_trial_optimizers_settings(tiny_study: Path) -> None:
    spec = load_spec(tiny_study)
    setup = select_device(spec.training)
    params = TrialParams(batch_size=16, lr=0.02, weight_decay=3e-4)
    run = load_benchmark("gpu_step").variant_run(spec, setup, params, "eager_fused")
    group = run.optimizer.param_groups[0]
    assert group["fused"] is True
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.02, 3e-4, 0.9)


def test_evaluation_on_cpu_uses_capped_batches_with_the_same_metrics(
    tiny_study: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, run, data = _fitted(tiny_study, epochs=1)
    setup = select_device(spec.training)
    small = evaluate(run.model, data.val, data.batcher, setup, 16)  # 8 batches of the split
    large = evaluate(run.model, data.val, data.batcher, setup, CPU_EVAL_BATCH_MAX)
    assert small[1:] == pytest.approx(large[1:]) and small[0] == pytest.approx(large[0], rel=1e-4)

    used: list[int] = []

    def recording(model, patches, batcher, setup, batch_size):  # the signature hpo calls
        used.append(batch_size)
        return small

    monkeypatch.setattr(hpo_train, "evaluate", recording)
    monkeypatch.setattr(hpo_train, "CPU_EVAL_BATCH_MAX", 32)  # below the spec's 512
    _fitted(tiny_study, epochs=1)
    assert used and set(used) == {32}


# ------------------------------------------------- the validation split prepared once


def test_the_prepared_validation_split_gives_exactly_the_per_batch_metrics(
    tiny_study: Path,
) -> None:
    spec, run, data = _fitted(tiny_study, epochs=1)
    setup = select_device(spec.training)
    assert data.val_prepared is not None and data.val_for_eval is data.val_prepared
    per_batch = evaluate(run.model, data.val, data.batcher, setup, CPU_EVAL_BATCH_MAX)
    prepared = evaluate(run.model, data.val_prepared, data.batcher, setup, CPU_EVAL_BATCH_MAX)
    assert prepared == per_batch  # the same inputs, bit for bit, so the same numbers
    images, labels = data.batcher.take(data.val, torch.arange(len(data.val)))
    assert torch.equal(data.val_prepared.images, images)
    assert torch.equal(data.val_prepared.labels, labels)


def test_fit_evaluates_the_prepared_split_and_prepares_no_validation_batch(
    tiny_study: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(tiny_study)
    setup = select_device(spec.training)
    data = prepare_data(load_splits(spec.dataset), setup, spec.training)
    taken: list[int] = []
    original_take = type(data.batcher).take

    def recording_take(batcher, patches, indices, generator=None):
        taken.append(id(patches))
        return original_take(batcher, patches, indices, generator)

    monkeypatch.setattr(type(data.batcher), "take", recording_take)
    params = TrialParams(batch_size=32, lr=0.05, weight_decay=1e-5)
    fit(build_run(spec, params, setup, seed=0), data, setup, spec, params)
    assert id(data.val) not in taken and id(data.train) in taken


def test_a_validation_split_above_the_memory_bound_is_prepared_batch_by_batch(
    tiny_study: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(tiny_study)
    setup = select_device(spec.training)
    monkeypatch.setattr(hpo_train, "EVAL_PREPARED_MAX_BYTES", 1)
    data = prepare_data(load_splits(spec.dataset), setup, spec.training)
    assert data.val_prepared is None and data.val_for_eval is data.val


# ------------------------------------------------------------------ training.compile


@pytest.mark.parametrize(
    ("compile_setting", "mode"),
    [(False, None), (True, None), ("default", None), ("reduce-overhead", "reduce-overhead")],
)
def test_training_compile_compiles_the_model_in_place_keeping_its_state_dict_keys(
    tiny_study: Path, monkeypatch: pytest.MonkeyPatch, compile_setting: bool | str, mode: str | None
) -> None:
    """Off by default (it did not pay on CPU: docs/benchmarks.md, compile.py). On, the model
    is compiled in place, so a checkpoint's keys are the eager model's (no ``_orig_mod.``)."""
    spec = load_spec(tiny_study)
    assert spec.training.compile is False
    training = spec.training.model_copy(update={"compile": compile_setting})
    spec = spec.model_copy(update={"training": training})
    compiled: list[tuple[torch.nn.Module, str | None]] = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, *a, **k: compiled.append((self, k.get("mode")))
    )
    setup = select_device(spec.training)
    params = TrialParams(batch_size=32, lr=0.05, weight_decay=1e-5)
    run = build_run(spec, params, setup, seed=0)
    assert compiled == ([(run.model, mode)] if compile_setting else [])
    assert not any(key.startswith("_orig_mod") for key in run.model.state_dict())


def test_compile_benchmark_times_an_eager_trial_step_and_forward() -> None:
    """Smoke test of benchmarks/compile.py's per-process measurement (eager only: a cold
    inductor compile takes minutes on the shared CPU, too long for the suite)."""
    figures = load_benchmark("compile").measure("eager", "small-cnn", 16, 8, 1)
    assert figures["mode"] == "eager" and figures["step_s"] > 0 and figures["forward_s"] > 0
    assert "second_instance_first_step_extra_s" not in figures  # compiled runs only


def test_checkpoint_benchmark_runs_on_cpu_with_quick(tmp_path: Path) -> None:
    """benchmarks/checkpoint.py's smoke test: both saves are timed on hpo's real run and
    set against an epoch at PCam's size; the background write overlapped a step."""
    out = tmp_path / "ckpt.json"
    load_benchmark("checkpoint").main(["--quick", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["sync_save_s"] > 0 and result["async_call_s"] > 0 and result["file_mib"] > 0
    assert result["epoch_s"] == pytest.approx(262_144 / result["samples_per_s"])
    assert result["steps_during_write"] >= 1
    assert result["sync_vs_epoch"] == pytest.approx(result["sync_save_s"] / result["epoch_s"])
