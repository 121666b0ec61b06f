"""Unstructured sparsity: magnitude pruning (per layer or global) and N:M (2:4), made permanent, plus sparse storage.

``sparsify`` writes zeros into the weights of a copy of the model (no masks, no hooks: the result is a plain
module). Dense kernels multiply those zeros like any other number, so the model is **not faster**; what shrinks is
the file once the weights go through ``pack_sparse`` (a bitmask of the non-zeros + the non-zero values).
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit._modules import matches
from slimkit.config import Config, check_range
from slimkit.errors import InputTypeError, UsageError
from slimkit.history import record_step

__all__ = ["SparseResult", "SparsityConfig", "SparsityMode", "pack_sparse", "sparsify", "unpack_sparse"]

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
MASK, VALUES, SHAPE = ".__sparse_mask", ".__sparse_values", ".__sparse_shape"


class SparsityMode(str, enum.Enum):
    LOCAL = "local"
    GLOBAL = "global"
    NM = "n:m"


@dataclass
class SparsityConfig(Config):
    """Unstructured sparsity settings.

    Args:
        amount: fraction of the selected weights set to zero (``local``: in every layer; ``global``: over all of
            them, ranked by ``|w|`` together). Ignored for ``n:m``.
        mode: ``local``, ``global`` or ``n:m`` (keep the ``n`` largest of every ``m`` consecutive input weights).
        n, m: the N:M pattern (2:4 is what sparse tensor cores accelerate).
        ignore: module names or ``re:`` patterns left dense.
    """

    amount: float = 0.5
    mode: SparsityMode = SparsityMode.LOCAL
    n: int = 2
    m: int = 4
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()  # converts mode to SparsityMode (Config coerces every Enum-typed field)
        check_range("amount", self.amount, 0.0, 0.999)
        if not 0 < self.n < self.m:
            raise UsageError(f"n={self.n}, m={self.m}: need 0 < n < m (e.g. n=2, m=4)")
        if isinstance(self.ignore, str):
            self.ignore = (self.ignore,)


@dataclass
class SparseResult:
    model: nn.Module
    record: dict[str, Any] = field(default_factory=dict)


def _nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    # groups of m consecutive *input* weights of one output (channels last for convolutions)
    w = weight.movedim(1, -1) if weight.dim() > 2 else weight
    groups = w.abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(n, dim=1).indices, True)
    keep = keep.reshape(w.shape)
    return keep.movedim(-1, 1) if weight.dim() > 2 else keep


def sparsify(model: nn.Module, config: SparsityConfig) -> SparseResult:
    """Zero the smallest-magnitude weights of every Conv/Linear layer of a copy of ``model``.

    Example:
        >>> res = slimkit.pruning.sparsify(model, SparsityConfig(mode="n:m", n=2, m=4))       # doctest: +SKIP
        >>> packed = slimkit.pruning.pack_sparse(res.model.state_dict())                    # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"sparsify: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, SparsityConfig):
        raise InputTypeError(f"sparsify: config must be a SparsityConfig, got {type(config).__name__}")
    new = copy.deepcopy(model)
    layers = {name: m for name, m in new.named_modules() if isinstance(m, LAYERS) and not matches(name, config.ignore)}
    skipped = {}
    if config.mode is SparsityMode.NM:
        for name, layer in list(layers.items()):
            inputs = layer.weight.shape[1] if layer.weight.dim() > 1 else 0
            if inputs % config.m:
                skipped[name] = f"{inputs} inputs per output are not a multiple of m={config.m}"
                del layers[name]
    if not layers:
        raise UsageError(
            "sparsify: no Conv/Linear layer left to sparsify (all ignored or incompatible: "
            f"{skipped or config.ignore}); ignore fewer layers"
        )
    with torch.no_grad():
        if config.mode is SparsityMode.GLOBAL:
            pooled = torch.cat([lay.weight.abs().flatten() for lay in layers.values()])
            count = int(config.amount * pooled.numel())
            threshold = pooled.kthvalue(count).values if count else torch.tensor(-1.0)
        stats = {}
        for name, layer in layers.items():
            w = layer.weight
            if config.mode is SparsityMode.NM:
                keep = _nm_mask(w, config.n, config.m)
            elif config.mode is SparsityMode.GLOBAL:
                keep = w.abs() > threshold
            else:
                count = int(config.amount * w.numel())
                keep = torch.ones_like(w, dtype=torch.bool)
                keep.view(-1)[w.abs().flatten().argsort(stable=True)[:count]] = False
            w.masked_fill_(~keep, 0.0)  # not mul_: that leaves -0.0, whose sign bit would be stored
            stats[name] = 1 - int(keep.sum()) / keep.numel()
    total = sum(layers[n].weight.numel() for n in stats)
    record = {
        "config": config.to_dict(),
        "layers": stats,
        "skipped": skipped,
        "sparsity": sum(s * layers[n].weight.numel() for n, s in stats.items()) / total,
        "note": "zeros are stored densely in the module: dense kernels are not faster; use pack_sparse to "
        "shrink the file",
    }
    return SparseResult(record_step(new, model, "sparsify", record), record)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of ``t`` as an integer tensor (so -0.0 and NaN payloads survive the round trip)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def pack_sparse(state: dict[str, torch.Tensor], min_sparsity: float = 0.3) -> dict[str, torch.Tensor]:
    """A flat tensor dict (safetensors-ready) where every floating tensor with at least ``min_sparsity`` zeros is
    stored as a packed bitmask of its non-zeros plus their values; other tensors pass through unchanged.

    Example:
        >>> from safetensors.torch import save_file
        >>> save_file(pack_sparse(model.state_dict()), "model.safetensors")              # doctest: +SKIP
    """
    out = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if not t.is_floating_point() or t.numel() == 0:
            out[name] = t.contiguous()
            continue
        nonzero = (_bits(t) != 0).flatten()
        if 1 - int(nonzero.sum()) / t.numel() < min_sparsity:
            out[name] = t.contiguous()
            continue
        padded = torch.nn.functional.pad(nonzero.to(torch.uint8), (0, -t.numel() % 8)).reshape(-1, 8)
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
        out[name + MASK] = (padded * weights).sum(1).to(torch.uint8)
        out[name + VALUES] = t.flatten()[nonzero].contiguous()
        out[name + SHAPE] = torch.tensor(t.shape, dtype=torch.int64)
    return out


def unpack_sparse(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``pack_sparse``: bit-exact dense tensors, ready for ``load_state_dict``."""
    out = {}
    for name, t in packed.items():
        if name.endswith(MASK):
            base = name[: -len(MASK)]
            try:
                values, shape = packed[base + VALUES], torch.Size(packed[base + SHAPE].tolist())
            except KeyError as err:
                raise UsageError(
                    f"unpack_sparse: {base!r} has a mask but no {err.args[0]!r}: the file is not "
                    "from pack_sparse or is truncated"
                ) from None
            numel = shape.numel()
            bits = (t[:, None] >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1
            nonzero = bits.flatten()[:numel].bool()
            if int(nonzero.sum()) != values.numel():
                raise UsageError(
                    f"unpack_sparse: {base!r} mask has {int(nonzero.sum())} bits set but "
                    f"{values.numel()} values are stored: corrupted file"
                )
            dense = torch.zeros(numel, dtype=values.dtype)
            dense[nonzero] = values
            out[base] = dense.reshape(shape)
        elif not (name.endswith(VALUES) or name.endswith(SHAPE)):
            out[name] = t
    return out
