"""ONNX export (fp32 and QDQ int8 from slimkit's scales) and ONNX Runtime parity."""

import onnx
import pytest
import torch

from slimkit import models
from slimkit.export.onnx import export_onnx
from slimkit.export.runtime import OrtModel, parity
from slimkit.quantization import QuantConfig, quantize
from slimkit.train import TrainConfig, fit


@pytest.fixture(scope="module")
def trained_lenet5(mnist):
    train, _ = mnist
    model = models.create("lenet5")
    fit(model, train.subset(3000), None, TrainConfig(epochs=1, lr=1e-3, progress=False))
    return model


def test_int8_export_agrees_with_fake_quant_model_on_mnist(trained_lenet5, mnist, tmp_path):
    train, test = mnist
    result = quantize(trained_lenet5, QuantConfig(calibration_batches=8), train)
    path = export_onnx(result.model, torch.zeros(1, 1, 28, 28), tmp_path / "int8.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    assert weights["features.0.weight.int8"].data_type == onnx.TensorProto.INT8
    report = parity(result.model, OrtModel(path, threads=1), test)
    assert report["count"] == 2000
    assert report["top1_agreement"] >= 0.99, report


def test_fp32_export_matches_torch(trained_lenet5, mnist, tmp_path):
    _, test = mnist
    path = export_onnx(trained_lenet5, torch.zeros(1, 1, 28, 28), tmp_path / "fp32.onnx")
    assert "QuantizeLinear" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    report = parity(trained_lenet5, OrtModel(path, threads=1), test.subset(256))
    assert report["max_abs_diff"] < 1e-3 and report["top1_agreement"] == 1.0


def test_int8_export_errors(trained_lenet5, tmp_path, mnist):
    with pytest.raises(ValueError, match="int8=True"):
        export_onnx(trained_lenet5, torch.zeros(1, 1, 28, 28), tmp_path / "x.onnx", int8=True)
    grouped = quantize(trained_lenet5, QuantConfig(granularity="per_group", group_size=8, weight_bits=8), mnist[0])
    with pytest.raises(ValueError, match="per-group"):
        export_onnx(grouped.model, torch.zeros(1, 1, 28, 28), tmp_path / "g.onnx")
    assert not (tmp_path / "g.onnx").exists()
    with pytest.raises(FileNotFoundError):
        OrtModel(tmp_path / "missing.onnx")


@pytest.fixture(scope="module")
def resnet_ptq():
    from slimkit import data

    train, test = data.load("mnist10k", shape=(3, 32, 32))
    torch.manual_seed(0)
    model = models.create("resnet20")
    fit(model, train.subset(1024), None, TrainConfig(epochs=1, lr=0.05, optimizer="sgd", batch_size=64, progress=False))
    calib = torch.stack([train[i][0] for i in range(256)])  # the batches quantize() calibrates on
    return quantize(model.eval(), QuantConfig(calibration_batches=4), calib), test.subset(500), calib


def test_residual_blocks_export_as_integer_convs_and_adds(resnet_ptq, tmp_path):
    import onnxruntime as ort

    result, test, _ = resnet_ptq
    residual = result.record["stats"]["quantized_residual_outputs"]
    assert "layer1.0.conv2" in residual and "layer2.0.downsample.0" in residual and "layer1.0.conv1" not in residual
    path = export_onnx(result.model, torch.zeros(1, 3, 32, 32), tmp_path / "r20.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "r20-opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "r20-opt.onnx")).graph.node]
    # every conv and every residual add runs on integers (the last add's output feeds QLinearGlobalAveragePool)
    assert ops.count("QLinearConv") == 21 and "Conv" not in ops and "FusedConv" not in ops
    assert ops.count("QLinearAdd") == 9 and ops.count("Add") == 0 and ops.count("QLinearGlobalAveragePool") == 1
    report = parity(result.model, OrtModel(path, threads=1), test)
    assert report["top1_agreement"] >= 0.99, report


def test_torch_x86_int8_agrees_with_fake_quant_model(resnet_ptq):
    pytest.importorskip("torchao")
    from slimkit.export.torch_int8 import to_torch_int8

    result, test, calib = resnet_ptq
    x = torch.stack([test[i][0] for i in range(8)])
    int8 = to_torch_int8(result.model, calib, x)
    ops = {str(n.target) for n in int8.lowered(tuple(x.shape)).graph.nodes}
    assert any("qconv" in op for op in ops), ops  # oneDNN integer convolutions, not dequantize + float conv
    report = parity(result.model, int8, test, batch_size=100)
    assert report["top1_agreement"] >= 0.99, report


def test_residual_output_quantizers_survive_pack_and_replay(resnet_ptq):
    from slimkit.quantization import pack_state_dict, replay, unpack_state_dict

    result, test, _ = resnet_ptq
    assert sum(layer["output_act_bits"] == 8 for layer in result.record["layers"]) == 11
    tensors, meta = pack_state_dict(result.model)
    fresh = replay(models.create("resnet20"), result.record)
    fresh.load_state_dict(unpack_state_dict(tensors, meta))
    assert fresh.layer1[0].conv2.output_quant is not None
    x = torch.stack([test[i][0] for i in range(16)])
    assert torch.equal(fresh(x), result.model(x))


class _TinyResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn0 = torch.nn.BatchNorm2d(8)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 64, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn(self.conv(x)) + x)
        return self.fc(x.flatten(1))


def test_qat_model_quantizes_residual_outputs_after_folding_and_exports(digits, tmp_path):
    train, test = digits
    torch.manual_seed(0)
    result = quantize(_TinyResidual(), QuantConfig(method="qat", epochs=2, lr=5e-3, batch_size=32), train)
    assert result.record["stats"]["quantized_residual_outputs"] == ["conv"]
    assert result.model.conv.output_quant is not None and result.model.stem.output_quant is None
    path = export_onnx(result.model, torch.zeros(1, 1, 8, 8), tmp_path / "res.onnx")
    report = parity(result.model, OrtModel(path, threads=1), test)
    assert report["top1_agreement"] >= 0.99, report


def test_int8_for_fully_connected_layers_only(trained_lenet5, mnist, tmp_path):
    train, test = mnist
    result = quantize(trained_lenet5, QuantConfig(calibration_batches=8), train)
    path = export_onnx(result.model, torch.zeros(1, 1, 28, 28), tmp_path / "fc.onnx", int8=True, int8_ops=("Gemm",))
    weights = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    assert weights["features.0.weight"].data_type == onnx.TensorProto.FLOAT  # convolutions stay float
    assert weights["classifier.1.weight.int8"].data_type == onnx.TensorProto.INT8
    assert (
        path.stat().st_size
        < 0.4 * export_onnx(result.model, torch.zeros(1, 1, 28, 28), tmp_path / "f.onnx", int8=False).stat().st_size
    )
    # the convolutions see float activations here, so agreement with the simulated model is close, not exact
    assert parity(result.model, OrtModel(path, threads=1), test)["top1_agreement"] >= 0.98
