"""nn.Embedding quantized per row (int8, or fewer bits by override): gather on the codes in PyTorch, ``Gather`` on an
int8 table in ONNX, packed codes in the artifact; embeddings left in float are named with their reason."""

import numpy as np
import pytest
import torch
from torch import nn

from slimkit.errors import UsageError
from slimkit.measure import size_on_disk
from slimkit.quantization import QuantConfig, quantize, replay_
from slimkit.quantization.fake import QuantEmbedding
from slimkit.quantization.pack import pack_state_dict, unpack_state_dict

VOCAB, WIDTH = 1000, 64


class Embedder(nn.Module):
    """Most of its bytes are the token table, as in a small sentence-embedding model."""

    def __init__(self, max_norm: float | None = None) -> None:
        super().__init__()
        self.word = nn.Embedding(VOCAB, WIDTH, padding_idx=0, max_norm=max_norm)
        self.position = nn.Embedding(16, WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        return self.proj(self.word(input_ids) + self.position(positions)).mean(1)


def _model() -> Embedder:
    torch.manual_seed(0)
    return Embedder().eval()


def _ids(batch: int = 8, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_dynamic_quantizes_embeddings_per_row_and_gathers_the_codes():
    result = quantize(_model(), QuantConfig(method="dynamic"))
    word = result.model.word
    assert isinstance(word, QuantEmbedding)
    layers = {entry["name"]: entry for entry in result.record["layers"]}
    assert layers["word"]["kind"] == "Embedding" and layers["word"]["weight_bits"] == 8
    assert layers["word"]["act_bits"] is None and layers["word"]["weight_scale"]["count"] == VOCAB  # one per row
    assert "word" not in result.record["skipped"]
    # gather then dequantize == quantize the table (per row, symmetric int8) then gather
    w = word.weight.detach()
    scale = w.abs().amax(1, keepdim=True) / 127
    table = torch.clamp(torch.round(w / scale), -127, 127) * scale
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(word(ids), table[ids], rtol=0, atol=0)
        assert float((word(ids) - nn.functional.embedding(ids, w)).abs().max()) <= float(scale.max()) / 2 + 1e-7


def test_int8_embedding_onnx_is_a_gather_on_int8_codes_and_matches_torch(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from slimkit.export.onnx import export_onnx

    model = _model()
    quantized = quantize(model, QuantConfig(method="dynamic")).model
    fp32 = export_onnx(model, _ids(1, 12), tmp_path / "fp32.onnx")
    int8 = export_onnx(quantized, _ids(1, 12), tmp_path / "int8.onnx")
    graph = onnx.load(str(int8)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    tables = [n for n in graph.node if n.op_type == "Gather" and inits.get(n.input[0], np.zeros(0)).ndim == 2]
    assert tables and all(inits[n.input[0]].dtype == np.int8 for n in tables)
    assert not [a for a in inits.values() if a.dtype == np.float32 and a.shape == (VOCAB, WIDTH)]  # no fp32 table
    # 1 byte per weight (table and Linear) plus a 4-byte scale per row: 3.76x at this width
    assert fp32.stat().st_size > 3.5 * int8.stat().st_size
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    ids = _ids(5, 9, seed=1)  # other batch and sequence length than exported
    with torch.no_grad():
        expected = quantized(ids).numpy()
    np.testing.assert_allclose(session.run(None, {"input": ids.numpy()})[0], expected, atol=1e-4)


def test_static_ptq_quantizes_embeddings_and_qat_keeps_them_float_with_a_reason():
    model = _model()
    data = torch.utils.data.TensorDataset(_ids(64, 12), torch.zeros(64, dtype=torch.long))
    ptq = quantize(model, QuantConfig(), data)
    assert isinstance(ptq.model.word, QuantEmbedding) and isinstance(ptq.model.position, QuantEmbedding)
    qat = quantize(model, QuantConfig(method="qat", epochs=1, max_batches=1), data, loss_fn=lambda out, y, x: out.sum())
    assert "not by QAT" in qat.record["skipped"]["word"] and isinstance(qat.model.word, nn.Embedding)
    assert not isinstance(qat.model.word, QuantEmbedding)
    norm = quantize(Embedder(max_norm=1.0).eval(), QuantConfig(method="dynamic"))
    assert "max_norm" in norm.record["skipped"]["word"]


def test_four_bit_embeddings_by_override_export_as_int8_codes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import export_onnx

    cfg = QuantConfig(method="dynamic", overrides={"word": {"weight_bits": 4}})
    quantized = quantize(_model(), cfg).model
    codes = quantized.word.weight_quant.codes(quantized.word.weight)
    assert int(codes.abs().max()) == 7
    path = export_onnx(quantized, _ids(1, 12), tmp_path / "int4.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = _ids(3, 12, seed=2)
    with torch.no_grad():
        expected = quantized(ids).numpy()
    np.testing.assert_allclose(session.run(None, {"input": ids.numpy()})[0], expected, atol=1e-4)
    with pytest.raises(UsageError, match="Embedding 'word' is quantized weight-only"):
        quantize(_model(), QuantConfig(method="ptq", overrides={"word": {"act_bits": 8}}))


def test_packed_embeddings_make_the_file_smaller_and_replay_bit_exactly():
    model = _model()
    result = quantize(model, QuantConfig(method="dynamic"))
    assert size_on_disk(result.model) < size_on_disk(model) / 3.5
    tensors, meta = pack_state_dict(result.model)
    assert tensors["word.weight.codes"].dtype == torch.uint8 and "word.weight" not in tensors
    rebuilt = replay_(Embedder(), result.record)
    rebuilt.load_state_dict(unpack_state_dict(tensors, meta))
    ids = _ids(4, 12, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), result.model(ids), rtol=0, atol=0)


class WideEmbedder(Embedder):
    """The token table and two Linear layers wide enough for 32-element weight-only blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(WIDTH, 128), nn.Linear(128, WIDTH)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        x = self.word(input_ids) + self.position(positions)
        return self.proj(x + self.down(torch.relu(self.up(x)))).mean(1)


@pytest.mark.parametrize("algorithm", ["rtn", "gptq", "awq"])
def test_weight_only_quantizes_embeddings_per_row_and_exports_beside_matmulnbits(tmp_path, algorithm):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import export_onnx

    torch.manual_seed(0)
    model = WideEmbedder().eval()
    cfg = QuantConfig(weight_bits=4, act_bits=None, group_size=32, algorithm=algorithm)
    result = quantize(model, cfg, _ids(64, 12))
    assert isinstance(result.model.word, QuantEmbedding) and isinstance(result.model.position, QuantEmbedding)
    layers = {entry["name"]: entry for entry in result.record["layers"]}
    assert layers["word"]["kind"] == "Embedding" and layers["word"]["weight_bits"] == 8
    assert layers["word"]["weight_scale"]["count"] == VOCAB and not result.record["skipped"]
    assert layers["up"]["weight_bits"] == 4 and layers["proj"]["weight_bits"] == 8  # first / last Linear: 8 bits
    w = model.word.weight.detach()  # per-row symmetric int8, as method='ptq' quantizes it
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)  # the padding row is all zeros
    table = torch.clamp(torch.round(w / scale), -127, 127)
    torch.testing.assert_close(result.model.word.weight_quant.codes(result.model.word.weight), table)
    path = export_onnx(result.model, _ids(1, 12), tmp_path / "wo.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 3 and "MatMul" not in ops and "Gemm" not in ops
    int8_tables = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert sorted(tuple(i.dims) for i in int8_tables) == [(16, WIDTH), (VOCAB, WIDTH)]
    assert not [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = _ids(3, 9, seed=2)  # another batch and length
    with torch.no_grad():
        expected = result.model(ids).numpy()
    np.testing.assert_allclose(session.run(None, {"input": ids.numpy()})[0], expected, atol=1e-5)
    rebuilt = replay_(WideEmbedder(), result.record)
    tensors, meta = pack_state_dict(result.model)
    assert "word.weight" not in tensors
    rebuilt.load_state_dict(unpack_state_dict(tensors, meta))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), result.model(ids), rtol=0, atol=0)
