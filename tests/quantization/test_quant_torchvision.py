"""torchvision's Swin, ConvNeXt and ViT (random init, nothing downloaded) under static and dynamic int8: quantized,
exported with ``export_onnx`` and run on ONNX Runtime with top-1 agreement >= 99% against the quantized PyTorch model,
and every layer left in float named in the record with its reason.

The models come from their classes with small settings instead of ``swin_t()`` / ``convnext_tiny()`` / ``vit_b_16()``:
the same blocks (Swin's shifted-window attention reading ``qkv`` / ``proj`` weights through ``F.linear``, ConvNeXt's
Linear layers on (N, H, W, C), ViT's ``nn.MultiheadAttention``) at 32x32 inputs, so each case runs in seconds on two
shared cores instead of minutes (swin_t has 28M parameters).
"""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.export.onnx import export_onnx
from slimkit.quantization import QuantResult, replay_

torchvision = pytest.importorskip("torchvision")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

SIZE = 32
SWIN = {"patch_size": [4, 4], "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 2], "window_size": [4, 4]}
VIT = {"image_size": SIZE, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}


def _model(name: str) -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    if name == "swin":  # two stages: shifted windows (8x8 tokens, window 4) and, after patch merging, one window
        return SwinTransformer(**SWIN, num_classes=10).eval()
    if name == "convnext":  # two stages of one block each: depthwise 7x7 conv, LayerNorm, Linear on (N, H, W, C)
        return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10).eval()
    model = VisionTransformer(**VIT, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision zero-initialises the head: all logits 0
    return model


def _weight_layers(model: nn.Module) -> set[str]:
    """Every module owning a weight matrix, plus each ``nn.MultiheadAttention`` (its in-projection is a parameter of
    its own, not a layer's ``weight``)."""
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        or (isinstance(module._parameters.get("weight"), torch.Tensor) and module._parameters["weight"].ndim >= 2)
    }


def _quantize(model: nn.Module, method: str) -> QuantResult:
    calibration = torch.randn(64, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    config = slimkit.QuantConfig(method=method, batch_size=16, calibration_batches=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing about a layer left behind
        return slimkit.quantize(model, config, calibration)


def _ort(path, x: torch.Tensor) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("method", ["ptq", "dynamic"])
@pytest.mark.parametrize("name", ["swin", "convnext", "vit"])
def test_torchvision_model_quantizes_and_exports_with_ort_parity(tmp_path, name, method):
    model = _model(name)
    result = _quantize(model, method)
    record, quantized = result.record, result.model

    # nothing silently skipped: every weight layer is quantized (an attention through its projections) or named
    planned = {layer["name"] for layer in record["layers"]}
    skipped = record["skipped"]
    covered = planned | set(skipped) | set(record["decomposed"])
    assert _weight_layers(model) <= covered, _weight_layers(model) - covered
    assert planned.isdisjoint(skipped)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if method == "dynamic":  # dynamic int8 covers Linear layers; the convolutions are named with that reason
        assert set(skipped) == convs and all("Linear layers only" in reason for reason in skipped.values())
    else:
        assert not skipped, skipped
    for attention in record["decomposed"]:  # nn.MultiheadAttention: all four projections quantized
        assert {f"{attention}.{p}_proj" for p in ("q", "k", "v", "out")} <= planned
    if name == "vit":
        assert len(record["decomposed"]) == 2
    if name == "swin":  # qkv / proj weights read through F.linear: quantized, their reading attention redirected
        read = {n for n in _weight_layers(model) if n.endswith(("attn.qkv", "attn.proj"))}
        assert len(read) == 8 and read <= planned
        assert record["redirected"] == {n: n.rsplit(".", 1)[0] for n in read}

    example = torch.randn(1, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no quantized layer missing from the graph
        warnings.filterwarnings("ignore", message=".*(TracerWarning|Converting a tensor|Iterating over).*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        path = export_onnx(quantized, example, tmp_path / f"{name}-{method}.onnx", int8=True)
    proto = onnx.load(str(path))
    ops = [node.op_type for node in proto.graph.node]
    int8 = [i for i in proto.graph.initializer if len(i.dims) >= 2 and i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == len(planned)  # every quantized layer ships integer codes
    if method == "dynamic":
        assert ops.count("MatMulInteger") == len(planned)
    else:
        assert "QuantizeLinear" in ops and "MatMulInteger" not in ops

    x = torch.randn(256, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, original = quantized(x), model(x)
    got = _ort(path, x)
    agreement = float((got.argmax(1) == expected.argmax(1)).float().mean())
    assert agreement >= 0.99, agreement
    error = float((got - expected).abs().max())
    assert error <= 0.1 * float(expected.std()), (error, float(expected.std()))
    cosine = float(F.cosine_similarity(expected.flatten(), original.flatten(), dim=0))
    assert cosine >= 0.99, cosine  # the simulated int8 model stays close to the float one


@pytest.mark.parametrize("name", ["swin", "vit"])
def test_replayed_and_loaded_models_are_bit_exact(tmp_path, name):
    """A fresh model replayed from the record (attention decomposed, F.linear readers redirected) and loaded with
    the quantized state dict, and the saved artifact loaded back, give the quantized model's outputs exactly."""
    model = _model(name)
    result = _quantize(model, "ptq")
    x = torch.randn(8, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = result.model(x)
    fresh = replay_(_model(name), result.record)
    fresh.load_state_dict(result.model.state_dict())
    copied = copy.deepcopy(result.model)  # the redirection travels with a copy
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
        assert torch.equal(copied(x), expected)

    if name == "swin":
        module = "torchvision.models.swin_transformer"
        source = {"factory": f"{module}:SwinTransformer", "kwargs": {**SWIN, "num_classes": 10}}
    else:
        module = "torchvision.models.vision_transformer"
        source = {"factory": f"{module}:VisionTransformer", "kwargs": {**VIT, "num_classes": 10}}
    folder = slimkit.save(result, tmp_path / f"{name}.slim", source=source)
    loaded = slimkit.load(folder, trust=[module])
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_attention_under_static_ptq_quantizes_its_projections():
    """nn.MultiheadAttention used to stay float under static PTQ; now its four projections are static int8 layers
    with calibrated input scales, and the model stays close to the float one."""
    from slimkit.quantization.fake import QuantLinear

    model = _model("vit")
    result = _quantize(model, "ptq")
    attention = result.model.encoder.layers.encoder_layer_0.self_attention
    for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layer = getattr(attention, part)
        assert isinstance(layer, QuantLinear)
        assert layer.input_quant is not None and not layer.input_quant.dynamic
        assert float(layer.input_quant.scale) > 0
    ignored = slimkit.quantize(model, slimkit.QuantConfig(ignore=["re:.*self_attention"]), torch.randn(16, 3, 32, 32))
    assert not ignored.record["decomposed"]
    assert all("ignore" in ignored.record["skipped"][n] for n in ("encoder.layers.encoder_layer_0.self_attention",))


class _Reads(nn.Module):
    """A block that reads its layers' weights directly, as Swin's attention does."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x).relu()
        stride = 2 if self.how == "other stride" else 1
        x = F.conv2d(x, self.conv.weight, self.conv.bias, stride=stride, padding=1).relu().mean((2, 3))
        if self.how == "transposed":
            return x @ self.fc.weight.t() + self.fc.bias
        return F.linear(x, self.fc.weight, self.fc.bias)


def test_weights_read_through_f_linear_and_f_conv2d_are_quantized():
    torch.manual_seed(0)
    model = _Reads("linear").eval()
    data = torch.randn(32, 3, 8, 8)
    result = slimkit.quantize(model, slimkit.QuantConfig(), data)
    assert result.record["redirected"] == {"conv": "", "fc": ""} and not result.record["skipped"]
    quantized = result.model
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():  # the redirected calls run the fake-quant layers: equal to calling them by hand
        h = quantized.stem(x).relu()
        by_hand = quantized.fc(quantized.conv(h).relu().mean((2, 3)))
        assert torch.equal(quantized(x), by_hand)
        assert not torch.equal(by_hand, model(x))


@pytest.mark.parametrize(
    ("how", "layer", "reason"),
    [
        ("transposed", "fc", "read by t"),
        ("other stride", "conv", "another stride"),
    ],
)
def test_a_weight_read_otherwise_stays_float_named_with_a_warning(how, layer, reason):
    torch.manual_seed(0)
    model = _Reads(how).eval()
    with pytest.warns(UserWarning, match=f"layer\\(s\\) {layer} "):
        result = slimkit.quantize(model, slimkit.QuantConfig(), torch.randn(32, 3, 8, 8))
    skipped = result.record["skipped"]
    assert list(skipped) == [layer] and reason in skipped[layer] and "kept in float" in skipped[layer]
    assert not hasattr(result.model.get_submodule(layer), "weight_quant")
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert np.isfinite(result.model(x).numpy()).all()


def test_adaround_reaches_layers_read_through_f_linear():
    """AdaRound captures each layer's float and quantized inputs with hooks: the redirection runs them on both."""
    torch.manual_seed(0)
    model = _Reads("linear").eval()
    config = slimkit.QuantConfig(adaround=True, adaround_iters=5)
    result = slimkit.quantize(model, config, torch.randn(32, 3, 8, 8))
    assert result.record["redirected"] == {"conv": "", "fc": ""} and not result.record["skipped"]
    assert {"conv", "fc"} <= set(result.record["stats"]["adaround"])
