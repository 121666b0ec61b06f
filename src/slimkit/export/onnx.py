"""ONNX export: fp32, or integer ONNX built from slimkit's own calibrated scales (no re-calibration).

Two integer back ends rewrite the fp32 export of the model's float twin: QDQ int8 for static activation
quantization (``onnx_static.py``) and ``DynamicQuantizeLinear -> MatMulInteger`` for dynamic quantization
(``onnx_dynamic.py``). Back ends do not import algorithms: quantized layers are read through the handlers their
algorithm registers (``registry.py``, ``lowering.py``).

Example:
    >>> export_onnx(result.model, torch.zeros(1, 1, 28, 28), "model.onnx")      # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from slimkit._io import atomic_path
from slimkit.errors import InputTypeError, UsageError
from slimkit.export.lowering import float_twin, is_dynamic_model, is_int8_model
from slimkit.export.onnx_dynamic import dynamic_graph
from slimkit.export.onnx_graph import OPSET, export_float
from slimkit.export.onnx_static import quantize_graph

__all__ = ["OPSET", "export_onnx", "is_dynamic_model", "is_int8_model"]


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    int8: bool | None = None,
    int8_ops: tuple[str, ...] = ("Conv", "Gemm", "MatMul"),
) -> Path:
    """Write ``model`` as ONNX (batch dimension dynamic), atomically.

    Args:
        int8: integer ONNX from the model's own weight codes and scales (default: for slimkit fake-quant models):
            QDQ for static activation quantization, ``DynamicQuantizeLinear -> MatMulInteger`` for
            ``method="dynamic"``; False writes the simulated model in fp32.
        int8_ops: which ONNX ops of quantized layers get QDQ int8 (``("Gemm", "MatMul")``: fully connected layers only,
            convolutions stay float - for nets whose thin convolutions run slower on int8 kernels).
    """
    if not isinstance(example_input, torch.Tensor):
        raise InputTypeError(f"export_onnx: example_input must be a tensor, got {type(example_input).__name__}")
    quantized, dynamic = is_int8_model(model), is_dynamic_model(model)
    int8 = (quantized or dynamic) if int8 is None else int8
    if int8 and not (quantized or dynamic):
        raise UsageError(
            "export_onnx: int8=True needs a slimkit fake-quant model (slimkit.quantize(..., "
            "QuantConfig(act_bits=8, method='ptq', 'qat' or 'dynamic')))"
        )
    proto = export_float(float_twin(model), example_input)
    if int8:
        proto = quantize_graph(proto, model, tuple(int8_ops)) if quantized else dynamic_graph(proto, model)
    import onnx

    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)
