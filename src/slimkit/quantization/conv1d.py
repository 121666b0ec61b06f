"""transformers' ``Conv1D`` (GPT-2's attention and MLP projections) as the ``nn.Linear`` it is.

``Conv1D(nf, nx)`` computes ``x @ W + b`` with ``W`` stored ``(nx, nf)``: a Linear with a transposed weight. Before
planning, ``quantize`` swaps each for ``nn.Linear(nx, nf)`` holding ``W.T`` (equal in float up to rounding), so every
method quantizes it like any Linear layer (per output channel) and export writes its MatMul / Gemm in int8. The record
names the swapped layers (``"linearized"``) so ``replay_`` swaps them on a fresh model too. Nothing here imports
transformers: the class is recognised by its name, module and shape.

Example:
    >>> layer = as_linear(gpt2.transformer.h[0].mlp.c_fc)           # doctest: +SKIP
    >>> torch.allclose(layer(x), gpt2.transformer.h[0].mlp.c_fc(x))  # doctest: +SKIP
    True
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit._modules import set_module
from slimkit.errors import UsageError

__all__ = ["as_linear", "is_conv1d", "linearize"]


def is_conv1d(module: nn.Module) -> bool:
    """True for a transformers ``Conv1D`` (``transformers.pytorch_utils.Conv1D``: ``nf`` outputs, weight
    ``(nx, nf)``)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and type(module).__module__.startswith("transformers.")
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and weight.shape[1] == getattr(module, "nf", None)
    )


def as_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear(nx, nf)`` computing what the ``Conv1D`` does (weight transposed, bias copied), in its mode."""
    weight = module.weight
    bias = getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise UsageError(f"as_linear: {type(module).__name__} has no 2-D weight to turn into a Linear")
    linear = nn.Linear(
        weight.shape[0], weight.shape[1], bias=isinstance(bias, torch.Tensor), device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        if linear.bias is not None and isinstance(bias, torch.Tensor):
            linear.bias.copy_(bias)
    return linear.train(module.training)


def linearize(model: nn.Module, only: list[str] | None = None) -> list[str]:
    """Swap every ``Conv1D`` of ``model`` (or the named ones) for its ``nn.Linear`` in place; returns their names in
    module order. A name in ``only`` that is not a ``Conv1D`` is an error (a record that does not fit the model)."""
    found = [name for name, module in model.named_modules() if is_conv1d(module)]
    if only is not None:
        wrong = sorted(set(only) - set(found))
        if wrong:
            raise UsageError(
                f"replay: the quantization record's Conv1D layer(s) {wrong} are not transformers Conv1D layers of "
                "this model"
            )
        found = [name for name in found if name in set(only)]
    for name in found:
        set_module(model, name, as_linear(model.get_submodule(name)))
    return found
