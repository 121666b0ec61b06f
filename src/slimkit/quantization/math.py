"""Pure quantization math: integer ranges, scales and zero points, (fake) quantize / dequantize, and the range
estimators (observers) used by calibration. No module state lives here except the small ``Observer`` accumulators.

Affine quantization of a real ``x`` with step ``s`` and zero point ``z`` onto the integers ``[qmin, qmax]``::

    q = clamp(round(x / s) + z, qmin, qmax)        x_hat = (q - z) * s

Symmetric quantization fixes ``z = 0`` and uses the narrow signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``;
asymmetric uses ``[0, 2^b - 1]`` with ``z`` chosen so that 0.0 is exactly representable.

Granularity: per-tensor (one scale), per-channel (one per output channel, dim 0) or per-group (one per block of
``group_size`` consecutive input elements of each output channel, padded with zeros when it does not divide).

Example:
    >>> x = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    >>> s, z = qparams(torch.tensor(-1.0), torch.tensor(1.0), bits=8, symmetric=True)
    >>> fake_quantize(x, s, z, *qrange(8, True)).tolist()
    [-1.0, 0.0, 0.5039370059967041, 1.0]
"""

from __future__ import annotations

import enum
import math

import torch

from slimkit.errors import UsageError

__all__ = [
    "Granularity",
    "Observer",
    "ObserverKind",
    "dequantize",
    "fake_quantize",
    "group_view",
    "kl_range",
    "mse_range",
    "percentile_range",
    "qparams",
    "qrange",
    "quantize",
    "quantize_weight",
    "sqnr",
    "ungroup",
]

EPS = 1e-12


class Granularity(str, enum.Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"


class ObserverKind(str, enum.Enum):
    MINMAX = "minmax"
    MOVING_AVERAGE = "moving_average"
    PERCENTILE = "percentile"
    MSE = "mse"
    HISTOGRAM = "histogram"


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: narrow signed ``[-(2^(b-1)-1), 2^(b-1)-1]`` if symmetric else unsigned ``[0, 2^b-1]``."""
    if not 2 <= bits <= 16:
        raise UsageError(f"bits={bits} is out of range; affine quantization supports 2..16 bits")
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued float) zero point covering ``[lo, hi]`` (the range is widened to include 0)."""
    lo = torch.minimum(torch.as_tensor(lo, dtype=torch.float32), torch.zeros(()))
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.float32), torch.zeros(()))
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        scale = torch.where(scale > EPS, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > EPS, scale, torch.ones_like(scale))
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as float tensor) ``clamp(round(x / s) + z, qmin, qmax)``; round half to even like ONNX."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s`` in float32 (the exact op order of ONNX DequantizeLinear)."""
    return (q.float() - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize then dequantize (no gradient handling; see ``fake.py`` for the STE)."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


def group_view(w: torch.Tensor, granularity: Granularity | str, group_size: int = 0) -> torch.Tensor:
    """Reshape a weight so that each row of the last dim shares one scale.

    per-tensor: ``(1, N)``; per-channel: ``(C, K)``; per-group: ``(C, K', group_size)`` (zero padded).
    """
    granularity = Granularity(granularity)
    if granularity is Granularity.PER_TENSOR:
        return w.reshape(1, -1)
    rows = w.reshape(w.shape[0], -1)
    if granularity is Granularity.PER_CHANNEL:
        return rows
    if group_size < 1:
        raise UsageError(f"group_size={group_size} must be >= 1 for per-group quantization")
    pad = (-rows.shape[1]) % group_size
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], -1, group_size)


def ungroup(grouped: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``group_view`` (drops the padding)."""
    numel = math.prod(shape)
    if grouped.ndim == 3:
        grouped = grouped.reshape(grouped.shape[0], -1)[:, : numel // shape[0]]
    return grouped.reshape(shape)


def quantize_weight(
    w: torch.Tensor, bits: int, symmetric: bool, granularity: Granularity | str = "per_channel", group_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantize a weight: returns ``(codes in grouped view, scale, zero_point)``, scales keepdim'd."""
    g = group_view(w.detach(), granularity, group_size)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scale, zero_point = qparams(lo, hi, bits, symmetric)
    return quantize(g, scale, zero_point, *qrange(bits, symmetric)), scale, zero_point


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference - approx).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise.clamp_min(EPS)))


# ----------------------------------------------------------------------------------------------- range estimators


def percentile_range(x: torch.Tensor, percentile: float = 99.99) -> tuple[float, float]:
    """Clip the lowest and highest ``100 - percentile`` percent of values."""
    flat = x.detach().flatten().float()
    q = torch.quantile(flat, torch.tensor([1 - percentile / 100, percentile / 100]))
    return float(q[0]), float(q[1])


def mse_range(x: torch.Tensor, bits: int, symmetric: bool, steps: int = 100) -> tuple[float, float]:
    """The clipping range ``alpha * [min, max]`` (alpha on a grid in (0, 1]) with the least quantization MSE."""
    flat = x.detach().flatten().float()
    lo, hi = float(flat.min()), float(flat.max())
    qmin, qmax = qrange(bits, symmetric)
    best, best_err = (lo, hi), math.inf
    for i in range(steps, 0, -1):
        alpha = i / steps
        s, z = qparams(torch.tensor(lo * alpha), torch.tensor(hi * alpha), bits, symmetric)
        err = float((fake_quantize(flat, s, z, qmin, qmax) - flat).pow(2).mean())
        if err < best_err:
            best, best_err = (lo * alpha, hi * alpha), err
    return best


def _smooth(p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Move ``eps`` of probability onto every empty bin (taken evenly from the non-empty ones) so that
    ``KL(P || Q)`` stays finite where ``Q`` has an empty bin that ``P`` does not."""
    zeros = p == 0
    n_zero, n_nonzero = int(zeros.sum()), int((~zeros).sum())
    if n_zero == 0 or n_nonzero == 0:
        return p
    return p + eps * zeros - (eps * n_zero / n_nonzero) * (~zeros)


def kl_range(
    x: torch.Tensor, bits: int, bins: int = 2048, start_bins: int = 128, atom_fraction: float = 0.01
) -> tuple[float, float]:
    """Entropy calibration (TensorRT / MXNet): the clipping threshold with the least ``KL(P || Q)``.

    The histogram (``bins`` bins) is of ``x`` itself when ``x >= 0`` (post-ReLU: the unsigned range, ``2^bits``
    levels) and of ``|x|`` otherwise (``2^(bits-1)`` levels per side). For each candidate of ``i >= start_bins``
    bins: ``P`` is the first ``i`` bins with every outlier folded into the last one; ``Q`` merges the unfolded
    ``i`` bins into ``levels`` buckets and spreads each bucket back evenly over its non-empty bins (empty bins stay
    empty); both are normalised and smoothed (``_smooth``). Returns ``(max(min x, -t), min(max x, t))``.

    Atoms -- single values holding at least ``atom_fraction`` of the samples (ReLU's zeros, MNIST's background and
    saturated pixels) -- are left out of the histogram and the threshold is kept at or above the largest one:
    an atom quantizes to one grid point whatever the threshold, but smeared over its bucket it would dominate
    the KL and push the threshold far below the real signal (the classic failure on post-ReLU tensors).
    """
    flat = x.detach().flatten().float()
    lo, hi = float(flat.min()), float(flat.max())
    unsigned = lo >= 0
    mags = flat if unsigned else flat.abs()
    top = float(mags.max())
    if top <= EPS:
        return lo, hi
    values, counts = torch.unique(mags, return_counts=True)
    atoms = values[counts >= atom_fraction * mags.numel()]
    floor_t = float(atoms.max()) if atoms.numel() else 0.0
    rest = mags[~torch.isin(mags, atoms)] if atoms.numel() else mags
    if rest.numel() == 0:
        return lo, hi
    hist = torch.histc(rest, bins=bins, min=0.0, max=top).double()
    levels = 2**bits if unsigned else 2 ** (bits - 1)
    width = top / bins
    best_i, best_kl = bins, math.inf
    stride = max(1, bins // 512)
    for i in [*range(min(start_bins, bins), bins, stride), bins]:
        if i * width < floor_t:
            continue
        sliced = hist[:i]
        p = sliced.clone()
        p[-1] += hist[i:].sum()
        nonzero = p > 0
        buckets = min(levels, i)
        idx = torch.div(torch.arange(i) * buckets, i, rounding_mode="floor")
        bucket_sum = torch.zeros(buckets, dtype=torch.float64).index_add_(0, idx, sliced)
        bucket_cnt = torch.zeros(buckets, dtype=torch.float64).index_add_(0, idx, nonzero.double())
        q = torch.where(nonzero, bucket_sum[idx] / bucket_cnt[idx].clamp_min(1), torch.zeros_like(p))
        if q.sum() <= 0:
            continue
        p, q = _smooth(p / p.sum()), _smooth(q / q.sum())
        mask = p > 0
        kl = float((p[mask] * torch.log(p[mask] / q[mask].clamp_min(EPS))).sum())
        if kl < best_kl:
            best_i, best_kl = i, kl
    threshold = max(best_i * width, floor_t)
    return max(lo, -threshold), min(hi, threshold)


class Observer:
    """Accumulates activation statistics over calibration batches and returns a range ``(lo, hi)``.

    ``minmax``: global extremes; ``moving_average``: EMA of per-batch extremes (``momentum``); ``percentile``,
    ``mse`` and ``histogram`` (KL) work on a bounded random sample of the values seen.
    """

    SAMPLE = 200_000

    def __init__(
        self,
        kind: ObserverKind | str = "minmax",
        bits: int = 8,
        symmetric: bool = False,
        momentum: float = 0.1,
        percentile: float = 99.99,
        seed: int = 0,
    ) -> None:
        self.kind = ObserverKind(kind)
        self.bits, self.symmetric, self.momentum, self.percentile = bits, symmetric, momentum, percentile
        self.lo: float | None = None
        self.hi: float | None = None
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            raise UsageError("observer got an empty tensor: the calibration batch is empty")
        if not torch.isfinite(x).all():
            raise UsageError("observer got NaN/inf activations: check the calibration data and the model weights")
        lo, hi = float(x.min()), float(x.max())
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        elif self.kind is ObserverKind.MOVING_AVERAGE:
            self.lo += self.momentum * (lo - self.lo)
            self.hi += self.momentum * (hi - self.hi)
        else:
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if self.kind in (ObserverKind.PERCENTILE, ObserverKind.MSE, ObserverKind.HISTOGRAM):
            flat = x.flatten()
            if flat.numel() > self.SAMPLE // 4:
                flat = flat[torch.randint(flat.numel(), (self.SAMPLE // 4,), generator=self.generator)]
            self.samples.append(flat)
            total = sum(s.numel() for s in self.samples)
            if total > self.SAMPLE:
                merged = torch.cat(self.samples)
                self.samples = [merged[torch.randperm(merged.numel(), generator=self.generator)[: self.SAMPLE]]]

    def range(self) -> tuple[float, float]:
        if self.lo is None or self.hi is None:
            raise UsageError("observer saw no data: run at least one calibration batch")
        if self.kind in (ObserverKind.MINMAX, ObserverKind.MOVING_AVERAGE):
            return self.lo, self.hi
        sample = torch.cat(self.samples)
        if self.kind is ObserverKind.PERCENTILE:
            return percentile_range(sample, self.percentile)
        if self.kind is ObserverKind.MSE:
            return mse_range(sample, self.bits, self.symmetric)
        return kl_range(sample, self.bits)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        return qparams(torch.tensor(lo), torch.tensor(hi), self.bits, self.symmetric)
