"""QDQ int8 ONNX from slimkit's own calibrated scales (static activation quantization; no re-calibration).

Each quantized ``Conv``/``Gemm`` gets an int8 weight initializer with its per-channel scales and a
``DequantizeLinear``, an int32 bias at scale ``s_x * s_w`` (exactly what the fake-quant model simulates), and a
``QuantizeLinear -> DequantizeLinear`` pair on its input with the calibrated activation scale. That pair is also
repeated upstream through ``Relu`` / ``MaxPool`` / ``Flatten`` / ``Reshape`` chains up to the producing layer: these
ops commute exactly with a monotone quantizer (and re-quantizing a grid value is the identity), so the graph computes
the same function while ONNX Runtime can fuse ``DQ -> Conv -> Q`` into integer kernels (``QLinearConv``, ``QGemm``,
uint8 ``MaxPool``); ``Clip`` too (ReLU6) when the quantized range lies inside its bounds.

Around the layers, the elementwise ops ONNX Runtime has integer kernels for (``Sigmoid``, ``Mul``, ``Add``,
``GlobalAveragePool``, ``AveragePool``, ``LeakyRelu``) get ``QDQ`` on their inputs and output as soon as their inputs
are quantized, so SiLU (``Sigmoid`` + ``Mul``), squeeze-excitation gates and pooling run as ``QLinearSigmoid`` /
``QLinearMul`` / ``QLinearGlobalAveragePool`` between ``QLinearConv`` s instead of dequantizing to float and back. A
tensor no layer calibrated gets the range its producer can reach from its quantized inputs (the function over the
input's 256 grid values, interval arithmetic for ``Mul`` / ``Add``, the input's range for pooling): a superset of
what calibration would see, tight for monotone functions. Without this a Conv followed by SiLU / Hardswish stays a
float Conv with dequantized weights, and EfficientNet-B0 ran 2-3x slower than ``quantize_static``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.errors import UsageError
from slimkit.export.lowering import integer_layers
from slimkit.export.onnx_graph import toposort
from slimkit.export.registry import ActivationQuant, IntegerLayer

__all__ = ["quantize_graph"]

PASS_THROUGH = {"Relu", "MaxPool", "Flatten", "Reshape"}
INTEGER_OPS = {"Sigmoid", "Mul", "Add", "GlobalAveragePool", "AveragePool", "LeakyRelu"}  # ORT QLinear* kernels
SAME_RANGE = {"GlobalAveragePool", "AveragePool", "MaxPool", "Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze"}
SAME_GRID = {"MaxPool", "Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze"}  # outputs on the input's grid
BOUNDED = {"Sigmoid": (0.0, 1.0), "HardSigmoid": (0.0, 1.0), "Tanh": (-1.0, 1.0)}


@dataclass
class _Index:
    """The graph being rewritten with its lookups: initializers by name, the nodes reading / producing each tensor,
    and the QDQ pairs already inserted (tensor -> (scale, zero point, dequantized name))."""

    graph: Any
    inits: dict[str, Any]
    consumers: dict[str, list] = field(default_factory=dict)
    producer: dict[str, Any] = field(default_factory=dict)
    done: dict[str, tuple[float, int, str]] = field(default_factory=dict)
    dequantized: dict[str, tuple[float, int]] = field(default_factory=dict)  # a DQ output -> its scale, zero point
    source: dict[str, str] = field(default_factory=dict)  # a DQ output -> the tensor it quantizes

    @classmethod
    def of(cls, graph: Any) -> _Index:
        index = cls(graph, {i.name: i for i in graph.initializer})
        for node in graph.node:
            for name in node.input:
                index.consumers.setdefault(name, []).append(node)
            for name in node.output:
                index.producer[name] = node
        return index


def _insert_qdq(index: _Index, tensor: str, consumers: list, scale: float, zero_point: int, tag: str) -> None:
    """Route ``consumers`` of ``tensor`` through ``QuantizeLinear -> DequantizeLinear``; a tensor already quantized
    with the same parameters reuses its pair (one ``Q`` per tensor, as ONNX Runtime's fusions expect)."""
    from onnx import helper, numpy_helper

    graph, done = index.graph, index.done
    if index.dequantized.get(tensor) == (scale, zero_point):
        return  # already a dequantized tensor on this grid (a producer's output quantizer): one pair per tensor
    previous = done.get(tensor)
    if previous is not None and previous[:2] == (scale, zero_point):
        dq_out = previous[2]
    else:
        s_name, z_name = f"{tag}.scale", f"{tag}.zero_point"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name),
                numpy_helper.from_array(np.array(zero_point, dtype=np.uint8), z_name),
            ]
        )
        q_out, dq_out = f"{tag}.q", f"{tag}.dq"
        graph.node.extend(
            [
                helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [q_out], name=f"{tag}.Q"),
                helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=f"{tag}.DQ"),
            ]
        )
        done.setdefault(tensor, (scale, zero_point, dq_out))
        index.dequantized[dq_out] = (scale, zero_point)
        index.source[dq_out] = tensor
    for node in consumers:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = dq_out


def _act_params(quantizer: ActivationQuant, name: str, where: str) -> tuple[float, int]:
    if quantizer.bits != 8:
        raise UsageError(f"export_onnx: layer {name!r} has {quantizer.bits}-bit {where}; QDQ int8 export needs 8")
    if quantizer.scale is None or quantizer.zero_point is None:
        raise UsageError(f"export_onnx: layer {name!r} has dynamic {where}; QDQ int8 export needs calibrated ones")
    return quantizer.scale, quantizer.zero_point


def quantize_graph(proto: Any, model: nn.Module, ops: tuple[str, ...] = ("Conv", "Gemm", "MatMul")) -> Any:
    """Rewrite the fp32 ONNX ``proto`` of ``model``'s float twin into QDQ int8 (in place; also returned).

    Args:
        ops: which ONNX ops of quantized layers get QDQ int8; the others stay float (with the dequantized weights).
    """
    from onnx import helper, numpy_helper

    index = _Index.of(proto.graph)
    graph, inits, consumers = index.graph, index.inits, index.consumers
    matmuls = _matmul_weights(index)
    for name, layer in integer_layers(model):
        iq = layer.input if layer.input is not None and not layer.input.dynamic else None
        weight_name = f"{name}.weight"
        nodes = [n for n in consumers.get(weight_name, []) if n.op_type in ("Conv", "Gemm")]
        if not nodes and weight_name not in inits:  # a Linear on (N, T, C) inputs exports as MatMul(x, W^T)
            found = _matmul_of(layer, matmuls)
            if found is not None:
                _quantize_matmul(index, found, name, layer, iq, ops)
                continue
        if weight_name not in inits or len(nodes) != 1:
            raise UsageError(
                f"export_onnx: cannot find the ONNX Conv/Gemm/MatMul of layer {name!r} (weight {weight_name})"
            )
        _check_codes(layer, name)
        node = nodes[0]
        if node.op_type not in ops:  # left in float (with the dequantized weights of the simulated model)
            continue
        scale = _int8_weight(index, layer, name, weight_name, transposed=False)
        if iq is None:
            continue
        s_x, _ = _act_params(iq, name, "activations")
        bias_source = _initializer_behind(index, node.input[2]) if len(node.input) > 2 else None
        if bias_source is not None:
            # the layer's own int32 bias: the exporter shares equal float biases between layers (all zeros after
            # folding a fresh BatchNorm) through Identity nodes, and each layer's bias lives on its own s_x * s_w
            tag = f"{name}.bias"
            bias_scale = (np.float32(s_x) * scale).astype(np.float32)
            bias = numpy_helper.to_array(inits[bias_source]).astype(np.float32)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.round(bias / bias_scale).astype(np.int32), f"{tag}.int32"),
                    numpy_helper.from_array(bias_scale, f"{tag}.scale"),
                    numpy_helper.from_array(np.zeros_like(bias_scale, dtype=np.int32), f"{tag}.zero_point"),
                ]
            )
            graph.node.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{tag}.int32", f"{tag}.scale", f"{tag}.zero_point"],
                    [f"{tag}.dq"],
                    name=f"{tag}.DQ",
                    axis=0,
                )
            )
            node.input[2] = f"{tag}.dq"
        _quantize_input(index, node, name, iq, layer)
    _quantize_residual_adds(index)
    _quantize_elementwise(index)
    toposort(graph)
    _drop_redundant(graph)
    _drop_unused(graph)
    return proto


def _quantize_residual_adds(index: _Index) -> None:
    """A residual ``Add`` reading a layer's quantized input reads its QDQ pair too where every other input of the Add
    is a quantized layer output (ResNet: ``QLinearConv -> QLinearAdd``). Where the other input stays float (a
    transformer's ``dense(x) + x -> LayerNorm``: no integer Add to gain) the Add keeps the float tensor, as the
    simulated model does: rounding the residual stream there only moved ONNX away from it (BERT: 6% of the logits'
    spread)."""
    quantized = {pair[2] for pair in index.done.values()}
    for tensor, (scale, zero_point, _) in list(index.done.items()):
        for add in index.consumers.get(tensor, []):
            others = [i for i in add.input if i and i != tensor]
            if add.op_type == "Add" and tensor in add.input and others and all(i in quantized for i in others):
                _insert_qdq(index, tensor, [add], scale, zero_point, f"{tensor}.residual")


def _initializer_behind(index: _Index, tensor: str) -> str | None:
    """The initializer ``tensor`` is, directly or through ``Identity`` nodes, or None."""
    for _ in range(8):
        if tensor in index.inits:
            return tensor
        node = index.producer.get(tensor)
        if node is None or node.op_type != "Identity":
            return None
        tensor = node.input[0]
    return None


def _drop_redundant(graph: Any) -> None:
    """One quantized tensor per value: a ``Relu`` reading a ``DequantizeLinear`` with zero point 0 is the identity
    (its input is >= 0), and a ``QuantizeLinear`` of a ``DequantizeLinear`` output with the same scale and zero point
    gives back the codes it was given. Their readers read the earlier tensors instead, so ONNX Runtime does not
    requantize between a conv's output and the squeeze-excitation pool / mul after its ReLU (MobileNetV3)."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    alias: dict[str, str] = {}
    dequantized: dict[tuple, str] = {}  # (codes, scale, zero point) -> the first DequantizeLinear output

    def params(node: Any) -> tuple | None:
        if len(node.input) < 3 or node.input[1] not in values or node.input[2] not in values:
            return None
        scale, zero_point = values[node.input[1]], values[node.input[2]]
        return scale.dtype.str, scale.tobytes(), zero_point.dtype.str, zero_point.tobytes()

    def origin(tensor: str) -> str:
        while tensor in alias:
            tensor = alias[tensor]
        return tensor

    for node in graph.node:  # in topological order: a tensor's alias is known before its readers
        for i, name in enumerate(node.input):
            node.input[i] = origin(name)
        source = producer.get(node.input[0]) if node.input else None
        if node.output[0] in outputs or source is None or source.op_type != "DequantizeLinear":
            if node.op_type == "DequantizeLinear" and params(node) is not None:
                key = (node.input[0], *params(node), *(a.SerializeToString() for a in node.attribute))  # type: ignore[misc]
                if key in dequantized:
                    alias[node.output[0]] = dequantized[key]
                else:
                    dequantized[key] = node.output[0]
            continue
        grid = params(source)
        if grid is None:
            continue
        zero_point = values[source.input[2]]
        if node.op_type == "Relu" and zero_point.dtype == np.uint8 and not zero_point.any():
            alias[node.output[0]] = node.input[0]
        elif node.op_type == "QuantizeLinear" and params(node) == grid:
            alias[node.output[0]] = source.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = origin(name)


def _drop_unused(graph: Any) -> None:
    """Remove the ``Identity`` / ``Relu`` / ``QuantizeLinear`` / ``DequantizeLinear`` nodes and the initializers
    nothing reads any more (float biases replaced above, pairs ``_drop_redundant`` bypassed)."""
    outputs = {o.name for o in graph.output}
    removable = {"Identity", "Relu", "QuantizeLinear", "DequantizeLinear"}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in removable and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _quantize_input(index: _Index, node: Any, name: str, iq: ActivationQuant, layer: IntegerLayer) -> None:
    """QDQ on ``node``'s input with the layer's calibrated scale (and on its output when it feeds a residual Add)."""
    consumers, producer = index.consumers, index.producer
    s_x, z_x = _act_params(iq, name, "activations")
    # The input: quantized for this layer (and for a residual Add reading it: ``_quantize_residual_adds``), then
    # again upstream through ops that commute with the quantizer.
    tensor, users, step = node.input[0], [node], 0
    while True:
        _insert_qdq(index, tensor, users, s_x, z_x, f"{name}.input{step}")
        source = producer.get(tensor)
        if (
            source is None
            or not (source.op_type in PASS_THROUGH or _clip_keeps(index, source, s_x, z_x))
            or len(consumers.get(tensor, [])) != 1
            or source.input[0] in index.inits
        ):
            break
        tensor, users, step = source.input[0], [source], step + 1
        if len(consumers.get(tensor, [])) != 1:
            break
    if layer.output is not None:  # the output feeds a residual Add: QLinearConv -> QLinearAdd
        s_y, z_y = _act_params(layer.output, name, "outputs")
        _insert_qdq(index, node.output[0], list(consumers.get(node.output[0], [])), s_y, z_y, f"{name}.output")


def _check_codes(layer: IntegerLayer, name: str) -> torch.Tensor:
    """The layer's integer weight codes; per-group scales (no codes) cannot be QDQ int8."""
    if layer.codes is None:
        raise UsageError(
            f"export_onnx: layer {name!r} uses per-group scales, which QDQ int8 cannot express; "
            "export fp32 (int8=False) or quantize per channel"
        )
    return layer.codes


def _int8_weight(index: _Index, layer: IntegerLayer, name: str, target: str, *, transposed: bool) -> np.ndarray:
    """Replace the float initializer ``target`` (the layer's weight; its transpose for ``MatMul``) by the layer's
    int8 codes and a ``DequantizeLinear`` (per output channel); returns the weight scales."""
    from onnx import helper, numpy_helper

    dtype = np.int8 if layer.symmetric else np.uint8
    scale = layer.scale.numpy().astype(np.float32)
    codes = _check_codes(layer, name).numpy().astype(dtype)
    tag, graph = f"{name}.weight", index.graph
    graph.initializer.remove(index.inits[target])
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(codes.T) if transposed else codes, f"{tag}.int8"),
            numpy_helper.from_array(scale, f"{tag}.scale"),
            numpy_helper.from_array(layer.zero_point.numpy().astype(dtype), f"{tag}.zero_point"),
        ]
    )
    graph.node.append(
        helper.make_node(
            "DequantizeLinear",
            [f"{tag}.int8", f"{tag}.scale", f"{tag}.zero_point"],
            [target],
            name=f"{tag}.DQ",
            axis=1 if transposed and scale.size > 1 else 0,
        )
    )
    return scale


def _matmul_weights(index: _Index) -> dict[tuple, list]:
    """``MatMul`` nodes whose second input is an initializer, keyed by that matrix (shape, bytes)."""
    from onnx import numpy_helper

    found: dict[tuple, list] = {}
    for node in index.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in index.inits:
            array = np.ascontiguousarray(numpy_helper.to_array(index.inits[node.input[1]]).astype(np.float32))
            found.setdefault((array.shape, array.tobytes()), []).append(node)
    return found


def _matmul_of(layer: IntegerLayer, matmuls: dict[tuple, list]) -> Any:
    """The one ``MatMul`` computing ``x @ W^T`` with this layer's (dequantized) weight, or None."""
    weight_t = np.ascontiguousarray(layer.dequantized.numpy().astype(np.float32).T)
    nodes = matmuls.get((weight_t.shape, weight_t.tobytes()), [])
    return nodes[0] if len(nodes) == 1 else None


def _quantize_matmul(
    index: _Index, node: Any, name: str, layer: IntegerLayer, iq: ActivationQuant | None, ops: tuple[str, ...]
) -> None:
    """A Linear exported as ``MatMul(x, W^T) [-> Add(bias)]``: int8 ``W^T`` codes with per-column scales and a
    ``DequantizeLinear`` (axis 1), the bias rounded to the int32 grid ``s_x * s_w`` the simulated model uses, QDQ on
    the input. ORT fuses ``DQ -> MatMul`` into integer kernels."""
    from onnx import numpy_helper

    _check_codes(layer, name)
    if "MatMul" not in ops:
        return
    scale = _int8_weight(index, layer, name, node.input[1], transposed=True)
    if iq is None:
        return
    s_x, _ = _act_params(iq, name, "activations")
    graph, inits = index.graph, index.inits
    adds = [n for n in index.consumers.get(node.output[0], []) if n.op_type == "Add"]
    for add in adds:  # the bias: rounded to the int32 grid of s_x * s_w, as the simulated model does
        bias_name = next((i for i in add.input if i in inits), None)
        if bias_name is None:
            continue
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.float32)
        if bias.shape != (scale.size if scale.size > 1 else bias.size,):
            continue
        grid = (np.float32(s_x) * scale).astype(np.float32)
        rounded = (np.round(bias / grid) * grid).astype(np.float32)
        graph.initializer.remove(inits[bias_name])
        graph.initializer.append(numpy_helper.from_array(rounded, bias_name))
    _quantize_input(index, node, name, iq, layer)


def _constant(index: _Index, tensor: str) -> np.ndarray | None:
    """The value of ``tensor`` when it is an initializer or a ``Constant`` node's output, else None."""
    from onnx import numpy_helper

    if tensor in index.inits:
        return numpy_helper.to_array(index.inits[tensor])
    node = index.producer.get(tensor)
    if node is not None and node.op_type == "Constant":
        for attribute in node.attribute:
            if attribute.name == "value":
                return numpy_helper.to_array(attribute.t)
    return None


def _clip_bounds(index: _Index, node: Any) -> tuple[float, float]:
    from onnx import helper

    bounds = [-np.inf, np.inf]
    for slot in (1, 2):  # opset >= 11: min / max inputs (optional)
        value = _constant(index, node.input[slot]) if len(node.input) > slot and node.input[slot] else None
        if value is not None:
            bounds[slot - 1] = float(value)
    for attribute in node.attribute:  # opset < 11
        if attribute.name in ("min", "max"):
            bounds[attribute.name == "max"] = float(helper.get_attribute_value(attribute))
    return bounds[0], bounds[1]


def _clip_keeps(index: _Index, node: Any, scale: float, zero_point: int) -> bool:
    """A ``Clip`` commutes with the quantizer when the quantized range lies inside its bounds (ReLU6 before a layer
    calibrated on its output): both clamp to the same grid ends."""
    if node.op_type != "Clip":
        return False
    low, high = _clip_bounds(index, node)
    span = 255 * scale
    return -zero_point * scale >= low - 1e-6 * span and (255 - zero_point) * scale <= high + 1e-6 * span


def _qparams(low: float, high: float) -> tuple[float, int]:
    """uint8 scale and zero point covering ``[low, high]`` widened to include 0 (slimkit's asymmetric observers)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = float(np.float32((high - low) / 255)) if high - low > 1e-12 else 1.0
    return scale, int(np.clip(-np.round(low / scale), 0, 255))


def _unary(index: _Index, node: Any, x: np.ndarray) -> np.ndarray:
    """``node``'s elementwise function on ``x``."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op == "Sigmoid":
        return 1 / (1 + np.exp(-x))
    if op == "HardSigmoid":
        return np.clip(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0, 1)
    if op == "HardSwish":
        return x * np.clip(x / 6 + 0.5, 0, 1)
    if op == "Relu":
        return np.maximum(x, 0)
    if op == "LeakyRelu":
        return np.where(x >= 0, x, attrs.get("alpha", 0.01) * x)
    if op == "Tanh":
        return np.tanh(x)
    low, high = _clip_bounds(index, node)  # Clip
    return np.clip(x, low, high)


def _range(index: _Index, tensor: str, depth: int = 0) -> tuple[float, float] | None:
    """The range of ``tensor`` from the quantized tensors it is computed from (see the module docstring), or None
    when its producer is not an op whose range follows from its inputs'."""
    params = index.dequantized.get(tensor) or (index.done[tensor][:2] if tensor in index.done else None)
    if params is not None:
        scale, zero_point = params
        return -zero_point * scale, (255 - zero_point) * scale
    node = index.producer.get(tensor)
    if node is None or depth > 32 or not node.input:
        return None
    op, inputs = node.op_type, [i for i in node.input if i]
    if op in SAME_RANGE:
        return _range(index, inputs[0], depth + 1)
    if op in ("Sigmoid", "HardSigmoid", "HardSwish", "Relu", "LeakyRelu", "Tanh", "Clip"):
        found = _range(index, inputs[0], depth + 1)
        if found is None:
            return BOUNDED.get(op)
        values = _unary(index, node, np.linspace(found[0], found[1], 256))  # the input's grid values
        return float(values.min()), float(values.max())
    if op in ("Mul", "Add") and len(inputs) == 2:
        a, b = inputs
        for x, gate in ((a, b), (b, a)):  # SiLU: Mul(x, Sigmoid(x)), over x's grid
            producer = index.producer.get(index.source.get(gate, gate))
            if (
                op == "Mul"
                and producer is not None
                and producer.op_type == "Sigmoid"
                and index.source.get(producer.input[0], producer.input[0]) == index.source.get(x, x)
            ):
                found = _range(index, x, depth + 1)
                if found is None:
                    return None
                grid = np.linspace(found[0], found[1], 256)
                values = grid / (1 + np.exp(-grid))
                return float(values.min()), float(values.max())
        ra, rb = _range(index, a, depth + 1), _range(index, b, depth + 1)
        if ra is None or rb is None:
            return None
        if op == "Add":
            return ra[0] + rb[0], ra[1] + rb[1]
        products = [p * q for p in ra for q in rb]
        return min(products), max(products)
    return None


def _derived_params(index: _Index, tensor: str) -> tuple[float, int] | None:
    """Scale and zero point for ``tensor`` (no layer calibrated it): its input's own grid when its producer keeps
    values on that grid (pooling by max, reshapes; a ReLU on a grid with zero point 0, which ``_drop_redundant``
    removes), else the range ``_range`` derives, else None."""
    node = index.producer.get(tensor)
    source = index.dequantized.get(node.input[0]) if node is not None and node.input else None
    if (
        node is not None
        and source is not None
        and (node.op_type in SAME_GRID or (node.op_type, source[1]) == ("Relu", 0))
    ):
        return source
    found = _range(index, tensor)
    return None if found is None else _qparams(*found)


def _quantize_elementwise(index: _Index) -> None:
    """QDQ on the inputs and output of each op ONNX Runtime runs on integers (``INTEGER_OPS``) whose inputs are
    quantized or have a derivable range, so it fuses into ``QLinearSigmoid`` / ``QLinearMul`` / ``QLinearAdd`` /
    ``QLinearGlobalAveragePool``. Tensors a layer calibrated keep that layer's scale."""
    graph_outputs = {o.name for o in index.graph.output}
    for node in [n for n in index.graph.node if n.op_type in INTEGER_OPS]:
        inputs = [i for i in node.input if i]
        if not inputs or any(_constant(index, i) is not None for i in inputs):
            continue
        known = [i in index.dequantized or i in index.done or _range(index, i) is not None for i in inputs]
        if not all(known):
            continue
        for slot, tensor in enumerate(node.input):
            if not tensor or tensor in index.dequantized:
                continue
            if tensor in index.done:
                node.input[slot] = index.done[tensor][2]
                continue
            params = _derived_params(index, tensor)
            if params is not None:
                _insert_qdq(index, tensor, [node], *params, f"{tensor}.act")
        output = node.output[0]
        users = index.consumers.get(output, [])
        if output in index.done or output in graph_outputs:
            continue
        if users and all(u.op_type in ("Relu", "Clip") and u.output[0] in index.done for u in users):
            continue  # Add -> Relu -> QuantizeLinear: ORT folds the Relu into QLinearAdd (a Q here would requantize)
        params = _derived_params(index, output)
        if params is not None:
            _insert_qdq(index, output, list(users), *params, f"{output}.act")
