"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs: stride 1 in the stem and the second stage.

Inverted residuals: 1x1 expansion -> 3x3 depthwise -> 1x1 linear projection, with a residual add when the shape
is kept. The two strides removed relative to ImageNet keep the final map at 4x4 for 32x32 inputs.
"""

from __future__ import annotations

from torch import nn

from slimkit.models.zoo import register

# (expansion t, output channels c, repeats n, first stride s), as in the paper with CIFAR strides
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        layers = [] if expansion == 1 else [_conv_bn(c_in, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, c_out, 1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2CIFAR(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        c_in = int(32 * width_mult)
        blocks: list[nn.Module] = [_conv_bn(in_channels, c_in, 3, 1)]
        for t, c, n, s in SETTINGS:
            c_out = int(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        last = int(1280 * max(1.0, width_mult))
        blocks.append(_conv_bn(c_in, last, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register("mobilenetv2_cifar", (3, 32, 32), "MobileNetV2 for CIFAR (2.24M params)")
def mobilenetv2_cifar(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> MobileNetV2CIFAR:
    return MobileNetV2CIFAR(num_classes, in_channels, width_mult)
