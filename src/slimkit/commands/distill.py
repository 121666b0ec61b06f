"""``slimkit distill``: train a student on a teacher's soft targets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimkit.commands._common import DataOpt, ShapeOpt, build_model, check_out, console, fail_cleanly, load_data


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
    temperature: Annotated[float, typer.Option(help="Softmax temperature T > 0.")] = 4.0,
    alpha: Annotated[float, typer.Option(help="Weight of the soft KD term in [0, 1].")] = 0.9,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="sgd, adam or adamw.")] = "adam",
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    cache_teacher: Annotated[bool, typer.Option(help="Compute the teacher's logits once (data without "
                                                     "augmentation).")] = True,
) -> None:
    """Distill a teacher into a student (Hinton KD) and save the student's weights."""
    from slimkit.distillation import DistillConfig
    from slimkit.distillation import distill as run_distill
    from slimkit.models import save_weights

    check_out(out, "file")
    cfg = DistillConfig(temperature=temperature, alpha=alpha, epochs=epochs, lr=lr, optimizer=optimizer,
                        batch_size=batch_size, seed=seed, cache_teacher=cache_teacher)
    student_model = build_model(student, student_weights, student_args)
    teacher_model = build_model(teacher, teacher_weights, teacher_args)
    train_data, test_data = load_data(data, shape)
    result = run_distill(student_model, teacher_model, cfg, train_data, test_data)
    save_weights(result.model, out, metadata={"distilled_from": teacher, "temperature": str(temperature),
                                              "alpha": str(alpha)})
    record = result.record
    console.print(f"teacher {record['teacher_accuracy']:.2f}%  student {record['student_accuracy_before']:.2f}% -> "
                  f"{record['student_accuracy']:.2f}% (T={temperature:g}, alpha={alpha:g}) -> weights in {out}")


def register(app: typer.Typer) -> None:
    app.command()(distill)
