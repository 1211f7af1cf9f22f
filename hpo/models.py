"""Models by name or by the user's factory, with the classifier head sized for the data.

``model.name`` is ``small-cnn`` (a CPU demo) or any classification model torchvision lists
(``torchvision.models.list_models(module=torchvision.models)``: resnet18, vgg16,
efficientnet_b0, convnext_tiny, vit_b_16, …). VGG-16 is the model of the batch-size study on
PCam that motivated this tool (Kandel & Castelli, 2020). ``model.factory =
"package.module:function"`` is the user's own CNN, called as ``function(num_classes=N)``.
``check_model`` builds the model once and runs one tiny CPU forward pass, so a bad name, a
factory that cannot be imported, or a model that cannot take the study's patch size fails
before a study is created or a trial is claimed. Nothing here knows about Optuna.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from hpo.errors import UserError
from hpo.trust import check_trusted

if TYPE_CHECKING:
    from hpo.spec import ModelSpec

SMALL_CNN = "small-cnn"
# Torchvision's classifiers come with ImageNet's 1000 categories; their head is replaced.
IMAGENET_CLASSES = 1000
# These two return (logits, aux logits) in train mode unless built without the aux heads.
AUX_LOGITS_MODELS = ("googlenet", "inception_v3")


class ModelError(UserError):
    """A model that cannot be built (unknown name, factory that fails, weights not available)."""


class SmallCNN(nn.Module):
    """Three conv blocks (16-32-64 channels) and a linear head: ~25 MMAC per 96×96 patch,
    enough to learn nucleus density and shape, small enough for a CPU demo."""

    def __init__(self, num_classes: int = 2, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, 2 * width, 4 * width):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def torchvision_model_names() -> list[str]:
    """Every classification model torchvision lists (not detection, segmentation, video)."""
    from torchvision import models

    return list(models.list_models(module=models))


def model_names() -> list[str]:
    return [SMALL_CNN, *torchvision_model_names()]


def replace_head(model: nn.Module, num_classes: int, old_classes: int = IMAGENET_CLASSES) -> None:
    """Replace the classifier head in place: the last layer producing ``old_classes``
    outputs, a Linear layer or (SqueezeNet) a 1×1 convolution, by a fresh one producing
    ``num_classes``. Raises ModelError when there is no such layer."""
    found = None
    for name, module in model.named_modules():
        width = getattr(module, "out_features", getattr(module, "out_channels", None))
        if isinstance(module, nn.Linear | nn.Conv2d) and width == old_classes:
            found = name
    if found is None:
        raise ModelError(
            f"model.name: {type(model).__name__} has no Linear or Conv2d layer with "
            f"{old_classes} outputs to replace by a {num_classes}-class head"
        )
    parent_name, _, attribute = found.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attribute)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding)
    setattr(parent, attribute, new)


def _torchvision_model(name: str, *, pretrained: bool, num_classes: int) -> nn.Module:
    from torchvision import models

    if name not in torchvision_model_names():
        raise ModelError(
            f"model.name: unknown model {name!r}; allowed: {SMALL_CNN!r} or a classification "
            "model of torchvision.models.list_models() (e.g. resnet18, efficientnet_b0)"
        )
    extra = {"aux_logits": False} if name in AUX_LOGITS_MODELS else {}
    if extra and not pretrained:
        extra["init_weights"] = True
    try:
        model = models.get_model(name, weights="DEFAULT" if pretrained else None, **extra)
    except Exception as error:  # urllib/HTTP/OS errors differ by platform; all mean the same
        if not pretrained:
            raise
        weights = models.get_model_weights(name).DEFAULT
        raise ModelError(
            f"model.pretrained: could not load {name} ImageNet weights "
            f"({weights.url.rsplit('/', 1)[-1]}) into torch's cache ($TORCH_HOME/hub/"
            f"checkpoints): {type(error).__name__}. Put the file there or set "
            "pretrained = false."
        ) from None
    replace_head(model, num_classes)
    return model


def import_factory(path: str):  # noqa: ANN201 - any callable
    """The function named by ``package.module:function``; ModelError naming the field."""
    module_name, _, function_name = path.partition(":")
    check_trusted(module_name, "model.factory")  # a study row must not run code by itself
    try:
        module = importlib.import_module(module_name)
        return getattr(module, function_name)
    except (Exception, SystemExit) as error:  # sys.exit() at import is no clean exit of hpo
        raise ModelError(
            f"model.factory: cannot import {path!r}: {type(error).__name__}: {error}"
        ) from None


def build_model(
    name: str | None = None,
    *,
    pretrained: bool = False,
    num_classes: int = 2,
    factory: str | None = None,
) -> nn.Module:
    """A fresh model with a ``num_classes`` head; ``pretrained`` loads ImageNet weights from
    torch's cache.

    Raises ModelError for an unknown name, a factory that cannot be imported or returns no
    ``nn.Module``, and pretrained weights that are not in the cache and cannot be downloaded
    (e.g. a GPU node without internet access).
    """
    if factory is not None:
        try:
            model = import_factory(factory)(num_classes=num_classes)
        except ModelError:
            raise
        except (Exception, SystemExit) as error:
            raise ModelError(
                f"model.factory: {factory}(num_classes={num_classes}) raised "
                f"{type(error).__name__}: {error}"
            ) from None
        if not isinstance(model, nn.Module):
            raise ModelError(
                f"model.factory: {factory}(num_classes={num_classes}) returned "
                f"{type(model).__name__}, not a torch.nn.Module"
            )
        return model
    if name == SMALL_CNN:
        if pretrained:
            raise ModelError("model.pretrained: small-cnn has no pretrained weights")
        return SmallCNN(num_classes)
    return _torchvision_model(str(name), pretrained=pretrained, num_classes=num_classes)


def build_from_spec(model: ModelSpec, *, num_classes: int) -> nn.Module:
    return build_model(
        model.name, pretrained=model.pretrained, num_classes=num_classes, factory=model.factory
    )


def check_model(model: ModelSpec, *, image_size: int, num_classes: int) -> None:
    """Build the model and run one forward pass of two ``image_size`` patches on the CPU in
    eval mode; ModelError naming the field (``model.name`` or ``model.factory``) unless the
    output is a (2, num_classes) tensor. The commands that train call this once, before a
    study is created or a trial claimed; commands that only read a study never do."""
    field = "model.factory" if model.factory is not None else "model.name"
    built = build_from_spec(model, num_classes=num_classes)
    if not any(parameter.requires_grad for parameter in built.parameters()):
        raise ModelError(f"{field}: the model has no trainable parameters; nothing to optimize")
    built.eval()
    try:
        with torch.inference_mode():
            output = built(torch.zeros(2, 3, image_size, image_size))
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else ""
        raise ModelError(
            f"{field}: forward pass on 2×3×{image_size}×{image_size} patches failed: "
            f"{type(error).__name__}: {message}"
        ) from None
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (2, num_classes):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelError(
            f"{field}: output for 2 patches is {shape}, expected (2, {num_classes}) logits"
        )
