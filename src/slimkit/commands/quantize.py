"""``slimkit quantize``: int8 down to binary, written as a pickle-free artifact (and optionally ONNX)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimkit.commands._common import (
    ArgsOpt,
    DataOpt,
    ModelOpt,
    ShapeOpt,
    WeightsOpt,
    build_model,
    console,
    fail_cleanly,
    load_data,
)


@fail_cleanly
def quantize(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact folder to write (packed weights).")],
    weights: WeightsOpt = None,
    data: DataOpt = "mnist10k",
    shape: ShapeOpt = None,
    model_args: ArgsOpt = None,
    bits: Annotated[int, typer.Option("--bits", help="Weight bits: 8..2, 2 with --scheme ternary, 1 binary.")] = 8,
    act_bits: Annotated[int, typer.Option(help="Activation bits (0: weight-only).")] = 8,
    method: Annotated[str, typer.Option(help="dynamic, ptq or qat.")] = "ptq",
    scheme: Annotated[str, typer.Option(help="symmetric, affine, ternary or binary.")] = "symmetric",
    observer: Annotated[str, typer.Option(help="minmax, moving_average, percentile, mse or histogram.")] = "minmax",
    epochs: Annotated[int, typer.Option(help="QAT epochs.")] = 3,
    lr: Annotated[float, typer.Option(help="QAT learning rate.")] = 1e-3,
    adaround: Annotated[bool, typer.Option(help="PTQ: learn each weight's rounding (AdaRound).")] = False,
    onnx: Annotated[Path | None, typer.Option(help="Also write an ONNX file (QDQ int8 when possible).")] = None,
) -> None:
    """Quantize a trained model, compare accuracy and size with the float model, save the artifact."""
    from slimkit._text import human, make_table
    from slimkit.export.artifact import save
    from slimkit.measure import size_on_disk
    from slimkit.quantization import QuantConfig
    from slimkit.quantization import quantize as run_quantize
    from slimkit.train import evaluate

    if bits == 1 and scheme == "symmetric":
        scheme = "binary"
    cfg = QuantConfig(weight_bits=bits, act_bits=act_bits or None, method=method, scheme=scheme, observer=observer,
                      epochs=epochs, lr=lr, adaround=adaround)
    net = build_model(model, weights, model_args)
    train_data, test_data = load_data(data, shape)
    result = run_quantize(net, cfg, train_data, val_data=test_data if method == "qat" else None)
    before, after = evaluate(net, test_data).accuracy, evaluate(result.model, test_data).accuracy
    path = save(result, out, metrics={"accuracy_fp32": before, "accuracy_quantized": after})
    packed = (path / "model.safetensors").stat().st_size
    fp32 = size_on_disk(net)
    rows = [["fp32", f"{before:.2f}%", human(fp32, "B")],
            [f"{method} w{bits}" + (f"a{act_bits}" if act_bits else ""), f"{after:.2f}%", human(packed, "B")]]
    console.print(make_table(f"{model} on {data}", ["model", "accuracy", "weights on disk"], rows))
    skipped = result.record["skipped"]
    if skipped:
        console.print("kept in float: " + ", ".join(f"{k} ({v})" for k, v in skipped.items()))
    if onnx is not None:
        from slimkit.export.onnx import export_onnx, is_int8_model

        x = next(iter(test_data))[0].unsqueeze(0)
        export_onnx(result.model, x, onnx, int8=is_int8_model(result.model) and (act_bits == 8))
        console.print(f"onnx: {onnx}")
    console.print(f"artifact: {path} ({fp32 / packed:.2f}x smaller weights)")


def register(app: typer.Typer) -> None:
    app.command()(quantize)
