"""``slimkit demo``: the whole story on the bundled MNIST-10k, in a few minutes on 2 CPU cores.

Train the classic MLP (784-200-10) and LeNet-5 (or reuse cached checkpoints), compress each with a recipe (default
``fast-cpu``: prune + knowledge distillation + int8 + ONNX export), print before/after tables and write an artifact
with its HTML report per model. Speed-ups are the shipped file's, against the original on its fastest fp32 runtime
(ONNX Runtime fp32 or folded eager) and against PyTorch eager; sizes are the shipped file's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.table import Table

from slimkit import data, models
from slimkit._text import human, make_table
from slimkit.measure import profile
from slimkit.train import Optimizer, TrainConfig, fit

if TYPE_CHECKING:
    from slimkit.pipeline import CompressResult

DEMO_MODELS = {
    "mlp": TrainConfig(epochs=15, lr=0.05, optimizer=Optimizer.SGD, weight_decay=5e-4, batch_size=64),
    "lenet5": TrainConfig(epochs=15, lr=0.05, optimizer=Optimizer.SGD, weight_decay=5e-4, batch_size=64),
}
# speed-up at batch 64 over the original on its fastest fp32 runtime that the demo aims for; short of it, it says why
SPEEDUP_TARGETS = {"lenet5": 1.5}


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
    """Train (or reuse) the MLP and LeNet-5, compress each with ``recipe``, save artifacts and reports.

    The summary compares the file that ships (its size and its speed on its runtime) with the original on its
    fastest fp32 runtime and in PyTorch eager, and fits an 80-column terminal.
    """
    from slimkit.export.artifact import save
    from slimkit.pipeline import compress
    from slimkit.report import write_report

    console = console or Console()
    torch.set_num_threads(2)
    train_data, test_data = data.load("mnist10k")
    # 1,000 of the 8,000 training digits choose epochs and check the budget; the 2,000 test digits only report
    train_data, val_data = data.split(train_data, 0.125)
    rows, results, lines = [], {}, []
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
        summary = demo_summary(name, result)
        results[name] = {**summary, "artifact": str(path), "report": str(html)}
        rows.append(summary["row"])
        lines += summary["lines"]
    console.print(demo_table(recipe, rows))
    console.print(
        "faster: the shipped file on its runtime vs the original on its fastest fp32 runtime (ONNX Runtime fp32 "
        "or folded channels-last eager) at the same batch size; vs eager: vs the original in PyTorch eager; "
        "smaller: the shipped file vs the original exported as fp32 ONNX. 2 threads, side by side."
    )
    for line in lines:
        console.print(line)
    console.print("reports: " + ", ".join(r["report"] for r in results.values()))
    return results


def demo_table(recipe: str, rows: list[list[str]]) -> Table:
    """The closing table: one row per model (``demo_summary(...)["row"]``), at most 80 columns wide."""
    return make_table(
        f"slimkit demo: {recipe!r} on the MNIST-10k test set (2,000 digits)",
        ["model", "test acc %", "ships", "smaller", "faster\nb1", "faster\nb64", "vs eager\nb64"],
        rows,
    )


def demo_summary(name: str, result: CompressResult) -> dict[str, Any]:
    """The demo's row for one model, its explanation lines, and the numbers behind them."""
    b, f = result.baseline, result.final
    speedup = {bs: b["latency_ms"][bs] / ms for bs, ms in f["latency_ms"].items()}
    eager = {bs: b["eager_latency_ms"][bs] / ms for bs, ms in f["latency_ms"].items()}
    shipped = f["shipped_file"]
    before_bytes = b["deployed_bytes"] if shipped.endswith(".onnx") and "deployed_bytes" in b else b["size_bytes"]
    accuracy = f.get("deployed_test_accuracy", f["test_accuracy"])
    big = max(f["latency_ms"], key=int)
    row = [
        name,
        f"{b['test_accuracy']:.2f}→{accuracy:.2f}",
        shipped,
        f"{before_bytes / f['shipped_bytes']:.1f}x",
        *(f"{speedup[bs]:.2f}x" for bs in ("1", "64") if bs in speedup),
        f"{eager[big]:.2f}x",
    ]
    lines = [
        f"{name}: {f['runtime']} ({human(f['shipped_bytes'], 'B')}): {f['latency_ms'][big]:.3g} ms "
        f"at batch {big} vs {b['latency_ms'][big]:.3g} ms on the original's {b['runtime'][big]} "
        f"({b['eager_latency_ms'][big]:.3g} ms in PyTorch eager)"
    ]
    lines += [f"{name}: {note}" for note in result.speed_notes()[1:]]
    target = SPEEDUP_TARGETS.get(name)
    if target is not None and speedup.get("64", 0.0) < target:
        lines.append(
            f"{name}: {speedup['64']:.2f}x at batch 64 vs {b['runtime']['64']} ({f['latency_ms']['64']:.3g} vs "
            f"{b['latency_ms']['64']:.3g} ms), short of {target}x: {_why(result)}"
        )
    return {
        "before": b,
        "after": f,
        "speedup": speedup,
        "speedup_vs_eager": eager,
        "size_ratio": before_bytes / f["shipped_bytes"],
        "row": row,
        "lines": lines,
    }


def _why(result: CompressResult) -> str:
    """What each step did to the deployed model's speed, as measured when it ran."""
    parts = []
    for step in result.steps:
        if step.deployed_ms_before is None or step.deployed_ms is None:
            continue
        if step.status == "skipped":
            parts.append(next((n for n in step.notes if n.startswith(f"{step.kind} skipped:")), f"{step.kind} skipped"))
        else:
            parts.append(
                f"{step.kind} {step.runtime_before} {step.deployed_ms_before:.3g} -> {step.runtime} "
                f"{step.deployed_ms:.3g} ms ({step.deployed_ms_before / step.deployed_ms:.2f}x)"
            )
    return "; ".join(parts) or "no step changed the deployed model"
