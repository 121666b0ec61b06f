"""``slimkit demo``: the whole story on the bundled MNIST-10k, in a few minutes on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from slimkit import data, models
from slimkit._text import human, make_table
from slimkit.measure import profile
from slimkit.train import TrainConfig, evaluate, fit

DEMO_MODELS = {
    "mlp": TrainConfig(epochs=15, lr=0.05, optimizer="sgd", weight_decay=5e-4, batch_size=64),
    "lenet5": TrainConfig(epochs=15, lr=0.05, optimizer="sgd", weight_decay=5e-4, batch_size=64),
}


def trained(name: str, cache: Path, train_data, test_data, retrain: bool = False, console: Console | None = None):
    """Train a zoo model on MNIST-10k, or reuse its cached checkpoint."""
    path = cache / f"{name}-mnist10k.safetensors"
    model = models.create(name)
    if path.exists() and not retrain:
        models.load_weights(model, path)
        if console:
            console.print(f"[dim]reusing {path}[/dim]")
    else:
        fit(model, train_data, test_data, DEMO_MODELS[name], checkpoint=path)
    return model.eval()


def run_demo(cache: Path, retrain: bool = False, console: Console | None = None) -> dict[str, dict]:
    console = console or Console()
    torch.set_num_threads(2)
    train_data, test_data = data.load("mnist10k")
    rows, results = [], {}
    for name in DEMO_MODELS:
        console.rule(f"{name} on MNIST-10k")
        model = trained(name, cache, train_data, test_data, retrain, console)
        acc = evaluate(model, test_data).accuracy
        prof = profile(model, models.example_input(name))
        console.print(prof.table(max_layers=12))
        results[name] = {"accuracy": acc, "params": prof.params, "macs": prof.macs, "size_bytes": prof.size_bytes}
        rows.append([name, f"{acc:.2f}%", human(prof.params), human(prof.macs), human(prof.size_bytes, "B")])
    console.print(make_table("slimkit demo: MNIST-10k test set (2,000 digits)",
                             ["model", "accuracy", "params", "MACs", "on disk"], rows))
    return results
