"""Example inputs and model outputs in the forms users have them, normalised once for every verb.

An example input is a tensor, a tuple of positional arguments or a dict of keyword arguments (``{"input_ids": ...,
"attention_mask": ...}``); an output is a tensor, a tuple / list, a dict or a transformers ``ModelOutput`` (a dict
whose ``None`` fields are left out), possibly nested; a dataclass output is read as the dict of its fields.
``as_args`` / ``call`` take the first, ``first_tensor`` / ``named_outputs`` read the second. Nothing here imports
transformers.

Data sets yield the same forms, with or without labels: an example ``(inputs, label)`` is told from a tuple of
inputs by its second item (a label is a number or a 0-d tensor; in a batch a 1-D tensor with one entry per row).
``split_example`` / ``split_batch`` / ``first_batch`` / ``head`` read them for every verb; ``fit`` trains on
``(inputs, targets)`` pairs, so ``with_targets`` gives unlabelled data placeholder targets (``-1``) that the
distillation loss never reads.

Example:
    >>> model = nn.Linear(4, 2)
    >>> as_args(torch.zeros(1, 4))[1]
    {}
    >>> first_tensor({"logits": call(model, torch.zeros(3, 4))}).shape
    torch.Size([3, 2])
    >>> split_example((torch.zeros(3), 1))[1]
    1
    >>> split_example((torch.zeros(3), torch.ones(3)))[1] is None        # two positional inputs
    True
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from slimkit.errors import InputTypeError, UsageError

__all__ = [
    "Data",
    "as_args",
    "attention_mask",
    "call",
    "describe",
    "first_batch",
    "first_example",
    "first_tensor",
    "head",
    "input_names",
    "named_outputs",
    "probe",
    "rows",
    "same",
    "split_batch",
    "split_example",
    "tensors_of",
    "with_targets",
]


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


# -- data sets: inputs with or without labels ------------------------------------------------------------------
Data = Dataset | DataLoader
MASK_KEY = "attention_mask"


def _is_label(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) or (isinstance(value, torch.Tensor) and value.ndim == 0)


def split_example(item: Any) -> tuple[Any, Any | None]:
    """``(inputs, label)`` of one dataset example; ``label`` is None when the example is inputs only."""
    if isinstance(item, tuple | list) and len(item) == 2 and _is_label(item[1]):
        return item[0], item[1]
    return item, None


def rows(inputs: Any) -> int:
    """The batch size of a batch of inputs (the first dimension of its first tensor)."""
    found = tensors_of(inputs)
    if not found or found[0][1].ndim == 0:
        raise UsageError(f"distill: a batch of inputs must hold tensors with a batch dimension, got {type(inputs)}")
    return int(found[0][1].shape[0])


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels)`` of one batch; ``labels`` is None when the batch is inputs only."""
    if isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        labels = batch[1]
        if labels.ndim == 1 and tensors_of(batch[0]) and rows(batch[0]) == len(labels):
            return batch[0], labels
    return batch, None


class _Placeholders(Dataset):
    """A dataset of inputs-only examples as ``(inputs, -1)`` pairs."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        return self.data[index], torch.tensor(-1)


class _PlaceholderBatches(IterableDataset):
    """A DataLoader of inputs-only batches as ``(inputs, full(-1))`` batches (re-iterable, with its length)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        for batch in self.loader:
            yield batch, torch.full((rows(batch),), -1, dtype=torch.long)


def first_batch(data: Data, n: int = 8) -> Any:
    """A batch of up to ``n`` examples (or the DataLoader's first batch), as the data gives it."""
    if isinstance(data, DataLoader):
        return next(iter(data))
    size = len(data)  # type: ignore[arg-type]  # a map-style Dataset has __len__
    if size == 0:
        raise UsageError("distill: the training data is empty")
    return default_collate([data[i] for i in range(min(n, size))])


def first_example(data: Data) -> Any:
    """The inputs of ``data``'s first example (labels dropped) as a batch of 1 (a tensor, tuple or dict)."""
    return head(split_batch(first_batch(data, 1))[0], 1)


def probe(data: Data, n: int = 8) -> tuple[Any, bool]:
    """``(inputs of a few examples, whether the data has labels)``."""
    if isinstance(data, DataLoader):
        inputs, labels = split_batch(first_batch(data))
        return head(inputs, n), labels is not None
    size = len(data)  # type: ignore[arg-type]
    if size == 0:
        raise UsageError("distill: the training data is empty")
    examples = [split_example(data[i]) for i in range(min(n, size))]
    return default_collate([inputs for inputs, _ in examples]), examples[0][1] is not None


def with_targets(data: Data, labelled: bool) -> Data:
    """``data`` as ``fit`` reads it: ``(inputs, targets)`` pairs (placeholder targets when it has no labels)."""
    if labelled:
        return data
    if isinstance(data, DataLoader):
        return DataLoader(_PlaceholderBatches(data), batch_size=None)
    return _Placeholders(data)


def head(inputs: Any, n: int) -> Any:
    """The first ``n`` rows of a batch of inputs (tensor, tuple or dict)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:n]
    if isinstance(inputs, Mapping):
        return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(v[:n] if isinstance(v, torch.Tensor) else v for v in inputs)
    return inputs


def same(a: Any, b: Any) -> bool:
    """Whether two inputs (tensor, tuple or dict) hold equal tensors."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def attention_mask(inputs: Any) -> torch.Tensor | None:
    """The ``attention_mask`` of a dict of inputs, if it has one."""
    if isinstance(inputs, Mapping):
        mask = inputs.get(MASK_KEY)
        return mask if isinstance(mask, torch.Tensor) else None
    return None


def describe(inputs: Any) -> str:
    """Shapes of the tensors of a batch of inputs, for error messages."""
    if isinstance(inputs, torch.Tensor):
        return f"of shape {tuple(inputs.shape)}"
    found = tensors_of(inputs)
    return (
        "of shapes " + ", ".join(f"{slot}: {tuple(t.shape)}" for slot, t in found) if found else type(inputs).__name__
    )
