"""AlexNet adapted to 32x32 inputs, trained on CIFAR-10.

With a network, CIFAR-10 is downloaded by torchvision into $SLIMKIT_DATA (default ~/.cache/slimkit/data):

    python examples/cifar10_alexnet.py --epochs 30

Offline, train the same network on the bundled MNIST digits presented as 32x32x3 images (about a minute on 2 cores;
96-97% test accuracy, checked in CI):

    python examples/cifar10_alexnet.py --offline --epochs 2

Adam at 1e-3 with a cosine schedule; the best epoch is chosen on 10% of the training split held out, and the test
split is only reported.
"""

import argparse

import torch

import slimkit
from slimkit.data import DataError, split
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

train, val = split(train, 0.1)
torch.manual_seed(0)
model = slimkit.models.create("alexnet_cifar")
fit(model, train, val, TrainConfig(epochs=args.epochs, lr=1e-3, optimizer="adam", batch_size=64))
print(f"test accuracy: {evaluate(model, test).accuracy:.2f}%")
print(slimkit.profile(model, torch.zeros(1, 3, 32, 32)))
