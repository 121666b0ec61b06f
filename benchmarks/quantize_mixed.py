"""Mixed precision on MNIST-10k: per-layer weight bits chosen from measured sensitivity under a size budget, against
uniform bit widths, on the checkpoints of benchmarks/quantize.py (LeNet-5 and ResNet-20; trained on 7,000 digits).

Rows: uniform int8 / int4 / int2 weights (first and last layer 8-bit, the default) and ``mixed_precision`` plans at
5x, 6x and 7x smaller weights (every layer free to take 8, 4 or 2 bits, sensitivity measured on 4 x 64 training
digits). All rows are PTQ with 8-bit activations on the first calibration draw of benchmarks/quantize.py (1,024
training digits); accuracy on the 2,000 test digits; size = packed safetensors vs fp32 safetensors.

Run: ``flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/quantize_mixed.py`` (writes
benchmarks/results/quantize_mixed.{json,md}; about 2 minutes with the checkpoints cached).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from quantize import OUT, calibration_draws, file_bytes, mnist_model, packed_bytes, run_models

from slimkit.quantization import QuantConfig, quantize
from slimkit.quantization.mixed import mixed_precision
from slimkit.train import evaluate

RATIOS = (5.0, 6.0, 7.0)


def run_model(name: str, folder: Path) -> dict:
    model, train, _, test = mnist_model(name)
    calib = calibration_draws(train, 1)[0]
    fp32_bytes = file_bytes(model.state_dict(), folder, f"{name}-fp32")
    rows = {"fp32": {"accuracy": evaluate(model, test).accuracy, "size_ratio": 1.0}}
    configs = {f"uniform int{b}": QuantConfig(weight_bits=b) for b in (8, 4, 2)}
    for ratio in RATIOS:
        t0 = time.perf_counter()
        plan = mixed_precision(model, calib, size_ratio=ratio)
        configs[f"mixed {ratio:.0f}x"] = QuantConfig(overrides=plan.overrides, keep_first_last_8bit=False)
        rows[f"mixed {ratio:.0f}x"] = {"plan_seconds": time.perf_counter() - t0, "bits": plan.bits}
    for label, cfg in configs.items():
        q = quantize(model, cfg, calib).model
        rows.setdefault(label, {}).update(
            accuracy=evaluate(q, test).accuracy, size_ratio=fp32_bytes / packed_bytes(q, folder, f"{name}-{label}")
        )
        print(f"{name} {label}: {rows[label]['accuracy']:.2f}% {rows[label]['size_ratio']:.2f}x", flush=True)
    return rows


def markdown(results: dict) -> str:
    lines = [
        "# Mixed precision vs uniform bit widths on MNIST-10k (2,000 test digits)",
        "",
        "Reproduce: `flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/quantize_mixed.py`",
        "",
        "| model | weights | accuracy | drop (pt) | packed size vs fp32 | layers at 8 / 4 / 2 bits |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, rows in results.items():
        fp32 = rows["fp32"]["accuracy"]
        for label, row in rows.items():
            bits = list(row.get("bits", {}).values())
            mix = " / ".join(str(bits.count(b)) for b in (8, 4, 2)) if bits else ""
            lines.append(
                f"| {name} | {label} | {row['accuracy']:.2f} | {fp32 - row['accuracy']:+.2f} | "
                f"{row['size_ratio']:.2f}x | {mix} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    results, seconds = run_models(run_model, ("lenet5", "resnet20"))
    (OUT / "quantize_mixed.json").write_text(json.dumps({"results": results, "seconds": seconds}, indent=2))
    (OUT / "quantize_mixed.md").write_text(markdown(results))
    print(markdown(results))
    print(f"total {seconds:.0f}s")


if __name__ == "__main__":
    main()
