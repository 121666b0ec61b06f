"""Grouped convolutions (whole groups removed) and plain q/k/v attention heads: reached MACs/params and latency.

torchvision ResNeXt-50 32x4d and RegNetY-400MF (grouped 3x3 convs in every block) at 32x32, and a timm-style ViT
(fused and separate q/k/v Linears, 6 blocks, dim 192, 6 heads of 32, built in this file) pruned to 30% and 60% MACs
(l2, uniform); latency of original vs pruned side by side in one process (2 threads, median).

    flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/prune_grouped.py

writes benchmarks/results/prune_grouped.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import slimkit
from slimkit.measure import benchmark_latency
from slimkit.pruning import PruneConfig, prune

OUT = Path(__file__).parent / "results"


def _vit():
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "pruning"))
    from test_prune_grouped_heads import Block, TinyViT

    model = TinyViT(dim=192, heads=6)
    model.pos = torch.nn.Parameter(torch.randn(1, 64, 192) * 0.02)
    model.blocks = torch.nn.Sequential(*[Block(192, 6, fused=i % 2 == 0) for i in range(6)])
    return model


def models():
    import torchvision.models as tvm

    return {
        "resnext50_32x4d": (lambda: tvm.resnext50_32x4d(num_classes=10), (3, 32, 32)),
        "regnet_y_400mf": (lambda: tvm.regnet_y_400mf(num_classes=10), (3, 32, 32)),
        "vit_qkv (6x192, 6 heads)": (_vit, (3, 32, 32)),
    }


def run() -> list[dict]:
    rows = []
    for name, (build, shape) in models().items():
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(1, *shape)
        base = slimkit.profile(model, x)
        pruned = {}
        for amount in (0.3, 0.6):
            result = prune(model, PruneConfig(amount=amount, target="macs", importance="l2"), x)
            pruned[amount] = result
        lat = benchmark_latency(
            {"original": model, **{f"{a:.0%}": r.model for a, r in pruned.items()}},
            x,
            batch_sizes=(1, 32),
            threads=2,
            repeats=20,
            max_seconds=20,
        )
        for amount, result in pruned.items():
            prof = slimkit.profile(result.model, x)
            grouped = [m.groups for m in result.model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
            heads = [m.num_heads for m in result.model.modules() if hasattr(m, "num_heads")]
            key = f"{amount:.0%}"
            row = {
                "model": name,
                "target": amount,
                "macs_reduction": 1 - prof.macs / base.macs,
                "params_reduction": 1 - prof.params / base.params,
                "speedup_b1": lat["original"][1].median / lat[key][1].median,
                "speedup_b32": lat["original"][32].median / lat[key][32].median,
                "ms_b1": lat[key][1].median * 1e3,
                "ms_b32": lat[key][32].median * 1e3,
                "original_ms": {"b1": lat["original"][1].median * 1e3, "b32": lat["original"][32].median * 1e3},
                "kept": f"groups {min(grouped)}-{max(grouped)}" if grouped else f"heads {heads}",
                "kept_intact": [k["group"] for k in result.record["kept_intact"]],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows) -> str:
    lines = [
        "| model | target | MACs reduction | params reduction | kept | speed-up b1 | speed-up b32 | ms b1 | ms b32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['target']:.0%} | {r['macs_reduction']:.1%} | {r['params_reduction']:.1%} | "
            f"{r['kept']} | {r['speedup_b1']:.2f} | {r['speedup_b32']:.2f} | {r['ms_b1']:.2f} | "
            f"{r['ms_b32']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(2)
    rows = run()
    OUT.mkdir(exist_ok=True)
    (OUT / "prune_grouped.json").write_text(json.dumps(rows, indent=2))
    (OUT / "prune_grouped.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
