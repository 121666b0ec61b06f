"""The classic MLP (784-200-10) on MNIST: train, evaluate, profile, save.

Runs offline on the 10,000 real MNIST digits bundled with slimkit:

    python examples/mnist_mlp.py            # ~10 s on 2 CPU cores
"""

import torch

import slimkit
from slimkit.data import split
from slimkit.train import TrainConfig, evaluate, fit

torch.set_num_threads(2)
train, test = slimkit.data.load("mnist10k")
train, val = split(train, 0.1)  # the best epoch is chosen on held-out digits; the test split is only reported
model = slimkit.models.create("mlp")
fit(model, train, val, TrainConfig(epochs=15, lr=0.05, optimizer="sgd", weight_decay=5e-4, batch_size=64))
print(f"test accuracy: {evaluate(model, test).accuracy:.2f}% on {len(test)} digits")
print(slimkit.profile(model, torch.zeros(1, 1, 28, 28)))
slimkit.models.save_weights(model, "mlp-mnist10k.safetensors")
print("weights saved to mlp-mnist10k.safetensors")
