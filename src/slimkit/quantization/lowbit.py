"""Ternary (TWN) and binary (XNOR-Net / BinaryConnect) weight quantization, per output channel.

Ternary weight networks (Li et al. 2016), per output channel ``c``::

    delta_c = 0.7 * mean|W_c|
    alpha_c = mean{ |w| : w in W_c, |w| > delta_c }
    W_hat   = alpha_c * t,   t = sign(w) * [|w| > delta_c]  in {-1, 0, +1}

Binary (XNOR-Net's scaled sign, Rastegari et al. 2016)::

    alpha_c = mean|W_c|,   W_hat = alpha_c * b,   b = sign(w) in {-1, +1}  (sign(0) = +1)

Both return integer codes, the per-channel scale (shape ``(C, 1)`` over the flattened weight) and, for ternary,
the threshold, so a stored model re-derives exactly the same codes from ``W_hat`` (``alpha_c > delta_c``).
"""

from __future__ import annotations

import torch

__all__ = ["binary_codes", "binary_params", "ternary_codes", "ternary_params"]

TWN_RATIO = 0.7


def ternary_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, delta)`` per output channel, each of shape ``(C, 1)``."""
    rows = w.detach().reshape(w.shape[0], -1).abs()
    delta = TWN_RATIO * rows.mean(dim=1, keepdim=True)
    keep = (rows > delta).float()
    alpha = (rows * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1)
    return alpha, delta


def ternary_codes(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, 0, +1} of the flattened weight ``(C, K)``."""
    rows = w.reshape(w.shape[0], -1)
    return torch.sign(rows) * (rows.abs() > delta).to(rows.dtype)


def binary_params(w: torch.Tensor) -> torch.Tensor:
    """``alpha`` per output channel, shape ``(C, 1)``."""
    return w.detach().reshape(w.shape[0], -1).abs().mean(dim=1, keepdim=True)


def binary_codes(w: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, +1} of the flattened weight ``(C, K)``; zero maps to +1."""
    rows = w.reshape(w.shape[0], -1)
    return torch.where(rows >= 0, torch.ones_like(rows), -torch.ones_like(rows))
