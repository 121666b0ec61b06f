"""AlexNet adapted to 32x32 inputs, trained on CIFAR-10.

With a network, CIFAR-10 is downloaded by torchvision into $SLIMKIT_DATA (default ~/.cache/slimkit/data):

    python examples/cifar10_alexnet.py --epochs 30

Offline, train the same network on the bundled MNIST digits presented as 32x32x3 images:

    python examples/cifar10_alexnet.py --offline --epochs 2
"""

import argparse

import torch

import slimkit
from slimkit.data import DataError
from slimkit.train import TrainConfig, evaluate, fit

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--offline", action="store_true", help="use MNIST-10k as 3x32x32 instead of CIFAR-10")
args = parser.parse_args()

torch.set_num_threads(2)
if args.offline:
    train, test = slimkit.data.load("mnist10k", shape=(3, 32, 32))
else:
    try:
        train, test = slimkit.data.load("cifar10")
    except DataError as exc:
        raise SystemExit(f"{exc}\n\nOffline? Run: python examples/cifar10_alexnet.py --offline") from None

model = slimkit.models.create("alexnet_cifar")
fit(model, train, test, TrainConfig(epochs=args.epochs, lr=0.01, optimizer="sgd", weight_decay=5e-4, batch_size=128))
print(f"test accuracy: {evaluate(model, test).accuracy:.2f}%")
print(slimkit.profile(model, torch.zeros(1, 3, 32, 32)))
