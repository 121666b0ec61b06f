"""Static int8 parity between the simulated (fake-quant) model and its ONNX export on ONNX Runtime, beyond top-1:
a tiny random-init BERT calibrated on only 2 sequences (so evaluation inputs leave the calibrated ranges and clip)
must give every quantized layer the same integer input codes in ONNX Runtime as in PyTorch (at most a rare 1-step
rounding flip, never more), and hidden states within a small multiple of the quantization step."""

import os

import pytest
import torch

import slimkit
from slimkit.export.onnx import export_onnx
from slimkit.quantization.ptq import quant_layers

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing downloads: the config is built here, weights are random
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

VOCAB = 97


def _tokens(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[batch // 2 :, -3:] = 0
    return {
        "input_ids": torch.randint(0, VOCAB, (batch, length), generator=g),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
        "attention_mask": mask,
    }


@pytest.mark.parametrize("optimized", [False, True])
def test_static_bert_layer_inputs_match_ort_code_for_code(tmp_path, optimized):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        layer_norm_eps=1e-12,
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    result = slimkit.quantize(model, slimkit.QuantConfig(batch_size=16), _tokens(2, 8, seed=1))
    quantized = result.model
    path = export_onnx(quantized, _tokens(1, 8, seed=1), tmp_path / "bert.onnx")

    proto = onnx.load(str(path))
    readers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    by_name = {node.name: node for node in proto.graph.node}
    layers = [(name, layer) for name, layer in quant_layers(quantized) if layer.input_quant is not None]
    assert len(layers) == 6 * 3
    inputs = {}
    for name, _ in layers:  # the dequantized activation each layer's MatMul reads
        weight = by_name[f"{name}.weight.DQ"].output[0]
        (matmul,) = [n for n in readers[weight] if n.op_type in ("MatMul", "Gemm")]
        inputs[name] = matmul.input[0]
    outputs = ["last_hidden_state", *inputs.values()]
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    test = _tokens(16, 13, seed=2)  # another length, and values outside the 2 calibration sequences' ranges
    got = dict(zip(outputs, session.run(outputs, {k: v.numpy() for k, v in test.items()})))

    simulated: dict[str, torch.Tensor] = {}
    hooks = [
        layer.input_quant.register_forward_hook(lambda m, a, out, name=name: simulated.__setitem__(name, out))
        for name, layer in layers
    ]
    with torch.no_grad():
        hidden = quantized(**test).last_hidden_state
    for hook in hooks:
        hook.remove()
    flips = 0
    for name, layer in layers:
        step = float(layer.input_quant.scale)
        steps = (torch.from_numpy(got[inputs[name]]).reshape(simulated[name].shape) - simulated[name]).abs() / step
        assert float(steps.max()) < 1.01, f"{name}: ONNX Runtime's input codes differ by {float(steps.max()):.2f} steps"
        flips += int((steps > 0.5).sum())
    assert flips <= 1e-3 * sum(t.numel() for t in simulated.values())
    rows = test["attention_mask"].bool()
    diff = (torch.from_numpy(got["last_hidden_state"]) - hidden)[rows].abs()
    assert float(diff.max()) < 0.05 * float(hidden[rows].std())
