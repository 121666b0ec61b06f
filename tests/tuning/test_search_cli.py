"""``slimkit search``: a run from a space file, a continued run, clear errors."""

import json

from typer.testing import CliRunner

from slimkit.cli import app
from slimkit.tuning.saving import read_result

runner = CliRunner()
MODEL = ["--model", "mlp", "--model-args", json.dumps({"in_features": 64, "hidden": 16}), "--data", "digits"]


def test_search_from_a_space_file_then_continue(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 0.001, high: 0.3, log: true}\nbatch_size: 64\n")
    args = [
        "search",
        *MODEL,
        "--space",
        str(space),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--objectives",
        "accuracy,size",
        "--holdout",
        "0.2",
    ]
    result = runner.invoke(app, [*args, "--n-trials", "2"])
    assert result.exit_code == 0, result.output
    assert "best" in result.output and (tmp_path / "run" / "report.md").is_file()
    result = runner.invoke(app, [*args, "--n-trials", "3"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(saved["trials"]) == 3
    assert read_result(tmp_path / "run" / "best")["trial"] == saved["best"]["trial"]


def _error(args):
    result = runner.invoke(app, ["search", *MODEL, *args])
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split())  # rich wraps long lines


def test_search_errors_are_one_clear_line(tmp_path):
    assert "unknown objective 'sped'" in _error(["--objectives", "accuracy,sped", "--out", str(tmp_path)])
    assert "nope.json does not exist" in _error(["--space", str(tmp_path / "nope.json"), "--out", str(tmp_path)])
    message = _error(["--storage", "mysql://u:pw@127.0.0.1:9/x", "--out", str(tmp_path)])
    assert "storage mysql://u:***@" in message and ":pw@" not in message
    # --holdout is a fraction of the training split, as in compress (a count was refused only after loading)
    for bad in ("300", "1", "-0.1", "nan"):
        assert f"--holdout {float(bad)}: give a fraction of the training split, 0 < f < 1" in _error(
            ["--holdout", bad, "--out", str(tmp_path)]
        )
