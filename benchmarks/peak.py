"""Percent of peak (issue 11, Deliver 4): how much of this machine's measured multiply-accumulate peak each deployed
form of ResNet-56 reaches at batch 64, original and pruned to 50% of its MACs.

The peak is ``slimkit.measure.machine_peak`` (fp32 FMA and int8 VNNI micro-kernels on every core of the process),
measured before and after the latency runs; the higher of the two is used. Models: ResNet-56 (seeded random
weights: speed does not depend on their values), and ``slimkit.prune(model, PruneConfig(amount=0.5,
target="macs"), x).model`` with the default ``round_to`` and with ``round_to=16`` explicitly (one row when the two
give the same widths) and with ``round_to=1``. Forms: ``slimkit.export.deployed.deployed_forms`` (ONNX Runtime
fp32, BN-folded channels-last eager fp32; ONNX Runtime int8 and oneDNN int8 of ``slimkit.quantize(model,
QuantConfig(), calib)`` with 256 seeded random-normal calibration inputs), timed by ``harness.time_forms`` (3
fresh processes, allocator pinned, 2 threads). GMAC/s = ``slimkit.profile`` MACs at batch 64 / median seconds;
int8 forms are compared with the int8 peak, fp32 forms with the fp32 peak.

Run (about 5 minutes): ``flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/peak.py``; writes
benchmarks/results/peak.{json,md} (``--markdown-only``: rewrite the markdown from the stored JSON).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

import slimkit

OUT = Path(__file__).parent / "results"
NAME = "resnet56"
BATCH = 64
CALIB = 256
GOALS = {"original": 60.0, "pruned": 40.0}  # issue 11: best int8 path, % of the VNNI peak at batch 64


def variants() -> dict[str, int | None]:
    """Label -> the ``round_to`` given to PruneConfig (``"default"``: none given), duplicates of the default
    dropped; ``"original"`` is the unpruned model."""
    chosen: dict[str, int | None] = {}
    seen: dict[tuple[int, ...], str] = {}
    for label, round_to in (("pruned, default round_to", None), ("pruned, round_to=16", 16), ("pruned, round_to=1", 1)):
        model = pruned(round_to)
        key = tuple(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        if key in seen:  # one row, named by both: "pruned, default round_to (= round_to=16)"
            first = seen[key]
            chosen[f"{first} (= {label.split(', ')[1]})"] = chosen.pop(first)
            continue
        seen[key] = label
        chosen[label] = round_to
    return chosen


def original() -> torch.nn.Module:
    torch.manual_seed(0)
    return slimkit.models.create(NAME).eval()


def pruned(round_to: int | None) -> torch.nn.Module:
    x = slimkit.models.example_input(NAME, 1)
    extra = {} if round_to is None else {"round_to": round_to}
    cfg = slimkit.PruneConfig(amount=0.5, target="macs", **extra)
    return slimkit.prune(original(), cfg, x).model.eval()


def build_forms(labels: dict[str, int | None], folder: str, threads: int = 2) -> tuple[dict, torch.Tensor]:
    """Harness build function (runs in each worker): every deployed form of the original and each pruned model."""
    import os

    from slimkit.export.deployed import deployed_forms

    x = slimkit.models.example_input(NAME, 1)
    calib = torch.randn(CALIB, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    models = {"original": original(), **{label: pruned(r) for label, r in labels.items()}}
    forms = {}
    for label, model in models.items():
        out = Path(folder) / f"worker-{os.getpid()}" / label.replace(" ", "_").replace(",", "")
        forms.update({f"{label} | {k}": f for k, f in deployed_forms(model, x, out, threads=threads).items()})
        int8_model = slimkit.quantize(model, slimkit.QuantConfig(), calib).model
        int8 = deployed_forms(int8_model, x, out, calib=calib, threads=threads, batch_size=BATCH)
        forms.update({f"{label} | {k}": f for k, f in int8.items()})
    return forms, x


def main() -> None:
    from harness import time_forms

    from slimkit.measure import machine_peak, percent_of_peak

    before = machine_peak(refresh=True)
    labels = variants()
    x64 = slimkit.models.example_input(NAME, BATCH)
    macs = {"original": slimkit.profile(original(), x64).macs}
    macs.update({label: slimkit.profile(pruned(r), x64).macs for label, r in labels.items()})
    with tempfile.TemporaryDirectory(prefix="slimkit-peak-") as folder:
        results = time_forms("peak:build_forms", {"labels": labels, "folder": folder}, (BATCH,), processes=3)
    after = machine_peak(refresh=True)
    peak = dataclasses.replace(
        before,
        fp32_macs_per_s=max(before.fp32_macs_per_s, after.fp32_macs_per_s),
        int8_macs_per_s=max(before.int8_macs_per_s, after.int8_macs_per_s),
    )
    rows = []
    for name, by_bs in results.items():
        label, form = name.split(" | ")
        kind = "int8" if "int8" in form else "fp32"
        seconds = by_bs[BATCH]["median_ms"] / 1e3
        rows.append(
            {
                "model": label,
                "form": form,
                "kind": kind,
                "macs": macs[label],
                "ms": by_bs[BATCH],
                "gmac_per_s": macs[label] / seconds / 1e9,
                "percent_of_peak": percent_of_peak(macs[label], seconds, kind, peak),
            }
        )
    result = {
        "model": NAME,
        "batch_size": BATCH,
        "peak": peak.to_dict(),
        "peak_before": before.to_dict(),
        "peak_after": after.to_dict(),
        "rows": rows,
        "goals": GOALS,
        "torch": torch.__version__,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "peak.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result)


def write_markdown(result: dict) -> None:
    (OUT / "peak.md").write_text(markdown(result))
    print((OUT / "peak.md").read_text())


def markdown(r: dict) -> str:
    from harness import PINNED, ms_cell

    from slimkit.measure import Peak

    peak, before, after = r["peak"], r["peak_before"], r["peak_after"]
    describe = Peak(**peak).describe()
    lines = [
        f"# Percent of peak: ResNet-56 at batch {r['batch_size']}",
        "",
        f"Measured peak (`slimkit.measure.machine_peak`, higher of the runs before and after the latency runs): "
        f"{describe}. Before: fp32 {before['fp32_macs_per_s'] / 1e9:.0f} / int8 {before['int8_macs_per_s'] / 1e9:.0f}"
        f" GMAC/s; after: fp32 {after['fp32_macs_per_s'] / 1e9:.0f} / int8 {after['int8_macs_per_s'] / 1e9:.0f}"
        " GMAC/s.",
        "",
        "| model | form | GMAC / batch | ms (spread) | GMAC/s | % of peak |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['model']} | {row['form']} | {row['macs'] / 1e9:.2f} | {ms_cell(row['ms'])} | "
            f"{row['gmac_per_s']:.0f} | {row['percent_of_peak']:.1f}% of {row['kind']} |"
        )
    best = {}
    for row in r["rows"]:
        if row["kind"] == "int8":
            group = "original" if row["model"] == "original" else "pruned"
            if row["percent_of_peak"] > best.get(group, {"percent_of_peak": -1})["percent_of_peak"]:
                best[group] = row
    lines += ["", "Issue 11 asks for the best int8 path at batch 64:", ""]
    for group, goal in r["goals"].items():
        if group in best:
            row = best[group]
            verdict = "met" if row["percent_of_peak"] >= goal else "not met"
            lines.append(
                f"- {group} >= {goal:.0f}% of the int8 peak: {row['model']}, {row['form']}, "
                f"{row['percent_of_peak']:.1f}% ({verdict})"
            )
    lines += [
        "",
        "Latency: 3 fresh processes one after another, each timing every form interleaved "
        f"(slimkit.measure.benchmark_latency, 2 threads), allocator pinned (GLIBC_TUNABLES={PINNED}); ms cells are "
        "the median of the process medians and their spread (lowest-highest); GMAC/s and % of peak use the median. "
        f"MACs: `slimkit.profile` at batch {r['batch_size']} (the int8 model does the same MACs as its float "
        f"model). Peak GMAC/s: fp32 {peak['fp32_macs_per_s'] / 1e9:.0f}, int8 {peak['int8_macs_per_s'] / 1e9:.0f}; "
        f"torch {r['torch']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown-only"]:  # rewrite peak.md from the stored peak.json
        write_markdown(json.loads((OUT / "peak.json").read_text()))
    else:
        main()
