"""Dynamic int8 ONNX: ``DynamicQuantizeLinear -> MatMulInteger`` from slimkit's own weight codes and scales.

Each ``MatMul`` / ``Gemm`` of a quantized layer becomes ``DynamicQuantizeLinear(x) -> MatMulInteger(x_q, int8 codes)
-> Cast -> Mul(s_x * s_w)`` (+ its bias), the pattern ONNX Runtime fuses into ``DynamicQuantizeMatMul``; a fused
recurrent module (registered ``FUSED_RNN``) becomes ``com.microsoft.DynamicQuantizeLSTM``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from slimkit.errors import UsageError
from slimkit.export.lowering import fused_rnns, integer_layers
from slimkit.export.onnx_graph import toposort
from slimkit.export.registry import IntegerLayer

__all__ = ["dynamic_graph"]


def _dynamic_lstm(graph: Any, node: Any, inits: dict) -> None:
    """An ONNX ``LSTM`` (from a dynamic int8 slimkit LSTM: its weights sit on slimkit's per-channel int8 grid) becomes
    ONNX Runtime's ``com.microsoft.DynamicQuantizeLSTM`` with the same int8 codes and per-channel scales."""
    from onnx import helper, numpy_helper

    inputs = list(node.input) + [""] * (8 - len(node.input))
    quantized = []
    for weight_name in inputs[1:3]:  # W [dirs, 4H, in], R [dirs, 4H, H]; rows in ONNX gate order (i, o, f, c)
        weight = numpy_helper.to_array(inits[weight_name]).astype(np.float32)
        scale = np.abs(weight).max(axis=2) / 127.0
        scale[scale == 0] = 1.0
        codes = np.clip(np.round(weight / scale[..., None]), -127, 127).astype(np.int8)
        tag = f"{weight_name}.dyn"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.ascontiguousarray(codes.transpose(0, 2, 1)), f"{tag}.codes"),
                numpy_helper.from_array(scale.astype(np.float32), f"{tag}.scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{tag}.zero_point"),
            ]
        )
        quantized.append(tag)
    w, r = quantized
    new = helper.make_node(
        "DynamicQuantizeLSTM",
        [
            inputs[0],
            f"{w}.codes",
            f"{r}.codes",
            *inputs[3:8],
            f"{w}.scale",
            f"{w}.zero_point",
            f"{r}.scale",
            f"{r}.zero_point",
        ],
        list(node.output),
        name=f"{node.name}.dyn",
        domain="com.microsoft",
    )
    new.attribute.extend(node.attribute)
    graph.node.remove(node)
    graph.node.append(new)


def dynamic_graph(proto: Any, model: nn.Module) -> Any:
    """Rewrite the fp32 ONNX ``proto`` of ``model``'s float twin into dynamic int8 (in place; also returned).

    Weight codes and per-channel scales are slimkit's own; a layer called several times (an LSTM's hidden-state
    gates, once per step) shares one int8 weight.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    layers = integer_layers(model)
    by_weight: dict[tuple, list[tuple[str, IntegerLayer]]] = {}
    dequantized: dict[str, np.ndarray] = {}  # each layer's weight as the float twin stored it
    int8_codes: dict[str, np.ndarray] = {}
    for name, layer in layers:
        if layer.bits != 8 or not layer.symmetric or layer.codes is None:
            raise UsageError(
                f"export_onnx: dynamic layer {name!r} needs symmetric 8-bit per-channel or per-tensor "
                f"weights for MatMulInteger (has {layer.bits}-bit {layer.scheme} {layer.granularity})"
            )
        int8_codes[name] = layer.codes.numpy().astype(np.int8)
        weight = dequantized[name] = layer.dequantized.numpy().astype(np.float32)
        for key in ((weight.shape, weight.tobytes()), (weight.T.shape, np.ascontiguousarray(weight.T).tobytes())):
            by_weight.setdefault(key, []).append((name, layer))  # equal weights (fresh copies) share codes
    added: set[str] = set()
    fused = fused_rnns(model)
    matched = {n for n, _ in layers if any(n.startswith(f"{p}.") for p in fused)}
    identity = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    fused_inputs = set()  # each fused LSTM layer's input weights (all directions), as sorted rows
    for prefix, rnn in fused.items():
        for gates in rnn.input_gates:
            rows = [r.tobytes() for gate in gates for r in dequantized[f"{prefix}.{gate}"]]
            fused_inputs.add(tuple(sorted(rows)))
    for node in [n for n in graph.node if n.op_type == "LSTM"]:  # an LSTM kept in float is left alone
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if tuple(sorted(r.tobytes() for r in w.reshape(-1, w.shape[-1]))) in fused_inputs:
            _dynamic_lstm(graph, node, inits)
    for node in list(graph.node):
        weight_name = identity.get(node.input[1], node.input[1]) if len(node.input) > 1 else ""  # shared weights
        if node.op_type not in ("MatMul", "Gemm") or weight_name not in inits:
            continue
        array = numpy_helper.to_array(inits[weight_name])
        hit = by_weight.get((array.shape, np.ascontiguousarray(array).tobytes()))
        if hit is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (
            attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
            or not attrs.get("transB", 0)
        ):
            raise UsageError(f"export_onnx: cannot map Gemm {node.name!r} of layer {hit[0][0]!r} to MatMulInteger")
        name, layer = hit[0]
        matched.update(n for n, _ in hit)
        tag = f"{name}.dyn"
        if tag not in added:
            codes = int8_codes[name]
            scale = np.broadcast_to(layer.scale.numpy(), (codes.shape[0],)).astype(np.float32)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.ascontiguousarray(codes.T), f"{tag}.codes"),
                    numpy_helper.from_array(np.array(0, np.int8), f"{tag}.zero_point"),
                    numpy_helper.from_array(scale, f"{tag}.scale"),
                ]
            )
            added.add(tag)
        out, x = node.output[0], node.input[0]
        t = f"{node.name or out}.dyn"
        graph.node.remove(node)
        result = f"{t}.y" if node.op_type == "Gemm" and len(node.input) > 2 else out
        graph.node.extend(
            [
                helper.make_node("DynamicQuantizeLinear", [x], [f"{t}.xq", f"{t}.xs", f"{t}.xz"], name=f"{t}.Q"),
                helper.make_node(
                    "MatMulInteger",
                    [f"{t}.xq", f"{tag}.codes", f"{t}.xz", f"{tag}.zero_point"],
                    [f"{t}.i32"],
                    name=f"{t}.MatMulInteger",
                ),
                helper.make_node("Cast", [f"{t}.i32"], [f"{t}.f32"], name=f"{t}.Cast", to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{t}.xs", f"{tag}.scale"], [f"{t}.s"], name=f"{t}.Scale"),
                helper.make_node("Mul", [f"{t}.f32", f"{t}.s"], [result], name=f"{t}.Mul"),
            ]
        )
        if result != out:
            graph.node.append(helper.make_node("Add", [result, node.input[2]], [out], name=f"{t}.Bias"))
    missing = [n for n, _ in layers if n not in matched]
    if missing:
        raise UsageError(f"export_onnx: cannot find the ONNX MatMul / Gemm of dynamic layer(s) {missing}")
    if any(n.domain == "com.microsoft" for n in graph.node):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {name for n in graph.node for name in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:  # the float weights the int8 codes replaced
        graph.initializer.remove(init)
    toposort(graph)
    return proto
