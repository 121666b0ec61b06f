"""Why slimkit's int8 PTQ and ONNX Runtime's ``quantize_static`` differ: tensor-by-tensor scales, the set of
quantized tensors, and fidelity to the fp32 model on digits no model trained on (accuracy only, no latency).

Both sides use the models and the first calibration draw of benchmarks/quantize.py (16 x 64 training digits;
ORT: QDQ, per-channel int8 weights, uint8 activations, MinMax). slimkit variants: the default (bias correction on),
``bias_correction=False`` and AdaRound (as in benchmarks/quantize.py). Fidelity is measured on the 2,000 test digits
and on the 1,000 held-out training digits no model trained on (they only chose the best fp32 epoch).

Run: ``flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/quantize_vs_ort.py`` (trains or reuses the
checkpoints of benchmarks/quantize.py; writes benchmarks/results/quantize_vs_ort.{json,md}; about 3 minutes cached).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from quantize import THREADS, calibration_draws, logits, mnist_model, ort_static  # benchmarks/quantize.py

from slimkit.export.onnx import export_onnx
from slimkit.export.runtime import OrtModel
from slimkit.quantization import QuantConfig, quantize

OUT = Path(__file__).parent / "results"
VARIANTS = {
    "slimkit int8 PTQ (default)": {},
    "slimkit int8 PTQ, bias_correction=False": {"bias_correction": False},
    "slimkit int8 PTQ + AdaRound": {"adaround": True, "adaround_iters": 300},
}
ORT = "ORT quantize_static"


def qdq_tensors(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Activation tensor name -> (scale, zero point) of every ``QuantizeLinear`` in an ONNX file."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return {n.input[0]: (values[n.input[1]], values[n.input[2]]) for n in graph.node if n.op_type == "QuantizeLinear"}


def weight_codes(path: Path) -> dict[str, np.ndarray]:
    """Conv / Gemm node name -> its int8 weight codes (the initializer behind the weight's ``DequantizeLinear``)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dq = {
        n.output[0]: values[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in values and values[n.input[0]].dtype == np.int8
    }
    return {n.name: dq[n.input[1]] for n in graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in dq}


def compare_scales(ours: Path, theirs: Path) -> dict:
    a, b = qdq_tensors(ours), qdq_tensors(theirs)
    shared = sorted(set(a) & set(b))
    rel = [abs(float(a[t][0]) / float(b[t][0]) - 1) for t in shared]
    wa, wb = weight_codes(ours), weight_codes(theirs)
    return {
        "shared": len(shared),
        "max_rel_scale_diff": max(rel),
        "median_rel_scale_diff": float(np.median(rel)),
        "zero_points_equal": sum(int(a[t][1]) == int(b[t][1]) for t in shared),
        "only_ort": sorted(set(b) - set(a)),
        "only_slimkit": sorted(set(a) - set(b)),
        "weight_tensors": len(wa),
        "weight_codes_equal": wa.keys() == wb.keys()
        and all(wa[k].shape == wb[k].shape and (wa[k] == wb[k]).all() for k in wa),
    }


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b vs c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def fidelity(runtimes: dict, xs: torch.Tensor, ys: torch.Tensor, ref: torch.Tensor) -> dict:
    out, right = {}, {}
    for label, model in runtimes.items():
        out_logits = logits(model, xs)
        pred = out_logits.argmax(1)
        right[label] = pred == ys
        out[label] = {
            "accuracy": 100 * right[label].float().mean().item(),
            "agree_fp32": 100 * (pred == ref.argmax(1)).float().mean().item(),
            "logit_mse": ((out_logits - ref) ** 2).mean().item(),
        }
    for label in VARIANTS:
        wins, losses = int((right[label] & ~right[ORT]).sum()), int((~right[label] & right[ORT]).sum())
        out[label].update(wins_vs_ort=wins, losses_vs_ort=losses, mcnemar_p=mcnemar_p(wins, losses))
    return out


def run_model(name: str, folder: Path) -> dict:
    model, train, val, test = mnist_model(name)
    calib = list(calibration_draws(train, 1)[0].split(QuantConfig().batch_size))
    x1 = torch.zeros(1, *test[0][0].shape)
    fp32 = export_onnx(model, x1, folder / f"{name}-fp32.onnx")
    paths = {ORT: ort_static(fp32, folder / f"{name}-ort.onnx", calib)}
    for i, (label, kw) in enumerate(VARIANTS.items()):
        q = quantize(model, QuantConfig(**kw), torch.cat(calib)).model
        paths[label] = export_onnx(q, x1, folder / f"{name}-slimkit{i}.onnx")
    runtimes = {label: OrtModel(path, THREADS) for label, path in paths.items()}
    sets = {
        split: (torch.stack([x for x, _ in digits]), torch.tensor([int(y) for _, y in digits]))
        for split, digits in (("test", test), ("held-out 1,000", val))
    }
    result = {"scales": compare_scales(paths[next(iter(VARIANTS))], paths[ORT])}
    for split, (xs, ys) in sets.items():
        result[split] = fidelity(runtimes, xs, ys, logits(model, xs))
        result[split]["fp32"] = {"accuracy": 100 * (logits(model, xs).argmax(1) == ys).float().mean().item()}
    return result


def short(names: list[str]) -> str:
    return (
        "-"
        if not names
        else f"{len(names)}: " + ", ".join(f"`{n}`" for n in names[:2]) + (", ..." if len(names) > 2 else "")
    )


def markdown(results: dict) -> str:
    lines = [
        "# slimkit int8 PTQ vs ONNX Runtime quantize_static (accuracy and fidelity only)",
        "",
        "Reproduce: `flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/quantize_vs_ort.py`",
        "",
        "## Scales and quantized tensors (slimkit default vs quantize_static)",
        "",
        "| model | shared QDQ tensors | max / median rel. scale diff | equal zero points | int8 weights identical "
        "| only ORT quantizes | only slimkit quantizes |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for name, res in results.items():
        s = res["scales"]
        lines.append(
            f"| {name} | {s['shared']} | {100 * s['max_rel_scale_diff']:.2f} % / "
            f"{100 * s['median_rel_scale_diff']:.2f} % | {s['zero_points_equal']} | "
            f"{'yes' if s['weight_codes_equal'] else 'no'} ({s['weight_tensors']}) | "
            f"{short(s['only_ort'])} | {short(s['only_slimkit'])} |"
        )
    lines += [
        "",
        "## Accuracy and fidelity to fp32 on ONNX Runtime",
        "",
        "agree = top-1 agreement with the fp32 model; MSE = mean squared logit error vs fp32; wins / losses = "
        "digits slimkit gets right and ORT wrong / the reverse (exact McNemar p).",
        "",
        "| model | digits | variant | accuracy | agree fp32 | logit MSE | wins / losses vs ORT | p |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        for split in [k for k in res if k != "scales"]:
            for label, row in res[split].items():
                if label == "fp32":
                    lines.append(f"| {name} | {split} | fp32 | {row['accuracy']:.2f} | | | | |")
                    continue
                wl = f"{row['wins_vs_ort']} / {row['losses_vs_ort']}" if "wins_vs_ort" in row else ""
                p = f"{row['mcnemar_p']:.2f}" if "mcnemar_p" in row else ""
                lines.append(
                    f"| {name} | {split} | {label} | {row['accuracy']:.2f} | {row['agree_fp32']:.2f} | "
                    f"{row['logit_mse']:.5f} | {wl} | {p} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(THREADS)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_model(name, Path(tmp)) for name in ("lenet5", "resnet20", "resnet56")}
    (OUT / "quantize_vs_ort.json").write_text(json.dumps(results, indent=2))
    (OUT / "quantize_vs_ort.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
