"""Example inputs and model outputs in the forms users have them, normalised once for every verb.

An example input is a tensor, a tuple of positional arguments or a dict of keyword arguments (``{"input_ids": ...,
"attention_mask": ...}``); an output is a tensor, a tuple / list, a dict or a transformers ``ModelOutput`` (a dict
whose ``None`` fields are left out), possibly nested; a dataclass output is read as the dict of its fields.
``as_args`` / ``call`` take the first, ``first_tensor`` / ``named_outputs`` read the second. Nothing here imports
transformers.

Example:
    >>> model = nn.Linear(4, 2)
    >>> as_args(torch.zeros(1, 4))[1]
    {}
    >>> first_tensor({"logits": call(model, torch.zeros(3, 4))}).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from slimkit.errors import InputTypeError

__all__ = ["as_args", "call", "first_tensor", "input_names", "named_outputs", "tensors_of"]


def as_args(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` to call a model with: a tensor is one positional argument, a tuple / list the positional
    arguments, a dict the keyword arguments.

    Example:
        >>> as_args({"input_ids": torch.zeros(1, 8, dtype=torch.long)})[0]
        ()
    """
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if isinstance(example_input, tuple | list):
        return tuple(example_input), {}
    if isinstance(example_input, Mapping):
        if not all(isinstance(k, str) for k in example_input):
            raise InputTypeError("example_input: a dict of inputs needs str keys (the forward's argument names)")
        return (), dict(example_input)
    raise InputTypeError(
        f"example_input must be a tensor, a tuple of tensors or a dict of tensors, got {type(example_input).__name__}"
    )


def call(model: nn.Module, example_input: Any) -> Any:
    """``model`` called on ``example_input`` (tensor, tuple or dict), as ``as_args`` spreads it."""
    args, kwargs = as_args(example_input)
    return model(*args, **kwargs)


def tensors_of(example_input: Any) -> list[tuple[str | int, torch.Tensor]]:
    """The tensors of an example input with their slot: position for a tensor / tuple, key for a dict."""
    args, kwargs = as_args(example_input)
    slots: list[tuple[str | int, Any]] = [*enumerate(args), *kwargs.items()]
    return [(slot, value) for slot, value in slots if isinstance(value, torch.Tensor)]


def input_names(model: nn.Module, example_input: Any) -> list[str]:
    """A name per input tensor: ``"input"`` for a bare tensor, the forward's argument names for a tuple (from
    ``inspect.signature``; ``input_<i>`` past them or for ``*args``), the keys for a dict."""
    if isinstance(example_input, torch.Tensor):
        return ["input"]
    params: list[str] = []
    try:
        for p in inspect.signature(model.forward).parameters.values():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                params.append(p.name)
    except (TypeError, ValueError):  # a builtin or C-level forward: no signature
        pass
    names = []
    for slot, _ in tensors_of(example_input):
        if isinstance(slot, str):
            names.append(slot)
        else:
            names.append(params[slot] if slot < len(params) else f"input_{slot}")
    return names


def named_outputs(output: Any, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of ``output`` with a name: a tensor is ``"output"``; a tuple's items ``"output"``,
    ``"output_1"``, ...; a dict's / ``ModelOutput``'s items their keys; nested items ``"<parent>.<index or key>"``.

    Example:
        >>> [n for n, _ in named_outputs((torch.zeros(1), (torch.zeros(1), torch.zeros(1))))]
        ['output', 'output_1.0', 'output_1.1']
    """
    found: list[tuple[str, torch.Tensor]] = []

    def walk(value: Any, name: str) -> None:
        value = _as_mapping(value)
        if isinstance(value, torch.Tensor):
            found.append((name, value))
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{name}.{key}")
        elif isinstance(value, tuple | list):
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}")

    output = _as_mapping(output)
    if isinstance(output, Mapping):
        for key, item in output.items():
            walk(item, str(key))
    elif isinstance(output, tuple | list):
        for i, item in enumerate(output):
            walk(item, prefix if i == 0 else f"{prefix}_{i}")
    else:
        walk(output, prefix)
    return found


def _as_mapping(value: Any) -> Any:
    """A dataclass output (an output class that is not a dict) as a dict of its fields; anything else as is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type | Mapping):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return value


def first_tensor(output: Any, key: str | None = None) -> torch.Tensor:
    """The tensor a verb compares or measures: ``output[key]`` when ``key`` is given, else the first tensor of
    ``output`` (a ``ModelOutput``'s first field: ``logits`` or ``last_hidden_state``).

    Example:
        >>> first_tensor((torch.ones(2), torch.zeros(3))).tolist()
        [1.0, 1.0]
    """
    output = _as_mapping(output)
    if key is not None:
        if not isinstance(output, Mapping) or key not in output:
            have = list(output) if isinstance(output, Mapping) else type(output).__name__
            raise InputTypeError(f"the model's output has no {key!r} (it has {have})")
        value = output[key]
        if not isinstance(value, torch.Tensor):
            raise InputTypeError(f"the model's output {key!r} is a {type(value).__name__}, not a tensor")
        return value
    found = named_outputs(output)
    if not found:
        raise InputTypeError(f"the model's output ({type(output).__name__}) holds no tensor")
    return found[0][1]
