"""What export back ends read from a model, through the handlers algorithms register (``registry.py``).

``float_twin`` is the plain torch model that computes what a simulated (fake-quant) model computes;
``integer_layers`` lists its quantized layers' integer view; ``fused_rnns`` its recurrent modules that export as one
fused integer op. Back ends never import an algorithm: a layer no handler knows is exported as it is.

Example:
    >>> plain = float_twin(nn.Sequential(nn.Linear(4, 2), nn.ReLU()))
    >>> integer_layers(plain)
    []
"""

from __future__ import annotations

import copy

from torch import nn

from slimkit.export.registry import FLOAT_TWIN, FUSED_RNN, INTEGER_LAYER, FusedRNN, IntegerLayer, find, handled

__all__ = ["float_twin", "fused_rnns", "integer_layers", "is_dynamic_model", "is_int8_model"]


def _lower(module: nn.Module) -> nn.Module:
    handler = find(FLOAT_TWIN, module)
    if handler is not None:
        plain = handler(module)
        if plain is not None:
            return plain.train(module.training)
    for name, child in list(module.named_children()):
        lowered = _lower(child)
        if lowered is not child:
            setattr(module, name, lowered)
    return module


def float_twin(model: nn.Module) -> nn.Module:
    """A plain float copy of ``model`` in eval mode: every module with a registered float twin (a fake-quant layer:
    its dequantized weight and simulated bias) replaced by it; ``model`` is untouched."""
    return _lower(copy.deepcopy(model).eval())


def integer_layers(model: nn.Module) -> list[tuple[str, IntegerLayer]]:
    """``(name, IntegerLayer)`` for every quantized layer of ``model``, in module order."""
    return [(name, handler(module)) for name, module, handler in handled(INTEGER_LAYER, model)]


def fused_rnns(model: nn.Module) -> dict[str, FusedRNN]:
    """``{name: FusedRNN}`` for the recurrent modules of ``model`` that export as one fused integer op."""
    found = {}
    for name, module, handler in handled(FUSED_RNN, model):
        fused = handler(module)
        if fused is not None:
            found[name] = fused
    return found


def is_dynamic_model(model: nn.Module) -> bool:
    """True when ``model`` has quantized layers with dynamic (per-call) activation quantization."""
    return any(layer.input is not None and layer.input.dynamic for _, layer in integer_layers(model))


def is_int8_model(model: nn.Module) -> bool:
    """True when ``model`` has quantized layers with static (calibrated) activation quantization."""
    return any(layer.input is not None and not layer.input.dynamic for _, layer in integer_layers(model))
