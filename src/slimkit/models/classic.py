"""The classic MNIST models: the seed MLP (784-200-10), LeNet-300-100 and LeNet-5."""

from __future__ import annotations

from itertools import pairwise

from torch import nn

from slimkit.models.zoo import register


def _mlp(widths: list[int], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for w_in, w_out in pairwise(widths):
        layers += [nn.Linear(w_in, w_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


@register("mlp", (1, 28, 28), "the seed MLP 784-200-10 (159,010 params)")
def mlp(hidden: int = 200, num_classes: int = 10, in_features: int = 784) -> nn.Sequential:
    return _mlp([in_features, hidden], num_classes)


@register("lenet300", (1, 28, 28), "LeNet-300-100: 784-300-100-10 (266,610 params)")
def lenet300(num_classes: int = 10, in_features: int = 784) -> nn.Sequential:
    return _mlp([in_features, 300, 100], num_classes)


@register("mlp_wide", (1, 28, 28), "Hinton et al. 2015 KD teacher/student MLPs: 784-H-H-10, H=1200 by default")
def mlp_wide(hidden: int = 1200, depth: int = 2, num_classes: int = 10, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling; 28x28 inputs are padded by 2 in the first conv."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        pad = 2 if image_size == 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = ((image_size + 2 * pad - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register("lenet5", (1, 28, 28), "LeNet-5: conv6-conv16-fc120-fc84-fc10 (61,706 params on 28x28)")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> LeNet5:
    return LeNet5(num_classes, in_channels, image_size)
