"""More than two classes: ImageFolder with three class directories trains end to end, the
AUC is the macro one-vs-rest AUC, the binary numbers are unchanged, and `hpo status` shows
the per-class counts stored on the study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn
from typer.testing import CliRunner

from hpo.cli import app
from hpo.data import DeviceBatcher, PatchSet, class_counts, load_splits
from hpo.device import select_device
from hpo.report import summarize
from hpo.spec import DatasetSpec, TrainingSpec, describe_metric
from hpo.study import CLASS_COUNTS_ATTR, stored_class_counts
from hpo.train import evaluate
from tests.conftest import tiny_study_text

CLASSES = ("adipose", "stroma", "tumor")
THREE_CLASS_AUC = "val_auc: macro one-vs-rest AUC over 3 classes"


def write_three_class_folder(root: Path, per_class: int = 20, size: int = 16) -> None:
    """Each class a different colour cast, so a small CNN separates them in one epoch."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3))
            pixels[..., label] += 180
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index}.png")


class Fixed(nn.Module):
    """Returns stored logits batch by batch, in the order evaluate asks for them."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.at = logits, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.at : self.at + len(images)]
        self.at += len(images)
        return out


def _evaluate(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    setup = select_device(TrainingSpec(device="cpu", mixed_precision=False, channels_last=False))
    patches = PatchSet(torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8), labels)
    batcher = DeviceBatcher(torch.zeros(3), torch.ones(3), setup.device, channels_last=False)
    return evaluate(Fixed(logits), patches, batcher, setup, batch_size=7)


def test_three_class_auc_is_the_macro_one_vs_rest_auc() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    logits = torch.randn(30, 3, generator=generator) + 1.5 * nn.functional.one_hot(labels, 3)
    loss, accuracy, auc = _evaluate(logits, labels)
    probability = logits.softmax(dim=1)
    assert auc == pytest.approx(roc_auc_score(labels, probability, multi_class="ovr"))
    assert accuracy == pytest.approx(float((probability.argmax(1) == labels).float().mean()))
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, labels)), rel=1e-5)


def test_binary_metrics_are_the_tumour_class_auc_and_threshold_accuracy() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(30) % 2
    logits = torch.randn(30, 2, generator=generator)
    _, accuracy, auc = _evaluate(logits, labels)
    tumour = logits.softmax(dim=1)[:, 1]
    assert auc == float(roc_auc_score(labels, tumour))
    assert accuracy == float(((tumour > 0.5).long() == labels).float().mean())


def test_a_missing_class_is_left_out_of_the_macro_auc() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[3.0, 0, 0], [0, 1, 0], [0, 3, 0], [1, 0, 0]])
    _, _, auc = _evaluate(logits, labels)
    probability = logits.softmax(dim=1)
    expected = (
        roc_auc_score(labels == 0, probability[:, 0])
        + roc_auc_score(labels == 1, probability[:, 1])
    ) / 2
    assert auc == pytest.approx(expected)


def test_class_counts_name_each_class_per_split(tmp_path: Path) -> None:
    write_three_class_folder(tmp_path, per_class=10)
    spec = DatasetSpec(kind="imagefolder", root=tmp_path, val_fraction=0.2, image_size=16)
    counts = class_counts(spec, load_splits(spec))
    assert counts == {"train": dict.fromkeys(CLASSES, 8), "val": dict.fromkeys(CLASSES, 2)}


def test_a_three_class_imagefolder_study_end_to_end(studies_dir: Path, tmp_path: Path) -> None:
    write_three_class_folder(tmp_path / "patches")
    text = (
        tiny_study_text(epochs=1, pruner="none")
        .replace(
            'kind = "synthetic"\ntrain_size = 256\nval_size = 128\nimage_size = 32',
            f'kind = "imagefolder"\nroot = "{tmp_path / "patches"}"\nimage_size = 16\nval_fraction = 0.25',
        )
        .replace(
            "batch_size_min = 16\nbatch_size_max = 64", "batch_size_min = 8\nbatch_size_max = 16"
        )
    )
    assert 'kind = "imagefolder"' in text and "batch_size_min = 8" in text
    (studies_dir / "tiny.toml").write_text(text)
    runner = CliRunner()
    result = runner.invoke(app, ["launch", "--study", "tiny", "--n-trials", "2"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="tiny", storage="sqlite:///hpo.db")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(0.0 <= t.value <= 1.0 for t in complete)
    assert study.user_attrs[CLASS_COUNTS_ATTR] == {
        "train": dict.fromkeys(CLASSES, 15),
        "val": dict.fromkeys(CLASSES, 5),
    }
    status = runner.invoke(app, ["status", "--study", "tiny"])
    assert status.exit_code == 0, status.output
    assert f"maximize {THREE_CLASS_AUC})" in status.output
    assert "patches per class" in status.output
    for name in CLASSES:
        assert any(
            name in line and "15" in line and "5" in line for line in status.output.splitlines()
        )

    # The report and the export say the same, in the same words.
    report = runner.invoke(app, ["report", "--study", "tiny", "--out", "out", "--no-attach"])
    assert report.exit_code == 0, report.output
    summary = (Path("out") / "summary.md").read_text()
    assert f"objective: maximize {THREE_CLASS_AUC}." in summary
    exported = runner.invoke(app, ["export", "--study", "tiny"])
    assert exported.exit_code == 0, exported.output
    configuration = json.loads(exported.stdout)
    assert configuration["metric"] == "val_auc"
    assert configuration["metric_description"] == THREE_CLASS_AUC


def test_the_metric_is_described_past_two_classes_only() -> None:
    assert describe_metric("val_acc", 5) == "val_acc: top-1 accuracy over 5 classes"
    assert describe_metric("val_loss", 3) == "val_loss: cross-entropy over 3 classes"
    assert describe_metric("val_auc", 2) == "val_auc"
    assert describe_metric("objective", 3) == "objective"  # a study from another tool


def test_class_counts_another_tool_stored_are_ignored() -> None:
    study = optuna.create_study()
    study.set_user_attr(CLASS_COUNTS_ATTR, {"train": ["a", "b", "c"]})
    assert stored_class_counts(study) == {}
    assert summarize(study, "val_auc").metric_description == "val_auc"
