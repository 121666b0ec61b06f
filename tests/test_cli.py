import json

from typer.testing import CliRunner

from slimkit.cli import app

runner = CliRunner()


def test_profile_resnet56():
    result = runner.invoke(app, ["profile", "--model", "resnet56"])
    assert result.exit_code == 0, result.output
    assert "0.86M" in result.output or "855.77K" in result.output
    assert "125.75M" in result.output


def test_train_then_eval(tmp_path):
    out = tmp_path / "w.safetensors"
    args = [
        "train",
        "--model",
        "mlp",
        "--data",
        "digits",
        "--model-args",
        json.dumps({"in_features": 64}),
        "--epochs",
        "2",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.exists()
    result = runner.invoke(
        app,
        ["eval", "--model", "mlp", "--weights", str(out), "--data", "digits", "--model-args", '{"in_features": 64}'],
    )
    assert result.exit_code == 0 and "accuracy" in result.output
    accuracy = float(result.output.split("accuracy")[1].split("%")[0])
    assert accuracy > 80


def test_bad_input_is_one_clear_line():
    result = runner.invoke(app, ["profile", "--model", "resnet65"])
    assert result.exit_code == 2 and "did you mean 'resnet56'" in result.output
    result = runner.invoke(app, ["eval", "--model", "mlp", "--data", "nope"])
    assert result.exit_code == 2 and "unknown data spec" in result.output


def test_help_lists_every_command_and_each_has_help():
    import typer.main

    commands = typer.main.get_command(app).commands  # what typer really registered
    expected = {
        "models",
        "profile",
        "train",
        "eval",
        "demo",
        "compress",
        "export",
        "report",
        "recipes",
        "prune",
        "quantize",
        "distill",
        "search",
    }
    assert expected <= set(commands)
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = {line.split()[1] for line in result.output.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
    assert set(commands) <= listed, set(commands) - listed
    for name, command in commands.items():
        assert command.help, f"{name} has no help text"
        sub = runner.invoke(app, [name, "--help"])
        assert sub.exit_code == 0 and f"slimkit {name}" in sub.output, name
