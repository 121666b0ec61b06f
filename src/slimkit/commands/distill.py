"""``slimkit distill``: train a student on a teacher's soft targets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from slimkit.commands._common import DataOpt, ShapeOpt, build_model, check_out, console, fail_cleanly, load_data
from slimkit.commands.pipeline import HOLDOUT_HELP, check_holdout, holdout_split
from slimkit.distillation.config import DEFAULT_ALPHA, DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_TEMPERATURE


@fail_cleanly
def distill(
    student: Annotated[str, typer.Option(help="Student: zoo name or 'pkg.module:function'.")],
    teacher: Annotated[str, typer.Option(help="Teacher: zoo name or 'pkg.module:function'.")],
    teacher_weights: Annotated[Path, typer.Option(help="The trained teacher's weights (.safetensors/state_dict).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the student's weights (.safetensors).")],
    data: DataOpt = "mnist10k",
    shape: ShapeOpt = None,
    student_weights: Annotated[Path | None, typer.Option(help="Start the student from these weights.")] = None,
    student_args: Annotated[str | None, typer.Option(help="JSON kwargs for the student factory.")] = None,
    teacher_args: Annotated[str | None, typer.Option(help="JSON kwargs for the teacher factory.")] = None,
    temperature: Annotated[float, typer.Option(help="Softmax temperature T > 0.")] = DEFAULT_TEMPERATURE,
    alpha: Annotated[float, typer.Option(help="Weight of the soft KD term in [0, 1].")] = DEFAULT_ALPHA,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = DEFAULT_EPOCHS,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = DEFAULT_LR,
    optimizer: Annotated[str, typer.Option(help="sgd, adam or adamw.")] = "adam",
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    cache_teacher: Annotated[
        bool, typer.Option(help="Compute the teacher's logits once (data without augmentation).")
    ] = True,
    holdout: Annotated[float, typer.Option(help=HOLDOUT_HELP)] = 0.1,
) -> None:
    """Distill a teacher into a student (Hinton KD) and save the student's weights."""
    from slimkit.distillation import DistillConfig
    from slimkit.distillation import distill as run_distill
    from slimkit.models import save_weights
    from slimkit.train import evaluate

    check_out(out, "file")
    check_holdout(holdout)
    settings: dict[str, Any] = {
        "temperature": temperature,
        "alpha": alpha,
        "epochs": epochs,
        "lr": lr,
        "optimizer": optimizer,
        "batch_size": batch_size,
        "seed": seed,
        "cache_teacher": cache_teacher,
    }  # the config turns strings into enums
    cfg = DistillConfig(**settings)
    student_model = build_model(student, student_weights, student_args)
    teacher_model = build_model(teacher, teacher_weights, teacher_args)
    train_data, test_data = load_data(data, shape)
    train_data, val_data = holdout_split(train_data, test_data, holdout)
    result = run_distill(student_model, teacher_model, cfg, train_data, val_data)
    save_weights(
        result.model, out, metadata={"distilled_from": teacher, "temperature": str(temperature), "alpha": str(alpha)}
    )
    record = result.record
    decided = "held-out split" if holdout else "test split"
    line = (
        f"teacher {record['teacher_accuracy']:.2f}%  student {record['student_accuracy_before']:.2f}% -> "
        f"{record['student_accuracy']:.2f}% on the {decided} (T={temperature:g}, alpha={alpha:g})"
    )
    if holdout:  # the epoch was chosen on the held-out split: the test split is only reported
        line += (
            f"; test accuracy: teacher {evaluate(teacher_model, test_data).accuracy:.2f}%, student "
            f"{evaluate(result.model, test_data).accuracy:.2f}%"
        )
    console.print(f"{line} -> weights in {out}")


def register(app: typer.Typer) -> None:
    app.command()(distill)
