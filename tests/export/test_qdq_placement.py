"""QDQ placement of the static int8 export around SiLU / Hardswish / squeeze-excitation / ReLU6 blocks: every conv
becomes an integer kernel in ONNX Runtime's optimized graph, and ORT agrees with the simulated model."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from slimkit.export.onnx import export_onnx
from slimkit.quantization import QuantConfig, quantize

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, gate: type[nn.Module]) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, 8, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(8, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class Block(nn.Module):
    """EfficientNet / MobileNetV3-style: expand, depthwise, squeeze-excitation, project, residual."""

    def __init__(self, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), act())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), act())
        self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), act())
        self.se = SqueezeExcite(32, gate)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))
        self.relu6 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.head = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.se(self.depthwise(self.expand(x))))
        return self.fc(self.head(self.relu6(x)))


def _randomize_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))


def _optimized_ops(path, tmp_path) -> collections.Counter:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize(("act", "gate"), [(nn.SiLU, nn.Sigmoid), (nn.Hardswish, nn.Hardsigmoid)])
def test_se_block_runs_on_integer_kernels(act, gate, tmp_path) -> None:
    torch.manual_seed(0)
    model = Block(act, gate).eval()
    _randomize_bn(model)
    x = torch.randn(64, 3, 12, 12)
    result = quantize(model, QuantConfig(), x)
    quantized = result.model
    outputs = set(result.record["stats"]["quantized_residual_outputs"])
    # the layers before a gate (and the residual's) get a calibrated output scale; the ReLU6 conv does not need one
    assert {"stem.0", "expand.0", "depthwise.0", "se.fc1", "se.fc2", "project.0"} <= outputs
    assert "relu6.0" not in outputs
    path = export_onnx(quantized, x[:1], tmp_path / "block.onnx")

    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 8  # every conv, the depthwise and the SE's 1x1 ones included
    assert ops["Conv"] == 0 and ops["FusedConv"] == 0
    assert ops["QLinearGlobalAveragePool"] == 2 and ops["QLinearAdd"] == 1  # the SE pool and the head's
    assert ops["QLinearMul"] >= 1  # the squeeze-excitation rescale
    if act is nn.SiLU:  # SiLU = QLinearSigmoid -> QLinearMul, the SE gate a QLinearSigmoid
        assert ops["QLinearSigmoid"] == 5 and ops["QLinearMul"] == 5
    raw = onnx.load(str(path)).graph
    assert not [n for n in raw.node if n.op_type == "Identity"]  # shared float biases were replaced per layer

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    test = torch.randn(32, 3, 12, 12)
    got = torch.from_numpy(session.run(None, {"input": test.numpy()})[0])
    with torch.no_grad():
        simulated, reference = quantized(test), model(test)
    spread = float(reference.abs().max())
    # the gates' outputs are quantized in the ONNX graph only (derived ranges): close to, not equal to, the simulation
    assert float((got - simulated).abs().max()) < 0.1 * spread
    assert float(torch.nn.functional.cosine_similarity(got, reference, dim=1).mean()) > 0.98


def test_relu_conv_chain_keeps_single_qdq(tmp_path) -> None:
    """A plain conv-ReLU-conv net is unchanged: no output quantizer, one QDQ pair per tensor, ORT matches."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)
    ).eval()
    x = torch.randn(32, 3, 12, 12)
    result = quantize(model, QuantConfig(), x)
    assert result.record["stats"]["quantized_residual_outputs"] == []
    path = export_onnx(result.model, x[:1], tmp_path / "chain.onnx")
    quantized_tensors = [n.input[0] for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantized_tensors) == len(set(quantized_tensors))
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        expected = result.model(x)
    assert float((got - expected).abs().max()) <= 1e-3 * max(float(expected.abs().max()), 1.0)


def _requantized(path, tmp_path) -> list[str]:
    """The ``DequantizeLinear -> QuantizeLinear`` pairs (a tensor with two scales) left in ORT's optimized graph."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    producer = {o: n for n in graph.node for o in n.output}
    return [
        n.name
        for n in graph.node
        if n.op_type == "QuantizeLinear" and getattr(producer.get(n.input[0]), "op_type", "") == "DequantizeLinear"
    ]


class TwoBlocks(nn.Module):
    """MobileNetV3-style: a block whose project conv feeds both the next block's expand conv and its residual add,
    and a conv -> ReLU -> squeeze-excitation (pool and rescale) in each."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList(
            [
                nn.ModuleDict(
                    {
                        "expand": nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU()),
                        "se": SqueezeExcite(32, nn.Hardsigmoid),
                        "project": nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16)),
                    }
                )
                for _ in range(2)
            ]
        )
        self.head = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            y = block["project"](block["se"](block["expand"](x)))
            x = y if i == 0 else x + y  # the first block has no residual (a stride or width change in MobileNetV3)
        return self.fc(self.head(x))


def test_one_scale_per_tensor_between_blocks_and_before_se(tmp_path) -> None:
    """A block's project conv and the next block's first conv quantize the tensor between them with one scale, and a
    ReLU before a squeeze-excitation keeps its conv's grid (zero point 0): ORT requantizes nowhere, and runs what the
    simulated model computes up to the SE gates' ONNX-only rounding."""
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    _randomize_bn(model)
    x = torch.randn(64, 3, 12, 12)
    result = quantize(model, QuantConfig(), x)
    quantized = result.model
    first, second = quantized.blocks[0], quantized.blocks[1]
    project_out, expand_in = first["project"][0].output_quant, second["expand"][0].input_quant
    assert project_out is not None and expand_in is not None
    assert (float(project_out.scale), float(project_out.zero_point)) == (
        float(expand_in.scale),
        float(expand_in.zero_point),
    )
    assert float(first["expand"][0].output_quant.zero_point) == 0  # conv -> ReLU -> SE pool / mul
    path = export_onnx(quantized, x[:1], tmp_path / "blocks.onnx")

    assert _requantized(path, tmp_path) == []
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 10 and ops["Conv"] == 0 and ops["Relu"] == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    test = torch.randn(32, 3, 12, 12)
    got = torch.from_numpy(session.run(None, {"input": test.numpy()})[0])
    with torch.no_grad():
        simulated, reference = quantized(test), model(test)
    assert float((got - simulated).abs().max()) < 0.1 * float(reference.abs().max())
    assert float(torch.nn.functional.cosine_similarity(got, reference, dim=1).mean()) > 0.98
