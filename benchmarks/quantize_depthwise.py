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

The torchvision models of issue 13 (``--models vit_b_16,swin_t,convnext_tiny,efficientnet_b0,mobilenet_v3_large``,
or ``torchvision_section()`` from another benchmark): the big three (ViT-B/16, Swin-T, ConvNeXt-T, 4-18 GFLOPs per
image on 2 shared cores) run at batch ``BIG_BATCH`` with ``BIG_CALIBRATION`` / ``BIG_EVALUATION`` images so each model
fits one 10-minute hold of the CPU lock and ``quantize_static``'s calibration (which keeps every intermediate output of
every batch: ~0.5 GB per ViT-B/16 image; its ``CalibMaxIntermediateOutputs`` drops them without computing ranges in
ORT 1.32, then fails "No data is collected") fits in memory: both quantizers calibrate on the same 8 images there.
torchvision's ViT starts with a zero classification head (all logits 0), so a zero-initialised last Linear is
re-initialised (normal, std 0.02) to give the cosine something to compare. A form that fails (quantize, export,
session) is reported with its one-line error and the others are still measured; layers slimkit leaves in float are
counted.

Run: ``flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/quantize_depthwise.py [--models a,b] [--size 224]``
(writes benchmarks/results/quantize_depthwise.{json,md}, merging the models run into the JSON already there).
"""

from __future__ import annotations

import argparse
import collections
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
TORCHVISION = ("vit_b_16", "swin_t", "convnext_tiny", "efficientnet_b0", "mobilenet_v3_large")  # issue 13's list
BIG = ("vit_b_16", "swin_t", "convnext_tiny")
BIG_BATCH, BIG_CALIBRATION, BIG_EVALUATION = 8, 8, 64
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

    model = getattr(torchvision.models, name)(weights=None).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    if not last.weight.any():  # torchvision's ViT: a zero head gives all-zero logits
        torch.nn.init.normal_(last.weight, std=0.02)
    return model, size


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


def counts(name: str) -> tuple[int, int, int]:
    """Batch size, calibration images and evaluation images for ``name``."""
    return (BIG_BATCH, BIG_CALIBRATION, BIG_EVALUATION) if name in BIG else (BATCH, CALIBRATION, EVALUATION)


def export_slimkit(name: str, size: int, path: Path) -> dict:
    """slimkit's default int8 PTQ calibrated on the calibration images, exported to ``path`` (the slimkit package on
    ``sys.path``: the working tree's, or the baseline's in a subprocess); returns the record's skipped layers."""
    from slimkit.export.onnx import export_onnx
    from slimkit.quantization import QuantConfig, quantize

    batch, calibration_count, _ = counts(name)
    model, side = prepared(name, size)
    calibration = natural_images(calibration_count, side, seed=1)
    result = quantize(model, QuantConfig(batch_size=batch), calibration)
    export_onnx(result.model, calibration[:1], path)
    return dict(result.record.get("skipped", {}))


def _error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def prepared(name: str, size: int) -> tuple[torch.nn.Module, int]:
    model, side = create(name, size)
    refresh_batchnorm(model, natural_images(CALIBRATION, side, seed=1))
    return model, side


def op_counts(path: Path) -> dict[str, int]:
    """Op types of ONNX Runtime's optimized graph of ``path`` (what actually runs)."""
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
    """Export the fp32 / slimkit / quantize_static (/ baseline) ONNX files; their cosine to fp32 and op counts. A form
    that fails is left out and its error kept in ``info["errors"]``."""
    from slimkit.export.onnx import export_onnx
    from slimkit.export.runtime import OrtModel

    folder = CACHE / f"{name}-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    batch, calibration_count, evaluation_count = counts(name)
    model, side = prepared(name, size)
    calibration = natural_images(calibration_count, side, seed=1)
    info: dict = {"input": [3, side, side], "batch": batch, "cosine": {}, "ops": {}, "errors": {}}
    paths = {FP32: folder / "fp32.onnx"}
    export_onnx(model, calibration[:1], paths[FP32])
    try:
        skipped = export_slimkit(name, size, folder / "slimkit.onnx")
        paths[SLIMKIT] = folder / "slimkit.onnx"
        info["float_layers"] = len(skipped)
        reasons = collections.Counter(str(reason) for reason in skipped.values())
        info["float_reasons"] = [f"{count} x {reason}" for reason, count in sorted(reasons.items())]
    except Exception as exc:  # any failure of quantize / export is a result to report, not a crash
        info["errors"][SLIMKIT] = _error(exc)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = list(calibration.split(batch))
            ort_static(paths[FP32], folder / "ort.onnx", batches)
        paths[ORT] = folder / "ort.onnx"
    except Exception as exc:  # onnxruntime raises its own types
        info["errors"][ORT] = _error(exc)
    if baseline_src:
        paths[BEFORE] = folder / "slimkit-before.onnx"
        env = dict(os.environ, PYTHONPATH=baseline_src)
        subprocess.run(  # nosec B603: this interpreter and this script
            [sys.executable, __file__, "--export-only", name, str(size), str(paths[BEFORE])], env=env, check=True
        )
    evaluation = natural_images(evaluation_count, side, seed=2)
    with torch.no_grad():
        reference = torch.cat([model(x) for x in evaluation.split(batch)])
    for form, path in list(paths.items()):
        try:
            session = OrtModel(path, THREADS)
            got = torch.cat([session(x) for x in evaluation.split(batch)])
            info["cosine"][form] = float(torch.nn.functional.cosine_similarity(got, reference, dim=1).mean())
            info["ops"][form] = op_counts(path)
        except Exception as exc:  # a file ORT cannot load or run
            info["errors"][form] = _error(exc)
            del paths[form]
    return paths, info


def run(name: str, size: int, baseline_src: str | None, processes: int, max_seconds: float) -> dict:
    sys.path.insert(0, str(HERE))
    from harness import time_forms

    paths, info = prepare_files(name, size, baseline_src)
    batch = info["batch"]
    timed = time_forms(
        "quantize_depthwise:build_forms",
        {"paths": {form: str(p) for form, p in paths.items()}},
        (batch,),
        processes=processes,
        threads=THREADS,
        max_seconds=max_seconds,
    )
    info["latency"] = {form: timed[form][batch] for form in paths}
    return info


def torchvision_section(
    models: tuple[str, ...] = TORCHVISION,
    size: int = 224,
    processes: int = 3,
    max_seconds: float = 4.0,
) -> tuple[dict, str]:
    """Issue 13's torchvision models: slimkit int8 vs ``quantize_static`` vs fp32 on ONNX Runtime (latency, logit
    cosine, float layers), one model at a time; a model that fails as a whole is reported with its error. Returns
    ``(results, markdown)``: the results as this script stores them and a markdown section for them.

    Example:
        >>> results, text = torchvision_section(("mobilenet_v3_large",))  # doctest: +SKIP
    """
    torch.set_num_threads(THREADS)
    results: dict = {}
    for name in models:
        try:
            results[name] = run(name, size, None, processes, max_seconds)
        except Exception as exc:  # report the model's failure and go on with the next
            results[name] = {"error": _error(exc)}
    return results, markdown(results, title="## torchvision models on ONNX Runtime: slimkit int8 vs quantize_static")


def markdown(results: dict, title: str = "") -> str:
    from harness import method_note, ms_cell

    lines = [
        title or "# torchvision and depthwise / squeeze-excitation nets: slimkit int8 vs ONNX Runtime quantize_static",
        "",
        "Reproduce: `flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/quantize_depthwise.py "
        "--models <name>` (one model per hold of the lock; see the script's docstring).",
        "",
        method_note(),
        "",
        "Random-init torchvision / slimkit models (BatchNorm statistics re-estimated on the calibration images); "
        "inputs: images with a 1/f amplitude spectrum, standardised per channel (no natural images offline); cosine = "
        f"mean cosine of the logits to the fp32 model's on {EVALUATION} such images (calibration: {CALIBRATION} "
        f"others); {', '.join(BIG)}: batch {BIG_BATCH}, {BIG_CALIBRATION} calibration / {BIG_EVALUATION} evaluation "
        "images.",
        "",
        "| model | input | batch | slimkit int8 ms | before ms | quantize_static ms | ORT fp32 ms | slimkit / static "
        "| slimkit / fp32 | cosine slimkit | cosine before | cosine static | slimkit float layers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for name, res in results.items():
        if "error" in res:
            lines.append(f"| {name} | failed: {res['error']} |" + " - |" * 11)
            continue
        lat, cos = res.get("latency", {}), res.get("cosine", {})

        def cell(form: str, lat=lat) -> str:
            return ms_cell(lat[form]) if form in lat else "-"

        def cos_cell(form: str, cos=cos) -> str:
            return f"{cos[form]:.4f}" if form in cos else "-"

        def ratio(a: str, b: str, lat=lat) -> str:
            return f"{lat[a]['median_ms'] / lat[b]['median_ms']:.2f}x" if a in lat and b in lat else "-"

        lines.append(
            f"| {name} | {'x'.join(map(str, res['input']))} | {res.get('batch', BATCH)} | {cell(SLIMKIT)} | "
            f"{cell(BEFORE)} | {cell(ORT)} | {cell(FP32)} | {ratio(ORT, SLIMKIT)} | {ratio(FP32, SLIMKIT)} | "
            f"{cos_cell(SLIMKIT)} | {cos_cell(BEFORE)} | {cos_cell(ORT)} | {res.get('float_layers', '-')} |"
        )
        for form, error in res.get("errors", {}).items():
            notes.append(f"- {name}, {form} failed: {error}")
        if res.get("float_reasons"):
            notes.append(f"- {name}, slimkit layers left in float: {'; '.join(res['float_reasons'])}")
    lines += ["", "Ratios > 1: slimkit int8 is faster.", *notes, "", "Ops in ONNX Runtime's optimized graph:", ""]
    for name, res in results.items():
        for form, ops in res.get("ops", {}).items():
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
        try:
            results[name] = run(name, args.size, args.baseline_src, args.processes, args.max_seconds)
        except Exception as exc:  # one model's failure is reported; the others are still measured
            results[name] = {"error": _error(exc)}
        store.write_text(json.dumps(results, indent=2))
    (OUT / "quantize_depthwise.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
