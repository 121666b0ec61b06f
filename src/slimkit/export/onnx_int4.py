"""Block-quantized weight-only ONNX: ONNX Runtime's ``com.microsoft.MatMulNBits`` from slimkit's own codes.

A weight-only layer (no activation quantizer) whose weight sits on a per-group grid of a power-of-two block of input
elements (``QuantConfig(weight_bits=4, act_bits=None, group_size=128, algorithm=...)``) has its fp32 ``MatMul`` /
``Gemm`` replaced by ``MatMulNBits(A, B, scales, zero_points)`` with attributes ``K`` (inputs), ``N`` (outputs),
``bits`` and ``block_size``; a ``Gemm``'s bias becomes an ``Add`` after it. The layout ONNX Runtime reads:

- ``B``: uint8 ``(N, blocks, block_size * bits / 8)``; row ``n`` holds the unsigned codes of output ``n`` along K,
  ``8 / bits`` per byte, the first in the lowest bits; K is padded with zero codes to whole blocks.
- ``scales``: float ``(N * blocks)``; ``zero_points``: uint8 ``(N * ceil(blocks * bits / 8))``, packed the same way
  per row. The weight is ``(code - zero_point) * scale``: exactly the simulated model's.

Symmetric grids are stored shifted to unsigned (``code - qmin``, ``zero_point = -qmin``). The layer's bits are
stored in 2, 4 or 8 (3-bit codes in 4). AWQ's input scale, when it could not be folded upstream, is the ``Mul`` the
float twin already puts before the ``MatMul``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from slimkit.errors import UsageError
from slimkit.export.lowering import integer_layers
from slimkit.export.onnx_graph import toposort
from slimkit.export.registry import IntegerLayer

__all__ = ["blockwise_graph", "blockwise_layers", "pack_blocks", "set_accuracy_level"]


def _block_size(in_features: int, blocks: int) -> int | None:
    """The power-of-two block (>= 16, what ``MatMulNBits`` takes) giving ``blocks`` blocks over ``in_features``, or
    None (with one block any size >= K works: the smallest is taken)."""
    size = 16
    while math.ceil(in_features / size) > blocks:
        size *= 2
    return size if math.ceil(in_features / size) == blocks else None


def _storage(bits: int) -> int:
    return next(width for width in (2, 4, 8) if bits <= width)


def blockwise_layers(model: nn.Module) -> list[tuple[str, IntegerLayer, int]]:
    """``(name, IntegerLayer, block_size)`` for each weight-only Linear layer on a per-group uniform grid that
    ``MatMulNBits`` runs (power-of-two blocks >= 16 along the input dim)."""
    found = []
    for name, layer in integer_layers(model):
        if layer.input is not None or layer.granularity != "per_group" or layer.scheme not in ("affine", "symmetric"):
            continue
        if layer.dequantized.ndim != 2 or layer.scale.numel() % layer.dequantized.shape[0]:
            continue
        out_features, in_features = layer.dequantized.shape
        size = _block_size(in_features, layer.scale.numel() // out_features)
        if size is not None:
            found.append((name, layer, size))
    return found


def pack_blocks(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes ``(rows, columns)`` (columns a multiple of ``8 / bits``) into uint8 ``(rows, columns *
    bits / 8)``, the first code of each byte in the lowest bits.

    Example:
        >>> pack_blocks(np.array([[1, 2, 15, 0]]), 4).tolist()
        [[33, 15]]
    """
    per_byte = 8 // bits
    grouped = codes.astype(np.uint16).reshape(codes.shape[0], -1, per_byte)
    packed = np.zeros(grouped.shape[:2], dtype=np.uint16)
    for i in range(per_byte):
        packed |= grouped[..., i] << (bits * i)
    return packed.astype(np.uint8)


def _matmul_nbits_inputs(layer: IntegerLayer, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(B, scales, zero_points, bits)`` of one layer in ``MatMulNBits``' layout (see the module docstring)."""
    weight = layer.dequantized.double().numpy()
    out_features, in_features = weight.shape
    blocks = math.ceil(in_features / block)
    scale = layer.scale.double().numpy().reshape(out_features, blocks)
    zero_point = layer.zero_point.double().numpy().reshape(out_features, blocks)
    qmin = -(2 ** (layer.bits - 1) - 1) if layer.symmetric else 0
    bits = _storage(layer.bits)
    padded = np.zeros((out_features, blocks * block))
    padded[:, :in_features] = weight
    step = np.repeat(scale, block, axis=1)
    codes = np.rint(padded / step) + np.repeat(zero_point, block, axis=1) - qmin
    codes = np.clip(codes, 0, 2**bits - 1)
    packed = pack_blocks(codes, bits).reshape(out_features, blocks, block * bits // 8)
    per_byte = 8 // bits
    zeros = np.zeros((out_features, math.ceil(blocks / per_byte) * per_byte))
    zeros[:, :blocks] = zero_point - qmin
    return packed, scale.astype(np.float32).reshape(-1), pack_blocks(zeros, bits).reshape(-1), bits


def blockwise_graph(proto: Any, model: nn.Module) -> dict[str, str]:
    """Rewrite the fp32 ONNX ``proto`` of ``model``'s float twin in place: each weight-only layer's ``MatMul`` /
    ``Gemm`` becomes ``MatMulNBits``. Returns metadata notes: the layers not found in the graph (a layer the forward
    never calls is not in it) are named in a warning and in ``slimkit.unused_layers``."""
    import warnings

    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    layers = blockwise_layers(model)
    by_weight: dict[tuple, tuple[str, IntegerLayer, int, bool]] = {}
    for name, layer, block in layers:
        weight = layer.dequantized.float().numpy()
        by_weight[(weight.shape, weight.tobytes())] = (name, layer, block, False)  # (N, K): Gemm transB=1
        transposed = np.ascontiguousarray(weight.T)
        by_weight[(transposed.shape, transposed.tobytes())] = (name, layer, block, True)  # (K, N): MatMul

    def weight_of(node: Any) -> tuple[str, IntegerLayer, int] | None:
        """The layer whose weight ``node`` multiplies by, when it reads it as ``(K, N)``."""
        source = node.input[1]
        flip = False
        producer = producers.get(source)
        if producer is not None and producer.op_type == "Transpose" and producer.input[0] in inits:
            source, flip = producer.input[0], True  # MatMul(x, Transpose(W))
        if source not in inits:
            return None
        array = numpy_helper.to_array(inits[source]).astype(np.float32)
        hit = by_weight.get((array.shape, np.ascontiguousarray(array).tobytes()))
        if hit is None:
            return None
        name, layer, block, transposed = hit
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                return None
            flip ^= bool(attrs.get("transB", 0))
        return (name, layer, block) if transposed != flip else None

    added: set[str] = set()
    found: set[str] = set()
    for node in list(graph.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        hit = weight_of(node)
        if hit is None:
            continue
        name, layer, block = hit
        found.add(name)
        tag = f"{name}.nbits"
        out_features, in_features = layer.dequantized.shape
        if tag not in added:
            packed, scales, zeros, bits = _matmul_nbits_inputs(layer, block)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(packed, f"{tag}.B"),
                    numpy_helper.from_array(scales, f"{tag}.scales"),
                    numpy_helper.from_array(zeros, f"{tag}.zero_points"),
                ]
            )
            added.add(tag)
        bits = _storage(layer.bits)
        out = node.output[0]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        result = f"{node.name or out}.nbits" if has_bias else out
        graph.node.remove(node)
        graph.node.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{tag}.B", f"{tag}.scales", f"{tag}.zero_points"],
                [result],
                name=f"{node.name or out}.MatMulNBits",
                domain="com.microsoft",
                K=in_features,
                N=out_features,
                bits=bits,
                block_size=block,
            )
        )
        if has_bias:
            graph.node.append(helper.make_node("Add", [result, node.input[2]], [out], name=f"{node.name or out}.Bias"))
    if added and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.output[0] not in used]:
        graph.node.remove(node)  # the transposes of the float weights the codes replaced
    used = {name for n in graph.node for name in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:  # the float weights themselves
        graph.initializer.remove(init)
    toposort(graph)
    missing = [name for name, _, _ in layers if name not in found]
    if not missing:
        return {}
    warnings.warn(
        f"export_onnx: weight-only layer(s) {', '.join(missing)} are not in the ONNX graph (their forward never runs "
        "on example_input, or reads the weight directly); left out of the MatMulNBits rewrite",
        stacklevel=3,
    )
    return {"slimkit.unused_layers": json.dumps(missing)}


def set_accuracy_level(source: str | os.PathLike, target: str | os.PathLike, accuracy_level: int) -> Path:
    """Copy the ONNX file ``source`` to ``target`` with every ``MatMulNBits``' ``accuracy_level`` set (written
    atomically; returns ``target``).

    ONNX Runtime reads it as the lowest precision the kernel may compute in: 0 (default, what ``export_onnx``
    writes) and 1 fp32, 2 fp16, 3 bf16, 4 int8 (the activations quantized per block inside the kernel: faster on
    CPUs with int8 dot products, slightly less exact).

    Example:
        >>> set_accuracy_level("llama-int4.onnx", "llama-int4-acc4.onnx", 4)      # doctest: +SKIP
    """
    import onnx
    from onnx import helper

    from slimkit._io import atomic_path

    if accuracy_level not in (0, 1, 2, 3, 4):
        raise UsageError(f"set_accuracy_level: accuracy_level={accuracy_level!r} must be 0, 1, 2, 3 or 4")
    proto = onnx.load(str(source))
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        raise UsageError(f"set_accuracy_level: {source} has no MatMulNBits node (export a weight-only model)")
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("accuracy_level", accuracy_level)])
    with atomic_path(target) as tmp:
        onnx.save(proto, str(tmp))
    return Path(target)
