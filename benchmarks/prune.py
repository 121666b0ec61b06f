"""Structured pruning: slimkit vs Torch-Pruning 1.6.1 at the same 2x MACs reduction.

Part 1 (speed): ResNet-56, MobileNetV2-CIFAR, VGG-16-CIFAR pruned to 50% of their MACs by both tools (uniform
per-layer ratios, L2 magnitude; Torch-Pruning's ratio is bisected to the same MACs), then params/MACs ratios and
latency of original / slimkit / Torch-Pruning measured side by side in one process (median, 2 threads, batch 1
and 64).
Part 2 (accuracy): LeNet-5 trained on MNIST-10k, pruned to 2x fewer MACs with every slimkit criterion and with
Torch-Pruning, each fine-tuned for 3 epochs with the same settings; accuracy drop from the unpruned model.
Part 3 (sparse): unstructured local/global/2:4 sparsity: packed file size and latency versus dense.

Run: ``flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/prune.py [--only speed|lenet5|sparse]`` (writes
benchmarks/results/prune.{json,md}; a part not run keeps its stored rows).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

import slimkit
from slimkit.measure import benchmark_latency
from slimkit.pruning import PruneConfig, prune
from slimkit.train import TrainConfig, evaluate, fit

OUT = Path(__file__).parent / "results"
AMOUNT = 0.5


def tp_prune(model, x, amount: float, importance=None, ignored=None, finetune_data=None):
    """Torch-Pruning at ``amount`` MACs reduction: bisection on its uniform pruning_ratio."""
    import torch_pruning as tp

    base, _ = tp.utils.count_ops_and_params(model, x)
    classifier = ignored or [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (lo + hi) / 2
        candidate = copy.deepcopy(model)
        imp = importance or tp.importance.GroupMagnitudeImportance(p=2)
        pruner = tp.pruner.MetaPruner(
            candidate,
            x,
            importance=imp,
            pruning_ratio=mid,
            ignored_layers=[
                dict(candidate.named_modules())[n] for n in [k for k, v in model.named_modules() if v in classifier]
            ],
        )
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(candidate, x)
        reduction = 1 - macs / base
        if best is None or abs(reduction - amount) < abs(best[1] - amount):
            best = (candidate, reduction)
        if reduction < amount:
            lo = mid
        else:
            hi = mid
    return best[0].eval()


def speed(names=("resnet56", "mobilenetv2_cifar", "vgg16_cifar")) -> list[dict]:
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = slimkit.models.create(name)
        x = slimkit.models.example_input(name, 1)
        t0 = time.perf_counter()
        ours = prune(model, PruneConfig(amount=AMOUNT, target="macs", importance="l2", allocation="uniform"), x).model
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = tp_prune(model, x, AMOUNT)
        t_tp = time.perf_counter() - t0
        base = slimkit.profile(model, x)
        lat = benchmark_latency(
            {"original": model, "slimkit": ours, "torch-pruning": theirs},
            x,
            batch_sizes=(1, 64),
            threads=2,
            repeats=30,
            max_seconds=25,
        )
        row = {"model": name, "params_before": base.params, "macs_before": base.macs}
        for tool, m in (("slimkit", ours), ("torch-pruning", theirs)):
            prof = slimkit.profile(m, x)
            row[tool] = {
                "params_ratio": base.params / prof.params,
                "macs_ratio": base.macs / prof.macs,
                "speedup_b1": lat["original"][1].median / lat[tool][1].median,
                "speedup_b64": lat["original"][64].median / lat[tool][64].median,
                "ms_b1": lat[tool][1].median * 1e3,
                "ms_b64": lat[tool][64].median * 1e3,
            }
        row["original_ms"] = {"b1": lat["original"][1].median * 1e3, "b64": lat["original"][64].median * 1e3}
        row["slimkit_vs_tp_latency_b64"] = lat["slimkit"][64].median / lat["torch-pruning"][64].median
        row["slimkit_vs_tp_latency_b1"] = lat["slimkit"][1].median / lat["torch-pruning"][1].median
        row["prune_seconds"] = {"slimkit": t_ours, "torch-pruning-bisection": t_tp}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def widths(model) -> list[int]:
    """Output width of every Conv/Linear layer, in order (the allocation each tool chose)."""
    return [
        m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]


def accuracy(epochs: int = 3) -> dict:
    import torch_pruning as tp

    train, test = slimkit.data.load("mnist10k")
    torch.manual_seed(0)
    model = slimkit.models.create("lenet5")
    fit(model, train, test, TrainConfig(epochs=8, lr=2e-3, progress=False))
    baseline = evaluate(model, test).accuracy
    x = slimkit.models.example_input("lenet5", 1)
    finetune = TrainConfig(epochs=epochs, lr=1e-3, progress=False)
    results = {"baseline": baseline, "finetune_epochs": epochs, "widths_before": widths(model), "runs": []}
    for criterion in ("l1", "l2", "fpgm", "bn_scale", "taylor", "random"):
        for allocation in ("uniform", "global"):
            cfg = PruneConfig(amount=AMOUNT, target="macs", importance=criterion, allocation=allocation)
            pruned = prune(model, cfg, x, train_data=train).model
            one_shot, kept = evaluate(pruned, test).accuracy, widths(pruned)
            fit(pruned, train, test, finetune)
            acc = evaluate(pruned, test).accuracy
            results["runs"].append(
                {
                    "tool": "slimkit",
                    "criterion": criterion,
                    "allocation": allocation,
                    "macs_ratio": slimkit.profile(model, x).macs / slimkit.profile(pruned, x).macs,
                    "widths": kept,
                    "one_shot": one_shot,
                    "accuracy": acc,
                    "drop": baseline - acc,
                }
            )
            print(json.dumps(results["runs"][-1]), flush=True)
    for label, imp in (
        ("l2", tp.importance.GroupMagnitudeImportance(p=2)),
        ("l1", tp.importance.GroupMagnitudeImportance(p=1)),
    ):
        pruned = tp_prune(model, x, AMOUNT, importance=imp)
        one_shot, kept = evaluate(pruned, test).accuracy, widths(pruned)
        fit(pruned, train, test, finetune)
        acc = evaluate(pruned, test).accuracy
        results["runs"].append(
            {
                "tool": "torch-pruning",
                "criterion": label,
                "allocation": "uniform",
                "macs_ratio": slimkit.profile(model, x).macs / slimkit.profile(pruned, x).macs,
                "widths": kept,
                "one_shot": one_shot,
                "accuracy": acc,
                "drop": baseline - acc,
            }
        )
        print(json.dumps(results["runs"][-1]), flush=True)
    return results


def sparse(names=("resnet56", "vgg16_cifar")) -> list[dict]:
    """Unstructured sparsity: file size through pack_sparse, and latency (which dense kernels do not reduce)."""
    import tempfile

    from safetensors.torch import save_file

    from slimkit.pruning import SparsityConfig, pack_sparse, sparsify

    rows = []
    for name in names:
        torch.manual_seed(0)
        model = slimkit.models.create(name)
        x = slimkit.models.example_input(name, 1)
        configs = {
            "local 50%": SparsityConfig(amount=0.5, mode="local"),
            "global 90%": SparsityConfig(amount=0.9, mode="global"),
            "2:4": SparsityConfig(mode="n:m", n=2, m=4),
        }
        models = {label: sparsify(model, cfg) for label, cfg in configs.items()}
        # untrained weights on a zero input give denormal activations, which are slow on CPU; flushing them
        # isolates what the zeros in the weights do (nothing, for dense kernels)
        flush = torch.set_flush_denormal(True)
        try:
            lat = benchmark_latency(
                {"dense": model, **{k: r.model for k, r in models.items()}},
                x,
                batch_sizes=(1, 64),
                threads=2,
                repeats=20,
                max_seconds=20,
            )
        finally:
            torch.set_flush_denormal(False)
        with tempfile.TemporaryDirectory() as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{tmp}/dense")
            dense_bytes = Path(f"{tmp}/dense").stat().st_size
            for label, res in models.items():
                save_file(pack_sparse(res.model.state_dict()), f"{tmp}/{label}")
                row = {
                    "model": name,
                    "sparsity": label,
                    "weight_sparsity": res.record["sparsity"],
                    "dense_bytes": dense_bytes,
                    "packed_bytes": Path(f"{tmp}/{label}").stat().st_size,
                    "flush_denormal": flush,
                    "latency_ratio_b1": lat[label][1].median / lat["dense"][1].median,
                    "latency_ratio_b64": lat[label][64].median / lat["dense"][64].median,
                }
                row["size_ratio"] = row["packed_bytes"] / dense_bytes
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(speed_rows, acc, sparse_rows=()) -> str:
    lines = [
        "## Speed: 2x MACs reduction, slimkit vs Torch-Pruning 1.6.1 (2 threads, median)",
        "",
        "| model | tool | params ratio | MACs ratio | speed-up b1 | speed-up b64 | ms b1 | ms b64 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in speed_rows:
        lines.append(
            f"| {r['model']} | original | 1.00 | 1.00 | 1.00 | 1.00 | {r['original_ms']['b1']:.2f} | "
            f"{r['original_ms']['b64']:.1f} |"
        )
        for tool in ("slimkit", "torch-pruning"):
            t = r[tool]
            lines.append(
                f"| {r['model']} | {tool} | {t['params_ratio']:.2f} | {t['macs_ratio']:.2f} | "
                f"{t['speedup_b1']:.2f} | {t['speedup_b64']:.2f} | {t['ms_b1']:.2f} | {t['ms_b64']:.1f} |"
            )
        lines.append(
            f"| {r['model']} | slimkit / TP latency | | | {r['slimkit_vs_tp_latency_b1']:.3f} | "
            f"{r['slimkit_vs_tp_latency_b64']:.3f} | | |"
        )
    if acc:
        lines += [
            "",
            f"## LeNet-5 on MNIST-10k, 2x MACs, {acc['finetune_epochs']} epochs fine-tune "
            f"(baseline {acc['baseline']:.2f}%, widths {acc.get('widths_before')})",
            "",
            "| tool | criterion | allocation | MACs ratio | kept widths | one-shot acc | fine-tuned acc | "
            "drop (points) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in acc["runs"]:
            lines.append(
                f"| {r['tool']} | {r['criterion']} | {r['allocation']} | {r['macs_ratio']:.2f} | "
                f"{r.get('widths', '')} | {r['one_shot']:.2f} | {r['accuracy']:.2f} | {r['drop']:+.2f} |"
            )
    if sparse_rows:
        lines += [
            "",
            "## Unstructured sparsity: packed file size and (unchanged) dense latency, 2 threads",
            "",
            "| model | sparsity | weight zeros | dense file | packed file | size ratio | latency b1 / dense | "
            "latency b64 / dense |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sparse_rows:
            lines.append(
                f"| {r['model']} | {r['sparsity']} | {r['weight_sparsity']:.1%} | "
                f"{r['dense_bytes'] / 1e6:.2f} MB | {r['packed_bytes'] / 1e6:.2f} MB | "
                f"{r['size_ratio']:.3f} | "
                f"{r['latency_ratio_b1']:.2f} | {r['latency_ratio_b64']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        choices=("speed", "lenet5", "sparse"),
        action="append",
        help="run only this part (repeatable); the other part's stored results are kept",
    )
    args = parser.parse_args()
    parts = set(args.only or ("speed", "lenet5", "sparse"))
    torch.set_num_threads(2)
    stored = json.loads((OUT / "prune.json").read_text()) if (OUT / "prune.json").exists() else {}
    speed_rows = speed() if "speed" in parts else stored.get("speed", [])
    acc = accuracy() if "lenet5" in parts else stored.get("accuracy")
    sparse_rows = sparse() if "sparse" in parts else stored.get("sparse", [])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prune.json").write_text(json.dumps({"speed": speed_rows, "accuracy": acc, "sparse": sparse_rows}, indent=1))
    (OUT / "prune.md").write_text(markdown(speed_rows, acc, sparse_rows))
    print(markdown(speed_rows, acc, sparse_rows))


if __name__ == "__main__":
    main()
