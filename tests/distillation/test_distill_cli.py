"""The ``slimkit distill`` command on the tiny sklearn digits."""

import json

import torch
from typer.testing import CliRunner

from slimkit.cli import app
from slimkit.models import create, load_weights, save_weights

runner = CliRunner()
DIGITS = json.dumps({"in_features": 64})


def test_distill_command_writes_a_student_that_works(tmp_path):
    torch.manual_seed(0)
    teacher_path, out = tmp_path / "teacher.safetensors", tmp_path / "student.safetensors"
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            "mlp",
            "--data",
            "digits",
            "--model-args",
            DIGITS,
            "--epochs",
            "3",
            "--out",
            str(teacher_path),
        ],
    )
    assert result.exit_code == 0, result.output
    args = [
        "distill",
        "--student",
        "mlp",
        "--student-args",
        json.dumps({"in_features": 64, "hidden": 16}),
        "--teacher",
        "mlp",
        "--teacher-args",
        DIGITS,
        "--teacher-weights",
        str(teacher_path),
        "--data",
        "digits",
        "--temperature",
        "3",
        "--alpha",
        "0.8",
        "--epochs",
        "8",
        "--lr",
        "0.01",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "T=3, alpha=0.8" in result.output
    accuracy = float(result.output.split("-> ")[1].split("%")[0])
    assert accuracy > 80
    student = load_weights(create("mlp", in_features=64, hidden=16), out)
    assert student.state_dict()["1.weight"].shape == (16, 64)


def test_distill_command_rejects_bad_settings_in_one_line(tmp_path):
    weights = tmp_path / "t.safetensors"
    save_weights(create("mlp", in_features=64), weights)
    base = [
        "distill",
        "--student",
        "mlp",
        "--teacher",
        "mlp",
        "--teacher-weights",
        str(weights),
        "--data",
        "digits",
        "--student-args",
        DIGITS,
        "--teacher-args",
        DIGITS,
        "--out",
        str(tmp_path / "s.safetensors"),
    ]
    result = runner.invoke(app, [*base, "--temperature", "0"])
    assert result.exit_code == 2 and "temperature=0.0 must be a number > 0" in result.output
    result = runner.invoke(app, [*base, "--alpha", "1.5"])
    assert result.exit_code == 2 and "alpha=1.5 is out of range" in result.output
    result = runner.invoke(
        app,
        [
            *base[:-6],
            "--student-args",
            json.dumps({"in_features": 64, "num_classes": 3}),
            "--teacher-args",
            DIGITS,
            "--out",
            str(tmp_path / "s.safetensors"),
        ],
    )
    assert result.exit_code == 2 and "output sizes differ" in result.output
    assert not (tmp_path / "s.safetensors").exists()
