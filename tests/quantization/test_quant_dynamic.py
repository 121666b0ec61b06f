"""Dynamic int8 for LSTM / GRU gates and attention projections: the Linear rebuild is exact in float, the
quantized model stays close to fp32 on real digits, packs and replays bit-exactly, and runs on ONNX Runtime's
integer MatMul kernels with the simulated model's top-1."""

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import slimkit
from slimkit import models
from slimkit.export.onnx import export_onnx
from slimkit.export.runtime import OrtModel, parity
from slimkit.quantization import QuantConfig, pack_state_dict, quantize, replay, unpack_state_dict
from slimkit.quantization.dynamic import LinearMultiheadAttention, LinearRNN, decompose
from slimkit.train import TrainConfig, evaluate, fit

LSTM, VIT = "slimkit.models.sequence:lstm_rows", "slimkit.models.sequence:vit_tiny"


def _flat(out) -> torch.Tensor:
    parts = [out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],))]
    return torch.cat([p.flatten() for p in parts])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first,bidirectional,layers", [(True, False, 1), (False, True, 2), (True, True, 2)])
def test_linear_rnn_equals_torch_rnn(cls, batch_first, bidirectional, layers):
    torch.manual_seed(0)
    rnn = cls(7, 11, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first).eval()
    linear = LinearRNN(rnn).eval()
    x = torch.randn(3, 5, 7)
    states = torch.randn(layers * (2 if bidirectional else 1), 3 if batch_first else 5, 11)
    hx = (states, states.flip(0)) if cls is nn.LSTM else states
    with torch.no_grad():
        for args in [(x,), (x, hx), (x[0],)]:  # zero state, given state, unbatched
            torch.testing.assert_close(_flat(linear(*args)), _flat(rnn(*args)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_linear_attention_equals_torch_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    linear = LinearMultiheadAttention(mha).eval()
    q, k = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    mask = torch.rand(5, 6) > 0.7
    mask[:, 0] = False
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -1] = True
    cases = [
        {},
        {"attn_mask": mask},
        {"attn_mask": torch.randn(8, 5, 6)},
        {"key_padding_mask": padding},
        {"need_weights": False},
        {"average_attn_weights": False},
    ]
    with torch.no_grad():
        for kwargs in cases:
            ours, theirs = linear(q, k, k, **kwargs), mha(q, k, k, **kwargs)
            torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
            assert (ours[1] is None) == (theirs[1] is None)
            if ours[1] is not None:
                torch.testing.assert_close(ours[1], theirs[1], atol=1e-6, rtol=1e-5)
        causal = nn.Transformer.generate_square_subsequent_mask(5)
        torch.testing.assert_close(
            linear(q, q, q, is_causal=True)[0], mha(q, q, q, attn_mask=causal)[0], atol=1e-5, rtol=1e-5
        )


def test_transformer_encoder_takes_the_regular_path_after_decompose():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    rebuilt = copy.deepcopy(encoder)
    assert decompose(rebuilt) == ["layers.0.self_attn", "layers.1.self_attn"]
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), encoder(x), atol=1e-5, rtol=1e-5)


def test_unsupported_variants_stay_float_and_are_listed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(8, 8, proj_size=4, batch_first=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    result = quantize(Net(), QuantConfig(method="dynamic"))
    assert [layer["name"] for layer in result.record["layers"]] == ["fc"]
    assert "proj_size" in result.record["skipped"]["rnn"]
    static = quantize(models.create(LSTM), QuantConfig(), torch.randn(8, 1, 28, 28))
    assert "method='dynamic' quantizes it" in static.record["skipped"]["rnn"]
    with pytest.raises(TypeError, match="PackedSequence"):
        packed = nn.utils.rnn.pack_sequence([torch.randn(3, 28)])
        quantize(models.create(LSTM), QuantConfig(method="dynamic")).model.rnn(packed)


@pytest.fixture(scope="module")
def trained_lstm(mnist):
    train, _ = mnist
    torch.manual_seed(0)
    model = models.create(LSTM, hidden=64)
    fit(model, train, None, TrainConfig(epochs=6, lr=1e-2, batch_size=64, progress=False))
    return model.eval()


def test_dynamic_lstm_keeps_accuracy_and_runs_on_integer_kernels(trained_lstm, mnist, tmp_path):
    _, test = mnist
    result = quantize(trained_lstm, QuantConfig(method="dynamic"))
    assert result.record["decomposed"] == ["rnn"]
    assert [layer["name"] for layer in result.record["layers"]] == ["rnn.ih_l0", "rnn.hh_l0", "head"]
    fp32, int8 = evaluate(trained_lstm, test).accuracy, evaluate(result.model, test).accuracy
    assert fp32 > 90 and abs(fp32 - int8) <= 0.5, (fp32, int8)
    gates = result.model.rnn.hh_l0
    codes = gates.weight_quant.codes(gates.weight)
    assert codes.abs().max() <= 127 and torch.equal(codes, codes.round())
    path = export_onnx(result.model, torch.zeros(1, 1, 28, 28), tmp_path / "lstm-int8.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DynamicQuantizeLSTM") == 1 and ops.count("MatMulInteger") == 1  # the LSTM, the head
    assert not {"LSTM", "MatMul", "Gemm"} & set(ops)
    assert {i.data_type for i in graph.initializer if i.name.endswith(".codes")} == {onnx.TensorProto.INT8}
    fp32_path = export_onnx(trained_lstm, torch.zeros(1, 1, 28, 28), tmp_path / "lstm-fp32.onnx")
    weight_bytes = [sum(len(i.raw_data) for i in onnx.load(str(p)).graph.initializer) for p in (fp32_path, path)]
    assert weight_bytes[0] > 3.2 * weight_bytes[1], weight_bytes  # int8 codes + fp32 scales and biases
    report = parity(result.model, OrtModel(path, threads=1), test)
    assert report["top1_agreement"] >= 0.99, report


def test_dynamic_vit_round_trips_through_the_artifact(mnist, tmp_path):
    _, test = mnist
    torch.manual_seed(0)
    model = models.create(VIT, dim=32, depth=2)
    result = quantize(model, QuantConfig(method="dynamic"))
    assert result.record["decomposed"] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    names = [layer["name"] for layer in result.record["layers"]]
    assert "encoder.layers.0.self_attn.q_proj" in names and "encoder.layers.1.linear2" in names
    assert "embed" in result.record["skipped"]  # a conv: dynamic covers Linear layers only
    x = torch.stack([test[i][0] for i in range(64)])
    with torch.no_grad():
        reference = result.model(x)
        assert (reference - model(x)).abs().max() < 0.05 * model(x).abs().max()
    tensors, meta = pack_state_dict(result.model)
    rebuilt = replay(models.create(VIT, dim=32, depth=2), result.record)
    rebuilt.load_state_dict(unpack_state_dict(tensors, meta))
    again = slimkit.load(slimkit.save(result, tmp_path / "vit.slim"))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), reference) and torch.equal(again(x), reference)
    path = export_onnx(result.model, x[:1], tmp_path / "vit-int8.onnx")
    out = np.asarray(OrtModel(path, threads=1)(x))
    assert (out.argmax(1) == reference.argmax(1).numpy()).mean() >= 0.98
    assert np.abs(out - reference.numpy()).max() < 0.05


def test_dynamic_gru_exports_one_integer_matmul_per_step(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(6, 12, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(24, 3)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = Net().eval()
    result = quantize(model, QuantConfig(method="dynamic"))
    path = export_onnx(result.model, torch.zeros(1, 5, 6), tmp_path / "gru.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulInteger") == 2 * (1 + 5) + 1 and "GRU" not in ops  # per direction: inputs + 5 steps
    x = torch.randn(32, 5, 6)
    with torch.no_grad():
        simulated = result.model(x).numpy()
    assert np.abs(np.asarray(OrtModel(path, threads=1)(x)) - simulated).max() < 1e-2


class _RowNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(6, 12, batch_first=True)
        self.a, self.b, self.head = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 3)
        self.b.load_state_dict(self.a.state_dict())  # equal weights: the exporter shares one initializer

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(self.rnn(x)[0][:, -1]))))


@pytest.mark.parametrize(
    "config, expect",
    [
        (QuantConfig(method="dynamic"), {"DynamicQuantizeLSTM": 1, "MatMulInteger": 3}),
        (QuantConfig(method="dynamic", ignore=("rnn",)), {"LSTM": 1, "MatMulInteger": 3}),  # kept whole, in float
        (
            QuantConfig(method="dynamic", overrides={"rnn": {"granularity": "per_tensor"}}),  # unrolled per step
            {"MatMulInteger": 1 + 5 + 3},
        ),
    ],
)
def test_dynamic_export_follows_the_plan_and_matches_the_simulation(config, expect, tmp_path):
    model = _RowNet().eval()
    result = quantize(model, config)
    path = export_onnx(result.model, torch.zeros(1, 5, 6), tmp_path / "net.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert {op: ops.count(op) for op in expect} == expect
    assert "Gemm" not in ops and "MatMul" not in ops
    x = torch.randn(64, 5, 6)
    with torch.no_grad():
        simulated = result.model(x).numpy()
    assert np.abs(np.asarray(OrtModel(path, threads=1)(x)) - simulated).max() < 1e-4


def test_dynamic_rejects_what_its_kernels_cannot_run():
    with pytest.raises(ValueError, match="per-channel or per-tensor"):
        QuantConfig(method="dynamic", granularity="per_group", group_size=4)
    with pytest.raises(TypeError, match="tuple"):
        LinearRNN(nn.LSTM(6, 12)).eval()(torch.randn(5, 2, 6), torch.zeros(2, 1, 2, 12))
