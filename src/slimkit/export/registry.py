"""Handlers that algorithm packages register, so export back ends and measurements can read their layers without
importing them (like torchao's config -> transform registry).

An algorithm registers, per module type it creates, a handler of a *kind*:

- ``FLOAT_TWIN``: ``module -> nn.Module | None``: the plain torch module that computes what ``module`` simulates
  (``None``: keep the module and look at its children).
- ``INTEGER_LAYER``: ``module -> IntegerLayer``: the integer view of a quantized layer (codes, scales, activation
  quantizers) that integer back ends (QDQ, ``MatMulInteger``) write.
- ``INTEGER_TABLE``: ``module -> IntegerLayer``: the integer view of a quantized lookup table (an embedding: int8
  codes and a scale per row) that export writes as ``Gather`` on the integer table.
- ``FUSED_RNN``: ``module -> FusedRNN | None``: a recurrent module that exports as one fused integer op.
- ``PACK``: ``model -> (tensors, meta)``: how a model holding such modules is stored (packed integer codes);
  ``meta`` is JSON for the artifact.

``slimkit.quantization`` fills this registry when it is imported (a model holding its layers has imported it).
This module imports nothing of slimkit's algorithms; ``export`` and ``measure`` look handlers up here.

Example:
    >>> class Mine(nn.Linear): ...
    >>> @register(FLOAT_TWIN, Mine)
    ... def mine_as_linear(module):
    ...     return nn.Linear(module.in_features, module.out_features)
    >>> find(FLOAT_TWIN, Mine(2, 3)) is mine_as_linear
    True
    >>> unregister(FLOAT_TWIN, Mine)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from slimkit.errors import UsageError

__all__ = [
    "FLOAT_TWIN",
    "FUSED_RNN",
    "INTEGER_LAYER",
    "INTEGER_TABLE",
    "PACK",
    "ActivationQuant",
    "FusedRNN",
    "IntegerLayer",
    "find",
    "handled",
    "packed_state",
    "register",
    "unregister",
]

FLOAT_TWIN = "float_twin"
INTEGER_LAYER = "integer_layer"
INTEGER_TABLE = "integer_table"
FUSED_RNN = "fused_rnn"
PACK = "pack"
KINDS = (FLOAT_TWIN, INTEGER_LAYER, INTEGER_TABLE, FUSED_RNN, PACK)

Handler = TypeVar("Handler", bound=Callable[..., Any])

_HANDLERS: dict[str, dict[type, Callable[..., Any]]] = {kind: {} for kind in KINDS}


@dataclass(frozen=True)
class ActivationQuant:
    """A per-tensor activation quantizer: ``dynamic`` ones compute scale and zero point per call (both None)."""

    bits: int
    dynamic: bool
    scale: float | None = None
    zero_point: int | None = None


@dataclass(frozen=True)
class IntegerLayer:
    """The integer view of a quantized ``Linear`` / ``Conv2d`` (what an integer runtime stores and computes).

    ``codes``: integer weight codes (float dtype) in the weight's shape, None for per-group scales (which the
    integer back ends cannot express); ``scale`` / ``zero_point``: flat, one per output channel or one in all;
    ``dequantized``: the weight the simulated model uses, ``(codes - zero_point) * scale``.
    """

    bits: int
    scheme: str
    granularity: str
    symmetric: bool
    codes: torch.Tensor | None
    scale: torch.Tensor
    zero_point: torch.Tensor
    dequantized: torch.Tensor
    input: ActivationQuant | None = None
    output: ActivationQuant | None = None


@dataclass(frozen=True)
class FusedRNN:
    """A recurrent module that exports as one fused integer op (ONNX Runtime's ``DynamicQuantizeLSTM``).

    ``input_gates[k]``: the names (relative to the module) of layer ``k``'s input-to-hidden gate layers, all
    directions; export recognises the fused op's ONNX node by their weights.
    """

    mode: str
    input_gates: tuple[tuple[str, ...], ...]


def register(kind: str, *module_types: type) -> Callable[[Handler], Handler]:
    """Decorator: ``handler`` handles modules of ``module_types`` (and their subclasses) for ``kind``."""
    if kind not in _HANDLERS:
        raise UsageError(f"register: unknown handler kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not module_types or not all(isinstance(t, type) for t in module_types):
        raise UsageError("register: pass one or more module types after the kind")

    def decorate(handler: Handler) -> Handler:
        for module_type in module_types:
            _HANDLERS[kind][module_type] = handler
        return handler

    return decorate


def unregister(kind: str, module_type: type) -> None:
    """Remove the ``kind`` handler of ``module_type`` (nothing if there is none)."""
    _HANDLERS.get(kind, {}).pop(module_type, None)


def find(kind: str, module: nn.Module) -> Callable[..., Any] | None:
    """The ``kind`` handler of ``module``'s type (the nearest registered base class), or None."""
    table = _HANDLERS[kind]
    for cls in type(module).__mro__:
        handler = table.get(cls)
        if handler is not None:
            return handler
    return None


def handled(kind: str, model: nn.Module) -> list[tuple[str, nn.Module, Callable[..., Any]]]:
    """``(name, module, handler)`` for every module of ``model`` that has a ``kind`` handler, in module order."""
    found = []
    for name, module in model.named_modules():
        handler = find(kind, module)
        if handler is not None:
            found.append((name, module, handler))
    return found


def packed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors slimkit writes for ``model`` and their packing metadata: the ``PACK`` handler's when the model
    holds layers that have one (quantized layers as packed integer codes), else the plain state_dict and None."""
    packers = {handler for _, _, handler in handled(PACK, model)}
    if len(packers) > 1:
        raise UsageError(
            f"cannot store the model: its layers need {len(packers)} different packings "
            f"({', '.join(sorted(getattr(p, '__qualname__', repr(p)) for p in packers))})"
        )
    if packers:
        tensors, meta = packers.pop()(model)
        return tensors, meta
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, None
