"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Rounding every weight to nearest is not optimal for the layer's output. AdaRound learns, layer by layer, whether
each weight rounds down or up. With ``W_floor = floor(W / s)`` and a continuous variable ``V`` per weight, the soft
weight during optimisation is

    W_soft = s * (clamp(W_floor + h(V) + z, qmin, qmax) - z),    h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)

(the rectified sigmoid, ``zeta = 1.1``, ``gamma = -0.1``: it reaches exactly 0 and 1 with a non-vanishing
gradient). ``V`` starts where ``h(V)`` equals the fractional part of ``W / s`` (so ``W_soft = W``) and minimises

    || W x_fp + b - (W_soft Q(x_q) + b) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

on calibration inputs: ``x_fp`` is the layer's input in the float (BN-folded) model, ``x_q`` the input in the
quantized model with the earlier layers already rounded (the paper's asymmetric reconstruction), ``Q`` the layer's
calibrated input quantizer. The regulariser drives every ``h`` to 0 or 1; ``beta`` anneals from 20 to 2 after a
20 % warm-up without it. Finally ``h`` is hardened to ``V >= 0`` and the layer's weight becomes the dequantized
``W_hat``, so every back end (ONNX QDQ, PyTorch x86, packing) re-derives exactly the learned integer codes.

The weights whose nearest code is ``qmin`` or ``qmax`` keep round-to-nearest: they define the min-max scale, which
``W_hat`` therefore reproduces when a runtime re-observes it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slimkit._inputs import call
from slimkit.errors import UsageError
from slimkit.quantization.fake import QuantConv2d, QuantLinear
from slimkit.quantization.math import group_view, ungroup

__all__ = ["GAMMA", "ZETA", "adaround", "rectified_sigmoid"]

ZETA, GAMMA = 1.1, -0.1
REG_WEIGHT = 0.01
WARMUP = 0.2
BETA = (20.0, 2.0)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse(frac: torch.Tensor) -> torch.Tensor:
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


def _capture(model: nn.Module, name: str, batches: list[Any], output: bool) -> torch.Tensor:
    """The input (or output) of ``model.<name>`` on every batch, stopping each forward pass there."""
    layer = model.get_submodule(name)
    seen: list[torch.Tensor] = []

    def grab(module, args, out=None):
        seen.append((out if output else args[0]).detach())
        raise _Stop

    handle = layer.register_forward_hook(grab) if output else layer.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    call(model, x)  # a tensor, tuple or dict batch
                except _Stop:
                    pass
    finally:
        handle.remove()
    return torch.cat(seen)


def _forward(layer: nn.Linear | nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)


def _recon(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over output channels (dim 1), averaged over samples and positions."""
    return (pred - target).pow(2).sum(1).mean()


def _round_layer(
    layer: QuantLinear | QuantConv2d,
    x_q: torch.Tensor,
    target: torch.Tensor,
    iters: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> dict[str, float]:
    wq = layer.weight_quant
    qmin, qmax = wq.int_range()
    scale, zero_point = wq.scale.detach(), wq.zero_point.detach()
    weight = layer.weight.detach()
    grouped = group_view(weight, wq.granularity, wq.group_size) / scale
    base = torch.floor(grouped)
    nearest = torch.clamp(torch.round(grouped) + zero_point, qmin, qmax)
    fixed = (nearest <= qmin) | (nearest >= qmax)  # the min-max defining weights keep their scale
    v = nn.Parameter(_inverse(grouped - base))
    optimizer = torch.optim.Adam([v], lr=lr)
    with torch.no_grad():
        x_q = layer.input_quant(x_q) if layer.input_quant is not None else x_q

    def soft_weight(h: torch.Tensor) -> torch.Tensor:
        codes = torch.where(fixed, nearest, torch.clamp(base + h + zero_point, qmin, qmax))
        return ungroup((codes - zero_point) * scale, weight.shape)

    warm = int(WARMUP * iters)
    for step in range(iters):
        idx = torch.randint(x_q.shape[0], (min(batch_size, x_q.shape[0]),), generator=generator)
        h = rectified_sigmoid(v)
        loss = _recon(_forward(layer, x_q[idx], soft_weight(h)), target[idx])
        if step >= warm:
            progress = (step - warm) / max(1, iters - warm)
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - progress)
            loss = loss + REG_WEIGHT * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learned = torch.where(fixed, nearest, torch.clamp(base + (v >= 0).float() + zero_point, qmin, qmax))
        w_hat = ungroup((learned - zero_point) * scale, weight.shape)
        w_near = ungroup((nearest - zero_point) * scale, weight.shape)
        probe = slice(0, min(256, x_q.shape[0]))
        before = float(_recon(_forward(layer, x_q[probe], w_near), target[probe]))
        after = float(_recon(_forward(layer, x_q[probe], w_hat), target[probe]))
        layer.weight.copy_(w_hat)
    return {
        "flipped": round(float((learned != nearest).float().mean()), 4),
        "recon_mse_nearest": before,
        "recon_mse_adaround": after,
    }


def adaround(
    model: nn.Module,
    reference: nn.Module,
    batches: list[torch.Tensor],
    iters: int = 300,
    lr: float = 1e-2,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Learn the rounding of every uniformly quantized layer of the fake-quant ``model`` in module order (in
    place); ``reference`` is the float model with the same layer names (BN already folded). Activation
    quantizers must be calibrated. Returns per-layer statistics: the fraction of weights rounded away from
    nearest and the reconstruction error (on up to 256 calibration inputs) with nearest vs learned rounding.

    Example:
        >>> stats = adaround(qmodel, folded_float_model, calib_batches, iters=300)       # doctest: +SKIP
    """
    from slimkit.quantization.ptq import quant_layers

    if iters < 1:
        raise UsageError(f"adaround: iters={iters} must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    stats: dict[str, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    reference.eval()
    try:
        for name, layer in quant_layers(model):
            wq = layer.weight_quant
            if wq.scheme not in ("symmetric", "affine") or wq.learnable:
                continue
            x_q = _capture(model, name, batches, output=False)
            target = _capture(reference, name, batches, output=True)
            if not math.prod(target.shape):
                continue
            stats[name] = _round_layer(layer, x_q, target, iters, lr, batch_size, generator)
    finally:
        model.train(was_training)
    return stats
