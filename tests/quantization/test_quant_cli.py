"""``slimkit quantize`` end to end on sklearn digits."""

import json

from typer.testing import CliRunner

from slimkit.cli import app


def test_quantize_cli_writes_artifact_and_onnx(tmp_path):
    out, onnx_path = tmp_path / "q.slim", tmp_path / "q.onnx"
    args = ["quantize", "--model", "mlp", "--model-args", '{"in_features": 64}', "--data", "digits", "--shape",
            "1x8x8", "--bits", "4", "--adaround", "--out", str(out), "--onnx", str(onnx_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and onnx_path.is_file()
    manifest = json.loads((out / "slimkit.json").read_text())
    assert manifest["history"][-1]["kind"] == "quantize"
    assert set(manifest["history"][-1]["record"]["stats"]["adaround"]) == {"1", "3"}
    assert "smaller weights" in result.output


def test_quantize_cli_bad_bits_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(app, ["quantize", "--model", "mlp", "--bits", "12", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "weight_bits" in result.output
    assert not (tmp_path / "x").exists()
