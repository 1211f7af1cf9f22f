"""The shipped demo study is designed to show an answer: what can be checked
without training it. Its measured figures (complete trials per batch size, the α interval,
best − median) are in docs/benchmarks.md; benchmarks/answer_quality.py checks it against a
dense grid."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpo.space import first_round
from hpo.spec import load_spec

DEMO = Path(__file__).resolve().parents[1] / "studies" / "demo.toml"


def test_demo_spans_at_least_five_batch_sizes() -> None:
    assert len(load_spec(DEMO).search.batch_sizes) >= 5


def test_demo_trains_on_at_least_32_times_its_largest_batch_size() -> None:
    spec = load_spec(DEMO)
    # 32 updates per epoch at the largest batch size: enough steps for it to be judged.
    assert spec.dataset.train_size >= 32 * spec.search.batch_size_max


def test_demo_runs_the_fair_policy() -> None:
    spec = load_spec(DEMO)
    assert spec.sampler.cover_batch_sizes and spec.pruner.stratify_by_batch_size
    assert spec.pruner.min_trials_per_batch_size >= 2
    batch_sizes = len(spec.search.batch_sizes)
    # The first round brackets the rule's LR at every batch size, and the floor trains both
    # of its trials there to the end: the two complete trials per batch size.
    assert len(first_round(spec)) == 2 * batch_sizes
    assert {p["log2_batch_size"] for p in first_round(spec)} == {
        b.bit_length() - 1 for b in spec.search.batch_sizes
    }
    # ...and the sampler still gets trials of its own: as many as the budget allows once
    # the first round is paid for (4 of them: 0.30 of the dense grid's training in all).
    assert spec.budget.n_trials > len(first_round(spec))


def test_demo_prunes_only_trials_that_cannot_come_near_the_best() -> None:
    """A median at half an epoch pruned the grid's top configs (answer_quality's regret):
    the demo's pruner forecasts a trial's final value and keeps it while it may end
    within the report's 1% of its batch size's best."""
    pruner = load_spec(DEMO).pruner
    assert pruner.kind == "catch_up" and pruner.near_best >= 0.01


@pytest.mark.parametrize("name", ["demo", "histo"])
def test_shipped_first_rounds_try_two_weight_decays_at_every_batch_size(name: str) -> None:
    spec = load_spec(DEMO.with_name(f"{name}.toml"), check_paths=False)  # histo: no PCam here
    assert spec.sampler.cover_batch_sizes and spec.sampler.n_startup_trials == len(
        first_round(spec)
    )  # TPE starts once the round is done
    decays: dict[int, set[float]] = {}
    lrs_at: dict[tuple[int, float], float] = {}
    for params in first_round(spec):
        decays.setdefault(int(params["log2_batch_size"]), set()).add(params["weight_decay"])
        lrs_at[(int(params["log2_batch_size"]), params["weight_decay"])] = params["lr"]
    assert all(len(values) >= 2 for values in decays.values())
    low, high = spec.search.weight_decay_low, spec.search.weight_decay_high
    assert all(low <= wd <= high for values in decays.values() for wd in values)
    # One weight decay in each half of the log range at every batch size, and a Latin
    # square: the lowest LR is paired with the lower half's at some batch sizes and with
    # the upper half's at others.
    middle = (low * high) ** 0.5
    assert all(min(values) < middle < max(values) for values in decays.values())
    lowest_lr_decay = {
        log2: min((lr, wd) for (b, wd), lr in lrs_at.items() if b == log2)[1] for log2 in decays
    }
    assert {wd < middle for wd in lowest_lr_decay.values()} == {True, False}
