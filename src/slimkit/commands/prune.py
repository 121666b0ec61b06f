"""``slimkit prune``: structured pruning over the same API (slimkit.prune)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slimkit.commands._common import (
    ArgsOpt,
    ModelOpt,
    ShapeOpt,
    WeightsOpt,
    build_model,
    check_out,
    console,
    example,
    fail_cleanly,
    load_data,
)


@fail_cleanly
def prune(
    model: ModelOpt,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Folder for pruned weights + record.json (an older one is replaced whole)."),
    ],
    weights: WeightsOpt = None,
    shape: ShapeOpt = None,
    model_args: ArgsOpt = None,
    amount: Annotated[float, typer.Option(help="Fraction of the target to remove (0.5 = 2x fewer MACs).")] = 0.5,
    target: Annotated[
        str, typer.Option(help="channels, macs, params or latency (measured on --runtime at batch 64).")
    ] = "macs",
    importance: Annotated[
        str, typer.Option(help="l1, l2, fpgm, bn_scale, taylor, activation or random (taylor, activation read --data).")
    ] = "l2",
    allocation: Annotated[str, typer.Option(help="uniform, global or proportional.")] = "uniform",
    ignore: Annotated[list[str] | None, typer.Option(help="Module name or re:pattern to keep (repeatable).")] = None,
    round_to: Annotated[
        int | None,
        typer.Option(help="Kept channel counts are multiples of this (default: 16 for groups of 16+ channels)."),
    ] = None,
    runtime: Annotated[str, typer.Option(help="Where --target latency measures: onnxruntime or eager.")] = (
        "onnxruntime"
    ),
    max_sparsity: Annotated[float, typer.Option(help="Cap on the fraction removed from any one group.")] = 0.9,
    reconstruct: Annotated[
        bool, typer.Option(help="Refit the layers that lost inputs by least squares on --data (no labels needed).")
    ] = False,
    data: Annotated[
        str | None, typer.Option(help="Calibration data for taylor / activation / --reconstruct (a data spec).")
    ] = None,
) -> None:
    """Prune channels of a model to a MACs/params/channels target; writes weights and the replayable record."""
    from slimkit._io import atomic_path
    from slimkit.models.weights import save_weights
    from slimkit.pruning import PruneConfig
    from slimkit.pruning import prune as run_prune

    check_out(out, "prune")
    cfg = PruneConfig.from_dict(
        dict(
            amount=amount,
            target=target,
            importance=importance,
            allocation=allocation,
            ignore=tuple(ignore or ()),
            round_to=round_to,
            max_sparsity=max_sparsity,
            runtime=runtime,
            reconstruct=reconstruct,
        )
    )
    train_data = load_data(data, shape)[0] if data else None
    net = build_model(model, weights, model_args)
    result = run_prune(net, cfg, example(model, shape, model_args), train_data=train_data)
    with atomic_path(out, kind="prune") as tmp:  # weights and record appear together, or not at all
        tmp.mkdir()
        save_weights(result.model, tmp / "model.safetensors")
        (tmp / "record.json").write_text(json.dumps(result.record, indent=1))
    before, after = result.record["before"], result.record["after"]
    speed = result.record.get("latency")
    faster = f", {speed['speedup']:.2f}x faster on {runtime}" if speed else ""
    console.print(
        f"params {before['params']:,} -> {after['params']:,}, MACs {before['macs']:,.0f} -> "
        f"{after['macs']:,.0f} ({result.record['reduction']['macs']:.1%} fewer){faster}; "
        f"{len(result.record['kept_intact'])} group(s) kept intact -> {out}"
    )


def register(app: typer.Typer) -> None:
    app.command()(prune)
