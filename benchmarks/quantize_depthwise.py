"""Depthwise / squeeze-excitation nets on ONNX Runtime: slimkit's int8 QDQ vs ``quantize_static`` vs fp32 (issue 13,
Deliver 4).

Models: torchvision ``efficientnet_b0`` and ``mobilenet_v3_large`` (random init, ``weights=None``; nothing downloads)
at ``--size`` (224 by default), and slimkit's ``resnet56`` / ``mobilenetv2_cifar`` at 32x32 (the nets the change must
not slow down). BatchNorm statistics are re-estimated on the calibration images first (a fresh BatchNorm's running
statistics (0, 1) do not match its activations, so scales drift from layer to layer and every folded bias is 0; a
trained net's statistics match its data).

Inputs: no natural images are available offline, so "real-looking" means images with natural images' 1/f amplitude
spectrum (random phases), standardised per channel like ImageNet-normalised inputs: smooth, spatially correlated
content rather than white noise (which no layer of a CNN sees in deployment) or MNIST digits (mostly a constant
background). 64 images calibrate both quantizers (slimkit PTQ default config; ``quantize_static`` QDQ, per-channel
int8 weights, uint8 activations, MinMax, batches of 16); 256 other images measure the mean cosine of each runtime's
logits to the fp32 model's.

Latency: ``benchmarks/harness.py`` (3 fresh processes, 2 threads, allocator pinned), batch 16. ``--baseline-src
DIR`` also exports slimkit int8 with the slimkit package found in ``DIR`` (e.g. ``git archive HEAD src | tar -x -C
/tmp/head`` then ``--baseline-src /tmp/head/src``) and times it as "slimkit int8 (before)".

Run: ``flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/quantize_depthwise.py [--models a,b] [--size 224]``
(writes benchmarks/results/quantize_depthwise.{json,md}, merging the models run into the JSON already there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess  # nosec B404: this same script with the same interpreter
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from quantize import ort_static  # ONNX Runtime's own quantize_static, as benchmarks/quantize.py runs it

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
CACHE = HERE.parent / ".slimkit-cache" / "quantize_depthwise"
THREADS = 2
BATCH = 16
CALIBRATION, EVALUATION = 64, 256
MODELS = ("efficientnet_b0", "mobilenet_v3_large", "resnet56", "mobilenetv2_cifar")
FP32, SLIMKIT, BEFORE, ORT = "ORT fp32", "slimkit int8", "slimkit int8 (before)", "ORT quantize_static"


def natural_images(count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` 3 x size x size images with a 1/f amplitude spectrum, each channel standardised."""
    generator = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(size).reshape(-1, 1)
    fx = torch.fft.rfftfreq(size).reshape(1, -1)
    frequency = torch.sqrt(fx**2 + fy**2)
    frequency[0, 0] = 1.0
    spectrum = torch.randn(count, 3, size, size // 2 + 1, dtype=torch.complex64, generator=generator) / frequency
    images = torch.fft.irfftn(spectrum, s=(size, size), dim=(-2, -1))
    images = (images - images.mean(dim=(-2, -1), keepdim=True)) / images.std(dim=(-2, -1), keepdim=True)
    return images.float().contiguous()


def create(name: str, size: int) -> tuple[torch.nn.Module, int]:
    """The model (seeded random init) and its input size."""
    torch.manual_seed(0)
    if name in ("resnet56", "mobilenetv2_cifar"):
        from slimkit import models

        return models.create(name).eval(), 32
    import torchvision

    return getattr(torchvision.models, name)(weights=None).eval(), size


def refresh_batchnorm(model: torch.nn.Module, images: torch.Tensor) -> None:
    """BatchNorm running statistics = the mean / variance of its inputs over ``images`` (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for batch in images.split(BATCH):
            model(batch)
    model.eval()


def export_slimkit(name: str, size: int, path: Path) -> None:
    """slimkit's default int8 PTQ calibrated on the calibration images, exported to ``path`` (the slimkit package on
    ``sys.path``: the working tree's, or the baseline's in a subprocess)."""
    from slimkit.export.onnx import export_onnx
    from slimkit.quantization import QuantConfig, quantize

    model, side = prepared(name, size)
    calibration = natural_images(CALIBRATION, side, seed=1)
    quantized = quantize(model, QuantConfig(batch_size=BATCH), calibration).model
    export_onnx(quantized, calibration[:1], path)


def prepared(name: str, size: int) -> tuple[torch.nn.Module, int]:
    model, side = create(name, size)
    refresh_batchnorm(model, natural_images(CALIBRATION, side, seed=1))
    return model, side


def op_counts(path: Path) -> dict[str, int]:
    """Op types of ONNX Runtime's optimized graph of ``path`` (what actually runs)."""
    import collections

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return dict(collections.Counter(n.op_type for n in graph.node).most_common())


def build_forms(paths: dict[str, str]) -> tuple[dict, torch.Tensor]:
    """Harness build function: an ONNX Runtime session per ONNX file, and a batch-1 example input."""
    from slimkit.export.runtime import OrtModel

    forms = {form: OrtModel(path, THREADS) for form, path in paths.items()}
    side = OrtModel(next(iter(paths.values())), THREADS).session.get_inputs()[0].shape[-1]
    return forms, torch.zeros(1, 3, side, side)


def prepare_files(name: str, size: int, baseline_src: str | None) -> tuple[dict[str, Path], dict]:
    """Export the fp32 / slimkit / quantize_static (/ baseline) ONNX files; their cosine to fp32 and op counts."""
    from slimkit.export.onnx import export_onnx
    from slimkit.export.runtime import OrtModel

    folder = CACHE / f"{name}-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    model, side = prepared(name, size)
    calibration = natural_images(CALIBRATION, side, seed=1)
    paths = {FP32: folder / "fp32.onnx", SLIMKIT: folder / "slimkit.onnx", ORT: folder / "ort.onnx"}
    export_onnx(model, calibration[:1], paths[FP32])
    export_slimkit(name, size, paths[SLIMKIT])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort_static(paths[FP32], paths[ORT], list(calibration.split(BATCH)))
    if baseline_src:
        paths[BEFORE] = folder / "slimkit-before.onnx"
        env = dict(os.environ, PYTHONPATH=baseline_src)
        subprocess.run(  # nosec B603: this interpreter and this script
            [sys.executable, __file__, "--export-only", name, str(size), str(paths[BEFORE])], env=env, check=True
        )
    evaluation = natural_images(EVALUATION, side, seed=2)
    with torch.no_grad():
        reference = torch.cat([model(x) for x in evaluation.split(64)])
    info: dict = {"input": [3, side, side], "cosine": {}, "ops": {}}
    for form, path in paths.items():
        session = OrtModel(path, THREADS)
        got = torch.cat([session(x) for x in evaluation.split(64)])
        info["cosine"][form] = float(torch.nn.functional.cosine_similarity(got, reference, dim=1).mean())
        info["ops"][form] = op_counts(path)
    return paths, info


def run(name: str, size: int, baseline_src: str | None, processes: int, max_seconds: float) -> dict:
    sys.path.insert(0, str(HERE))
    from harness import time_forms

    paths, info = prepare_files(name, size, baseline_src)
    timed = time_forms(
        "quantize_depthwise:build_forms",
        {"paths": {form: str(p) for form, p in paths.items()}},
        (BATCH,),
        processes=processes,
        threads=THREADS,
        max_seconds=max_seconds,
    )
    info["latency"] = {form: timed[form][BATCH] for form in paths}
    return info


def markdown(results: dict) -> str:
    from harness import method_note, ms_cell

    lines = [
        "# Depthwise / squeeze-excitation nets: slimkit int8 vs ONNX Runtime quantize_static (batch 16)",
        "",
        "Reproduce: `flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/quantize_depthwise.py "
        "--baseline-src /tmp/head/src` (see the script's docstring).",
        "",
        method_note(),
        "",
        "Random-init models (BatchNorm statistics re-estimated on the calibration images); cosine = mean cosine of "
        f"the logits to the fp32 model's on {EVALUATION} 1/f-spectrum images (calibration: {CALIBRATION} others).",
        "",
        "| model | input | slimkit int8 ms | before ms | quantize_static ms | ORT fp32 ms | slimkit / static "
        "| slimkit / fp32 | cosine slimkit | cosine before | cosine static |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        lat, cos = res["latency"], res["cosine"]

        def cell(form: str, lat=lat) -> str:
            return ms_cell(lat[form]) if form in lat else "-"

        def cos_cell(form: str, cos=cos) -> str:
            return f"{cos[form]:.4f}" if form in cos else "-"

        ms = {form: lat[form]["median_ms"] for form in lat}
        lines.append(
            f"| {name} | {'x'.join(map(str, res['input']))} | {cell(SLIMKIT)} | {cell(BEFORE)} | {cell(ORT)} | "
            f"{cell(FP32)} | {ms[ORT] / ms[SLIMKIT]:.2f}x | {ms[FP32] / ms[SLIMKIT]:.2f}x | {cos_cell(SLIMKIT)} | "
            f"{cos_cell(BEFORE)} | {cos_cell(ORT)} |"
        )
    lines += ["", "Ratios > 1: slimkit int8 is faster. Ops in ONNX Runtime's optimized graph:", ""]
    for name, res in results.items():
        for form, ops in res["ops"].items():
            shown = ", ".join(f"{op} {count}" for op, count in ops.items())
            lines.append(f"- {name}, {form}: {shown}")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--export-only":  # the baseline's export, in its own process
        export_slimkit(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--baseline-src", default=None)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    np.random.seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    store = OUT / "quantize_depthwise.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for name in args.models.split(","):
        results[name] = run(name, args.size, args.baseline_src, args.processes, args.max_seconds)
        store.write_text(json.dumps(results, indent=2))
    (OUT / "quantize_depthwise.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
