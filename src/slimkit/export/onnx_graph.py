"""ONNX graph pieces both integer back ends share: the fp32 export they rewrite, and re-sorting the nodes."""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from torch import nn

from slimkit.errors import UsageError

__all__ = ["OPSET", "export_float", "toposort"]

OPSET = 17


def export_float(model: nn.Module, example_input: torch.Tensor) -> Any:
    """``model`` as an fp32 ONNX ``ModelProto`` (batch dimension dynamic; input ``input``, output ``output``)."""
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch types the target as a path only; a file object works (and is documented)
        torch.onnx.export(
            model,
            (example_input,),
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return onnx.load_from_string(buffer.getvalue())


def toposort(graph: Any) -> None:
    """Order ``graph``'s nodes so each runs after the producers of its inputs (ONNX requires it)."""
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
