"""Quantization on MNIST-10k: accuracy, file size and latency of int8 down to binary, against ONNX Runtime's own
``quantize_static`` on the same calibration set.

Models: the seed MLP (784-200-10), LeNet-5, ResNet-20 and ResNet-56 (MNIST presented as 3x32x32; ResNet-56 gets
fp32 / int8 PTQ rows and latency only). Every model trains on 7,000 of the 8,000 training digits; the other 1,000
(``slimkit.data.split(train, 0.125)``) choose the best epoch and which PTQ model is deployed; the 2,000 test digits
only report. The MLP and LeNet-5 are the demo's models (same cache); the ResNets train for 10 epochs (about 1.5 and
4 minutes on 2 cores, cached in .slimkit-cache).
Variants: fp32, int8 dynamic, int8 PTQ, int8 QAT, int4 (w4a8 PTQ), ternary QAT, binary QAT (first/last layer 8-bit
by default; the 2-layer MLP has only a first and a last layer, so its low-bit rows quantize both). QAT continues
training the fp32 model, so for ResNet-20 a control row trains the fp32 model with the same budget. slimkit's default
int8 PTQ and ``quantize_static`` are also compared over 6 disjoint calibration draws (one draw moves single-digit
accuracy differences by chance; the mean over draws and the logit error vs fp32 do not). File sizes:
packed safetensors vs fp32 safetensors (and LeNet-300-100 with every layer low-bit). Latency at batch 1 and 64 with
``benchmarks/harness.py`` (3 fresh processes one after another, allocator pinned, 2 threads, every form interleaved;
median and spread of the process medians, page faults per call): PyTorch fp32 eager, PyTorch fp32 as slimkit deploys
it eagerly (BatchNorm folded, channels-last), PyTorch fp32 ``torch.compile`` (inductor, frozen weights), ONNX Runtime
fp32, ONNX Runtime int8 (slimkit's QDQ export), ONNX Runtime int8 (quantize_static), PyTorch int8 x86 (torchao PT2E
lowered to oneDNN kernels, from slimkit's PTQ model), the same PT2E graph under ``torch.compile`` (inductor) and, for
the Linear-only models, PyTorch int8 dynamic (torch.ao dynamic int8 Linear kernels). Every speed-up is against the
fastest of the model's fp32 forms at the same batch size.

Run: ``flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/quantize.py [--only accuracy|train|latency]
[--models mlp ...]`` (writes benchmarks/results/quantize.{json,md}; a part or model not run keeps its stored results;
``train`` only caches the checkpoints in .slimkit-cache, about 1.5 and 4 minutes for ResNet-20 / ResNet-56;
``accuracy`` takes about 10 minutes with them cached and ``latency`` 1-4 minutes per model: run them in separate
lock holds; ``--untrained`` times seeded random weights where the checkpoint cannot be trained in one lock hold;
``--quick`` for a smoke run of the accuracy part).
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from slimkit import data, models
from slimkit.demo import trained
from slimkit.export.onnx import export_onnx
from slimkit.export.runtime import OrtModel, parity
from slimkit.export.torch_int8 import to_torch_int8
from slimkit.quantization import QuantConfig, pack_state_dict, quantize
from slimkit.train import TrainConfig, evaluate, fit

OUT = Path(__file__).parent / "results"
CACHE = Path(__file__).resolve().parent.parent / ".slimkit-cache"  # harness workers run in benchmarks/
QUICK = "--quick" in sys.argv
THREADS = 2


def file_bytes(tensors: dict, folder: Path, name: str) -> int:
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path.stat().st_size


def packed_bytes(qmodel, folder: Path, name: str) -> int:
    tensors, meta = pack_state_dict(qmodel)
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={"slimkit.pack": json.dumps(meta)})
    return path.stat().st_size


def ort_static(fp32_onnx: Path, out: Path, calib: list[torch.Tensor]) -> Path:
    """ONNX Runtime's own static QDQ quantization (per-channel int8 weights, uint8 activations, min-max)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": x.numpy()} for x in calib])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        str(fp32_onnx),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


RESNET_TRAINING = TrainConfig(epochs=10, lr=0.05, optimizer="sgd", weight_decay=5e-4, batch_size=64)
DRAWS = 1 if QUICK else 6  # calibration draws for the comparison with quantize_static (draw 0: every other row)


def resnet_trained(name: str, train, val):
    """A ResNet trained on ``train`` (best epoch on ``val``), or its cached checkpoint."""
    path = CACHE / f"{name}-mnist10k-{len(train)}-bench.safetensors"
    model = models.create(name)
    if path.exists():
        models.load_weights(model, path)
    else:
        fit(model, train, val, RESNET_TRAINING, checkpoint=path)
    return model.eval()


def mnist_model(name: str):
    """(model, train, val, test): the benchmark's trained model and its 7,000 / 1,000 / 2,000-digit splits."""
    train, test = data.load("mnist10k", shape=(3, 32, 32) if name.startswith("resnet") else None)
    train, val = data.split(train, 0.125)
    model = resnet_trained(name, train, val) if name.startswith("resnet") else trained(name, CACHE, train, val)
    return model.eval(), train, val, test


def calibration_draws(train, draws: int) -> list[torch.Tensor]:
    """Disjoint calibration sets of ``batch_size x calibration_batches`` training digits (QuantConfig defaults)."""
    n = QuantConfig().batch_size * QuantConfig().calibration_batches
    return [torch.stack([train[i][0] for i in range(k * n, (k + 1) * n)]) for k in range(draws)]


def logits(model, xs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.as_tensor(np.asarray(model(x))) for x in xs.split(250)])


def versus_ort(model, fp32_onnx: Path, draws: list[torch.Tensor], test, folder: Path) -> dict:
    """slimkit's default int8 PTQ and ``quantize_static``, each calibrated on the same draw, both run on ONNX
    Runtime: test accuracy, top-1 agreement with fp32 and mean squared logit error vs fp32, per draw."""
    xs, ys = torch.stack([x for x, _ in test]), torch.tensor([int(y) for _, y in test])
    ref = logits(model, xs)
    x1 = xs[:1]
    per: dict[str, list[dict]] = {"slimkit": [], "ort": []}
    for k, calib in enumerate(draws):
        ours = export_onnx(quantize(model, QuantConfig(), calib).model, x1, folder / f"draw{k}-slimkit.onnx")
        theirs = ort_static(fp32_onnx, folder / f"draw{k}-ort.onnx", list(calib.split(QuantConfig().batch_size)))
        for key, path in (("slimkit", ours), ("ort", theirs)):
            out = logits(OrtModel(path, THREADS), xs)
            per[key].append(
                {
                    "accuracy": 100 * (out.argmax(1) == ys).float().mean().item(),
                    "agree_fp32": 100 * (out.argmax(1) == ref.argmax(1)).float().mean().item(),
                    "logit_mse": ((out - ref) ** 2).mean().item(),
                }
            )
    mean = {key: {m: float(np.mean([r[m] for r in rows])) for m in rows[0]} for key, rows in per.items()}
    for key, rows in per.items():
        mean[key]["accuracy_std"] = float(np.std([r["accuracy"] for r in rows]))
    diffs = [a["accuracy"] - b["accuracy"] for a, b in zip(per["slimkit"], per["ort"])]
    return {
        "draws": per,
        "mean": mean,
        "better": sum(d > 1e-6 for d in diffs),
        "tied": sum(abs(d) <= 1e-6 for d in diffs),
        "worse": sum(d < -1e-6 for d in diffs),
    }


ADAROUND = {"adaround": True, "adaround_iters": 300}
PTQ_CHOICES = ("int8 PTQ", "int8 PTQ + AdaRound")  # the deployed slimkit int8 model: the better on held-out digits
RESNET_LOWBIT_QAT = {"epochs": 3, "lr": 2e-3, "freeze_bn_epoch": 2}  # on the 4,000-digit QAT subset


def variants(name: str) -> dict[str, tuple[QuantConfig, bool]]:
    """label -> (config, uses training data)."""
    if name == "resnet56":
        return {
            "int8 PTQ": (QuantConfig(), False),
            "int8 PTQ + AdaRound": (QuantConfig(**ADAROUND), False),
            "int8 PTQ (histogram observer)": (QuantConfig(observer="histogram"), False),
        }
    every_layer = name == "mlp"  # the MLP's two layers are its first and last: quantize them too
    low = {"keep_first_last_8bit": not every_layer}
    qat_epochs = 1 if QUICK else (1 if name == "resnet20" else 3)
    qat = {"method": "qat", "epochs": qat_epochs, "max_batches": 40 if name == "resnet20" else None}
    lowbit = {**qat, "lr": 1e-3}
    if name == "resnet20" and not QUICK:  # binary/ternary need more steps on a 20-layer net (bounded: ~40 s each)
        lowbit = {"method": "qat", "max_batches": None, **RESNET_LOWBIT_QAT}
    return {
        "int8 dynamic": (QuantConfig(method="dynamic"), False),
        "int8 PTQ": (QuantConfig(), False),
        "int8 PTQ + AdaRound": (QuantConfig(**ADAROUND), False),
        "int8 PTQ (histogram observer)": (QuantConfig(observer="histogram"), False),
        "int8 QAT": (QuantConfig(**qat, lr=1e-4), True),
        "int4 PTQ (w4a8)": (QuantConfig(weight_bits=4, **low), False),
        "int4 PTQ (w4a8) + AdaRound": (QuantConfig(weight_bits=4, **low, **ADAROUND), False),
        "ternary QAT": (QuantConfig(weight_bits=2, scheme="ternary", **lowbit, **low), True),
        "binary QAT": (QuantConfig(weight_bits=1, scheme="binary", **lowbit, **low), True),
    }


def fp32_control(model, train, val, test) -> float:
    """The fp32 model trained further with the low-bit QAT budget (same data, optimizer, epochs, lr, val)."""
    control = copy.deepcopy(model)
    fit(
        control,
        train,
        val,
        TrainConfig(
            epochs=RESNET_LOWBIT_QAT["epochs"],
            lr=RESNET_LOWBIT_QAT["lr"],
            optimizer="adam",
            batch_size=QuantConfig().batch_size,
        ),
    )
    return evaluate(control.eval(), test).accuracy


def compiled(model, shapes: list[torch.Size], exported: bool = False):
    """``torch.compile`` (inductor, weights frozen) warmed up on each batch shape; None when it cannot compile.
    ``exported``: a PT2E-converted int8 graph (compiled in place; inductor fuses its quantize / dequantize pairs
    into oneDNN int8 kernels)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    try:
        fn = torch.compile(model if exported else copy.deepcopy(model).eval())
        with torch.no_grad():
            for shape in shapes:
                fn(torch.zeros(shape))
        return (lambda x: fn(x)) if exported else fn  # an exported graph refuses .eval()
    except Exception as exc:  # reported, not fatal: the other runtimes are still measured
        print(f"torch.compile failed: {type(exc).__name__}: {exc}", flush=True)
        return None


def run_model(name: str, folder: Path) -> dict:
    resnet = name.startswith("resnet")
    model, train, val, test = mnist_model(name)
    x1 = torch.zeros(1, *test[0][0].shape)
    draws = calibration_draws(train, DRAWS)
    calib_tensor = draws[0]
    calib = list(calib_tensor.split(QuantConfig().batch_size))
    fp32_acc = evaluate(model, test).accuracy
    fp32_bytes = file_bytes(model.state_dict(), folder, f"{name}-fp32")
    rows = {"fp32": {"accuracy": fp32_acc, "drop": 0.0, "size_ratio": 1.0, "seconds": 0.0}}
    qmodels = {}
    qat_train = train.subset(4000) if resnet else train
    if name == "resnet20" and not QUICK:
        t0 = time.perf_counter()
        acc = fp32_control(model, qat_train, val, test)
        rows["fp32 + low-bit QAT budget (control)"] = {
            "accuracy": acc,
            "drop": fp32_acc - acc,
            "seconds": time.perf_counter() - t0,
        }
    for label, (cfg, uses_training) in variants(name).items():
        t0 = time.perf_counter()
        result = quantize(model, cfg, qat_train, val_data=val) if uses_training else quantize(model, cfg, calib_tensor)
        acc = evaluate(result.model, test).accuracy
        rows[label] = {
            "accuracy": acc,
            "drop": fp32_acc - acc,
            "size_ratio": fp32_bytes / packed_bytes(result.model, folder, f"{name}-{label}"),
            "seconds": time.perf_counter() - t0,
        }
        qmodels[label] = result.model
        print(f"{name} {label}: {acc:.2f}% ({rows[label]['seconds']:.0f}s)", flush=True)
    # which PTQ model to deploy is chosen on held-out training digits (never on the test split); ties keep plain
    held_out = {label: evaluate(qmodels[label], val).accuracy for label in PTQ_CHOICES}
    chosen = max(PTQ_CHOICES, key=lambda label: (held_out[label], label == PTQ_CHOICES[0]))
    print(f"{name} held-out: {held_out} -> {chosen}", flush=True)
    ptq = qmodels[chosen]
    # ONNX Runtime: fp32, slimkit int8 QDQ, ORT quantize_static on the same calibration batches
    fp32_onnx = export_onnx(model, x1, folder / f"{name}-fp32.onnx")
    ours_onnx = export_onnx(ptq, x1, folder / f"{name}-int8.onnx")
    theirs_onnx = ort_static(fp32_onnx, folder / f"{name}-ort-static.onnx", calib)
    t0 = time.perf_counter()
    versus = versus_ort(model, fp32_onnx, draws, test, folder)
    print(
        f"{name} vs quantize_static over {DRAWS} draws: {versus['mean']} ({time.perf_counter() - t0:.0f}s)", flush=True
    )
    runtimes = {
        "ort int8 (slimkit QDQ)": OrtModel(ours_onnx, THREADS),
        "ort int8 (quantize_static)": OrtModel(theirs_onnx, THREADS),
    }
    torch_int8 = to_torch_int8(ptq, calib, torch.zeros(64, *x1.shape[1:]))
    torch_int8.lowered((250, *x1.shape[1:]))  # evaluation and parity in batches of 250
    deployed = {
        "ORT quantize_static int8": runtimes["ort int8 (quantize_static)"],
        "slimkit int8 on ORT": runtimes["ort int8 (slimkit QDQ)"],
        "slimkit int8 on torch x86 (oneDNN)": torch_int8,
    }
    if not resnet:  # dynamic int8 only covers Linear layers: for the ResNets it is the fp32 convs again
        deployed["torch int8 dynamic (real kernels)"] = torch_dynamic(model)
    for label, runtime in deployed.items():
        acc = evaluate(runtime, test, batch_size=250).accuracy  # 8 equal batches: few shapes to lower
        rows[label] = {"accuracy": acc, "drop": fp32_acc - acc}
    agreement = {
        "ort": parity(ptq, runtimes["ort int8 (slimkit QDQ)"], test, batch_size=250),
        "torch_x86": parity(ptq, torch_int8, test, batch_size=250),
    }
    return {
        "accuracy": rows,
        "parity": agreement,
        "fp32_bytes": fp32_bytes,
        "held_out_accuracy": held_out,
        "deployed_ptq": chosen,
        "versus_ort": versus,
    }


def torch_dynamic(model):
    """PyTorch's own dynamic int8 Linear kernels (torch.ao) on a copy of ``model``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def build_forms(name: str, ptq: str, folder: str, trained_weights: bool = True) -> tuple[dict, torch.Tensor]:
    """Harness build function (runs in each worker): every fp32 and int8 runtime of one trained model.

    The checkpoint is the cached one the parent made sure of (``trained_weights=False``: the zoo model with seeded
    random weights, same shapes and kernels); the int8 model is ``ptq`` (the deployed PTQ variant the accuracy part
    chose on held-out digits) calibrated on calibration draw 0, exactly as in the accuracy part.
    """
    import os

    from slimkit.export.deployed import eager_fp32

    if trained_weights:
        model, train, _, _ = mnist_model(name)
    else:
        train, _ = data.load("mnist10k", shape=(3, 32, 32) if name.startswith("resnet") else None)
        train, _ = data.split(train, 0.125)
        torch.manual_seed(0)
        model = models.create(name).eval()
    x1 = torch.zeros(1, *train[0][0].shape)
    x64 = torch.zeros(64, *x1.shape[1:])
    calib_tensor = calibration_draws(train, 1)[0]
    calib = list(calib_tensor.split(QuantConfig().batch_size))
    qmodel = quantize(model, variants(name)[ptq][0], calib_tensor).model
    out = Path(folder) / f"worker-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    fp32_onnx = export_onnx(model, x1, out / "fp32.onnx")
    torch_int8 = to_torch_int8(qmodel, calib, x64)
    torch_int8.lowered(tuple(x1.shape))
    forms = {"torch fp32": model, "torch fp32 (BN folded, channels-last)": eager_fp32(model)}
    fp32_compiled = compiled(model, [x1.shape, x64.shape])
    if fp32_compiled is not None:
        forms["torch fp32 compiled"] = fp32_compiled
    forms["ort fp32"] = OrtModel(fp32_onnx, THREADS)
    forms["ort int8 (slimkit QDQ)"] = OrtModel(export_onnx(qmodel, x1, out / "int8.onnx"), THREADS)
    forms["ort int8 (quantize_static)"] = OrtModel(ort_static(fp32_onnx, out / "ort-static.onnx", calib), THREADS)
    forms["torch int8 x86 (slimkit PTQ)"] = torch_int8
    int8_compiled = compiled(torch_int8.converted, [x1.shape, x64.shape], exported=True)
    if int8_compiled is not None:
        forms["torch int8 x86 compiled (PT2E + inductor)"] = int8_compiled
    if not name.startswith("resnet"):
        forms["torch int8 dynamic"] = torch_dynamic(model)
    return forms, x1


def latency(name: str, ptq: str, processes: int = 3, trained_weights: bool = True) -> dict:
    """Time every runtime of ``name`` with the harness (checkpoint cached here first, so workers only load it)."""
    import os

    from harness import time_forms

    if trained_weights:
        mnist_model(name)
    load_before = os.getloadavg()[0]  # other work on the cores shows up here and in the spread
    with tempfile.TemporaryDirectory(prefix="slimkit-bench-quantize-") as folder:
        timed = time_forms(
            "quantize:build_forms",
            {"name": name, "ptq": ptq, "folder": folder, "trained_weights": trained_weights},
            (1, 64),
            processes=processes,
            threads=THREADS,
        )
    return {
        "forms": timed,
        "processes": processes,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "weights": "trained checkpoint" if trained_weights else "seeded random init (untrained)",
    }


def lenet300_sizes(folder: Path) -> dict:
    """File-size ratios on LeNet-300-100 with every layer low-bit (the issue's size targets)."""
    torch.manual_seed(0)
    model = models.create("lenet300")
    calib = torch.randn(64, 1, 28, 28)
    fp32 = file_bytes(model.state_dict(), folder, "lenet300-fp32")
    out = {}
    for label, cfg in {
        "int8": QuantConfig(),
        "int4": QuantConfig(weight_bits=4),
        "ternary": QuantConfig(weight_bits=2, scheme="ternary"),
        "binary": QuantConfig(weight_bits=1, scheme="binary"),
    }.items():
        cfg.keep_first_last_8bit = False
        result = quantize(model, cfg, calib)
        out[label] = fp32 / packed_bytes(result.model, folder, f"lenet300-{label}")
    return out


FP32_RUNTIMES = ("torch fp32", "torch fp32 (BN folded, channels-last)", "torch fp32 compiled", "ort fp32")
MODELS = ("mlp", "lenet5", "resnet20", "resnet56")
WEIGHT_DEPENDENT = ("ort int8 (quantize_static)",)  # its graph follows the calibrated ranges, not only the shapes


def latency_lines(results: dict) -> list[str]:
    """The latency table (harness cells) and the list of int8 forms not faster than the fastest fp32 form."""
    from harness import load_lines, method_note, ms_cell, speedups

    timed = {name: res["latency"] for name, res in results.items() if "latency" in res}
    if not timed:
        return ["", "## Latency", "", "Not measured yet with benchmarks/harness.py: run `--only latency`."]
    processes = next(iter(timed.values()))["processes"]
    lines = [
        "",
        f"## Latency (ms, median of {processes} processes, 2 threads)",
        "",
        method_note(processes, THREADS) + " The fp32 forms compared are PyTorch eager as trained, eager with "
        "BatchNorm folded and channels-last (slimkit's deployed eager form), torch.compile and ONNX Runtime fp32.",
        "",
        "| model | runtime | ms b1 | ms b64 | vs fastest fp32 b1 | vs fastest fp32 b64 | vs torch fp32 eager b64 "
        "| page faults / call |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, lat in timed.items():
        forms = lat["forms"]
        fp32 = [f for f in FP32_RUNTIMES if f in forms]
        ratio = {bs: speedups(forms, fp32, bs) for bs in (1, 64)}
        for label, per in forms.items():
            if label in WEIGHT_DEPENDENT and lat.get("weights", "").startswith("seeded"):
                continue
            faults = max(per[bs]["page_faults_per_call"] for bs in (1, 64))
            lines.append(
                f"| {name} | {label} | {ms_cell(per[1])} | {ms_cell(per[64])} | {ratio[1][label]:.2f}x | "
                f"{ratio[64][label]:.2f}x | {forms['torch fp32'][64]['median_ms'] / per[64]['median_ms']:.2f}x | "
                f"{faults:.0f} |"
            )
    untrained = [name for name, lat in timed.items() if lat.get("weights", "").startswith("seeded")]
    if untrained:
        lines += [
            "",
            f"Timed with seeded random weights (the trained checkpoint was not available; same shapes, kernels and "
            f"calibration digits, so the same speed for slimkit's forms): {', '.join(untrained)}. Their "
            f"{', '.join(WEIGHT_DEPENDENT)} row is left out: ONNX Runtime's quantize_static graph depends on the "
            "calibrated ranges and was several times slower on random weights (kept in quantize.json).",
        ]
    lines += load_lines(timed)
    lines += [
        "",
        "Where int8 is not faster than the fastest fp32 form at batch 64 (docs/quantization.md says why):",
        "",
    ]
    for name, lat in timed.items():
        forms = lat["forms"]
        fp32 = [f for f in FP32_RUNTIMES if f in forms]
        best = min(fp32, key=lambda f: forms[f][64]["median_ms"])
        ratio = speedups(forms, fp32, 64)
        skip = WEIGHT_DEPENDENT if lat.get("weights", "").startswith("seeded") else ()
        slower = [f"{k} {ratio[k]:.2f}x" for k in forms if k not in FP32_RUNTIMES and k not in skip and ratio[k] <= 1.0]
        if slower:
            lines.append(f"- {name} (fastest fp32: {best}, {forms[best][64]['median_ms']:.3g} ms): {', '.join(slower)}")
    return lines


def markdown(results: dict, sizes: dict) -> str:
    lines = [
        "# Quantization on MNIST-10k (2,000 test digits)",
        "",
        "Reproduce: `flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/quantize.py --only accuracy`, then "
        "`--only train` and one `--only latency --models NAME` per model (each its own lock hold)",
        "",
    ]
    lines += [
        "## Accuracy (%) and packed file size vs fp32",
        "",
        "| model | variant | accuracy | drop (pt) | size ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for name, res in results.items():
        for label, row in res["accuracy"].items():
            ratio = f"{row['size_ratio']:.2f}x" if "size_ratio" in row else ""
            lines.append(f"| {name} | {label} | {row['accuracy']:.2f} | {row['drop']:+.2f} | {ratio} |")
    lines += latency_lines(results)
    lines += [
        "",
        "## Which slimkit int8 PTQ model is deployed (ORT / torch x86 rows)",
        "",
        "Chosen on 1,000 held-out training digits (`slimkit.data.split(train, 0.125)`), never on the test split; "
        "a tie keeps plain rounding.",
        "",
        "| model | int8 PTQ (held-out) | + AdaRound (held-out) | deployed |",
        "|---|---:|---:|---|",
    ]
    for name, res in results.items():
        h = res["held_out_accuracy"]
        lines.append(f"| {name} | {h[PTQ_CHOICES[0]]:.2f} | {h[PTQ_CHOICES[1]]:.2f} | {res['deployed_ptq']} |")
    lines += [
        "",
        f"## slimkit int8 PTQ vs ONNX Runtime quantize_static over {DRAWS} calibration draws",
        "",
        "Each draw is a disjoint set of 16 x 64 training digits given to both (draw 0 is the set of every row "
        "above); slimkit's default `QuantConfig()` and `quantize_static` (QDQ, per-channel, MinMax), both run "
        "on ONNX Runtime over the 2,000 test digits. agree = top-1 agreement with fp32; MSE = mean squared "
        "logit error vs fp32; draws = slimkit better / tied / worse on accuracy.",
        "",
        "| model | fp32 | slimkit accuracy (mean ± sd) | ORT accuracy (mean ± sd) | slimkit agree / MSE "
        "| ORT agree / MSE | draws |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        v, fp32 = res["versus_ort"], res["accuracy"]["fp32"]["accuracy"]
        ours, theirs = v["mean"]["slimkit"], v["mean"]["ort"]
        lines.append(
            f"| {name} | {fp32:.2f} | {ours['accuracy']:.3f} ± {ours['accuracy_std']:.3f} | "
            f"{theirs['accuracy']:.3f} ± {theirs['accuracy_std']:.3f} | {ours['agree_fp32']:.2f} / "
            f"{ours['logit_mse']:.5f} | {theirs['agree_fp32']:.2f} / {theirs['logit_mse']:.5f} | "
            f"{v['better']} / {v['tied']} / {v['worse']} |"
        )
    lines += ["", "## Parity of slimkit's int8 deployments (top-1 agreement with the fake-quant model)", ""]
    for name, res in results.items():
        for runtime, p in res["parity"].items():
            lines.append(
                f"- {name} on {runtime}: {100 * p['top1_agreement']:.2f}% of {p['count']} digits, "
                f"max |diff| {p['max_abs_diff']:.4f}"
            )
    lines += [
        "",
        "## LeNet-300-100 packed file size vs fp32 safetensors (every layer low-bit)",
        "",
        "| bits | ratio |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.2f}x |" for k, v in sizes.items()]
    return "\n".join(lines) + "\n"


def run_models(run, names) -> tuple[dict, float]:
    """``{name: run(name, folder)}`` with fixed threads in a scratch folder, and the seconds it took."""
    torch.set_num_threads(THREADS)
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(name, Path(tmp)) for name in names}
    return results, time.perf_counter() - start


def _int_batches(latency_result: dict) -> dict:
    """Stored JSON has batch sizes as string keys; the harness helpers index them as ints."""
    forms = {form: {int(bs): stats for bs, stats in per.items()} for form, per in latency_result["forms"].items()}
    return {**latency_result, "forms": forms}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        choices=("accuracy", "train", "latency"),
        action="append",
        help="run only this part (repeatable); the other parts' stored results are kept",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=MODELS,
        help="accuracy / train / latency: only these models; the others' stored results are kept",
    )
    parser.add_argument("--processes", type=int, default=3, help="latency: fresh processes per model")
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="latency: time the zoo model with seeded random weights instead of the trained checkpoint (same shapes "
        "and kernels, so the same speed; for when training does not fit in a lock hold)",
    )
    parser.add_argument("--quick", action="store_true", help="accuracy: a smoke run (fewer draws and epochs)")
    args = parser.parse_args()
    parts = set(args.only or ("accuracy", "latency"))
    torch.set_num_threads(THREADS)
    stored = json.loads((OUT / "quantize.json").read_text()) if (OUT / "quantize.json").exists() else {}
    results = stored.get("results", {})
    for res in results.values():
        res.pop("latency_ms", None)  # timed in one process before benchmarks/harness.py: superseded
        if "latency" in res:
            res["latency"] = _int_batches(res["latency"])
    sizes = stored.get("lenet300_size_ratio", {})
    seconds = stored.get("seconds", {})
    seconds = seconds if isinstance(seconds, dict) else {"accuracy": seconds}
    if "accuracy" in parts:
        fresh, seconds["accuracy"] = run_models(run_model, args.models)
        for name, res in fresh.items():
            results[name] = {
                **res,
                **({"latency": results[name]["latency"]} if "latency" in results.get(name, {}) else {}),
            }
        with tempfile.TemporaryDirectory() as tmp:
            sizes = lenet300_sizes(Path(tmp))
    if "train" in parts:
        for name in args.models:
            mnist_model(name)
    if "latency" in parts:
        for name in args.models:
            if name not in results:
                raise SystemExit(f"{name}: no stored accuracy results (which PTQ is deployed): run --only accuracy")
            t0 = time.perf_counter()
            results[name]["latency"] = latency(
                name, results[name]["deployed_ptq"], args.processes, trained_weights=not args.untrained
            )
            seconds[f"latency {name}"] = time.perf_counter() - t0
    results = {name: results[name] for name in MODELS if name in results}
    payload = {"results": results, "lenet300_size_ratio": sizes, "threads": THREADS, "seconds": seconds, "quick": QUICK}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quantize.json").write_text(json.dumps(payload, indent=2))
    (OUT / "quantize.md").write_text(markdown(results, sizes))
    print(markdown(results, sizes))
    print(f"seconds: {seconds}")


if __name__ == "__main__":
    main()
