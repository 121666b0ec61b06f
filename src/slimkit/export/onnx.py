"""ONNX export: fp32, or QDQ int8 built from slimkit's own calibrated scales (no re-calibration).

For a slimkit fake-quant model, each quantized ``Conv``/``Gemm`` gets an int8 weight initializer with its
per-channel scales and a ``DequantizeLinear``, an int32 bias at scale ``s_x * s_w`` (exactly what the fake-quant
model simulates), and a ``QuantizeLinear -> DequantizeLinear`` pair on its input with the calibrated activation
scale. That pair is also repeated upstream through ``Relu`` / ``MaxPool`` / ``Flatten`` / ``Reshape`` chains up to
the producing layer: these ops commute exactly with a monotone quantizer (and re-quantizing a grid value is the
identity), so the graph computes the same function while ONNX Runtime can fuse ``DQ -> Conv -> Q`` into
integer kernels (``QLinearConv``, ``QGemm``, uint8 ``MaxPool``).

Back ends do not import algorithms: quantized layers are recognised by their ``weight_quant`` attribute.

Example:
    >>> export_onnx(result.model, torch.zeros(1, 1, 28, 28), "model.onnx")      # doctest: +SKIP
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimkit._io import atomic_path
from slimkit.errors import InputTypeError, UsageError
from slimkit.quantization.dynamic import LinearRNN

__all__ = ["export_onnx", "is_dynamic_model", "is_int8_model"]

OPSET = 17
PASS_THROUGH = {"Relu", "MaxPool", "Flatten", "Reshape"}


def _quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "weight_quant") and isinstance(m, nn.Linear | nn.Conv2d)]


def _static_input(layer: nn.Module):
    iq = getattr(layer, "input_quant", None)
    return iq if iq is not None and not iq.dynamic and iq.enabled else None


def is_dynamic_model(model: nn.Module) -> bool:
    """True when ``model`` is a slimkit fake-quant model with dynamic (per-call) activation quantization."""
    return any(getattr(m, "input_quant", None) is not None and m.input_quant.dynamic for _, m in _quant_layers(model))


def is_int8_model(model: nn.Module) -> bool:
    """True when ``model`` is a slimkit fake-quant model with static activation quantization."""
    return any(_static_input(m) is not None for _, m in _quant_layers(model))


def _fused_lstms(model: nn.Module) -> list[str]:
    """Dynamic int8 LSTMs that export as ONNX Runtime's fused ``DynamicQuantizeLSTM``: every gate quantized with
    per-channel scales (the others stay unrolled into one matrix product per step)."""
    return [name for name, m in model.named_modules() if isinstance(m, LinearRNN) and m.mode == "LSTM"
            and all(getattr(g, "weight_quant", None) is not None and g.weight_quant.granularity == "per_channel"
                    for n, g in m.named_children() if n.startswith(("ih_", "hh_")))]


def _float_twin(model: nn.Module) -> nn.Module:
    """A plain float copy whose quantized layers carry the dequantized weight (and simulated bias)."""
    fused = _fused_lstms(model)
    twin = copy.deepcopy(model).eval()
    for name, layer in _quant_layers(twin):
        with torch.no_grad():
            weight = layer.weight_quant.eval()(layer.weight)
            bias = _sim_bias(layer) if layer.bias is not None and layer._bias_quantized() else layer.bias
        if isinstance(layer, nn.Linear):
            plain: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
        else:
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, bias is not None, layer.padding_mode)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if bias is not None:
                plain.bias.copy_(bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, attr, plain)
    for name, module in list(twin.named_modules()):  # dynamic int8 LSTMs export as the fused ONNX LSTM op
        if name in fused:
            parent_name, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(parent_name) if parent_name else twin, attr, module.to_rnn())
    return twin


def _sim_bias(layer: nn.Module) -> torch.Tensor:
    iq, wq = layer.input_quant, layer.weight_quant
    bias_scale = (iq.scale.detach() * wq.scale.detach()).reshape(-1)
    return torch.round(layer.bias.detach() / bias_scale) * bias_scale


def _export_float(model: nn.Module, example_input: torch.Tensor):
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example_input,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def _insert_qdq(graph, tensor: str, consumers: list, scale: float, zero_point: int, tag: str,
                done: dict[str, tuple[float, int, str]]) -> None:
    """Route ``consumers`` of ``tensor`` through ``QuantizeLinear -> DequantizeLinear``; a tensor already quantized
    with the same parameters reuses its pair (one ``Q`` per tensor, as ONNX Runtime's fusions expect)."""
    from onnx import helper, numpy_helper

    previous = done.get(tensor)
    if previous is not None and previous[:2] == (scale, zero_point):
        dq_out = previous[2]
    else:
        s_name, z_name = f"{tag}.scale", f"{tag}.zero_point"
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name),
                                  numpy_helper.from_array(np.array(zero_point, dtype=np.uint8), z_name)])
        q_out, dq_out = f"{tag}.q", f"{tag}.dq"
        graph.node.extend([helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [q_out], name=f"{tag}.Q"),
                           helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=f"{tag}.DQ")])
        done.setdefault(tensor, (scale, zero_point, dq_out))
    for node in consumers:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = dq_out


def _act_params(quantizer, name: str, where: str) -> tuple[float, int]:
    if quantizer.bits != 8:
        raise UsageError(f"export_onnx: layer {name!r} has {quantizer.bits}-bit {where}; QDQ int8 export needs 8")
    return float(quantizer.scale.detach()), int(quantizer.zero_point)


def _quantize_graph(proto, model: nn.Module, ops: tuple[str, ...] = ("Conv", "Gemm")):
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    producer: dict[str, object] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    done: dict[str, tuple[float, int, str]] = {}
    for name, layer in _quant_layers(model):
        iq, wq = _static_input(layer), layer.weight_quant
        weight_name = f"{name}.weight"
        nodes = [n for n in consumers.get(weight_name, []) if n.op_type in ("Conv", "Gemm")]
        if weight_name not in inits or len(nodes) != 1:
            raise UsageError(f"export_onnx: cannot find the ONNX Conv/Gemm of layer {name!r} (weight {weight_name})")
        if wq.granularity == "per_group":
            raise UsageError(f"export_onnx: layer {name!r} uses per-group scales, which QDQ int8 cannot express; "
                             "export fp32 (int8=False) or quantize per channel")
        node = nodes[0]
        if node.op_type not in ops:  # left in float (with the dequantized weights of the simulated model)
            continue
        codes = wq.codes(layer.weight).reshape(layer.weight.shape)
        signed = bool(wq.symmetric)
        dtype = np.int8 if signed else np.uint8
        scale = wq.scale.detach().reshape(-1).numpy().astype(np.float32)
        zero = wq.zero_point.detach().reshape(-1).numpy().astype(dtype)
        graph.initializer.remove(inits[weight_name])
        graph.initializer.extend([
            numpy_helper.from_array(codes.numpy().astype(dtype), f"{weight_name}.int8"),
            numpy_helper.from_array(scale, f"{weight_name}.scale"),
            numpy_helper.from_array(zero, f"{weight_name}.zero_point"),
        ])
        graph.node.append(helper.make_node("DequantizeLinear", [f"{weight_name}.int8", f"{weight_name}.scale",
                                                                f"{weight_name}.zero_point"], [weight_name],
                                           name=f"{weight_name}.DQ", axis=0))
        if iq is None:
            continue
        s_x, z_x = _act_params(iq, name, "activations")
        if len(node.input) > 2 and node.input[2] in inits:
            bias_name = node.input[2]
            bias_scale = (np.float32(s_x) * scale).astype(np.float32)
            bias = numpy_helper.to_array(inits[bias_name]).astype(np.float32)
            graph.initializer.remove(inits[bias_name])
            graph.initializer.extend([
                numpy_helper.from_array(np.round(bias / bias_scale).astype(np.int32), f"{bias_name}.int32"),
                numpy_helper.from_array(bias_scale, f"{bias_name}.scale"),
                numpy_helper.from_array(np.zeros_like(bias_scale, dtype=np.int32), f"{bias_name}.zero_point"),
            ])
            graph.node.append(helper.make_node("DequantizeLinear", [f"{bias_name}.int32", f"{bias_name}.scale",
                                                                    f"{bias_name}.zero_point"], [bias_name],
                                               name=f"{bias_name}.DQ", axis=0))
        # The input: quantized for this layer and for residual Adds reading the same tensor (so ORT runs them as
        # QLinearAdd), then again upstream through ops that commute with the quantizer.
        tensor, users, step = node.input[0], [node], 0
        users += [n for n in consumers.get(tensor, []) if n.op_type == "Add"]
        while True:
            _insert_qdq(graph, tensor, users, s_x, z_x, f"{name}.input{step}", done)
            source = producer.get(tensor)
            if (source is None or source.op_type not in PASS_THROUGH or len(consumers.get(tensor, [])) != 1
                    or source.input[0] in inits):
                break
            tensor, users, step = source.input[0], [source], step + 1
            if len(consumers.get(tensor, [])) != 1:
                break
        oq = getattr(layer, "output_quant", None)
        if oq is not None:  # the output feeds a residual Add: QLinearConv -> QLinearAdd
            s_y, z_y = _act_params(oq, name, "outputs")
            _insert_qdq(graph, node.output[0], list(consumers.get(node.output[0], [])), s_y, z_y,
                        f"{name}.output", done)
    _toposort(graph)
    return proto


def _dynamic_lstm(graph, node, inits: dict) -> None:
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
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(codes.transpose(0, 2, 1)), f"{tag}.codes"),
            numpy_helper.from_array(scale.astype(np.float32), f"{tag}.scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{tag}.zero_point")])
        quantized.append(tag)
    w, r = quantized
    new = helper.make_node("DynamicQuantizeLSTM", [inputs[0], f"{w}.codes", f"{r}.codes", *inputs[3:8], f"{w}.scale",
                                                   f"{w}.zero_point", f"{r}.scale", f"{r}.zero_point"],
                           list(node.output), name=f"{node.name}.dyn", domain="com.microsoft")
    new.attribute.extend(node.attribute)
    graph.node.remove(node)
    graph.node.append(new)


def _dynamic_graph(proto, model: nn.Module):
    """Dynamic int8: each ``MatMul`` / ``Gemm`` of a quantized layer becomes ``DynamicQuantizeLinear(x) ->
    MatMulInteger(x_q, int8 codes) -> Cast -> Mul(s_x * s_w)`` (+ its bias), the pattern ONNX Runtime fuses into
    ``DynamicQuantizeMatMul``. Weight codes and per-channel scales are slimkit's own; a layer called several times (an
    LSTM's hidden-state gates, once per step) shares one int8 weight."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    by_weight: dict[tuple, list[tuple[str, nn.Module]]] = {}
    dequantized: dict[str, np.ndarray] = {}  # each layer's weight as the float twin stored it
    for name, layer in _quant_layers(model):
        wq = layer.weight_quant
        if wq.bits != 8 or not wq.symmetric or wq.granularity == "per_group":
            raise UsageError(f"export_onnx: dynamic layer {name!r} needs symmetric 8-bit per-channel or per-tensor "
                             f"weights for MatMulInteger (has {wq.bits}-bit {wq.scheme} {wq.granularity})")
        with torch.no_grad():
            weight = dequantized[name] = wq.eval()(layer.weight).numpy().astype(np.float32)
        for key in ((weight.shape, weight.tobytes()), (weight.T.shape, np.ascontiguousarray(weight.T).tobytes())):
            by_weight.setdefault(key, []).append((name, layer))  # equal weights (fresh copies) share codes
    added: set[str] = set()
    lstms = _fused_lstms(model)
    matched = {n for n, _ in _quant_layers(model) if any(n.startswith(f"{p}.") for p in lstms)}
    identity = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    fused_inputs = set()  # each fused LSTM layer's input weights (all directions), as sorted rows
    for name in lstms:
        rnn = model.get_submodule(name)
        for k in range(rnn.num_layers):
            rows = [r.tobytes() for sfx in rnn.suffixes for r in dequantized[f"{name}.ih_l{k}{sfx}"]]
            fused_inputs.add(tuple(sorted(rows)))
    for node in [n for n in graph.node if n.op_type == "LSTM"]:  # an LSTM kept in float is left alone
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if tuple(sorted(r.tobytes() for r in w.reshape(-1, w.shape[-1]))) in fused_inputs:
            _dynamic_lstm(graph, node, inits)
    for node in list(graph.node):
        weight = identity.get(node.input[1], node.input[1]) if len(node.input) > 1 else ""  # shared (equal) weights
        if node.op_type not in ("MatMul", "Gemm") or weight not in inits:
            continue
        array = numpy_helper.to_array(inits[weight])
        hit = by_weight.get((array.shape, np.ascontiguousarray(array).tobytes()))
        if hit is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                       or attrs.get("beta", 1.0) != 1.0 or not attrs.get("transB", 0)):
            raise UsageError(f"export_onnx: cannot map Gemm {node.name!r} of layer {hit[0][0]!r} to MatMulInteger")
        name, layer = hit[0]
        matched.update(n for n, _ in hit)
        tag = f"{name}.dyn"
        if tag not in added:
            wq = layer.weight_quant
            codes = wq.codes(layer.weight).reshape(layer.weight.shape).numpy().astype(np.int8)
            scale = np.broadcast_to(wq.scale.detach().reshape(-1).numpy(), (codes.shape[0],)).astype(np.float32)
            graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(codes.T), f"{tag}.codes"),
                                      numpy_helper.from_array(np.array(0, np.int8), f"{tag}.zero_point"),
                                      numpy_helper.from_array(scale, f"{tag}.scale")])
            added.add(tag)
        out, x = node.output[0], node.input[0]
        t = f"{node.name or out}.dyn"
        graph.node.remove(node)
        result = f"{t}.y" if node.op_type == "Gemm" and len(node.input) > 2 else out
        graph.node.extend([
            helper.make_node("DynamicQuantizeLinear", [x], [f"{t}.xq", f"{t}.xs", f"{t}.xz"], name=f"{t}.Q"),
            helper.make_node("MatMulInteger", [f"{t}.xq", f"{tag}.codes", f"{t}.xz", f"{tag}.zero_point"],
                             [f"{t}.i32"], name=f"{t}.MatMulInteger"),
            helper.make_node("Cast", [f"{t}.i32"], [f"{t}.f32"], name=f"{t}.Cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{t}.xs", f"{tag}.scale"], [f"{t}.s"], name=f"{t}.Scale"),
            helper.make_node("Mul", [f"{t}.f32", f"{t}.s"], [result], name=f"{t}.Mul"),
        ])
        if result != out:
            graph.node.append(helper.make_node("Add", [result, node.input[2]], [out], name=f"{t}.Bias"))
    missing = [n for n, _ in _quant_layers(model) if n not in matched]
    if missing:
        raise UsageError(f"export_onnx: cannot find the ONNX MatMul / Gemm of dynamic layer(s) {missing}")
    if any(n.domain == "com.microsoft" for n in graph.node):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {name for n in graph.node for name in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:  # the float weights the int8 codes replaced
        graph.initializer.remove(init)
    _toposort(graph)
    return proto


def _toposort(graph) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise UsageError("export_onnx: the quantized graph has a cycle or a dangling input")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *,
                int8: bool | None = None, int8_ops: tuple[str, ...] = ("Conv", "Gemm")) -> Path:
    """Write ``model`` as ONNX (batch dimension dynamic), atomically.

    Args:
        int8: integer ONNX from the model's own weight codes and scales (default: for slimkit fake-quant models):
            QDQ for static activation quantization, ``DynamicQuantizeLinear -> MatMulInteger`` for
            ``method="dynamic"``; False writes the simulated model in fp32.
        int8_ops: which ONNX ops of quantized layers get QDQ int8 (``("Gemm",)``: fully connected layers only,
            convolutions stay float - for nets whose thin convolutions run slower on int8 kernels).
    """
    if not isinstance(example_input, torch.Tensor):
        raise InputTypeError(f"export_onnx: example_input must be a tensor, got {type(example_input).__name__}")
    quantized, dynamic = is_int8_model(model), is_dynamic_model(model)
    int8 = (quantized or dynamic) if int8 is None else int8
    if int8 and not (quantized or dynamic):
        raise UsageError("export_onnx: int8=True needs a slimkit fake-quant model (slimkit.quantize(..., "
                         "QuantConfig(act_bits=8, method='ptq', 'qat' or 'dynamic')))")
    proto = _export_float(_float_twin(model) if _quant_layers(model) else copy.deepcopy(model).eval(),
                          example_input)
    if int8:
        proto = _quantize_graph(proto, model, tuple(int8_ops)) if quantized else _dynamic_graph(proto, model)
    import onnx

    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)
