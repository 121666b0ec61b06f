"""Weight-only int4 on a MiniLM-shaped encoder (tiny random-init BERT built from a config, nothing downloaded): the
Linear layers become ``MatMulNBits`` and the embedding tables int8 ``Gather``s in one ONNX file that ONNX Runtime runs
at another batch and sequence length like the simulated model, with no float weight matrix left. The real
all-MiniLM-L6-v2 numbers are in ``benchmarks/quantize_transformers.py``."""

import os

import pytest
import torch
from torch import nn

import slimkit
from slimkit.export.onnx import export_onnx
from slimkit.quantization.fake import QuantEmbedding

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

VOCAB = 500


class MeanPooled(nn.Module):
    """A sentence embedding: attention-mask mean of the encoder's last hidden state."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return MeanPooled(transformers.BertModel(config, add_pooling_layer=False)).eval()


def _inputs(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[batch // 2 :, -3:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_int4_minilm_shape_exports_matmulnbits_and_int8_tables_together(tmp_path, algorithm):
    model = _encoder()
    config = slimkit.QuantConfig(weight_bits=4, act_bits=None, group_size=32, algorithm=algorithm, batch_size=16)
    result = slimkit.quantize(model, config, _inputs(64, 12, seed=1))
    embeddings = result.model.encoder.embeddings
    assert all(
        isinstance(getattr(embeddings, name), QuantEmbedding)
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    )
    assert not result.record["skipped"]  # every Linear and every table quantized
    path = export_onnx(result.model, _inputs(1, 8, seed=2), tmp_path / "int4.onnx")
    fp32 = export_onnx(model, _inputs(1, 8, seed=2), tmp_path / "fp32.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 12  # 2 layers x (query, key, value, attention output, intermediate, output)
    float_matrices = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    assert not float_matrices
    assert sum(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2 for i in graph.initializer) == 3
    # int8 tables, int4 blocks with a float scale per 32 weights, first / last Linear 8-bit, float vectors: 2.9x here
    assert fp32.stat().st_size / path.stat().st_size > 2.5
    inputs = _inputs(5, 13, seed=3)  # another batch and sequence length
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        expected = result.model(**inputs).numpy()
    assert abs(got - expected).max() <= 1e-4 * (abs(expected).max())
