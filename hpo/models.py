"""CNNs by name: a small CNN for CPU demos, ResNet-18 and VGG-16 from torchvision.

VGG-16 is the model of the batch-size study on PCam that motivated this tool (Kandel &
Castelli, 2020); ResNet-18 trains the same task faster and with BatchNorm, which makes
its best LR less sensitive to batch size. Nothing here knows about Optuna.
"""

from __future__ import annotations

import torch
from torch import nn

from hpo.errors import UserError

MODEL_NAMES = ("small-cnn", "resnet18", "vgg16")


class ModelError(UserError):
    """A model that cannot be built (unknown name, pretrained weights not available)."""


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


def build_model(name: str, *, pretrained: bool = False, num_classes: int = 2) -> nn.Module:
    """A fresh model; ``pretrained`` loads ImageNet weights from torch's cache.

    Raises ModelError for an unknown name or when pretrained weights are not in the cache
    and cannot be downloaded (e.g. a GPU node without internet access).
    """
    if name == "small-cnn":
        if pretrained:
            raise ModelError("model.pretrained: small-cnn has no pretrained weights")
        return SmallCNN(num_classes)
    if name not in MODEL_NAMES:
        raise ModelError(f"model.name: unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")

    from torchvision import models

    builder = {"resnet18": models.resnet18, "vgg16": models.vgg16}[name]
    if not pretrained:
        return builder(num_classes=num_classes)
    try:
        model = builder(weights="DEFAULT")
    except Exception as error:  # urllib/HTTP/OS errors differ by platform; all mean the same
        weights = models.get_model_weights(name.replace("-", "_")).DEFAULT
        raise ModelError(
            f"model.pretrained: could not load {name} ImageNet weights "
            f"({weights.url.rsplit('/', 1)[-1]}) into torch's cache ($TORCH_HOME/hub/"
            f"checkpoints): {type(error).__name__}. Put the file there or set "
            "pretrained = false."
        ) from None
    if name == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return model
