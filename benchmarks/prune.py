"""Structured pruning: slimkit vs Torch-Pruning 1.6.1 at the same 2x MACs reduction.

Part 1 (speed): ResNet-56, MobileNetV2-CIFAR, VGG-16-CIFAR pruned to 50% of their MACs by slimkit's default
``PruneConfig(amount=0.5, target="macs")``, by ``round_to=1`` and ``round_to=16`` explicitly (whichever the default
is not), by ``target="latency"`` once slimkit has it, and by Torch-Pruning (uniform ratio bisected to the same MACs).
Each model, original and pruned, is timed as it ships: PyTorch eager, eager fp32 (BatchNorm folded, channels-last),
ONNX Runtime fp32, and after ``slimkit.quantize`` (256 seeded random normal calibration inputs) ONNX Runtime int8
and oneDNN int8, at batch 1 and 64, with ``benchmarks/harness.py``: 3 fresh processes one after another, allocator
pinned, median and spread of the process medians, page faults per call. Speed-ups are against the original's
FASTEST fp32 form, and against the original deployed the same way (int8 pruned vs int8 unpruned).
Part 2 (accuracy): LeNet-5 trained on MNIST-10k, pruned to 2x fewer MACs with every slimkit criterion and with
Torch-Pruning, each fine-tuned for 3 epochs with the same settings; accuracy drop from the unpruned model.
Part 3 (sparse): unstructured local/global/2:4 sparsity: packed file size, and latency versus dense timed in this
one process (not a deployment speed claim: dense kernels do the same work on zeros).

Run: ``flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/prune.py [--only speed|lenet5|sparse]
[--models resnet56 ...]`` (writes benchmarks/results/prune.{json,md}; a part or model not run keeps its stored rows).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

import slimkit
from slimkit.errors import SlimkitError
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


VARIANT_FORMS = ("eager", "eager fp32", "onnxruntime fp32", "onnxruntime int8", "onednn int8")
FP32_FORMS = ("eager", "eager fp32", "onnxruntime fp32")
SPEED_MODELS = ("resnet56", "mobilenetv2_cifar", "vgg16_cifar")
CALIB = 256  # random normal calibration inputs, seeded


def slimkit_variants() -> dict[str, PruneConfig]:
    """slimkit's pruning configs to compare: the default, ``round_to=1`` explicitly (and 16 while the default is
    1), and ``target="latency"`` once slimkit has it."""
    from slimkit.pruning.config import Target

    default = PruneConfig(amount=AMOUNT, target="macs")
    shown = "None: 16" if default.round_to is None else default.round_to
    variants = {f"slimkit default (round_to={shown})": default}
    for round_to in (1, 16) if default.round_to == 1 else (1,):
        if default.round_to != round_to:
            variants[f"slimkit round_to={round_to}"] = PruneConfig(amount=AMOUNT, target="macs", round_to=round_to)
    if "latency" in [t.value for t in Target]:
        variants["slimkit target=latency"] = PruneConfig(amount=AMOUNT, target="latency")
    return variants


def calibration_inputs(x: torch.Tensor) -> torch.Tensor:
    return torch.randn(CALIB, *x.shape[1:], generator=torch.Generator().manual_seed(0))


def build_forms(name: str, variants: dict[str, str | None], folder: str, threads: int = 2) -> tuple[dict, torch.Tensor]:
    """Harness build function (runs in each worker): every deployed form of the original and each pruned variant.

    ``variants``: label -> a slimkit artifact folder the parent wrote (exact pruned model), or None for
    Torch-Pruning, which is rebuilt here (deterministic: same seeded original, same bisection).
    """
    import os

    from slimkit.export.deployed import deployed_forms

    torch.manual_seed(0)
    model = slimkit.models.create(name).eval()
    x = slimkit.models.example_input(name, 1)
    calib = calibration_inputs(x)
    models = {"original": model}
    for label, artifact in variants.items():
        models[label] = slimkit.load(artifact) if artifact else tp_prune(model, x, AMOUNT)
    forms = {}
    for label, m in models.items():
        out = Path(folder) / f"worker-{os.getpid()}" / label.replace(" ", "_")
        forms[f"{label} | eager"] = m.eval()
        forms.update({f"{label} | {k}": f for k, f in deployed_forms(m, x, out, threads=threads).items()})
        quantized = slimkit.quantize(m, slimkit.QuantConfig(), calib).model
        int8 = deployed_forms(quantized, x, out, calib=calib, threads=threads, batch_size=64)
        forms.update({f"{label} | {k}": f for k, f in int8.items()})
    return forms, x


def speed(names=SPEED_MODELS, processes: int = 3) -> list[dict]:
    """Prune each model once per config here, then time every form in ``processes`` fresh pinned processes."""
    import tempfile

    from harness import PINNED, speedups, time_forms

    rows = []
    for name in names:
        torch.manual_seed(0)
        model = slimkit.models.create(name).eval()
        x = slimkit.models.example_input(name, 1)
        base = slimkit.profile(model, x)
        with tempfile.TemporaryDirectory(prefix="slimkit-bench-prune-") as folder:
            variants: dict[str, str | None] = {}
            meta = {}
            failed = {}
            for label, cfg in slimkit_variants().items():
                t0 = time.perf_counter()
                try:
                    result = prune(model, cfg, x)
                except SlimkitError as exc:  # a config slimkit refuses here is reported, not timed
                    failed[label] = str(exc)
                    print(f"{name} {label}: {exc}", flush=True)
                    continue
                seconds = time.perf_counter() - t0
                variants[label] = str(slimkit.save(result.model, Path(folder) / label.replace(" ", "_")))
                meta[label] = (result.model, seconds)
            t0 = time.perf_counter()
            meta["torch-pruning"] = (tp_prune(model, x, AMOUNT), time.perf_counter() - t0)
            variants["torch-pruning"] = None
            timed = time_forms(
                "prune:build_forms",
                {"name": name, "variants": variants, "folder": folder},
                (1, 64),
                processes=processes,
            )
        baseline = [f"original | {f}" for f in FP32_FORMS]
        vs_fp32 = {bs: speedups(timed, baseline, bs) for bs in (1, 64)}
        row = {
            "model": name,
            "params_before": base.params,
            "macs_before": base.macs,
            "processes": processes,
            "glibc_tunables": PINNED,
            "baseline_b1": min(baseline, key=lambda f: timed[f][1]["median_ms"]),
            "baseline_b64": min(baseline, key=lambda f: timed[f][64]["median_ms"]),
            "variants": [],
            "failed": failed,
        }
        for label in ["original", *variants]:
            entry = {"variant": label, "forms": {}}
            if label != "original":
                pruned, seconds = meta[label]
                prof = slimkit.profile(pruned, x)
                entry.update(
                    params_ratio=base.params / prof.params,
                    macs_ratio=base.macs / prof.macs,
                    prune_seconds=seconds,
                    widths=widths(pruned),
                )
            for form in VARIANT_FORMS:
                key = f"{label} | {form}"
                if key not in timed:
                    continue
                stats = {str(bs): timed[key][bs] for bs in (1, 64)}
                for bs in (1, 64):
                    same = timed[f"original | {form}"][bs]["median_ms"] if f"original | {form}" in timed else None
                    stats[str(bs)] = dict(
                        stats[str(bs)],
                        vs_fastest_fp32_original=vs_fp32[bs][key],
                        vs_original_same_form=same / timed[key][bs]["median_ms"] if same else None,
                    )
                entry["forms"][form] = stats
            row["variants"].append(entry)
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


def _ms(stats: dict) -> str:
    from harness import ms_cell

    return ms_cell(stats)


def speed_summary(speed_rows) -> list[str]:
    """One row per model and variant at batch 64 (the docs table): fp32 and int8 on each runtime."""
    lines = [
        "| model | variant | MACs ratio | best fp32 form b64 | ms | vs fastest fp32 original | ORT int8 ms b64 | "
        "vs original ORT int8 | oneDNN int8 ms b64 | vs original oneDNN int8 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in speed_rows:
        for v in r.get("variants", []):
            forms = v["forms"]
            best = min((f for f in FP32_FORMS if f in forms), key=lambda f: forms[f]["64"]["median_ms"])
            cells = [
                r["model"],
                v["variant"],
                f"{v.get('macs_ratio', 1.0):.2f}",
                best,
                _ms(forms[best]["64"]),
                f"{forms[best]['64']['vs_fastest_fp32_original']:.2f}x",
            ]
            for form in ("onnxruntime int8", "onednn int8"):
                stats = forms.get(form, {}).get("64")
                cells += [_ms(stats), f"{stats['vs_original_same_form']:.2f}x"] if stats else ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def speed_markdown(speed_rows) -> list[str]:
    from harness import method_note

    if any("variants" not in r for r in speed_rows):
        return ["## Speed", "", "Stored rows are in the format before benchmarks/harness.py: rerun `--only speed`."]
    processes = speed_rows[0]["processes"] if speed_rows else 3
    lines = [
        "## Speed: 2x MACs reduction, slimkit vs Torch-Pruning 1.6.1, on every deployed form",
        "",
        method_note(processes) + " int8: slimkit.quantize(model, QuantConfig(), 256 seeded random normal inputs), "
        "deployed on ONNX Runtime (QDQ) and PyTorch oneDNN. 'vs original, same form' compares with the original "
        "model deployed the same way (e.g. pruned int8 vs unpruned int8 on ONNX Runtime).",
        "",
        "### Batch 64 summary",
        "",
        *speed_summary(speed_rows),
    ]
    for r in speed_rows:
        lines += [
            "",
            f"### {r['model']} (fastest fp32 original: {r['baseline_b1']} at b1, {r['baseline_b64']} at b64)",
            "",
            "| variant | MACs ratio | form | ms b1 | ms b64 | vs fastest fp32 original b1 | b64 | "
            "vs original, same form b1 | b64 | page faults / call |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for v in r["variants"]:
            for form, stats in v["forms"].items():
                same = [stats[b]["vs_original_same_form"] for b in ("1", "64")]
                faults = max(stats[b]["page_faults_per_call"] for b in ("1", "64"))
                lines.append(
                    f"| {v['variant']} | {v.get('macs_ratio', 1.0):.2f} | {form} | {_ms(stats['1'])} | "
                    f"{_ms(stats['64'])} | {stats['1']['vs_fastest_fp32_original']:.2f}x | "
                    f"{stats['64']['vs_fastest_fp32_original']:.2f}x | "
                    + " | ".join(f"{x:.2f}x" if x else "-" for x in same)
                    + f" | {faults:.0f} |"
                )
        for label, error in r.get("failed", {}).items():
            lines.append(f"| {label} | | not built: {error} | | | | | | | |")
    return lines


def markdown(speed_rows, acc, sparse_rows=()) -> str:
    lines = speed_markdown(speed_rows) if speed_rows else []
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
            "Latency here is timed in this one process (slimkit.measure.benchmark_latency, interleaved), not with the "
            "deployment harness above: the point is only that dense kernels do not get faster on zeros.",
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
    parser.add_argument(
        "--models",
        nargs="+",
        choices=SPEED_MODELS,
        default=SPEED_MODELS,
        help="speed part: time only these models; the others' stored rows are kept",
    )
    parser.add_argument("--processes", type=int, default=3, help="speed part: fresh processes per model")
    args = parser.parse_args()
    parts = set(args.only or ("speed", "lenet5", "sparse"))
    torch.set_num_threads(2)
    stored = json.loads((OUT / "prune.json").read_text()) if (OUT / "prune.json").exists() else {}
    speed_rows = stored.get("speed", [])
    if "speed" in parts:
        fresh = {r["model"]: r for r in speed(tuple(args.models), processes=args.processes)}
        kept = [r for r in speed_rows if "variants" in r and r["model"] not in fresh]
        speed_rows = sorted([*kept, *fresh.values()], key=lambda r: SPEED_MODELS.index(r["model"]))
    acc = accuracy() if "lenet5" in parts else stored.get("accuracy")
    sparse_rows = sparse() if "sparse" in parts else stored.get("sparse", [])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prune.json").write_text(json.dumps({"speed": speed_rows, "accuracy": acc, "sparse": sparse_rows}, indent=1))
    (OUT / "prune.md").write_text(markdown(speed_rows, acc, sparse_rows))
    print(markdown(speed_rows, acc, sparse_rows))


if __name__ == "__main__":
    main()
