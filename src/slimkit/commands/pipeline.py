"""Pipeline commands: compress, export, report, recipes."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from slimkit.commands._common import (
    ArgsOpt,
    DataOpt,
    ModelOpt,
    ShapeOpt,
    WeightsOpt,
    build_model,
    console,
    example,
    fail_cleanly,
    load_data,
)
from slimkit.errors import UsageError

TrustOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--trust",
        metavar="MODULE",
        help="Allow the artifact's factory from this module (or exact module:function); repeatable. Without it "
        "only slimkit's zoo models are built.",
    ),
]
RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="A recipe YAML file or a shipped recipe name.")]
# the same words for every command that holds out part of the training split (compress, search, train, distill)
HOLDOUT_HELP = (
    "Fraction (0 < f < 1) of the training split held out to decide on (accuracy budget, best epoch, "
    "search selection); the test split is then only reported. 0 decides on the test split itself."
)


def check_holdout(holdout: float) -> None:
    """``--holdout`` is 0 or a fraction strictly between 0 and 1 (NaN refused)."""
    if not (holdout == 0 or 0 < holdout < 1):
        raise UsageError(
            f"--holdout {holdout}: give a fraction of the training split, 0 < f < 1 (e.g. 0.1), or 0 "
            "to decide on the test split"
        )


def holdout_split(train_data: Any, test_data: Any, holdout: float) -> tuple[Any, Any]:
    """``(train, val)``: ``holdout`` of the training split (seeded) as the data decisions are made on, or the test
    split when ``holdout`` is 0."""
    check_holdout(holdout)
    if not holdout:
        return train_data, test_data
    from slimkit.data import split

    return split(train_data, holdout)


@fail_cleanly
def compress(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder that receives <model>.slim.")],
    weights: WeightsOpt = None,
    data: DataOpt = "mnist10k",
    recipe: RecipeOpt = "fast-cpu",
    shape: ShapeOpt = None,
    model_args: ArgsOpt = None,
    max_accuracy_drop: Annotated[
        float | None, typer.Option(help="Override the recipe's accuracy budget (points).")
    ] = None,
    holdout: Annotated[float, typer.Option(help=HOLDOUT_HELP)] = 0.1,
) -> None:
    """Compress a trained model with a recipe under an accuracy budget; writes the artifact and its report."""
    from slimkit.commands._common import check_out
    from slimkit.export.artifact import save
    from slimkit.pipeline import compress as run_compress
    from slimkit.recipe import Recipe
    from slimkit.report import write_report

    artifact = out / f"{model.replace(':', '_').replace('.', '_')}.slim"
    check_out(out, "folder")
    check_out(artifact, "artifact")
    check_holdout(holdout)
    net = build_model(model, weights, model_args)
    train_data, test_data = load_data(data, shape)
    train_data, val_data = holdout_split(train_data, test_data, holdout)
    plan = Recipe.load(recipe)
    if max_accuracy_drop is not None:  # through the constructor, so the override is validated like the recipe
        plan = dataclasses.replace(plan, max_accuracy_drop=max_accuracy_drop)
    # the example input comes from the data itself (its shape is what the model will see)
    result = run_compress(net, plan, train_data, val_data, test_data=test_data if holdout else None, console=console)
    console.print(result.table())
    path = save(result, artifact)
    html = write_report(path)
    console.print(f"artifact: {path}\nreport:   {html}")


@fail_cleanly
def export(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by `slimkit compress`.")],
    format: Annotated[str, typer.Option("--format", "-f", help="onnx, onnx-int8 or torch-export.")] = "onnx-int8",
    data: Annotated[str | None, typer.Option(help="Data spec for the parity check (its test split).")] = None,
    shape: ShapeOpt = None,
    trust: TrustOpt = None,
) -> None:
    """Export an artifact to ONNX (fp32 / QDQ int8) or a torch.export program, inside the artifact folder."""
    from slimkit.export.artifact import load, update
    from slimkit.history import source_of
    from slimkit.pipeline import export_model
    from slimkit.recipe import ExportConfig

    model = load(artifact, trust=trust or [])  # checks the manifest and the factory's trust before running it
    cfg = ExportConfig.from_dict({"format": format})
    source = source_of(model) or {}
    x = example(source["factory"], shape, None) if data is None else load_data(data, shape)[1][0][0].unsqueeze(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(model, cfg, x, Path(tmp))
        if data is not None and path.suffix == ".onnx":
            from slimkit.export.runtime import OrtModel, parity

            result = parity(model, OrtModel(path, threads=2), load_data(data, shape)[1])
            console.print(
                f"parity vs PyTorch: max |diff| {result['max_abs_diff']:.3g}, "
                f"top-1 agreement {100 * result['top1_agreement']:.2f}%"
            )
        update(artifact, files={path.name: path})
    console.print(f"wrote {artifact / path.name}")


@fail_cleanly
def report(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by `slimkit compress`.")],
    trust: TrustOpt = None,
) -> None:
    """Write report.md / report.html (with PNG plots) into an artifact and print its before/after table."""
    from slimkit._text import make_table
    from slimkit.export.artifact import read_manifest, trusted_manifest
    from slimkit.report import summary_rows, write_report

    trusted_manifest(artifact, trust=trust or [])  # refuses an untrusted factory before the report builds anything
    html = write_report(artifact, trust=trust or [])
    rows = summary_rows(read_manifest(artifact)["metrics"])
    console.print(make_table(f"{artifact}", ["metric", "before", "after", "change"], rows))
    console.print(f"report: {html}")


@fail_cleanly
def recipes() -> None:
    """List the shipped recipes and their steps."""
    from slimkit._text import make_table
    from slimkit.recipe import Recipe, shipped_recipes

    rows = []
    for name in shipped_recipes():
        recipe = Recipe.load(name)
        rows.append([name, f"{recipe.max_accuracy_drop}", " -> ".join(s.kind.value for s in recipe.steps)])
    console.print(make_table("shipped recipes", ["name", "max drop (pt)", "steps"], rows))


def register(app: typer.Typer) -> None:
    app.command()(compress)
    app.command()(export)
    app.command()(report)
    app.command()(recipes)
