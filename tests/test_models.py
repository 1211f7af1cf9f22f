"""Models: every torchvision classification family with its head replaced, the user's own
factory end to end, and the errors (exit 2, one line naming the field)."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn
from torchvision import models as tv
from typer.testing import CliRunner

from hpo.cli import app
from hpo.models import ModelError, build_model, check_model, replace_head, torchvision_model_names
from hpo.spec import ModelSpec
from tests.conftest import tiny_study_text


def _family(name: str) -> str:
    """resnet18, resnet50 → resnet; wide_resnet50_2 → wide; vit_b_16 → vit."""
    return re.match(r"[a-z]+", name).group()


def _num_params(name: str) -> int:
    return tv.get_model_weights(name).DEFAULT.meta["num_params"]


def smallest_of_each_family() -> list[str]:
    """The rule that keeps the sweep fast: of each family, only its model with the fewest
    parameters (from torchvision's weight metadata, so nothing is built to choose)."""
    families: dict[str, list[str]] = {}
    for name in torchvision_model_names():
        families.setdefault(_family(name), []).append(name)
    return sorted(min(names, key=_num_params) for names in families.values())


def test_the_sweep_covers_every_family_with_its_smallest_model() -> None:
    chosen = smallest_of_each_family()
    names = torchvision_model_names()
    assert {_family(name) for name in chosen} == {_family(name) for name in names}
    assert len(chosen) == len({_family(name) for name in names})
    for name in chosen:
        same_family = [other for other in names if _family(other) == _family(name)]
        assert _num_params(name) == min(_num_params(other) for other in same_family)
    assert {"resnet18", "efficientnet_b0", "mobilenet_v3_small", "convnext_tiny"} <= set(chosen)


@pytest.mark.parametrize("name", smallest_of_each_family())
def test_each_torchvision_family_builds_with_a_three_class_head(name: str) -> None:
    # On the meta device: real shapes, no memory and no weight initialization (which is
    # most of the time for the big ones: inception_v3 takes 15 s on a CPU core). RegNet
    # computes its widths from tensors while it is built, so it is built on the CPU.
    size = max(32, *tv.get_model_weights(name).DEFAULT.meta["min_size"])
    device = "cpu" if name.startswith("regnet") else "meta"
    with torch.device(device):
        model = build_model(name, num_classes=3).eval()
        output = model(torch.zeros(1, 3, size, size))
    assert tuple(output.shape) == (1, 3)
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    widths += [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert 1000 not in widths  # no ImageNet head left behind (aux heads included)


def test_replace_head_takes_the_last_thousand_wide_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 1000), nn.ReLU(), nn.Linear(1000, 1000))
    replace_head(model, 5)
    assert (model[0].out_features, model[2].in_features, model[2].out_features) == (1000, 1000, 5)


def test_replace_head_without_a_head_names_the_field() -> None:
    with pytest.raises(ModelError, match=r"^model\.name: Sequential has no Linear"):
        replace_head(nn.Sequential(nn.Linear(4, 4)), 3)


def test_an_unknown_model_name_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"^model\.name: unknown model 'resnet7'"):
        check_model(ModelSpec(name="resnet7"), image_size=32, num_classes=2)


def test_a_model_that_cannot_take_the_patch_size_fails_the_check() -> None:
    with pytest.raises(ModelError, match=r"^model\.name: forward pass on 2×3×32×32 patches failed"):
        check_model(ModelSpec(name="vit_b_16"), image_size=32, num_classes=2)


FACTORY_MODULE = """
import torch
from torch import nn

def tiny(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, num_classes),
    )

def raises(num_classes):
    raise ValueError("depth must be positive")

def not_a_module(num_classes):
    return 42

class _NoWeights(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))[:, :2]

def no_parameters(num_classes):
    return _NoWeights()

def exits(num_classes):
    raise SystemExit(0)

def wrong_width(num_classes):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 7))
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(FACTORY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg.nets"
    for module in ("userpkg", "userpkg.nets"):
        sys.modules.pop(module, None)


def _factory_study(studies_dir: Path, factory: str) -> None:
    text = tiny_study_text(epochs=1, pruner="none").replace(
        'name = "small-cnn"', f'factory = "{factory}"'
    )
    (studies_dir / "tiny.toml").write_text(text)


def test_a_user_factory_trains_one_trial_end_to_end(studies_dir, factory_module) -> None:
    _factory_study(studies_dir, f"{factory_module}:tiny")
    result = CliRunner().invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="tiny", storage="sqlite:///hpo.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
    exported = CliRunner().invoke(app, ["export", "--study", "tiny"])
    assert '"factory": "userpkg.nets:tiny"' in exported.stdout


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("missing", "model.factory: cannot import 'userpkg.nets:missing': AttributeError"),
        ("raises", "model.factory: userpkg.nets:raises(num_classes=2) raised ValueError: depth"),
        ("not_a_module", "returned int, not a torch.nn.Module"),
        ("wrong_width", "model.factory: output for 2 patches is (2, 7), expected (2, 2)"),
        ("no_parameters", "model.factory: the model has no trainable parameters"),
        ("exits", "model.factory: userpkg.nets:exits(num_classes=2) raised SystemExit: 0"),
    ],
)
def test_a_broken_factory_exits_2_naming_the_field(
    studies_dir, factory_module, function, message
) -> None:
    _factory_study(studies_dir, f"{factory_module}:{function}")
    result = CliRunner().invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not Path("hpo.db").exists() or not optuna.get_all_study_names("sqlite:///hpo.db")


def test_an_unimportable_factory_module_exits_2(studies_dir) -> None:
    _factory_study(studies_dir, "no_such_package.nets:tiny")
    result = CliRunner().invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"])
    assert result.exit_code == 2
    assert "model.factory: cannot import 'no_such_package.nets:tiny': ModuleNotFoundError" in (
        result.stderr
    )


def test_a_worker_that_cannot_import_the_factory_exits_2_before_claiming(
    studies_dir, factory_module, monkeypatch
) -> None:
    from hpo.spec import load_spec
    from hpo.study import create_or_load_study

    _factory_study(studies_dir, f"{factory_module}:tiny")
    create_or_load_study(load_spec("tiny"), "sqlite:///hpo.db")  # made where it imports
    for module in ("userpkg", "userpkg.nets"):
        sys.modules.pop(module, None)
    monkeypatch.setattr(
        sys, "path", [p for p in sys.path if not p.startswith(str(studies_dir.parent))]
    )
    result = CliRunner().invoke(app, ["worker", "--study", "tiny", "--storage", "sqlite:///hpo.db"])
    assert result.exit_code == 2, result.output
    assert "model.factory: cannot import 'userpkg.nets:tiny': ModuleNotFoundError" in result.stderr
    assert optuna.load_study(study_name="tiny", storage="sqlite:///hpo.db").trials == []


def test_hpo_probe_measures_a_user_factory(studies_dir, factory_module) -> None:
    _factory_study(studies_dir, f"{factory_module}:tiny")
    result = CliRunner().invoke(
        app, ["probe", "--study", "tiny", "--storage", "sqlite:///hpo.db", "--steps", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "batch-size cap stored for 'cpu': 64" in result.output


@pytest.fixture
def torch_cache(tmp_path: Path) -> Path:
    """An empty torch hub directory for the test (``$TORCH_HOME/hub``), restored after."""
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(before)


def test_pretrained_weights_load_from_torchs_cache(torch_cache: Path) -> None:
    """The file torchvision would download, already in the cache, is what is loaded (no
    network); the ImageNet head is then replaced."""
    saved = tv.resnet18().state_dict()
    torch_cache.mkdir(parents=True)
    file = tv.get_model_weights("resnet18").DEFAULT.url.rsplit("/", 1)[-1]
    torch.save(saved, torch_cache / file)
    model = build_model("resnet18", pretrained=True, num_classes=3)
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])
    assert model.fc.out_features == 3


def test_pretrained_weights_offline_exit_2_naming_the_file(
    studies_dir, torch_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    text = tiny_study_text(epochs=1).replace(
        'name = "small-cnn"', 'name = "resnet18"\npretrained = true'
    )
    (studies_dir / "tiny.toml").write_text(text)
    result = CliRunner().invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "model.pretrained: could not load resnet18 ImageNet weights (resnet18-" in lines[0]
    assert "URLError" in lines[0] and "pretrained = false" in lines[0]
