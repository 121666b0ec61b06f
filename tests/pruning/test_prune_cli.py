import json

import torch
from typer.testing import CliRunner

from slimkit.cli import app
from slimkit.models import create, load_weights
from slimkit.pruning import replay


def test_cli_prune_writes_weights_and_record(tmp_path):
    result = CliRunner().invoke(app, ["prune", "--model", "lenet5", "--out", str(tmp_path), "--amount", "0.5"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "record.json").read_text())
    assert abs(record["reduction"]["macs"] - 0.5) <= 0.02
    model = load_weights(replay(create("lenet5"), record), tmp_path / "model.safetensors")
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_cli_prune_bad_target_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["prune", "--model", "lenet5", "--out", str(tmp_path), "--target", "flops"])
    assert result.exit_code == 2
    assert "target='flops' is not valid" in result.output
