"""Mixed precision: per-layer weight bits chosen from measured sensitivity under a size budget.

Sensitivity of layer ``l`` at ``b`` bits is measured, not estimated: only that layer's weights are quantized
(per channel, symmetric) and the KL divergence of the model's outputs from the float outputs is averaged over
the calibration batches. A greedy allocation starts with every layer at the highest candidate and repeatedly
lowers the layer with the smallest sensitivity increase per byte saved until the packed model fits the budget.

Example:
    >>> plan = mixed_precision(model, calib, size_ratio=6.0)                           # doctest: +SKIP
    >>> result = quantize(model, QuantConfig(overrides=plan.overrides, act_bits=None), calib)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkit._modules import matches
from slimkit.errors import UsageError
from slimkit.quantization.config import quantizable
from slimkit.quantization.math import dequantize, quantize_weight, ungroup
from slimkit.quantization.ptq import calibration_batches

__all__ = ["MixedPlan", "mixed_precision"]


@dataclass
class MixedPlan:
    """``overrides`` feeds ``QuantConfig(overrides=...)``; ``sensitivity[layer][bits]`` is the measured KL;
    ``size_bytes`` estimates the packed weights file (<= ``budget_bytes``, the fp32 state over ``size_ratio``)."""

    bits: dict[str, int]
    sensitivity: dict[str, dict[int, float]]
    size_bytes: int
    budget_bytes: int
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)


@torch.no_grad()
def _kl(model: nn.Module, batches: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    total = 0.0
    for x, ref in zip(batches, reference):
        total += float(
            F.kl_div(F.log_softmax(model(x), 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
        )
    return total / len(batches)


def mixed_precision(
    model: nn.Module,
    data: Dataset | DataLoader | torch.Tensor,
    size_ratio: float,
    candidates: tuple[int, ...] = (8, 4, 2),
    batches: int = 4,
    batch_size: int = 64,
    ignore: tuple[str, ...] = (),
) -> MixedPlan:
    """Choose weight bits per Linear/Conv2d layer so the packed model is ``size_ratio`` times smaller than its fp32
    state (biases, norms and per-channel scales included)."""
    if size_ratio < 1:
        raise UsageError(f"size_ratio={size_ratio} must be >= 1 (fp32 size / quantized size)")
    candidates = tuple(sorted(set(candidates), reverse=True))
    if not candidates or min(candidates) < 2 or max(candidates) > 8:
        raise UsageError(f"candidates={candidates} must be bit widths in 2..8")
    was_training = model.training
    try:
        return _plan(model.eval(), data, size_ratio, candidates, batches, batch_size, ignore)
    finally:
        model.train(was_training)


def _plan(
    model: nn.Module,
    data: Dataset | DataLoader | torch.Tensor,
    size_ratio: float,
    candidates: tuple[int, ...],
    batches: int,
    batch_size: int,
    ignore: tuple[str, ...],
) -> MixedPlan:
    # quantizable() yields only Linear / Conv2d layers; the isinstance check states it for the type checker
    layers = [
        (n, m)
        for n, m in quantizable(model)[0]
        if isinstance(m, nn.Linear | nn.Conv2d) and not any(matches(n, p) for p in ignore)
    ]
    xs = calibration_batches(data, batch_size, batches)
    with torch.no_grad():
        reference = [model(x) for x in xs]
    sensitivity: dict[str, dict[int, float]] = {}
    for name, layer in layers:
        original = layer.weight.detach().clone()
        sensitivity[name] = {}
        for candidate in candidates:
            codes, scale, zero_point = quantize_weight(original, candidate, True, "per_channel")
            with torch.no_grad():
                layer.weight.copy_(ungroup(dequantize(codes, scale, zero_point), original.shape))
            sensitivity[name][candidate] = _kl(model, xs, reference)
        with torch.no_grad():
            layer.weight.copy_(original)
    sizes = {name: layer.weight.numel() for name, layer in layers}
    # the budget is on the packed file: everything but the planned weights stays float, plus a float32 scale per
    # output channel (BN statistics are counted as they are, so folding only makes the real file smaller)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.is_floating_point())
    fixed = total - 4 * sum(sizes.values()) + 4 * sum(layer.weight.shape[0] for _, layer in layers)
    budget = int(total / size_ratio)
    bits = {name: candidates[0] for name, _ in layers}

    def size_bytes() -> int:
        return fixed + sum(sizes[n] * b for n, b in bits.items()) // 8

    while size_bytes() > budget:
        best, best_cost = None, float("inf")
        for name in bits:
            lower = [b for b in candidates if b < bits[name]]
            if not lower:
                continue
            nxt = lower[0]
            saved = sizes[name] * (bits[name] - nxt) / 8
            cost = (sensitivity[name][nxt] - sensitivity[name][bits[name]]) / saved
            if cost < best_cost:
                best, best_cost = (name, nxt), cost
        if best is None:
            raise UsageError(
                f"mixed_precision: even {candidates[-1]}-bit everywhere ({size_bytes()} bytes) "
                f"exceeds the budget of {budget} bytes; lower size_ratio or add smaller candidates"
            )
        bits[best[0]] = best[1]
    overrides = {name: {"weight_bits": b} for name, b in bits.items()}
    return MixedPlan(bits, sensitivity, size_bytes(), budget, overrides)
