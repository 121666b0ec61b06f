"""``slimkit search``: Optuna search over training hyperparameters or compression plans (resumable, shareable)."""

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
    fail_cleanly,
    load_data,
)
from slimkit.commands.pipeline import HOLDOUT_HELP, check_holdout, holdout_split
from slimkit.errors import MissingFileError, UsageError


def read_space(space: str) -> dict | str:
    """A preset name, or a JSON/YAML file holding ``{name: spec}``."""
    path = Path(space)
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        return space
    if not path.is_file():
        raise MissingFileError(f"search space file {path} does not exist")
    from slimkit.recipe import read_yaml

    value = read_yaml(path)  # JSON is YAML; size-limited, no aliases or duplicate keys
    if not isinstance(value, dict):
        raise UsageError(f"{path}: expected a mapping of parameter name -> spec, got {type(value).__name__}")
    return value


@fail_cleanly
def search(
    model: ModelOpt,
    data: DataOpt = "mnist10k",
    weights: WeightsOpt = None,
    shape: ShapeOpt = None,
    model_args: ArgsOpt = None,
    objectives: Annotated[str, typer.Option(help="Comma-separated: accuracy, latency, size, macs.")] = "accuracy",
    max_accuracy_drop: Annotated[
        float | None, typer.Option(help="Accuracy budget in points vs the input model.")
    ] = None,
    relative: Annotated[bool, typer.Option(help="The budget is a percent of the input accuracy.")] = False,
    space: Annotated[str, typer.Option(help="Preset (training, compression) or a JSON/YAML space file.")] = "training",
    n_trials: Annotated[
        int, typer.Option(help="Trials in the whole study (finished ones of earlier runs count).")
    ] = 20,
    timeout: Annotated[float | None, typer.Option(help="Seconds after which this run starts no new trial.")] = None,
    epochs: Annotated[int, typer.Option(help="Training / recovery epochs per trial.")] = 3,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage URL: sqlite:///f.db, postgresql://..., journal:PATH (default: sqlite in --out)."
        ),
    ] = None,
    study_name: Annotated[str, typer.Option(help="Study name inside the storage.")] = "slimkit-search",
    workers: Annotated[int, typer.Option(help="Local worker processes sharing the study.")] = 1,
    sampler: Annotated[str, typer.Option(help="auto, tpe, nsga2 or random.")] = "auto",
    pruner: Annotated[str, typer.Option(help="median, percentile, hyperband, halving or none.")] = "median",
    holdout: Annotated[float, typer.Option(help=HOLDOUT_HELP)] = 0.0,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the study, best model, Pareto set, report.")
    ] = Path("slimkit-search"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Search hyperparameters or compression plans; rerun the same command to continue a killed run."""
    from slimkit.tuning import SearchConfig
    from slimkit.tuning import search as run_search

    check_out(out, "search")
    check_holdout(holdout)
    settings: dict[str, Any] = {  # strings become enums inside the config, with its error messages
        "objectives": tuple(o.strip() for o in objectives.split(",") if o.strip()),
        "max_accuracy_drop": max_accuracy_drop,
        "relative": relative,
        "n_trials": n_trials,
        "timeout": timeout,
        "storage": storage,
        "study_name": study_name,
        "workers": workers,
        "sampler": sampler,
        "pruner": pruner,
        "space": read_space(space),
        "epochs": epochs,
        "out": str(out),
        "seed": seed,
    }
    cfg = SearchConfig(**settings)
    net = build_model(model, weights, model_args)
    train_data, test_data = load_data(data, shape)
    train_data, val_data = holdout_split(train_data, test_data, holdout)
    study = run_search(net, cfg, train_data, val_data)
    console.print(study.table())
    if study.message:
        console.print(study.message)
    console.print(f"report: {study.report}")


def register(app: typer.Typer) -> None:
    app.command()(search)
