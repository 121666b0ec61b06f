"""Foundation commands: models, profile, train, eval, demo."""

from __future__ import annotations

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
    check_out,
    console,
    example,
    fail_cleanly,
    load_data,
)
from slimkit.commands.pipeline import HOLDOUT_HELP, check_holdout, holdout_split


@fail_cleanly
def models() -> None:
    """List the model zoo."""
    from slimkit._text import make_table
    from slimkit.models import ZOO

    rows = [[name, "x".join(map(str, spec.input_shape)), spec.description] for name, spec in ZOO.items()]
    console.print(make_table("slimkit model zoo", ["name", "input", "description"], rows))


@fail_cleanly
def profile(
    model: ModelOpt,
    weights: WeightsOpt = None,
    shape: ShapeOpt = None,
    model_args: ArgsOpt = None,
    batch: Annotated[int, typer.Option(help="Batch size of the example input.")] = 1,
) -> None:
    """Print parameters, MACs, FLOPs and bytes on disk, per layer."""
    from slimkit.measure import profile as run_profile

    prof = run_profile(build_model(model, weights, model_args), example(model, shape, model_args, batch))
    console.print(prof.table())


@fail_cleanly
def train(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the trained weights (.safetensors).")],
    data: DataOpt = "mnist10k",
    weights: WeightsOpt = None,
    shape: ShapeOpt = None,
    model_args: ArgsOpt = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 0.05,
    optimizer: Annotated[str, typer.Option(help="sgd, adam or adamw.")] = "sgd",
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    holdout: Annotated[float, typer.Option(help=HOLDOUT_HELP)] = 0.1,
) -> None:
    """Train a model on a data spec; the weights of the best epoch on the held-out split are saved."""
    from slimkit.train import TrainConfig, evaluate, fit

    check_out(out, "file")
    check_holdout(holdout)
    settings: dict[str, Any] = {
        "epochs": epochs,
        "lr": lr,
        "optimizer": optimizer,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "seed": seed,
    }  # the config turns strings into enums
    cfg = TrainConfig(**settings)
    net = build_model(model, weights, model_args)
    train_data, test_data = load_data(data, shape)
    train_data, val_data = holdout_split(train_data, test_data, holdout)
    result = fit(net, train_data, val_data, cfg, checkpoint=out)
    chosen = f"weights of the best epoch on the {'held-out' if holdout else 'test'} split"
    if result.best_epoch is not None and result.best_accuracy is not None:
        chosen += f": epoch {result.best_epoch + 1}, {result.best_accuracy:.2f}%"
    console.print(f"test accuracy {evaluate(net, test_data).accuracy:.2f}% ({chosen}) -> weights in {out}")


@fail_cleanly
def evaluate(
    model: ModelOpt,
    weights: WeightsOpt = None,
    data: DataOpt = "mnist10k",
    shape: ShapeOpt = None,
    model_args: ArgsOpt = None,
) -> None:
    """Top-1 accuracy and loss on the test split of a data spec."""
    from slimkit.train import evaluate as run_evaluate

    _, test_data = load_data(data, shape)
    result = run_evaluate(build_model(model, weights, model_args), test_data)
    console.print(f"{model} on {data}: accuracy {result.accuracy:.2f}%  loss {result.loss:.4f}  (n={result.count})")


@fail_cleanly
def demo(
    cache: Annotated[Path, typer.Option(help="Folder for cached checkpoints and outputs.")] = Path(".slimkit-cache"),
    retrain: Annotated[bool, typer.Option(help="Ignore cached checkpoints.")] = False,
    recipe: Annotated[str, typer.Option(help="Recipe for both models (see `slimkit recipes`).")] = "fast-cpu",
) -> None:
    """Train the MLP and LeNet-5 on the bundled MNIST-10k, compress both, print before/after, write reports."""
    from slimkit.demo import run_demo

    run_demo(cache, retrain=retrain, console=console, recipe=recipe)


def register(app: typer.Typer) -> None:
    app.command()(models)
    app.command()(profile)
    app.command()(train)
    app.command(name="eval")(evaluate)
    app.command()(demo)
