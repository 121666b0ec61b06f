"""How many units each group keeps: uniform, global ranking, proportional, sensitivity; caps, round_to, overrides.

Every rule is a one-parameter family ``keep(s)`` that prunes more as ``s`` grows. For ``target="macs"`` or
``"params"`` the parameter is found by bisection on an exact cost model (MACs and parameters of Conv/Linear
scale with ``kept_out/out * kept_in/in``), then the remaining gap is closed one unit at a time in the rule's own
order (see ``_top_up``), so the result lands on the asked reduction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimkit.errors import UsageError
from slimkit.measure import count_macs
from slimkit.pruning.graph import CONVS, TRANSPOSED, PruneGraph, Seg

__all__ = ["CostModel", "GroupLimits", "allocate", "measure", "module_macs"]


def module_macs(model: nn.Module, example_input) -> tuple[dict[str, float], float]:
    """MACs per (qualified) module name and in total, counted as ``slimkit.profile`` counts them
    (``slimkit.measure.count_macs``)."""
    per_module, total = count_macs(model, example_input)
    return {name: float(macs) for name, macs in per_module.items()}, float(total)


def measure(model: nn.Module, example_input) -> dict[str, float]:
    """``{"params", "macs"}`` of ``model`` on ``example_input``."""
    return {"params": sum(p.numel() for p in model.parameters()), "macs": module_macs(model, example_input)[1]}


@dataclass
class _Entry:
    name: str  # the module ("" for a q @ k^T / attn @ v matmul)
    kind: str  # dense | through | heads
    macs: float
    scaled: float  # params scaling with out*in (dense), with in (through), with heads (heads)
    out_only: float  # params scaling with out only (biases)
    fixed: float
    out_group: int | None
    in_parts: list[tuple[int | None, int, int]]  # (group index, channels, block)
    in_total: int


class CostModel:
    """Exact MACs / parameter counts of a candidate allocation, without touching the model."""

    def __init__(self, model: nn.Module, graph: PruneGraph, example_input) -> None:
        self.graph = graph
        index = {id(g): i for i, g in enumerate(graph.groups)}
        self.sizes = [g.size for g in graph.groups]

        def group_index(space: int) -> int | None:
            group = graph.group_of_space.get(graph.root(space))
            return None if group is None else index[id(group)]

        macs, self.total_macs = module_macs(model, example_input)
        self.total_params = sum(p.numel() for p in model.parameters())
        self.entries: list[_Entry] = []
        for name in dict.fromkeys([*graph.out_space, *graph.in_segs, *graph.heads_space]):
            module = model.get_submodule(name)
            segs: tuple[Seg, ...] = graph.in_segs.get(name, ())
            parts = [(group_index(s.space), s.channels, s.block) for s in segs]
            params = {k: p.numel() for k, p in module.named_parameters()}
            if name in graph.heads_space:
                scaled = params.get("in_proj_weight", 0) + params.get("in_proj_bias", 0) + params["out_proj.weight"]
                entry = _Entry(
                    name,
                    "heads",
                    macs.get(name, 0.0),
                    scaled,
                    0,
                    params.get("out_proj.bias", 0),
                    group_index(graph.heads_space[name]),
                    [],
                    1,
                )
            elif name in graph.out_space:
                bias = params.get("bias", 0)
                entry = _Entry(
                    name,
                    "dense",
                    macs.get(name, 0.0),
                    sum(params.values()) - bias,
                    bias,
                    0,
                    group_index(graph.out_space[name]),
                    parts,
                    sum(c * b for _, c, b in parts),
                )
            else:
                entry = _Entry(
                    name,
                    "through",
                    macs.get(name, 0.0) if isinstance(module, CONVS + TRANSPOSED) else 0.0,
                    sum(params.values()),
                    0,
                    0,
                    None,
                    parts,
                    sum(c * b for _, c, b in parts),
                )
            self.entries.append(entry)
        for space, op_macs in graph.head_ops:  # q @ k^T and attn @ v scale with the kept heads
            self.entries.append(_Entry("", "heads", op_macs, 0, 0, 0, group_index(space), [], 1))

    def kept(self, entry: _Entry, keep: list[int]) -> tuple[int, int]:
        """``(input channels, output channels or heads' channels)`` ``entry`` keeps when group ``i`` keeps
        ``keep[i]`` channels (the full width where no group is cut)."""
        out = keep[entry.out_group] if entry.out_group is not None else None
        kept_in = sum(c * b if g is None else keep[g] * b for g, c, b in entry.in_parts)
        return kept_in, -1 if out is None else out

    def cost(self, keep: list[int]) -> tuple[float, float]:
        """``(macs, params)`` when group ``i`` keeps ``keep[i]`` channels."""
        macs: float = self.total_macs
        params: float = self.total_params
        for e in self.entries:
            kept_in, kept_out = self.kept(e, keep)
            f_out = kept_out / self.sizes[e.out_group] if e.out_group is not None else 1.0
            f_in = kept_in / e.in_total if e.in_parts else 1.0
            if e.kind == "dense":
                macs -= e.macs * (1 - f_out * f_in)
                params -= e.scaled * (1 - f_out * f_in) + e.out_only * (1 - f_out)
            elif e.kind == "through":
                macs -= e.macs * (1 - f_in)
                params -= e.scaled * (1 - f_in)
            else:
                macs -= e.macs * (1 - f_out)
                params -= e.scaled * (1 - f_out)
        return macs, params


@dataclass
class GroupLimits:
    """Per group: fewest units it may keep, the step of ``round_to`` in units, and a fixed keep (override)."""

    min_keep: int
    step: int
    fixed: int | None = None


def _snap(keep: int, units: int, limits: GroupLimits) -> int:
    if limits.fixed is not None:
        return limits.fixed
    keep = math.ceil(max(keep, limits.min_keep) / limits.step) * limits.step
    return min(keep, units)


def allocate(
    graph: PruneGraph,
    scores: list[torch.Tensor],
    limits: list[GroupLimits],
    cost: CostModel,
    rule: str,
    target: str,
    amount: float,
    sensitivity: list | None = None,
    latency: Callable[[list[int]], float] | None = None,
) -> list[int]:
    """Units kept per group so that ``target`` (channels/macs/params/latency) is reduced by ``amount``;
    ``latency(keep channels per group)`` predicts the latency (``target="latency"``)."""
    units = [g.units for g in graph.groups]
    unit = [g.unit for g in graph.groups]
    normalized = [s / (s.abs().mean() + 1e-12) for s in scores]
    full_latency = latency([g.size for g in graph.groups]) if latency is not None else 1.0

    def reduction(keep_units: list[int]) -> float:
        if target == "channels":
            total = sum(g.size for g in graph.groups) or 1
            return 1 - sum(k * u for k, u in zip(keep_units, unit)) / total
        if target == "latency":
            if latency is None:
                raise UsageError("target='latency' needs a latency model (slimkit.pruning.latency)")
            return 1 - latency([k * u for k, u in zip(keep_units, unit)]) / full_latency
        macs, params = cost.cost([k * u for k, u in zip(keep_units, unit)])
        return 1 - (macs / cost.total_macs if target == "macs" else params / cost.total_params)

    if rule == "global":
        pooled = torch.sort(torch.cat(normalized)).values if normalized else torch.zeros(0)

        def family(s: float) -> list[int]:
            if s <= 0 or len(pooled) == 0:
                return [_snap(n, n, lim) for n, lim in zip(units, limits)]
            threshold = pooled[min(int(s * len(pooled)), len(pooled)) - 1]
            return [_snap(n - int((v <= threshold).sum()), n, lim) for n, v, lim in zip(units, normalized, limits)]
    elif rule == "proportional":
        weights = [sum(e.scaled for e in cost.entries if e.out_group == i) for i in range(len(units))]
        top = max(weights, default=1) or 1
        caps = [1 - lim.min_keep / n for n, lim in zip(units, limits)]

        def family(s: float) -> list[int]:
            return [
                _snap(n - math.floor(n * min(cap, s * w / top)), n, lim)
                for n, w, cap, lim in zip(units, weights, caps, limits)
            ]
    elif rule == "sensitivity":
        if sensitivity is None:
            raise UsageError("allocation rule 'sensitivity' needs the per-group sensitivity curves")
        curves = sensitivity

        def family(s: float) -> list[int]:
            keep = []
            for n, curve, lim in zip(units, curves, limits):
                ratio = max([r for r, drop in curve if drop <= s * 100.0], default=0.0)
                keep.append(_snap(n - math.floor(n * ratio), n, lim))
            return keep
    else:

        def family(s: float) -> list[int]:
            return [_snap(n - math.floor(n * s), n, lim) for n, lim in zip(units, limits)]

    if rule == "uniform" and target == "channels":
        return family(amount)
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if reduction(family(mid)) <= amount:
            lo = mid
        else:
            hi = mid
    order = [torch.sort(v).values for v in normalized]
    # The family jumps in whole units, so the answer sits between family(lo) (just short of the target) and
    # family(hi) (past it). Close the gap from both sides and keep the candidate nearer the rule's own ratios.
    below = _top_up(family(lo), order, limits, units, reduction, amount, rule)
    above = _give_back(family(hi), order, limits, units, reduction, amount, rule)
    reference = family(lo)

    def badness(keep: list[int]) -> tuple:
        off_target = abs(reduction(keep) - amount) > _TOLERANCE
        if rule == "global":  # importance removed (normalized scores of the cut units)
            return off_target, sum(float(o[: n - k].sum()) for o, n, k in zip(order, units, keep))
        # per-layer rules: the deepest over-cut of any group beyond the family's own ratio (minimax)
        over = [(r - k) / n for k, r, n in zip(keep, reference, units)]
        return off_target, max(over, default=0.0), sum(o * o for o in over)

    return min((below, above), key=badness)


_TOLERANCE = 0.01


def _give_back(keep, order, limits, units, reduction, amount, rule: str) -> list[int]:
    """From a keep past the target, restore units one ``round_to`` step at a time while the target stays met:
    for ``global`` the unit with the most importance per point of reduction it costs, for the per-layer rules
    the group cut deepest (ties: the smaller loss of reduction)."""
    current = reduction(keep)
    while True:
        moves = []
        for i, (k, lim) in enumerate(zip(keep, limits)):
            if lim.fixed is None and k + lim.step <= units[i]:
                trial = list(keep)
                trial[i] += lim.step
                after = reduction(trial)
                if after < amount:
                    continue
                loss = max(current - after, 1e-12)
                key: tuple[float, ...]
                if rule == "global":
                    key = (-float(order[i][units[i] - trial[i] : units[i] - k].sum()) / loss,)
                else:
                    key = (-(1 - k / units[i]), loss)
                moves.append((key, after, trial))
        if not moves:
            return keep
        _, current, keep = min(moves, key=lambda m: m[0])


def _top_up(keep, order, limits, units, reduction, amount, rule: str, slack: float = 0.005) -> list[int]:
    """Close the gap left by the bisection, one ``round_to`` step at a time.

    The next unit to go must respect the rule, not only the scores: for ``global`` it is the unit that costs the
    least importance per point of reduction (a knapsack greedy; a tiny Linear neuron barely moves the MACs, so
    ranking by score alone would strip dozens of them), for the per-layer rules it is the group whose removed
    fraction stays lowest after the cut (ties: the larger reduction), so the ratios stay even instead of one
    group absorbing the whole gap. Near the target, a move that would overshoot by more than ``slack`` gives
    way to the closest-landing move.
    """
    current = reduction(keep)
    while current < amount:
        moves = []
        for i, (k, lim) in enumerate(zip(keep, limits)):
            if lim.fixed is None and k - lim.step >= max(lim.min_keep, 1):
                trial = list(keep)
                trial[i] -= lim.step
                after = reduction(trial)
                gain = max(after - current, 1e-12)
                key: tuple[float, ...]
                if rule == "global":
                    lost = float(order[i][units[i] - k : units[i] - k + lim.step].sum())
                    key = (lost / gain,)
                else:
                    key = (1 - trial[i] / units[i], -gain)
                moves.append((key, after, trial))
        if not moves:
            break
        fitting = [m for m in moves if m[1] <= amount + slack]
        _, after, trial = min(fitting, key=lambda m: m[0]) if fitting else min(moves, key=lambda m: abs(m[1] - amount))
        if not fitting and abs(after - amount) > abs(amount - current):
            break
        keep, current = trial, after
    return keep
