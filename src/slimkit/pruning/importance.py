"""Importance criteria: small callables ``(group) -> 1-D scores``, one score per prunable unit (a channel, a
GroupNorm group, an attention head). Low scores are pruned first.

Every criterion sees the whole group: the rows of the producers, the columns of the consumers (through
concat offsets and flatten blocks) and the norm parameters, as a list of ``(units, k)`` matrices from
``group_slices``. Register your own with ``@register_importance("name")`` (a recipe then refers to it by name)
or pass any callable as ``PruneConfig.importance``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from slimkit.errors import UsageError
from slimkit.pruning.attention import as_attention
from slimkit.pruning.graph import CONVS, TRANSPOSED, Group, Member

__all__ = ["CRITERIA", "Criterion", "group_slices", "register", "register_importance", "resolve"]

Criterion = Callable[[Group], torch.Tensor]
CRITERIA: dict[str, Criterion] = {}


def register_importance(name: str) -> Callable[[Criterion], Criterion]:
    """Register a criterion under ``name``: ``PruneConfig(importance=name)`` (or the function itself) uses it, and
    a recipe saves and loads it by that name.

    Example:
        >>> @register_importance("bias_l1")
        ... def bias_l1(group):
        ...     return group_slices(group, ("out",))[-1].abs().sum(1)
    """

    def wrap(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn

    return wrap


register = register_importance


def _scaled(weight: torch.Tensor, module: nn.Module, energy: torch.Tensor) -> torch.Tensor:
    """``weight`` with each input feature's column scaled by its RMS input (``energy``: mean squares)."""
    rms = energy.sqrt().to(weight)
    if isinstance(module, TRANSPOSED):
        return weight * rms.view(-1, *[1] * (weight.ndim - 1))
    return weight * rms.view(1, -1, *[1] * (weight.ndim - 2))


def _member_slices(
    module: nn.Module, member: Member, size: int, attr: str, energy: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Matrices with one row per channel of the group, for this member (``attr``: ``data`` or ``grad``; with
    ``energy``, an ``in`` member's weight columns are scaled by the RMS of their inputs)."""

    def get(param):
        if param is None:
            return None
        value = param.grad if attr == "grad" else param.detach()
        return torch.zeros_like(param) if value is None else value.detach()

    weight, bias = get(getattr(module, "weight", None)), get(getattr(module, "bias", None))
    lo, hi = member.offset, member.offset + size * member.block
    if member.role == "heads":
        attention = as_attention(module)
        e = attention.in_proj_weight.shape[0] // 3
        w_in = get(attention.in_proj_weight).view(3, e, -1).permute(1, 0, 2).reshape(e, -1)
        out = [w_in, get(attention.out_proj.weight).t()]
        if attention.in_proj_bias is not None:
            out.append(get(attention.in_proj_bias).view(3, e).t())
        return out
    if member.role == "out":
        rows = weight.transpose(0, 1) if isinstance(module, TRANSPOSED) else weight
        copies = member.copies  # fused q/k/v: row c of every part belongs to channel c
        out = [rows.reshape(copies, size, -1).transpose(0, 1).reshape(size, -1)]
        if bias is not None:
            out.append(bias.view(copies, size).t())
        return out
    if member.role == "in":
        if energy is not None:
            weight = _scaled(weight, module, energy)
        if isinstance(module, TRANSPOSED):
            return [weight[lo:hi].reshape(size, -1)]
        cols = weight[:, lo:hi]
        if isinstance(module, nn.Linear):
            return [cols.reshape(-1, size, member.block).transpose(0, 1).reshape(size, -1)]
        return [cols.transpose(0, 1).reshape(size, -1)]
    # through: norms, PReLU, depthwise conv
    out = [] if weight is None else [weight[lo:hi].reshape(size, -1)]
    if bias is not None and not isinstance(module, nn.PReLU):
        out.append(bias[lo:hi].view(size, 1))
    return out


def group_slices(
    group: Group,
    roles: tuple[str, ...] = ("out", "in", "through", "heads"),
    attr: str = "data",
    types: tuple[type, ...] | None = None,
) -> list[torch.Tensor]:
    """The group's parameters as ``(units, k)`` matrices, one per member (filtered by role / module type).
    ``attr="energy"``: the ``in`` members' weights with columns scaled by their inputs' RMS (members without
    input statistics in ``group.energy`` are left out)."""
    result = []
    for member in group.members:
        module = group.modules[member.module]
        if member.role not in roles or (types is not None and not isinstance(module, types)):
            continue
        energy = None
        if attr == "energy":
            energy = group.energy.get(member.module)
            if member.role != "in" or not _energy_fits(module, energy):
                continue
        for t in _member_slices(module, member, group.size, "data" if energy is not None else attr, energy):
            result.append(t.float().reshape(group.units, -1))
    return result


def _energy_fits(module: nn.Module, energy: torch.Tensor | None) -> bool:
    """``energy`` has one entry per input feature of ``module``'s weight (Linear, convolutions)."""
    if energy is None or not isinstance(module, (nn.Linear, *CONVS, *TRANSPOSED)):
        return False
    features = module.weight.shape[0 if isinstance(module, TRANSPOSED) else 1]
    return energy.numel() == features


def _cat(slices: list[torch.Tensor], group: Group) -> torch.Tensor:
    return torch.cat(slices, 1) if slices else torch.zeros(group.units, 1)


def _add(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(tensors)`` of a non-empty iterable, typed (and on the tensors' own device)."""
    parts = iter(tensors)
    total = next(parts)
    for part in parts:
        total = total + part
    return total


@register("l1")
def l1(group: Group) -> torch.Tensor:
    """Sum of absolute values of every weight the unit owns, across the whole group."""
    return _cat(group_slices(group), group).abs().sum(1)


@register("l2")
def l2(group: Group) -> torch.Tensor:
    """Euclidean norm of every weight the unit owns, across the whole group."""
    return _cat(group_slices(group), group).pow(2).sum(1).sqrt()


@register("fpgm")
def fpgm(group: Group) -> torch.Tensor:
    """Filter pruning via geometric median (He et al. 2019): a unit whose filters are close to all others
    (small summed distance, i.e. near the geometric median) is replaceable, so it scores low."""
    filters = _cat(
        group_slices(group, ("out", "heads", "through"), types=(*CONVS, nn.Linear, nn.MultiheadAttention)), group
    )
    return torch.cdist(filters, filters).sum(1)


@register("bn_scale")
def bn_scale(group: Group) -> torch.Tensor:
    """Network slimming (Liu et al. 2017): |gamma| of the group's norm layers; l2 when the group has none."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)
    gammas = []
    for m in group.members:
        module = group.modules[m.module]
        if m.role == "through" and isinstance(module, norms) and module.weight is not None:
            gammas.append(module.weight.detach()[m.offset : m.offset + group.size])
    if not gammas:
        return l2(group)
    return torch.stack([g.float().abs().view(group.units, -1).sum(1) for g in gammas]).sum(0)


@register("taylor")
def taylor(group: Group) -> torch.Tensor:
    """First-order Taylor (Molchanov et al. 2019): (sum over the unit's weights of w * dL/dw)^2, the
    estimated change of the loss when the unit is removed. Needs gradients (``prune`` computes them from a few
    training batches)."""
    weights, grads = group_slices(group), group_slices(group, attr="grad")
    if not weights:
        return torch.zeros(group.units)
    return _add((w * g).sum(1) for w, g in zip(weights, grads)).pow(2)


@register("activation")
def activation(group: Group) -> torch.Tensor:
    """Output energy each unit feeds the layers that read it (FLAP / Wanda-style, structured):
    ``sum over its input columns c of E[x_c^2] * ||W[:, c]||^2``, with ``E[x^2]`` measured on calibration batches
    of ``train_data`` (``PruneConfig.calibration_batches``). A group no Linear / convolution reads falls back to
    ``l2``."""
    slices = group_slices(group, ("in",), attr="energy")
    if not slices:
        return l2(group)
    return _add(t.pow(2).sum(1) for t in slices)


class RandomImportance:
    """Random scores (a baseline), reproducible from ``seed``."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: Group) -> torch.Tensor:
        return torch.rand(group.units, generator=self.generator)


CRITERIA["random"] = RandomImportance()
NEEDS_GRADIENTS = {"taylor"}
NEEDS_ACTIVATIONS = {"activation"}


def resolve(importance: str | Criterion, seed: int = 0) -> Criterion:
    """A criterion by name (``l1``, ``l2``, ``fpgm``, ``bn_scale``, ``taylor``, ``activation``, ``random``, or a
    registered one) or a callable."""
    if callable(importance):
        return importance
    name = getattr(importance, "value", importance)
    if name == "random":
        return RandomImportance(seed)
    if name not in CRITERIA:
        raise UsageError(
            f"importance={name!r} is not known; choose one of {', '.join(sorted(CRITERIA))} "
            "or pass a callable (group) -> scores"
        )
    return CRITERIA[name]


def l1_penalty(model: nn.Module, strength: float = 1e-4) -> torch.Tensor:
    """``strength * sum |gamma|`` over the BatchNorm layers: add it to the training loss before ``bn_scale``
    pruning (network slimming) so that unimportant channels are pushed to zero."""
    norms = [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.weight is not None
    ]
    return strength * _add(w.abs().sum() for w in norms) if norms else torch.zeros(())
