"""``slimkit quantize`` end to end on sklearn digits."""

import errno
import json

from typer.testing import CliRunner

from slimkit.cli import app


def test_quantize_cli_writes_artifact_and_onnx(tmp_path):
    out, onnx_path = tmp_path / "q.slim", tmp_path / "q.onnx"
    args = [
        "quantize",
        "--model",
        "mlp",
        "--model-args",
        '{"in_features": 64}',
        "--data",
        "digits",
        "--shape",
        "1x8x8",
        "--bits",
        "4",
        "--adaround",
        "--out",
        str(out),
        "--onnx",
        str(onnx_path),
    ]
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


DIGITS_MLP = ["--model", "mlp", "--model-args", '{"in_features": 64}', "--data", "digits", "--shape", "1x8x8"]


def test_quantize_cli_unwritable_onnx_leaves_no_artifact(tmp_path):
    out = tmp_path / "q.slim"
    result = CliRunner().invoke(app, ["quantize", *DIGITS_MLP, "--out", str(out), "--onnx", "/proc/nope/x.onnx"])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "/proc/nope" in result.output and "neither was written" in result.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_quantize_cli_failed_save_removes_the_onnx_file(tmp_path, monkeypatch):
    import slimkit.export.artifact as artifact

    def broken_save(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "q.slim")  # what a full disk raises

    monkeypatch.setattr(artifact, "save", broken_save)
    out, onnx_path = tmp_path / "q.slim", tmp_path / "q.onnx"
    result = CliRunner().invoke(app, ["quantize", *DIGITS_MLP, "--out", str(out), "--onnx", str(onnx_path)])
    assert result.exit_code == 2, result.output
    assert "disk is full writing q.slim" in result.output
    assert list(tmp_path.iterdir()) == []  # no ONNX file, no temporary beside it, no artifact


def test_quantize_cli_dynamic_onnx_is_integer(tmp_path):
    import onnx

    out, onnx_path = tmp_path / "d.slim", tmp_path / "d.onnx"
    args = ["quantize", *DIGITS_MLP, "--method", "dynamic", "--out", str(out), "--onnx", str(onnx_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ops = [node.op_type for node in onnx.load(str(onnx_path)).graph.node]
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops, ops
    assert (out / "model.onnx").read_bytes() == onnx_path.read_bytes()
    assert "model.onnx" in json.loads((out / "slimkit.json").read_text())["files"]


def test_quantize_cli_low_bit_activations_fall_back_to_fp32_onnx(tmp_path):
    import onnx

    onnx_path = tmp_path / "a4.onnx"
    args = ["quantize", *DIGITS_MLP, "--act-bits", "4", "--out", str(tmp_path / "a4.slim"), "--onnx", str(onnx_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4-bit activations" in result.output and "fp32" in result.output
    ops = {node.op_type for node in onnx.load(str(onnx_path)).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "MatMulInteger"}, ops


def test_quantize_cli_qat_validates_on_held_out_training_data(tmp_path, monkeypatch):
    import torch

    import slimkit.quantization as quantization
    from slimkit.data import load, split

    real, seen = quantization.quantize, {}

    def spy(model, config, data=None, *, val_data=None, **kwargs):
        seen.update(data=data, val_data=val_data)
        return real(model, config, data, val_data=val_data, **kwargs)

    monkeypatch.setattr(quantization, "quantize", spy)
    args = ["quantize", *DIGITS_MLP, "--method", "qat", "--epochs", "1", "--out", str(tmp_path / "qat.slim")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    train, test = load("digits", shape=(1, 8, 8))
    fit, val = split(train, 0.125)
    assert len(seen["val_data"]) == len(val) and torch.equal(seen["val_data"].images, val.images)
    assert torch.equal(seen["data"].images, fit.images)  # QAT does not train on its validation examples
    assert len(seen["data"]) + len(seen["val_data"]) == len(train) and len(test) > 0
