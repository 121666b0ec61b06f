"""The dynamic int8 rewrite (``export/onnx_dynamic.py``) as ONNX Runtime optimizes it, on a tiny random-init BERT built
from a config (nothing downloaded): every quantized Linear becomes one fused ``DynamicQuantizeMatMul`` /
``MatMulIntegerToFloat`` kernel with its bias folded in (no separate bias ``Add``, no ``MatMulInteger``/``Cast``/``Mul``
left), the residual ``Add`` + ``LayerNormalization`` pairs are left unfused (ORT 1.32's ``SkipLayerNormalization`` CPU
kernel measured ~6x slower than the pair on all-MiniLM-L6-v2 at 64 x 128, benchmarks/results/quantize_transformers.md),
and the optimized graph computes what the unoptimized one does."""

import os

import numpy as np
import pytest
import torch

import slimkit
from slimkit.export.onnx import export_onnx

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

LAYERS = 2
LINEARS_PER_LAYER = 6  # query, key, value, attention output, intermediate, output


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _inputs(batch: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[batch // 2 :, -2:] = 0
    return {"input_ids": torch.randint(0, 97, (batch, length), generator=g), "attention_mask": mask}


def _session(path, level, optimized=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = level
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _bert()
    quantized = slimkit.quantize(model, slimkit.QuantConfig(method="dynamic")).model
    path = tmp_path_factory.mktemp("dyn") / "bert_dynamic.onnx"
    export_onnx(quantized, _inputs(2, 8), path)
    return quantized, path


def test_ort_fuses_every_linear_with_its_bias(exported, tmp_path):
    _, path = exported
    optimized = tmp_path / "optimized.onnx"
    _session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized)
    graph = onnx.load(str(optimized)).graph
    ops = [n.op_type for n in graph.node]
    fused = [n for n in graph.node if n.op_type in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")]
    assert len(fused) == LAYERS * LINEARS_PER_LAYER
    inits = {i.name for i in graph.initializer}
    for node in fused:  # the bias is the kernel's last input (DynamicQuantizeMatMul: 5th, MatMulIntegerToFloat: 7th)
        assert node.input[-1] in inits and node.input[-1].endswith(".bias"), (node.name, list(node.input))
    leftover = [n.name for n in graph.node if ".dyn." in n.name and n.op_type in ("MatMulInteger", "Cast", "Mul")]
    assert not leftover
    producers = {o: n.op_type for n in graph.node for o in n.output}
    fused_outputs = {n.output[0] for n in fused}
    bias_adds = [  # an Add of a fused output and a 1-D initializer would be an unfolded bias
        n for n in graph.node if n.op_type == "Add" and n.input[0] in fused_outputs and n.input[1] in inits
    ]
    assert not bias_adds
    # every residual Add feeding a LayerNormalization stays Add + LayerNormalization (faster on ORT's CPU kernels)
    assert "SkipLayerNormalization" not in ops
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 1 + 2 * LAYERS
    assert sum(producers.get(n.input[0]) == "Add" for n in norms) == 1 + 2 * LAYERS


def test_optimized_graph_matches_unoptimized_and_the_simulated_model(exported):
    quantized, path = exported
    inputs = _inputs(4, 13)  # another batch size and sequence length than the export's
    feeds = {k: v.numpy() for k, v in inputs.items()}
    fused = _session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, feeds)[0]
    plain = _session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feeds)[0]
    np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        simulated = quantized(**inputs).last_hidden_state
    mask = inputs["attention_mask"].bool()
    got, want = torch.from_numpy(fused)[mask], simulated[mask]
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert float(cosine.min()) >= 0.99, float(cosine.min())
