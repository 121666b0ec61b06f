"""Dynamic int8 for sequence models on MNIST-10k: an LSTM reading each digit row by row and a small vision
transformer (``nn.TransformerEncoder``, 4 blocks of ``nn.MultiheadAttention``).

slimkit's ``method="dynamic"`` rebuilds the LSTM gates and the attention projections as Linear layers with int8
per-channel weights and per-call activation ranges; ``export_onnx`` writes them as ``DynamicQuantizeLinear ->
MatMulInteger`` from slimkit's own codes. Side by side in one run: PyTorch fp32 eager, ONNX Runtime fp32, slimkit's
int8 on ONNX Runtime, ONNX Runtime's own ``quantize_dynamic`` on the fp32 export (per-channel int8 weights), and
PyTorch's dynamic int8 kernels (``torch.ao`` ``quantize_dynamic``: LSTM and Linear). Models train on 7,000 digits
(best epoch on 1,000 held out); accuracy on the 2,000 test digits; latency at batch 1 and 64 with
``benchmarks/harness.py`` (3 fresh processes one after another, allocator pinned, 2 threads, every form interleaved;
median and spread of the process medians, page faults per call), speed-ups against the fastest fp32 form (PyTorch
eager, slimkit's deployed eager form, ONNX Runtime fp32); file size: packed safetensors vs fp32 safetensors.

Run: ``flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/quantize_dynamic.py [--models lstm_rows vit_tiny]
[--train-only]`` (writes benchmarks/results/quantize_dynamic.{json,md}; a model not run keeps its stored results; about
5 minutes with the checkpoints cached; ``--train-only`` first caches them, several minutes for the transformer on a
busy machine; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from quantize import file_bytes, packed_bytes, run_models  # benchmarks/quantize.py

from slimkit import data, models
from slimkit.export.onnx import export_onnx
from slimkit.export.runtime import OrtModel, parity
from slimkit.quantization import QuantConfig, quantize
from slimkit.train import TrainConfig, evaluate, fit

OUT = Path(__file__).parent / "results"
CACHE = Path(__file__).resolve().parent.parent / ".slimkit-cache"  # harness workers run in benchmarks/
QUICK = "--quick" in sys.argv
THREADS = 2
PROCESSES = 1 if QUICK else 3
FP32_FORMS = ("torch fp32", "torch fp32 (slimkit deployed eager)", "ort fp32")
MODELS = {
    "lstm_rows": ("slimkit.models.sequence:lstm_rows", TrainConfig(epochs=8, lr=1e-2, batch_size=64)),
    "vit_tiny": ("slimkit.models.sequence:vit_tiny", TrainConfig(epochs=15, lr=2e-3, weight_decay=0.0, batch_size=64)),
}


def trained(name: str, train, val):
    spec, cfg = MODELS[name]
    path = CACHE / f"{name}-mnist10k-{len(train)}.safetensors"
    model = models.create(spec)
    if path.exists():
        models.load_weights(model, path)
    else:
        fit(model, train, val, TrainConfig(**{**cfg.to_dict(), "epochs": 1 if QUICK else cfg.epochs}), checkpoint=path)
    return model.eval()


def ort_dynamic(fp32_onnx: Path, out: Path) -> Path:
    """ONNX Runtime's own dynamic quantization of the fp32 export (per-channel int8 weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_onnx), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out


def without_fastpath(model):
    """``model`` called with PyTorch's fused transformer fast path off: it reads ``linear1.weight`` as a tensor, which
    torch.ao's dynamic int8 Linear turns into a method."""

    def call(x: torch.Tensor):
        before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return model(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(before)

    return call


def torch_dynamic(model):
    """PyTorch's own dynamic int8 kernels (torch.ao: LSTM and Linear) on a copy of ``model``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.LSTM, torch.nn.Linear}, dtype=torch.qint8
        )


def exports(name: str, model, folder: Path):
    """slimkit's dynamic int8 model and the three ONNX files: fp32, slimkit int8, ORT quantize_dynamic."""
    x1 = torch.zeros(1, 1, 28, 28)
    t0 = time.perf_counter()
    result = quantize(model, QuantConfig(method="dynamic"))
    seconds = time.perf_counter() - t0
    fp32_onnx = export_onnx(model, x1, folder / f"{name}-fp32.onnx")
    ours_onnx = export_onnx(result.model, x1, folder / f"{name}-int8.onnx")
    theirs_onnx = ort_dynamic(fp32_onnx, folder / f"{name}-ort-dynamic.onnx")
    return result, seconds, (fp32_onnx, ours_onnx, theirs_onnx)


def build_forms(name: str, folder: str) -> tuple[dict, torch.Tensor]:
    """Harness build function (runs in each worker): the fp32 and int8 runtimes of one cached trained model."""
    import os

    from slimkit.export.deployed import eager_fp32

    train, _ = data.load("mnist10k")
    train, val = data.split(train, 0.125)
    model = trained(name, train, val)
    out = Path(folder) / f"worker-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    _, _, (fp32_onnx, ours_onnx, theirs_onnx) = exports(name, model, out)
    forms = {
        "torch fp32": model,
        "torch fp32 (slimkit deployed eager)": eager_fp32(model),
        "ort fp32": OrtModel(fp32_onnx, THREADS),
        "ort int8 (slimkit dynamic)": OrtModel(ours_onnx, THREADS),
        "ort int8 (quantize_dynamic)": OrtModel(theirs_onnx, THREADS),
        "torch int8 dynamic (torch.ao)": without_fastpath(torch_dynamic(model)),
    }
    return forms, torch.zeros(1, 1, 28, 28)


def run_model(name: str, folder: Path) -> dict:
    from harness import time_forms

    train, test = data.load("mnist10k")
    train, val = data.split(train, 0.125)
    model = trained(name, train, val)
    result, seconds, (fp32_onnx, ours_onnx, theirs_onnx) = exports(name, model, folder)
    candidates = {
        "ort fp32": OrtModel(fp32_onnx, THREADS),
        "ort int8 (slimkit dynamic)": OrtModel(ours_onnx, THREADS),
        "ort int8 (quantize_dynamic)": OrtModel(theirs_onnx, THREADS),
        "torch int8 dynamic (torch.ao)": without_fastpath(torch_dynamic(model)),
    }
    accuracy = {
        "fp32": evaluate(model, test).accuracy,
        "slimkit dynamic int8 (simulated)": evaluate(result.model, test).accuracy,
    }
    accuracy.update({label: evaluate(runtime, test, batch_size=250).accuracy for label, runtime in candidates.items()})
    fp32_bytes = file_bytes(model.state_dict(), folder, f"{name}-fp32")
    load_before = os.getloadavg()[0]  # other work on the cores shows up here and in the spread
    with tempfile.TemporaryDirectory(prefix="slimkit-bench-dynamic-") as scratch:
        timed = time_forms(
            "quantize_dynamic:build_forms",
            {"name": name, "folder": scratch},
            (1, 64),
            processes=PROCESSES,
            threads=THREADS,
            max_seconds=2 if QUICK else 10,
        )
    return {
        "accuracy": accuracy,
        "quantize_seconds": seconds,
        "latency": timed,
        "processes": PROCESSES,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "parity_ort": parity(result.model, candidates["ort int8 (slimkit dynamic)"], test, batch_size=250),
        "size_ratio": fp32_bytes / packed_bytes(result.model, folder, f"{name}-int8"),
        "onnx_bytes": {
            k: p.stat().st_size
            for k, p in (("fp32", fp32_onnx), ("slimkit int8", ours_onnx), ("quantize_dynamic", theirs_onnx))
        },
        "quantized_layers": len(result.record["layers"]),
        "decomposed": result.record["decomposed"],
    }


def markdown(results: dict) -> str:
    lines = [
        "# Dynamic int8 for sequence models on MNIST-10k (2,000 test digits)",
        "",
        "Reproduce: `flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/quantize_dynamic.py`",
        "",
        "## Accuracy (%)",
        "",
        "| model | variant | accuracy | drop (pt) |",
        "|---|---|---:|---:|",
    ]
    for name, res in results.items():
        fp32 = res["accuracy"]["fp32"]
        lines += [f"| {name} | {k} | {v:.2f} | {fp32 - v:+.2f} |" for k, v in res["accuracy"].items()]
    from harness import load_lines, method_note, ms_cell, speedups

    processes = next(iter(results.values()))["processes"]
    lines += [
        "",
        f"## Latency (ms, median of {processes} processes, 2 threads) and sizes",
        "",
        method_note(processes, THREADS) + " The fp32 forms compared are PyTorch eager, slimkit's deployed eager form "
        "(torch.fx-fused, channels-last input where the model has convolutions) and ONNX Runtime fp32.",
        "",
        "| model | runtime | ms b1 | ms b64 | vs fastest fp32 b1 | vs fastest fp32 b64 | vs ort fp32 b64 "
        "| page faults / call |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        forms = res["latency"]
        ratio = {bs: speedups(forms, list(FP32_FORMS), bs) for bs in (1, 64)}
        for label, per in forms.items():
            faults = max(per[bs]["page_faults_per_call"] for bs in (1, 64))
            lines.append(
                f"| {name} | {label} | {ms_cell(per[1])} | {ms_cell(per[64])} | {ratio[1][label]:.2f}x | "
                f"{ratio[64][label]:.2f}x | {forms['ort fp32'][64]['median_ms'] / per[64]['median_ms']:.2f}x | "
                f"{faults:.0f} |"
            )
    lines += load_lines(results)
    lines.append("")
    for name, res in results.items():
        p, b = res["parity_ort"], res["onnx_bytes"]
        lines.append(
            f"- {name}: {res['quantized_layers']} Linear layers quantized ({', '.join(res['decomposed'])} "
            f"rebuilt); packed weights {res['size_ratio']:.2f}x smaller than fp32 safetensors; ONNX files "
            f"{b['fp32'] / 1e3:.0f} KB fp32, {b['slimkit int8'] / 1e3:.0f} KB slimkit int8, "
            f"{b['quantize_dynamic'] / 1e3:.0f} KB quantize_dynamic; slimkit on ORT agrees with the simulated "
            f"model on {100 * p['top1_agreement']:.2f}% of {p['count']} digits (max |diff| "
            f"{p['max_abs_diff']:.4f})"
        )
    return "\n".join(lines) + "\n"


def _int_batches(forms: dict) -> dict:
    """Stored JSON has batch sizes as string keys; the harness helpers index them as ints."""
    return {form: {int(bs): stats for bs, stats in per.items()} for form, per in forms.items()}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=tuple(MODELS),
        default=tuple(MODELS),
        help="run only these models; the others' stored results are kept",
    )
    parser.add_argument("--train-only", action="store_true", help="only train and cache the checkpoints")
    parser.add_argument("--quick", action="store_true", help="a smoke run (1 epoch, 1 process)")
    args = parser.parse_args()
    if args.train_only:
        train, _ = data.load("mnist10k")
        train, val = data.split(train, 0.125)
        for name in args.models:
            trained(name, train, val)
        return
    stored_path = OUT / "quantize_dynamic.json"
    stored = json.loads(stored_path.read_text()) if stored_path.exists() else {}
    results = {k: v for k, v in stored.get("results", {}).items() if "latency" in v and k not in args.models}
    for res in results.values():
        res["latency"] = _int_batches(res["latency"])
    fresh, seconds = run_models(run_model, args.models)
    results = {name: {**results, **fresh}[name] for name in MODELS if name in {**results, **fresh}}
    payload = {"results": results, "threads": THREADS, "seconds": seconds, "quick": QUICK}
    (OUT / "quantize_dynamic.json").write_text(json.dumps(payload, indent=2))
    (OUT / "quantize_dynamic.md").write_text(markdown(results))
    print(markdown(results))
    print(f"total {payload['seconds']:.0f}s")


if __name__ == "__main__":
    main()
