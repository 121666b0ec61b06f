"""``slimkit quantize``: int8 down to binary, written as a pickle-free artifact (and optionally ONNX)."""

from __future__ import annotations

import errno
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
    check_out,
    console,
    fail_cleanly,
    load_data,
)
from slimkit.errors import UsageError


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
    epochs: Annotated[
        int,
        typer.Option(
            help="QAT epochs (the best one on 1/8 of the training split, held out, "
            "is kept; the test split is only reported)."
        ),
    ] = 3,
    lr: Annotated[float, typer.Option(help="QAT learning rate.")] = 1e-3,
    adaround: Annotated[bool, typer.Option(help="PTQ: learn each weight's rounding (AdaRound).")] = False,
    onnx: Annotated[
        Path | None,
        typer.Option(
            help="Also write an ONNX file, int8 when possible (QDQ for ptq / qat with 8-bit activations, "
            "DynamicQuantizeLinear -> MatMulInteger for dynamic), else fp32; also stored in the artifact as "
            "model.onnx."
        ),
    ] = None,
) -> None:
    """Quantize a trained model, compare accuracy and size with the float model, save the artifact."""
    from slimkit._io import atomic_path
    from slimkit._text import human, make_table
    from slimkit.data import split
    from slimkit.export.artifact import save
    from slimkit.measure import size_on_disk
    from slimkit.quantization import QuantConfig
    from slimkit.quantization import quantize as run_quantize
    from slimkit.train import evaluate

    check_out(out, "artifact")
    if onnx is not None:
        check_out(onnx, "file", option="--onnx")
    if onnx is not None and onnx.resolve().is_relative_to(out.resolve()):
        raise UsageError(
            f"--onnx {onnx} is inside the artifact folder --out {out}, which holds it as model.onnx "
            "anyway; give a path outside it"
        )
    cfg = QuantConfig.from_dict(
        dict(
            weight_bits=bits,
            act_bits=act_bits or None,
            method=method,
            scheme=scheme,
            observer=observer,
            epochs=epochs,
            lr=lr,
            adaround=adaround,
        )
    )
    net = build_model(model, weights, model_args)
    train_data, test_data = load_data(data, shape)
    val_data = None
    if method == "qat":  # pick the epoch on held-out training data; the test split is only reported
        train_data, val_data = split(train_data, 0.125)
    result = run_quantize(net, cfg, train_data, val_data=val_data)
    before, after = evaluate(net, test_data).accuracy, evaluate(result.model, test_data).accuracy
    metrics = {"accuracy_fp32": before, "accuracy_quantized": after}
    if onnx is None:
        path = save(result, out, metrics=metrics)
    else:
        from slimkit.export.onnx import export_onnx, is_dynamic_model, is_int8_model

        int8: bool | None = None  # export_onnx picks QDQ (static) or MatMulInteger (dynamic)
        if not is_dynamic_model(result.model) and not (is_int8_model(result.model) and act_bits == 8):
            int8 = False
            why = f"{act_bits}-bit activations" if act_bits else "weight-only quantization"
            console.print(f"note: {why} cannot be written as int8 ONNX; writing the simulated model in fp32")
        x = next(iter(test_data))[0].unsqueeze(0)
        # all or nothing: the ONNX file is written beside its final name, then the artifact (holding a copy of it);
        # the ONNX file takes its final name only once the artifact is saved, and is removed if anything fails
        try:
            with atomic_path(onnx, kind="file") as tmp_onnx:  # renamed onto --onnx only if the artifact is saved too
                export_onnx(result.model, x, tmp_onnx, int8=int8)
                path = save(result, out, metrics=metrics, extra_files={"model.onnx": tmp_onnx})
        except OSError as exc:  # e.g. an unwritable --onnx folder: one clean line, not a traceback
            if exc.errno == errno.ENOSPC:  # fail_cleanly names a full disk itself
                raise
            raise UsageError(f"could not write the ONNX file or the artifact, so neither was written: {exc}") from exc
    packed = (path / "model.safetensors").stat().st_size
    fp32 = size_on_disk(net)
    rows = [
        ["fp32", f"{before:.2f}%", human(fp32, "B")],
        [f"{method} w{bits}" + (f"a{act_bits}" if act_bits else ""), f"{after:.2f}%", human(packed, "B")],
    ]
    console.print(make_table(f"{model} on {data}", ["model", "accuracy", "weights on disk"], rows))
    skipped = result.record["skipped"]
    if skipped:
        console.print("kept in float: " + ", ".join(f"{k} ({v})" for k, v in skipped.items()))
    if onnx is not None:
        console.print(f"onnx: {onnx}")
    console.print(f"artifact: {path} ({fp32 / packed:.2f}x smaller weights)")


def register(app: typer.Typer) -> None:
    app.command()(quantize)
