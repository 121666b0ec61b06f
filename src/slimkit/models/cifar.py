"""CIFAR-sized (32x32) plain CNNs: AlexNet adapted to 32x32 inputs, and VGG-11/16 with batch norm.

Why AlexNet needs adapting: the ImageNet layout opens with an 11x11 stride-4 convolution and three stride-2
max-pools, then a classifier over 256x6x6 features. On a 32x32 image the first layer alone leaves an 8x8 map and
the pools shrink it to nothing, so the 256*6*6 classifier cannot even be applied. ``alexnet_cifar`` keeps the
five-conv / three-FC topology and channel widths (64-192-384-256-256) but uses a 5x5 stride-1 first layer,
one 2x2 pool after conv1, conv2 and conv5 (32 -> 16 -> 8 -> 4), and a 256*4*4 -> 1024 -> 1024 -> 10 classifier
with dropout (the 4096-wide ImageNet head would be 16.8M parameters for 10 classes).
"""

from __future__ import annotations

from torch import nn

from slimkit.models.zoo import register


class AlexNetCIFAR(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, fc_width: int = 1024, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(256 * 4 * 4, fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_width, fc_width),
            nn.ReLU(inplace=True),
            nn.Linear(fc_width, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register("alexnet_cifar", (3, 32, 32), "AlexNet adapted to 32x32 inputs (5 conv + 3 FC, 7.7M params)")
def alexnet_cifar(num_classes: int = 10, in_channels: int = 3, fc_width: int = 1024, dropout: float = 0.5):
    return AlexNetCIFAR(num_classes, in_channels, fc_width, dropout)


VGG_LAYOUTS: dict[int, list[int | str]] = {  # channel counts, 'M' for a 2x2 max-pool
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG with batch norm for 32x32 inputs: five pools bring 32x32 to 1x1, then one Linear(512, classes)."""

    def __init__(self, depth: int = 16, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG_LAYOUTS[depth]:
            if isinstance(item, str):  # "M"
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(channels, item, 3, padding=1, bias=False),
                    nn.BatchNorm2d(item),
                    nn.ReLU(inplace=True),
                ]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@register("vgg11_cifar", (3, 32, 32), "VGG-11 with BN for CIFAR (9.2M params)")
def vgg11_cifar(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(11, num_classes, in_channels)


@register("vgg16_cifar", (3, 32, 32), "VGG-16 with BN for CIFAR (14.7M params, 313M MACs)")
def vgg16_cifar(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(16, num_classes, in_channels)
