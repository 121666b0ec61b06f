"""ONNX export: fp32, or integer ONNX built from slimkit's own calibrated scales (no re-calibration).

Two integer back ends rewrite the fp32 export of the model's float twin: QDQ int8 for static activation
quantization (``onnx_static.py``) and ``DynamicQuantizeLinear -> MatMulInteger`` for dynamic quantization
(``onnx_dynamic.py``). Back ends do not import algorithms: quantized layers are read through the handlers their
algorithm registers (``registry.py``, ``lowering.py``).

Example:
    >>> export_onnx(result.model, torch.zeros(1, 1, 28, 28), "model.onnx")      # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit._inputs import as_args, call
from slimkit._io import atomic_path
from slimkit._modules import set_module
from slimkit.errors import UsageError
from slimkit.export.lowering import float_twin, is_dynamic_model, is_int8_model
from slimkit.export.onnx_dynamic import dynamic_graph
from slimkit.export.onnx_graph import OPSET, DynamicShapes, export_float, integer_tables, quantize_tables
from slimkit.export.onnx_static import quantize_graph
from slimkit.export.registry import FLOAT_TWIN, INTEGER_LAYER, INTEGER_TABLE, find, handled

__all__ = ["OPSET", "export_onnx", "is_dynamic_model", "is_int8_model"]


def export_onnx(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike,
    *,
    int8: bool | None = None,
    dynamic_shapes: DynamicShapes | None = None,
    int8_ops: tuple[str, ...] = ("Conv", "Gemm", "MatMul"),
) -> Path:
    """Write ``model`` as ONNX, atomically.

    Args:
        example_input: a tensor (ONNX input ``input``), a tuple of positional inputs (named after the forward's
            arguments) or a dict of keyword inputs (``{"input_ids": ids, "attention_mask": mask}``: its keys).
            Outputs are named ``output`` (``output_1``, ... for the rest of a tuple) or after a dict's /
            ``ModelOutput``'s keys.
        int8: integer ONNX from the model's own weight codes and scales (default: for slimkit fake-quant models):
            QDQ for static activation quantization, ``DynamicQuantizeLinear -> MatMulInteger`` for
            ``method="dynamic"``, ``Gather`` on int8 codes for quantized embeddings; False writes the simulated model
            in fp32. A quantized layer the forward never calls on ``example_input`` (an unused pooler) is not in
            the graph: it is named in a warning and in the metadata (``slimkit.unused_layers``).
        dynamic_shapes: ``{input name: {dim: symbol}}`` for the inputs whose dynamic dims differ from the default
            (dim 0 ``batch``; dim 1 ``sequence`` for integer inputs); ``{}`` makes an input static.
        int8_ops: which ONNX ops of quantized layers get QDQ int8 (``("Gemm", "MatMul")``: fully connected layers only,
            convolutions stay float - for nets whose thin convolutions run slower on int8 kernels).

    The exporter is TorchScript (opset 17), or torch's dynamo exporter for models TorchScript cannot export; the
    metadata says which (``slimkit.exporter``).

    Example:
        >>> export_onnx(bert, {"input_ids": ids, "attention_mask": mask}, "bert.onnx")    # doctest: +SKIP
    """
    as_args(example_input)  # a wrong type is one clear error before anything runs
    quantized, dynamic = is_int8_model(model), is_dynamic_model(model)
    tables = bool(integer_tables(model))
    from slimkit.export.onnx_int4 import blockwise_graph, blockwise_layers  # weight-only layers: MatMulNBits

    blockwise = int8 is None and not (quantized or dynamic) and bool(blockwise_layers(model))
    int8 = (quantized or dynamic or tables) if int8 is None else int8
    if int8 and not (quantized or dynamic or tables):
        raise UsageError(
            "export_onnx: int8=True needs a slimkit fake-quant model (slimkit.quantize(..., "
            "QuantConfig(act_bits=8, method='ptq', 'qat' or 'dynamic')))"
        )
    proto = export_float(float_twin(model), example_input, dynamic_shapes)
    notes: dict[str, str] = {}
    if int8:
        unused = _unused_layers(model, example_input)
        if unused:
            warnings.warn(
                f"export_onnx: quantized layer(s) {', '.join(unused)} never run on example_input, so they are not in "
                "the ONNX graph; left out of the int8 rewrite",
                stacklevel=2,
            )
            notes["slimkit.unused_layers"] = json.dumps(unused)
        live = _without(model, unused)
        if quantized:
            proto = quantize_graph(proto, live, tuple(int8_ops))
        elif dynamic:
            proto = dynamic_graph(proto, live)
        if tables:
            notes["slimkit.int8_tables"] = json.dumps(quantize_tables(proto, live))
    if blockwise:
        notes.update(blockwise_graph(proto, model))
    import onnx

    if notes:
        props = {p.key: p.value for p in proto.metadata_props}
        onnx.helper.set_model_props(proto, {**props, **notes})
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)


def _unused_layers(model: nn.Module, example_input: Any) -> list[str]:
    """The quantized layers (and tables) of ``model`` whose forward never runs on ``example_input``."""
    names = [name for kind in (INTEGER_LAYER, INTEGER_TABLE) for name, _, _ in handled(kind, model)]
    called: set[str] = set()
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: called.add(name))
        for name in names
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            call(model.eval(), example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [name for name in names if name not in called]


def _without(model: nn.Module, names: list[str]) -> nn.Module:
    """``model``, or a copy with the named quantized layers replaced by their float twins (the integer back ends
    then leave them alone)."""
    if not names:
        return model
    copied = copy.deepcopy(model)
    for name in names:
        module = copied.get_submodule(name)
        handler = find(FLOAT_TWIN, module)
        plain = handler(module) if handler is not None else None
        set_module(copied, name, plain if plain is not None else nn.Identity())
    return copied
