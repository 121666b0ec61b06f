"""Weight-only block quantization (RTN / GPTQ / AWQ): the grid, the algorithms' error on seeded problems, the
config's checks, the artifact round trip and the MatMulNBits export (parity with ONNX Runtime)."""

import pytest
import torch
from torch import nn

import slimkit
from slimkit.errors import UsageError
from slimkit.export.lowering import float_twin
from slimkit.quantization import QuantConfig
from slimkit.quantization.weight_only import ScaledLinear, WeightOnlyLinear, awq_search, gptq_quantize, rtn_quantize


def _correlated_inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    """Inputs living near one fixed low-rank subspace (as real activations do), drawn with ``seed``: where GPTQ's
    error feedback pays off."""
    basis = torch.randn(8, features, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 8, generator=g) @ basis + 0.1 * torch.randn(rows, features, generator=g)


def _outlier_inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    """Gaussian inputs with four channels 30x larger (the salient channels AWQ protects)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    x[:, :4] *= 30
    return x


def _output_mse(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float((x @ approx.T - x @ weight.T).pow(2).mean())


@pytest.mark.parametrize(("columns", "group"), [(128, 32), (100, 32), (64, 64)])
def test_rtn_error_within_half_a_step_per_group(columns, group):
    weight = torch.randn(16, columns, generator=torch.Generator().manual_seed(0))
    w_hat, scale, zero_point = rtn_quantize(weight, 4, group)
    blocks = -(-columns // group)
    assert scale.shape == zero_point.shape == (16, blocks, 1)
    assert bool(((zero_point >= 0) & (zero_point <= 15) & (zero_point == zero_point.round())).all())
    step = scale.expand(16, blocks, group).reshape(16, -1)[:, :columns]  # each weight's own block step
    assert bool(((weight - w_hat).abs() <= step / 2 + 1e-6).all())
    codes = torch.round(w_hat / step) + zero_point.expand(16, blocks, group).reshape(16, -1)[:, :columns]
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.allclose((codes - zero_point.expand(16, blocks, group).reshape(16, -1)[:, :columns]) * step, w_hat)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_layer_output_error_below_rtn(act_order):
    x = _correlated_inputs(1024, 256, seed=1)
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    rtn = rtn_quantize(weight, 4, 128)[0]
    gptq, scale, zero_point = gptq_quantize(weight, 2 * x.T @ x / len(x), 4, 128, act_order=act_order)
    held_out = _correlated_inputs(1024, 256, seed=3)  # same subspace, new draws
    assert _output_mse(x, weight, gptq) < 0.7 * _output_mse(x, weight, rtn)
    assert _output_mse(held_out, weight, gptq) < 0.7 * _output_mse(held_out, weight, rtn)
    # GPTQ's weights sit on its own block grid: re-quantizing them changes nothing
    step = scale.expand(64, 2, 128).reshape(64, 256)
    zeros = zero_point.expand(64, 2, 128).reshape(64, 256)
    codes = torch.clamp(torch.round(gptq / step) + zeros, 0, 15)
    assert torch.allclose((codes - zeros) * step, gptq, atol=1e-6)


def test_awq_beats_rtn_on_inputs_with_outlier_channels():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(4)) * 0.05
    x = _outlier_inputs(2048, 256, seed=5)
    scale, alpha = awq_search(weight, x, 4, 128)
    assert alpha > 0
    awq = rtn_quantize(weight * scale, 4, 128)[0] / scale
    rtn = rtn_quantize(weight, 4, 128)[0]
    held_out = _outlier_inputs(2048, 256, seed=6)
    assert _output_mse(held_out, weight, awq) < 0.9 * _output_mse(held_out, weight, rtn)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.GELU(), nn.Linear(96, 16))


def _wo(algorithm: str, **kwargs) -> QuantConfig:
    settings = {"weight_bits": 4, "act_bits": None, "group_size": 32, "keep_first_last_8bit": False, **kwargs}
    return QuantConfig(algorithm=algorithm, **settings)


def test_quantize_gptq_beats_rtn_and_awq_is_not_worse_on_the_model_output():
    model = _mlp()
    calib, test = _outlier_inputs(512, 64, seed=7), _outlier_inputs(512, 64, seed=8)
    errors = {}
    for algorithm in ("rtn", "gptq", "awq"):
        result = slimkit.quantize(model, _wo(algorithm), calib)
        assert all(isinstance(result.model[i], WeightOnlyLinear) for i in (0, 2, 4))
        with torch.no_grad():
            errors[algorithm] = float((result.model(test) - model(test)).pow(2).mean())
    assert errors["gptq"] < errors["rtn"]
    assert errors["awq"] <= errors["rtn"]


def test_awq_folds_through_relu_and_keeps_a_mul_behind_gelu():
    model = _mlp()
    calib = _outlier_inputs(512, 64, seed=7)
    result = slimkit.quantize(model, _wo("awq"), calib)
    by_name = {entry["name"]: entry for entry in result.record["layers"]}
    assert by_name["2"]["awq_folded_into"] == "0" and not by_name["2"]["input_scale"]  # Linear -> ReLU -> Linear
    assert by_name["4"]["input_scale"] and by_name["4"]["awq_folded_into"] is None  # behind a GELU
    assert result.model[4].input_scale is not None
    twin = float_twin(result.model)
    assert isinstance(twin[4], ScaledLinear) and type(twin[2]) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(twin(calib), result.model(calib), atol=1e-5)


def test_first_and_last_layers_get_8_bits_by_default_and_conv_stays_float():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 64), nn.ReLU(), nn.Linear(64, 32))
    model.append(nn.ReLU()).append(nn.Linear(32, 10))
    result = slimkit.quantize(model, QuantConfig(weight_bits=4, act_bits=None, algorithm="rtn"))
    bits = {entry["name"]: (entry["weight_bits"], entry["group_size"]) for entry in result.record["layers"]}
    assert bits == {"2": (8, 128), "4": (4, 128), "6": (8, 128)}
    assert "MatMulNBits" in result.record["skipped"]["0"] and type(result.model[0]) is nn.Conv2d


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_bits": 4, "act_bits": 8, "algorithm": "rtn"}, "needs act_bits=None"),
        ({"weight_bits": 4, "act_bits": None, "algorithm": "gptq", "group_size": 100}, "power of two >= 16"),
        ({"weight_bits": 4, "act_bits": None, "algorithm": "awq", "group_size": 8}, "power of two >= 16"),
        ({"weight_bits": 3, "act_bits": None, "algorithm": "rtn"}, "weight_bits 4 or 8"),
        ({"weight_bits": 4, "act_bits": None, "algorithm": "rtn", "method": "qat"}, "needs method='ptq'"),
        ({"weight_bits": 2, "act_bits": None, "algorithm": "rtn", "scheme": "ternary"}, "weight_bits 4 or 8"),
        ({"weight_bits": 4, "act_bits": None, "algorithm": "hqq"}, "'rtn', 'gptq', 'awq'"),
        ({"weight_bits": 4, "act_bits": None, "algorithm": "gptq", "weight_only": {"damp": 0}}, "damp=0"),
    ],
)
def test_config_refuses_what_weight_only_cannot_run(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        QuantConfig(**kwargs)


def test_config_defaults_and_round_trip():
    cfg = QuantConfig(weight_bits=4, act_bits=None, algorithm="gptq", weight_only={"act_order": True})
    assert (cfg.group_size, cfg.scheme.value, cfg.granularity.value) == (128, "affine", "per_group")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig().algorithm is None


def test_gptq_and_awq_need_calibration_data():
    for algorithm in ("gptq", "awq"):
        with pytest.raises(UsageError, match="needs calibration data"):
            slimkit.quantize(_mlp(), _wo(algorithm))


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_save_load_round_trip_is_exact_and_half_a_byte_per_weight(tmp_path, algorithm):
    model = slimkit.models.create("mlp")
    calib = torch.rand(256, 1, 28, 28)
    result = slimkit.quantize(model, _wo(algorithm, group_size=128), calib)
    folder = slimkit.save(result, tmp_path / "m.slim")
    loaded = slimkit.load(folder)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    blocks = sum(m.out_features * -(-m.in_features // 128) for m in linears)  # inputs padded to whole blocks
    floats = sum(m.out_features + m.in_features for m in linears)  # biases, AWQ's input scales
    size = (folder / "model.safetensors").stat().st_size
    # half a byte per (padded) weight, a float32 scale and zero point per block, the float vectors, the header
    assert size <= 0.5 * 128 * blocks + 8 * blocks + 4 * floats + 2048
    assert slimkit.measure.size_on_disk(model) / size > 5.5  # 784 inputs pad to 896: 5.9-6.1x here


class _Block(nn.Module):
    """A tiny pre-norm transformer block: Linear layers on (N, T, C) tokens, attention, GELU MLP, residuals."""

    def __init__(self, width: int = 64, hidden: int = 160) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width, bias=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(torch.softmax(q @ k.transpose(1, 2) / 8.0, dim=-1) @ v)
        x = x + self.down(nn.functional.gelu(self.up(self.norm2(x))))
        return self.head(x)


def _ort_outputs(path, x: torch.Tensor):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("algorithm", ["rtn", "gptq", "awq"])
def test_onnx_matmulnbits_agrees_with_torch_on_a_transformer_block(tmp_path, algorithm):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import export_onnx

    torch.manual_seed(0)
    model = _Block().eval()
    calib = torch.randn(16, 12, 64)
    calib[..., :3] *= 10  # outlier channels
    result = slimkit.quantize(model, _wo(algorithm, keep_first_last_8bit=True), calib)
    path = export_onnx(result.model, torch.randn(2, 12, 64), tmp_path / "block.onnx")
    proto = onnx.load(str(path))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 5 and not [n for n in proto.graph.node if n.op_type == "Gemm"]
    # the only MatMuls left are attention's two (activations by activations)
    assert sum(n.op_type == "MatMul" for n in proto.graph.node) == 2
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits}
    assert {(a["K"], a["N"], a["bits"], a["block_size"]) for a in attrs.values()} == {
        (64, 192, 8, 32),  # first (qkv) and last (head) layers: 8 bits
        (64, 64, 4, 32),
        (64, 160, 4, 32),
        (160, 64, 4, 32),  # 160 = 5 blocks of 32
        (64, 10, 8, 32),
    }
    x = torch.randn(3, 12, 64)  # another batch size
    x[..., :3] *= 10
    with torch.no_grad():
        expected = result.model(x).numpy()
    got = _ort_outputs(path, x)
    assert abs(got - expected).max() <= 1e-4 * (expected.max() - expected.min())
    if algorithm == "awq":  # norm1 -> qkv and norm2 -> up fold; proj (after attention) and down (after GELU) keep a Mul
        folded = {e["name"]: e["awq_folded_into"] for e in result.record["layers"]}
        assert folded == {"qkv": "norm1", "proj": None, "up": "norm2", "down": None, "head": None}
        assert sum(n.op_type == "Mul" and "input_scale" in "".join(n.input) for n in proto.graph.node) == 3


def test_onnx_matmulnbits_on_2d_inputs_is_smaller_and_exact(tmp_path):
    pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    result = slimkit.quantize(model, _wo("gptq", group_size=128), torch.randn(512, 256))
    quantized = export_onnx(result.model, torch.randn(4, 256), tmp_path / "q.onnx")
    fp32 = export_onnx(model, torch.randn(4, 256), tmp_path / "f.onnx")
    x = torch.randn(7, 256)
    with torch.no_grad():
        expected = result.model(x).numpy()
    assert abs(_ort_outputs(quantized, x) - expected).max() <= 1e-5 * (expected.max() - expected.min())
    ratio = fp32.stat().st_size / quantized.stat().st_size
    assert ratio > 6.5  # 4 bits + a float32 scale and a 4-bit zero point per 128 weights: 7.3x here


def test_int8_false_keeps_the_weight_only_model_in_fp32(tmp_path):
    onnx = pytest.importorskip("onnx")
    from slimkit.export.onnx import export_onnx

    result = slimkit.quantize(_mlp(), _wo("rtn"))
    path = export_onnx(result.model, torch.randn(2, 64), tmp_path / "f.onnx", int8=False)
    assert not [n for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft"]


def test_a_weight_only_layer_the_forward_never_calls_is_named(tmp_path):
    onnx = pytest.importorskip("onnx")
    from slimkit.export.onnx import export_onnx

    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.pooler = nn.Linear(64, 32), nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    result = slimkit.quantize(WithUnused(), _wo("rtn"))
    with pytest.warns(UserWarning, match="pooler"):
        path = export_onnx(result.model, torch.randn(2, 64), tmp_path / "u.onnx")
    proto = onnx.load(str(path))
    assert [n.op_type for n in proto.graph.node] == ["MatMulNBits", "Add"]
    assert {p.key: p.value for p in proto.metadata_props}["slimkit.unused_layers"] == '["pooler"]'


def test_set_accuracy_level_rewrites_every_matmulnbits_and_runs_close(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from slimkit.errors import UsageError
    from slimkit.export.onnx import export_onnx
    from slimkit.export.onnx_int4 import set_accuracy_level

    torch.manual_seed(0)
    result = slimkit.quantize(_Block().eval(), _wo("rtn"), torch.randn(8, 12, 64))
    path = export_onnx(result.model, torch.randn(2, 12, 64), tmp_path / "b.onnx")
    level4 = set_accuracy_level(path, tmp_path / "b4.onnx", 4)
    nodes = [n for n in onnx.load(str(level4)).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 5
    assert all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["accuracy_level"] == 4 for n in nodes)
    x = torch.randn(3, 12, 64)
    exact, fast = _ort_outputs(path, x), _ort_outputs(level4, x)
    assert abs(fast - exact).max() <= 0.05 * (exact.max() - exact.min())  # int8 activations per block
    with pytest.raises(UsageError, match="accuracy_level=5"):
        set_accuracy_level(path, tmp_path / "b5.onnx", 5)
    plain = export_onnx(nn.Linear(4, 4), torch.randn(1, 4), tmp_path / "plain.onnx")
    with pytest.raises(UsageError, match="no MatMulNBits"):
        set_accuracy_level(plain, tmp_path / "p.onnx", 4)
