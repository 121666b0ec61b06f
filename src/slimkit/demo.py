"""``slimkit demo``: the whole story on the bundled MNIST-10k, in a few minutes on 2 CPU cores.

Train the classic MLP (784-200-10) and LeNet-5 (or reuse cached checkpoints), compress each with a recipe (default
``fast-cpu``: prune + knowledge distillation + int8 + ONNX export), print before/after tables and write an artifact
with its HTML report per model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from slimkit import data, models
from slimkit._text import make_table
from slimkit.measure import profile
from slimkit.train import Optimizer, TrainConfig, fit

DEMO_MODELS = {
    "mlp": TrainConfig(epochs=15, lr=0.05, optimizer=Optimizer.SGD, weight_decay=5e-4, batch_size=64),
    "lenet5": TrainConfig(epochs=15, lr=0.05, optimizer=Optimizer.SGD, weight_decay=5e-4, batch_size=64),
}


def trained(name: str, cache: Path, train_data, val_data, retrain: bool = False, console: Console | None = None):
    """Train a zoo model on MNIST-10k (best epoch chosen on ``val_data``), or reuse its cached checkpoint."""
    path = cache / f"{name}-mnist10k-{len(train_data)}.safetensors"
    model = models.create(name)
    if path.exists() and not retrain:
        models.load_weights(model, path)
        if console:
            console.print(f"[dim]reusing {path}[/dim]")
    else:
        fit(model, train_data, val_data, DEMO_MODELS[name], checkpoint=path)
    return model.eval()


def run_demo(
    cache: Path, retrain: bool = False, console: Console | None = None, recipe: str = "fast-cpu"
) -> dict[str, dict]:
    """Train (or reuse) the MLP and LeNet-5, compress each with ``recipe``, save artifacts and reports."""
    from slimkit.export.artifact import save
    from slimkit.pipeline import compress
    from slimkit.report import write_report

    console = console or Console()
    torch.set_num_threads(2)
    train_data, test_data = data.load("mnist10k")
    # 1,000 of the 8,000 training digits choose epochs and check the budget; the 2,000 test digits only report
    train_data, val_data = data.split(train_data, 0.125)
    rows, results = [], {}
    for name in DEMO_MODELS:
        console.rule(f"{name} on MNIST-10k")
        model = trained(name, cache, train_data, val_data, retrain, console)
        console.print(profile(model, models.example_input(name)).table(max_layers=12))
        result = compress(
            model,
            recipe,
            train_data,
            val_data,
            test_data=test_data,
            example_input=models.example_input(name),
            console=console,
        )
        console.print(result.table())
        path = save(result, cache / f"{name}.slim")
        html = write_report(path)
        b, f = result.baseline, result.final
        speedup = {bs: b["latency_ms"][bs] / f["latency_ms"][bs] for bs in b["latency_ms"]}
        results[name] = {"before": b, "after": f, "speedup": speedup, "artifact": str(path), "report": str(html)}
        after = f.get("deployed_test_accuracy", f["test_accuracy"])
        rows.append(
            [
                name,
                f"{b['test_accuracy']:.2f}%",
                f"{after:.2f}%",
                f"{after - b['test_accuracy']:+.2f}",
                f"{b['size_bytes'] / f['size_bytes']:.1f}x",
                *(f"{s:.2f}x" for s in speedup.values()),
                str(html),
            ]
        )
    console.print(
        make_table(
            f"slimkit demo: recipe {recipe!r} on the MNIST-10k test set (2,000 digits)",
            ["model", "test acc before", "deployed", "change", "smaller", "faster b1", "faster b64", "report"],
            rows,
        )
    )
    return results
