"""Fake-quantization modules for calibration, QAT and evaluation in PyTorch.

Rounding uses the straight-through estimator (STE): ``round(x)`` forward, identity backward. With LSQ (Esser et
al. 2020) the step size ``s`` is a parameter; for ``v_hat = clamp(round(v / s), Qn, Qp) * s`` the gradient is

    d v_hat / d s = -v/s + round(v/s)   if Qn < v/s < Qp,     Qn or Qp when clipped,

scaled by ``g = 1 / sqrt(numel * Qp)``. ``QuantLinear`` / ``QuantConv2d`` subclass the float layers (so
``isinstance`` checks keep working) and add ``weight_quant`` and optionally ``input_quant``.
"""

from __future__ import annotations

import math
import typing

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import InputTypeError, UsageError
from slimkit.export.registry import FLOAT_TWIN, INTEGER_LAYER, INTEGER_TABLE, ActivationQuant, IntegerLayer, register
from slimkit.quantization.lowbit import binary_codes, binary_params, ternary_codes, ternary_params
from slimkit.quantization.math import Granularity, Observer, group_view, qparams, qrange, ungroup

E = typing.TypeVar("E", bound=nn.Embedding)

__all__ = [
    "ActQuantizer",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "WeightQuantizer",
    "float_embedding",
    "float_layer",
    "integer_layer",
    "integer_table",
    "round_ste",
]

WEIGHT_SCHEMES = ("symmetric", "affine", "ternary", "binary")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` forward (exactly), identity gradient."""
    return torch.round(x).detach() + (x - x.detach())


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Forward ``x``, gradient multiplied by ``g`` (LSQ's step-size gradient scale)."""
    scaled = x * g
    return x.detach() + (scaled - scaled.detach())


def lsq_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, numel_per_scale: int
) -> torch.Tensor:
    s = grad_scale(scale, 1.0 / math.sqrt(max(numel_per_scale, 1) * max(qmax, 1)))
    q = torch.clamp(round_ste(x / s) + zero_point, qmin, qmax)
    return (q - zero_point) * s


class WeightQuantizer(nn.Module):
    """Quantizes a weight tensor. Scales are recomputed from the weight in training mode (or on ``refresh``)
    and frozen in eval mode, so a stored ``W_hat`` always re-quantizes to the same codes."""

    def __init__(
        self,
        shape: tuple[int, ...],
        bits: int,
        scheme: str = "symmetric",
        granularity: str = "per_channel",
        group_size: int = 0,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        if scheme not in WEIGHT_SCHEMES:
            raise UsageError(f"weight scheme {scheme!r} is not valid; choose one of {WEIGHT_SCHEMES}")
        self.bits, self.scheme, self.group_size = bits, scheme, group_size
        self.granularity = Granularity(granularity).value
        if scheme in ("ternary", "binary"):
            self.granularity = Granularity.PER_CHANNEL.value
        self.learnable = learnable and scheme in ("symmetric", "affine")
        self.shape = tuple(shape)
        grouped = group_view(torch.zeros(self.shape), self.granularity, group_size)
        param_shape = (*grouped.shape[:-1], 1)
        scale = torch.ones(param_shape)
        self.scale = nn.Parameter(scale) if self.learnable else nn.Buffer(scale)
        self.zero_point = nn.Buffer(torch.zeros(param_shape))
        if scheme == "ternary":
            self.threshold = nn.Buffer(torch.zeros(param_shape))
        self.frozen = False  # QAT's observer-freezing schedule: keep the current scale

    @property
    def symmetric(self) -> bool:
        return self.scheme != "affine"

    def int_range(self) -> tuple[int, int]:
        if self.scheme == "ternary":
            return -1, 1
        if self.scheme == "binary":
            return -1, 1
        return qrange(self.bits, self.symmetric)

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        """Recompute scale (and zero point / threshold) from ``weight``."""
        if self.scheme == "ternary":
            alpha, delta = ternary_params(weight)
            self.scale.copy_(alpha)
            self.threshold.copy_(delta)
        elif self.scheme == "binary":
            self.scale.copy_(binary_params(weight))
        else:
            g = group_view(weight.detach(), self.granularity, self.group_size)
            scale, zero_point = qparams(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), self.bits, self.symmetric)
            if self.learnable:  # LSQ's initialisation 2 mean|w| / sqrt(Qp) is tuned for 2-4 bits; min-max for 8
                qmax = self.int_range()[1]
                lsq = 2 * g.abs().mean(-1, keepdim=True) / math.sqrt(qmax)
                scale = torch.minimum(scale, lsq) if self.bits <= 4 else scale
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes (float dtype) in the grouped view, from the frozen parameters."""
        if self.scheme == "ternary":
            return ternary_codes(weight.detach(), self.threshold)
        if self.scheme == "binary":
            return binary_codes(weight.detach())
        g = group_view(weight.detach(), self.granularity, self.group_size)
        qmin, qmax = self.int_range()
        return torch.clamp(torch.round(g / self.scale.detach()) + self.zero_point, qmin, qmax)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return ungroup((codes - self.zero_point) * self.scale.detach(), self.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and not self.learnable and not self.frozen:
            self.refresh(weight)
        if self.scheme == "ternary":
            rows = weight.reshape(weight.shape[0], -1)
            hard = ternary_codes(weight, self.threshold) * self.scale
            return (hard.detach() + (rows - rows.detach())).reshape(weight.shape)
        if self.scheme == "binary":
            rows = weight.reshape(weight.shape[0], -1)
            hard = binary_codes(weight) * self.scale
            return (hard.detach() + (rows - rows.detach())).reshape(weight.shape)
        g = group_view(weight, self.granularity, self.group_size)
        qmin, qmax = self.int_range()
        if self.learnable and self.training:
            out = lsq_fake_quant(g, self.scale, self.zero_point, qmin, qmax, g.shape[-1])
        else:
            q = torch.clamp(round_ste(g / self.scale) + self.zero_point, qmin, qmax)
            out = (q - self.zero_point) * self.scale
        return ungroup(out, weight.shape)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scheme={self.scheme}, granularity={self.granularity}"


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer: observes during calibration, then fake-quantizes with frozen (or, with
    ``learnable``, LSQ-trained) scale. ``dynamic`` recomputes min-max per batch (dynamic quantization)."""

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = False,
        observer: str = "minmax",
        dynamic: bool = False,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        self.bits, self.symmetric, self.observer_kind, self.dynamic = bits, symmetric, observer, dynamic
        self.learnable = learnable
        self.scale = nn.Parameter(torch.ones(())) if learnable else nn.Buffer(torch.ones(()))
        self.zero_point = nn.Buffer(torch.zeros(()))
        self.observer: Observer | None = None
        self.enabled = True
        self.frozen = False  # QAT's observer-freezing schedule: the LSQ step stops learning

    def start_observing(self) -> None:
        self.observer = Observer(self.observer_kind, self.bits, self.symmetric)

    @torch.no_grad()
    def stop_observing(self) -> None:
        """Freeze the observed range into scale / zero point."""
        if self.observer is None:
            return
        scale, zero_point = self.observer.qparams()
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.observer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if not self.enabled:
            return x
        qmin, qmax = qrange(self.bits, self.symmetric)
        if self.dynamic:
            scale, zero_point = qparams(x.detach().min(), x.detach().max(), self.bits, self.symmetric)
            return torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax).sub(zero_point).mul(scale)
        if self.learnable and self.training:
            return lsq_fake_quant(x, self.scale, self.zero_point, qmin, qmax, x[0].numel())
        q = torch.clamp(round_ste(x / self.scale) + self.zero_point, qmin, qmax)
        return (q - self.zero_point) * self.scale

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else self.observer_kind
        return f"bits={self.bits}, symmetric={self.symmetric}, {kind}"


class _QuantMixin:
    """Shared forward pieces: fake-quantized weight, input, and (with static input quantization) the bias
    rounded to int32 at scale ``s_x * s_w`` as integer runtimes do."""

    weight: torch.Tensor  # the Linear / Conv2d weight of the class this is mixed into
    weight_quant: WeightQuantizer
    input_quant: ActQuantizer | None

    def _setup(
        self,
        bits: int,
        scheme: str,
        granularity: str,
        group_size: int,
        learnable: bool,
        input_quant: ActQuantizer | None,
    ) -> None:
        self.weight_quant = WeightQuantizer(
            tuple(self.weight.shape),
            bits,
            scheme,
            granularity,
            group_size,
            learnable,
        )
        self.input_quant = input_quant
        self.output_quant: ActQuantizer | None = None

    def _quant_output(self, y: torch.Tensor) -> torch.Tensor:
        oq = getattr(self, "output_quant", None)
        return y if oq is None else oq(y)

    def _quant_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        weight = self.weight_quant(self.weight)
        bias: torch.Tensor | None = self.bias  # type: ignore[attr-defined]  # the host layer's (may be None)
        if self.input_quant is not None:
            x = self.input_quant(x)
            if bias is not None and self._bias_quantized():
                bias_scale = (self.input_quant.scale.detach() * self.weight_quant.scale.detach()).reshape(-1)
                bias = round_ste(bias / bias_scale) * bias_scale
        return x, weight, bias

    def _bias_quantized(self) -> bool:
        iq = self.input_quant
        return (
            iq is not None
            and iq.observer is None
            and iq.enabled
            and not iq.dynamic
            and self.weight_quant.granularity != Granularity.PER_GROUP.value
            and self.weight_quant.scale.numel() in (1, self.weight.shape[0])
        )


class QuantLinear(nn.Linear, _QuantMixin):
    """``nn.Linear`` with fake-quantized weight (and input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight, bias = self._quant_inputs(x)
        return self._quant_output(F.linear(x, weight, bias))


class QuantConv2d(nn.Conv2d, _QuantMixin):
    """``nn.Conv2d`` with fake-quantized weight (and input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight, bias = self._quant_inputs(x)
        return self._quant_output(self._conv_forward(x, weight, bias))


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` with a weight quantized per row (one scale per token): ``forward`` gathers the rows of the
    looked-up ids and quantizes only those, with their own row scales, which equals quantizing the whole table and
    then gathering. Weight-only: there is no activation quantizer (the input is integer ids)."""

    weight_quant: WeightQuantizer
    input_quant: ActQuantizer | None = None
    output_quant: ActQuantizer | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        wq = self.weight_quant
        if self.training and not wq.frozen:
            wq.refresh(self.weight)
        rows = F.embedding(ids, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)
        scale: torch.Tensor = wq.scale.detach()
        zero_point: torch.Tensor = wq.zero_point
        if scale.numel() > 1:  # per row: each looked-up row with its own scale
            scale, zero_point = F.embedding(ids, scale.reshape(-1, 1)), F.embedding(ids, zero_point.reshape(-1, 1))
        else:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        qmin, qmax = wq.int_range()
        q = torch.clamp(round_ste(rows / scale) + zero_point, qmin, qmax)
        return (q - zero_point) * scale


def _quant_embedding(layer: nn.Embedding, bits: int, scheme: str, granularity: str) -> QuantEmbedding:
    if layer.max_norm is not None:
        raise UsageError("cannot quantize an Embedding with max_norm (it renormalises its weight in place on lookup)")
    if scheme != "symmetric" or granularity not in ("per_channel", "per_tensor"):
        raise UsageError(
            f"an Embedding is quantized symmetric per row (per_channel) or per_tensor, got {scheme!r} {granularity!r}"
        )
    new = _embedding_like(QuantEmbedding, layer)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
    new.weight_quant = WeightQuantizer(tuple(new.weight.shape), bits, scheme, granularity)
    new.weight_quant.refresh(new.weight)
    return new.train(layer.training)


def make_quant_layer(
    layer: nn.Module,
    bits: int,
    scheme: str,
    granularity: str,
    group_size: int,
    learnable: bool,
    input_quant: ActQuantizer | None,
    bias: bool | None = None,
) -> nn.Module:
    """A ``QuantLinear`` / ``QuantConv2d`` / ``QuantEmbedding`` copying ``layer``'s hyper-parameters and weights."""
    if isinstance(layer, nn.Embedding):  # weight-only, per row
        return _quant_embedding(layer, bits, scheme, granularity)
    has_bias = (layer.bias is not None) if bias is None else bias
    new: QuantLinear | QuantConv2d
    if isinstance(layer, nn.Linear):
        new = QuantLinear(layer.in_features, layer.out_features, bias=has_bias)
    elif isinstance(layer, nn.Conv2d):
        kernel_size, stride, padding, dilation = _conv2d_geometry(layer)
        new = QuantConv2d(
            layer.in_channels,
            layer.out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=layer.groups,
            bias=has_bias,
            padding_mode=layer.padding_mode,
        )
        # (the ignores: torch types Conv2d's attributes tuple[int, ...] but its arguments tuple[int, int])
    else:
        raise InputTypeError(f"cannot quantize {type(layer).__name__}: only Linear, Conv2d and Embedding are supported")
    new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)  # a float64 model stays float64
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if new.bias is not None:
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
            else:
                new.bias.zero_()
    new._setup(bits, scheme, granularity, group_size, learnable, input_quant)
    new.weight_quant.refresh(new.weight)
    return new.train(layer.training)


def _activation(quantizer: ActQuantizer | None) -> ActivationQuant | None:
    if quantizer is None or not quantizer.enabled:
        return None
    if quantizer.dynamic:
        return ActivationQuant(quantizer.bits, dynamic=True)
    return ActivationQuant(quantizer.bits, False, float(quantizer.scale.detach()), int(quantizer.zero_point))


@torch.no_grad()
def _simulated_weight(layer: QuantLinear | QuantConv2d | QuantEmbedding) -> torch.Tensor:
    """``W_hat`` from the frozen grid, leaving the quantizer's train / eval mode as it was."""
    wq = layer.weight_quant
    was_training = wq.training
    try:
        return wq.eval()(layer.weight).detach()
    finally:
        wq.train(was_training)


@register(INTEGER_LAYER, QuantLinear, QuantConv2d)
@torch.no_grad()
def integer_layer(layer: QuantLinear | QuantConv2d) -> IntegerLayer:
    """The integer view of a fake-quant layer that integer export back ends write (registered handler)."""
    wq = layer.weight_quant
    per_group = wq.granularity == Granularity.PER_GROUP.value
    codes = None if per_group else wq.codes(layer.weight).reshape(layer.weight.shape)
    return IntegerLayer(
        wq.bits,
        wq.scheme,
        wq.granularity,
        wq.symmetric,
        codes,
        wq.scale.detach().reshape(-1),
        wq.zero_point.detach().reshape(-1),
        _simulated_weight(layer),
        _activation(layer.input_quant),
        _activation(getattr(layer, "output_quant", None)),
    )


@register(FLOAT_TWIN, QuantLinear, QuantConv2d)
@torch.no_grad()
def float_layer(layer: QuantLinear | QuantConv2d) -> nn.Linear | nn.Conv2d:
    """A plain ``nn.Linear`` / ``nn.Conv2d`` computing what ``layer`` simulates: the dequantized weight and, with
    static input quantization, the bias rounded at scale ``s_x * s_w`` (registered float-twin handler)."""
    weight = _simulated_weight(layer)
    bias = layer.bias.detach() if layer.bias is not None else None
    iq = layer.input_quant
    if bias is not None and iq is not None and layer._bias_quantized():
        bias_scale = (iq.scale.detach() * layer.weight_quant.scale.detach()).reshape(-1)
        bias = torch.round(bias / bias_scale) * bias_scale
    plain: nn.Linear | nn.Conv2d
    if isinstance(layer, nn.Linear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
    else:
        kernel_size, stride, padding, dilation = _conv2d_geometry(layer)
        plain = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            layer.groups,
            bias is not None,
            layer.padding_mode,
        )
        # (the ignores: torch types Conv2d's attributes tuple[int, ...] but its arguments tuple[int, int])
    plain = plain.to(device=weight.device, dtype=weight.dtype)
    plain.weight.copy_(weight)
    if bias is not None and plain.bias is not None:
        plain.bias.copy_(bias)
    return plain.train(layer.training)


def _conv2d_geometry(
    layer: nn.Conv2d,
) -> tuple[tuple[int, int], tuple[int, int], str | tuple[int, int], tuple[int, int]]:
    """``(kernel_size, stride, padding, dilation)`` of a Conv2d, typed as the pairs they are (torch types them as
    ``tuple[int, ...]``)."""
    pair = typing.cast(tuple[int, int], layer.kernel_size)
    padding = layer.padding if isinstance(layer.padding, str) else typing.cast(tuple[int, int], layer.padding)
    return pair, typing.cast(tuple[int, int], layer.stride), padding, typing.cast(tuple[int, int], layer.dilation)


@register(INTEGER_TABLE, QuantEmbedding)
@torch.no_grad()
def integer_table(layer: QuantEmbedding) -> IntegerLayer:
    """The integer view of a quantized embedding: codes per row and row scales (registered handler)."""
    wq = layer.weight_quant
    return IntegerLayer(
        wq.bits,
        wq.scheme,
        wq.granularity,
        wq.symmetric,
        wq.codes(layer.weight).reshape(layer.weight.shape),
        wq.scale.detach().reshape(-1),
        wq.zero_point.detach().reshape(-1),
        _simulated_weight(layer),
    )


@register(FLOAT_TWIN, QuantEmbedding)
@torch.no_grad()
def float_embedding(layer: QuantEmbedding) -> nn.Embedding:
    """A plain ``nn.Embedding`` holding the dequantized table (registered float-twin handler)."""
    plain = _embedding_like(nn.Embedding, layer)
    plain.weight.copy_(_simulated_weight(layer))
    return plain.train(layer.training)


def _embedding_like(cls: type[E], layer: nn.Embedding) -> E:
    """A ``cls`` embedding with ``layer``'s sizes, padding index, flags, device and dtype (weights not copied)."""
    return cls(
        layer.num_embeddings,
        layer.embedding_dim,
        layer.padding_idx,
        scale_grad_by_freq=layer.scale_grad_by_freq,
        sparse=layer.sparse,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    )
