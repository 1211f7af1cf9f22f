"""Device-hours: what each trial held its device for, the study's total per device kind and
per batch size (summary, `hpo status`, `hpo export`), and a cost view that compares trials
of one device kind only, on a planted study with two device kinds and on a real trial."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from hpo.cli import app
from hpo.report import collect, summarize
from hpo.report.device_hours import device_hours
from hpo.report.device_rates import probe_rates
from hpo.report.markdown import summary_markdown
from hpo.spec import load_spec
from hpo.storage import ReconnectingRDBStorage
from hpo.study import create_or_load_study
from hpo.worker import run_worker

DISTRIBUTIONS = {
    "log2_batch_size": IntDistribution(4, 6),
    "lr": FloatDistribution(1e-3, 0.3, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-3, log=True),
}
GPU = "NVIDIA H100 80GB HBM3"


def _trial(
    batch_size: int,
    value: float | None,
    device: str,
    seconds: tuple[float, float, float, float],
    state: TrialState = TrialState.COMPLETE,
):
    """A trial that held ``device`` for ``seconds`` = (train, eval, idle, all of it)."""
    train, evaluation, idle, held = seconds
    device_time = {"held": held, "idle": idle, "train": train, "eval": evaluation}
    return create_trial(
        state=state,
        value=value,
        params={"log2_batch_size": batch_size.bit_length() - 1, "lr": 0.01, "weight_decay": 1e-4},
        distributions=DISTRIBUTIONS,
        user_attrs={
            "batch_size": batch_size,
            "device": device,
            "train_seconds": train,
            "samples_per_s": 1000.0,
            "device_seconds": device_time,
        },
    )


@pytest.fixture
def two_devices(tiny_study: Path) -> optuna.Study:
    """Three complete trials on the CPU (two at B = 16, one at B = 32), one pruned on the
    CPU, and the study's best on a GPU at B = 32, faster than any CPU trial."""
    study = create_or_load_study(load_spec("tiny"), "sqlite:///hpo.db").study
    study.add_trial(_trial(16, 0.80, "cpu", (3000.0, 400.0, 200.0, 3600.0)))
    study.add_trial(_trial(16, 0.84, "cpu", (3000.0, 400.0, 200.0, 3600.0)))
    study.add_trial(_trial(32, 0.82, "cpu", (1500.0, 200.0, 100.0, 1800.0)))
    study.add_trial(_trial(32, None, "cpu", (600.0, 100.0, 0.0, 900.0), TrialState.PRUNED))
    study.add_trial(_trial(32, 0.95, GPU, (250.0, 50.0, 60.0, 360.0)))
    return study


def test_device_hours_add_up_per_study_device_kind_and_batch_size(two_devices) -> None:
    hours = summarize(two_devices, "val_auc").device
    assert hours.n_trials == 5
    assert hours.hours == pytest.approx((3600 * 2 + 1800 + 900 + 360) / 3600)
    assert hours.by_device == pytest.approx({"cpu": 9900 / 3600, GPU: 0.1})
    assert hours.by_batch_size[16] == pytest.approx({"cpu": 2.0})
    assert hours.by_batch_size[32] == pytest.approx({"cpu": 0.75, GPU: 0.1})
    assert hours.batch_size_hours(32) == pytest.approx(0.85)
    # What the parts do not cover (data preparation, checkpoints) is "other".
    assert hours.by_part["idle"] == pytest.approx(560 / 3600)
    assert hours.by_part["other"] == pytest.approx((900 - 700) / 3600)  # the pruned one


def test_device_seconds_stored_flat_by_older_studies_still_count() -> None:
    flat = create_trial(
        state=TrialState.COMPLETE,
        value=0.8,
        params={"log2_batch_size": 4, "lr": 0.01, "weight_decay": 1e-4},
        distributions=DISTRIBUTIONS,
        user_attrs={
            "batch_size": 16,
            "device": "cpu",
            "device_seconds": 3600.0,
            "device_seconds_train": 1800.0,
            "device_seconds_eval": 720.0,
            "device_seconds_idle": 360.0,
        },
    )
    hours = device_hours(
        [flat, _trial(16, 0.8, "cpu", (1800.0, 720.0, 360.0, 3600.0))], lambda t: 16
    )
    assert hours.n_trials == 2 and hours.hours == pytest.approx(2.0)
    assert hours.by_part == pytest.approx({"train": 1.0, "eval": 0.4, "idle": 0.2, "other": 0.4})


def test_the_cost_view_compares_trials_of_one_device_kind_and_says_so(two_devices) -> None:
    data = collect(two_devices, "val_auc")
    view = data.cost
    assert view is not None and view.device == "cpu" and view.other_devices == 1
    # The GPU trial is the study's best and the fastest, yet not on the CPU's front.
    assert {p.number for p in view.points} == {0, 1, 2}
    assert view.best is not None and view.best.number == 1
    assert view.describe().startswith("Compared on cpu only: 1 complete trials on other")
    markdown = summary_markdown(data)
    assert "device-h" in markdown
    assert hours_sentence(markdown).startswith(
        f"Device-hours: 2.85 over 5 trials ({GPU} 0.1 h, cpu 2.75"
    )


def _probe(study: optuna.Study, device: str, rates: dict[int, float | None]) -> None:
    """The table `hpo probe` stores for ``device``: samples/s per batch size (None: did
    not fit)."""
    rows = [
        {"batch_size": b, "fits": r is not None, "samples_per_s": r, "peak_memory_mib": None}
        for b, r in rates.items()
    ]
    study.set_user_attr(f"hpo_probe:{device}", {"device_name": device, "rows": rows})


def test_probe_rates_on_both_kinds_put_every_trial_in_the_reference_kinds_seconds(
    two_devices,
) -> None:
    _probe(two_devices, "cpu", {16: 100.0, 32: 150.0, 64: None})
    _probe(two_devices, GPU, {16: 800.0, 32: 1500.0, 64: 2500.0})
    view = collect(two_devices, "val_auc").cost
    assert view is not None and view.device == "cpu" and view.other_devices == 0
    factor = view.normalised[GPU]
    assert factor.factor == pytest.approx(9.0) and factor.batch_sizes == (16, 32)  # 8, 10
    gpu = next(p for p in view.points if p.number == 4)
    assert gpu.train_seconds == pytest.approx(250.0 * 9.0)  # what the CPU would have taken
    assert gpu.samples_per_s == pytest.approx(1000.0 / 9.0)
    assert view.best is not None and view.best.number == 4
    sentence = view.describe()
    assert sentence.startswith("Training seconds normalised to cpu by the samples/s")
    assert f"{GPU} × 9 (median over B = 16, 32)" in sentence
    assert "left out" not in sentence
    assert "(evaluation not counted, in cpu seconds)" in summary_markdown(
        collect(two_devices, "val_auc")
    )


def test_without_a_probe_on_every_kind_the_unprobed_kind_stays_out(two_devices) -> None:
    _probe(two_devices, "cpu", {16: 100.0, 32: 150.0})
    _probe(two_devices, "another GPU", {16: 900.0})
    view = collect(two_devices, "val_auc").cost
    assert view is not None and view.normalised == {} and view.other_devices == 1
    assert {p.number for p in view.points} == {0, 1, 2}
    assert view.describe().startswith("Compared on cpu only: 1 complete trials")


def test_malformed_probe_records_are_skipped() -> None:
    rates = probe_rates(
        {
            "hpo_probe:cpu": {"rows": [{"batch_size": 16, "fits": True, "samples_per_s": 50}]},
            "hpo_probe:bad": {"rows": "not rows"},
            "hpo_probe:nan": {"rows": [{"batch_size": 16, "fits": True, "samples_per_s": "x"}]},
            "hpo_probe:odd": [1, 2],
            "hpo_max_batch_size:cpu": 64,
        }
    )
    assert rates == {"cpu": {16: 50.0}}


def hours_sentence(markdown: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith("Device-hours:"))


def test_export_and_status_give_the_studys_device_hours(two_devices) -> None:
    exported = CliRunner().invoke(app, ["export", "--study", "tiny"])
    assert exported.exit_code == 0, exported.output
    cost = json.loads(exported.stdout)["cost"]
    assert cost["device_hours"] == pytest.approx(2.85)
    assert cost["by_device"] == pytest.approx({"cpu": 2.75, GPU: 0.1})

    status = CliRunner().invoke(app, ["status", "--study", "tiny"])
    assert status.exit_code == 0, status.output
    assert "device-h" in status.stdout
    assert f"Device-hours: 2.85 over 5 trials ({GPU} 0.1 h, cpu 2.75 h)" in (
        " ".join(status.stdout.split())
    )


def test_a_worker_trial_records_its_device_time_in_one_write(tiny_study: Path, monkeypatch) -> None:
    url = "sqlite:///hpo.db"
    create_or_load_study(load_spec("tiny"), url)
    written: list[str] = []
    original = ReconnectingRDBStorage.set_trial_user_attr

    def counted(self, trial_id: int, key: str, value) -> None:
        written.append(key)
        original(self, trial_id, key, value)

    batches: list[list[str]] = []
    batched = ReconnectingRDBStorage.set_trial_user_attrs

    def counted_batch(self, trial_id: int, attrs) -> None:
        batches.append(sorted(attrs))
        batched(self, trial_id, attrs)

    monkeypatch.setattr(ReconnectingRDBStorage, "set_trial_user_attr", counted)
    monkeypatch.setattr(ReconnectingRDBStorage, "set_trial_user_attrs", counted_batch)
    run_worker("tiny", url, total_trials=1)
    assert [key for key in written if key.startswith("device_seconds")] == ["device_seconds"]
    # The trial's other attrs in two writes (hpo.storage.attrs): what it runs on, at its
    # start, and its whole record (record_tally), at its end.
    assert sorted(written) == ["batch_size", "device_seconds", "worker"]
    start, record = batches
    assert {"device", "precision", "budget_unit"} <= set(start)
    assert {"val_auc", "train_seconds", "n_updates", "b_simple", "updates_at_report"} <= set(record)
    (trial,) = optuna.load_study(study_name="tiny", storage=url).trials
    attrs = trial.user_attrs
    assert attrs["device"] == "cpu"
    device_time = attrs["device_seconds"]
    assert device_time["train"] == pytest.approx(attrs["train_seconds"])
    assert device_time["eval"] > 0
    assert device_time["idle"] >= 0  # the claim itself: a local SQLite file
    parts = sum(device_time[p] for p in ("train", "eval", "idle"))
    held = device_time["held"] - device_time["idle"]
    assert parts <= device_time["held"]
    assert (
        attrs["wall_time_s"]
        <= held
        <= (trial.datetime_complete - trial.datetime_start).total_seconds()
    )
    exported = CliRunner().invoke(app, ["export", "--study", "tiny"])
    assert json.loads(exported.stdout)["cost"]["by_device"] == pytest.approx(
        {"cpu": device_time["held"] / 3600}, abs=1e-6
    )
