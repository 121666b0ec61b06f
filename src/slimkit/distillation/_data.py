"""Distillation data in the forms users have it: inputs only, or ``(inputs, labels)``.

Inputs are a tensor, a tuple of positional arguments or a dict of keyword arguments (``slimkit._inputs``). An example
``(inputs, label)`` is told from a tuple of inputs by its second item: a label is a number or a 0-d tensor (in a
batch: a 1-D tensor with one entry per row). ``fit`` trains on ``(inputs, targets)`` pairs, so unlabelled data is
given placeholder targets (``-1``) that the distillation loss never reads.

Example:
    >>> split_example((torch.zeros(3), 1))[1]
    1
    >>> split_example((torch.zeros(3), torch.ones(3)))[1] is None        # two positional inputs
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from slimkit._inputs import tensors_of
from slimkit.errors import UsageError

__all__ = [
    "Data",
    "attention_mask",
    "describe",
    "first_batch",
    "head",
    "probe",
    "rows",
    "same",
    "split_batch",
    "split_example",
    "with_targets",
]

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
