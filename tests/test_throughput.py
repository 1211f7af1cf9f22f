"""What keeps a trial near the compute limit (issue 13): metrics computed without slow
imports, and the generalization-gap pass that stays a faithful train − val measure."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from hpo.train import binary_auc


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
