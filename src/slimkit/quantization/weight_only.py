"""Weight-only block quantization of Linear layers (round-to-nearest, GPTQ and AWQ) and of embeddings (per row).

Every algorithm ends on the same grid: for each output row, blocks of ``group_size`` consecutive input elements
share a scale ``s`` and an integer zero point ``z``; codes ``q`` are unsigned (``0..15`` for 4 bits) and the weight
is ``(q - z) * s`` -- exactly what ONNX Runtime's ``MatMulNBits`` dequantizes (``export/onnx_int4.py``). An input
size that is not a multiple of ``group_size`` is padded with zeros (the last block is partly empty).

- RTN: min-max per block (the range widened to include 0, so 0.0 is exact).
- GPTQ (Frantar et al. 2022): the layer's Hessian ``H = 2/n X^T X`` from its calibration inputs, dampened by
  ``damp * mean(diag H)``; columns quantized one by one, the rounding error of each spread over the columns not yet
  quantized through the upper Cholesky factor of ``H^-1`` (lazily, in blocks of ``block_size`` columns). With
  ``act_order`` columns go by decreasing ``diag H`` and each block's scale is fixed from the float weight first, so
  the blocks stay contiguous along the input dim (no ``g_idx``).
- AWQ (Lin et al. 2023): per-input-channel scales ``s = mean|x| ** alpha`` (normalised), ``alpha`` searched on a grid
  for the least output error of ``X diag(1/s) Q(W diag(s))^T`` against ``X W^T``; then RTN of ``W diag(s)``. The
  ``1/s`` is folded into the op producing the input (a LayerNorm / RMSNorm, or a Linear, also through a ReLU) when
  the layer is its only reader, else kept as the layer's ``input_scale`` (a ``Mul`` before the ``MatMulNBits``).

Layers become ``WeightOnlyLinear`` (a ``QuantLinear`` without activation quantizer): they run in PyTorch on the
dequantized weight and are stored packed (``pack.py``: half a byte per 4-bit weight, plus the blocks' scales and
zero points). ``nn.Embedding`` tables (half the bytes of a small transformer such as all-MiniLM-L6-v2) become
``QuantEmbedding`` with symmetric 8-bit codes and one scale per row, as ``method="ptq"`` plans them (fewer bits by
an override); ``export_onnx`` gathers their int8 codes beside the ``MatMulNBits`` layers. transformers' ``Conv1D``
(GPT-2) first becomes the ``nn.Linear`` it is (``record["linearized"]``; ``replay_`` swaps them on a fresh model).

Example:
    >>> cfg = QuantConfig(weight_bits=4, act_bits=None, group_size=128, algorithm="gptq")   # doctest: +SKIP
    >>> result = slimkit.quantize(model, cfg, calibration_inputs)                          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import typing
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit._modules import matches, set_module
from slimkit.errors import UsageError
from slimkit.export.registry import FLOAT_TWIN, PACK, register
from slimkit.history import record_step
from slimkit.quantization.config import (
    LayerSpec,
    QuantConfig,
    WeightOnlyAlgorithm,
    WeightOnlySettings,
    check_group_size,
    plan_layers,
)
from slimkit.quantization.conv1d import linearize
from slimkit.quantization.fake import QuantLinear, float_layer
from slimkit.quantization.math import qparams, quantize_weight, ungroup
from slimkit.quantization.pack import pack_state_dict
from slimkit.quantization.ptq import calibration_batches, layer_summary, prepare, run_batches, trace_with_leaves

__all__ = [
    "ScaledLinear",
    "WeightOnlyLinear",
    "awq_search",
    "gptq_quantize",
    "quantize_weight_only",
    "replay_weight_only",
    "rtn_quantize",
]

METHOD = "weight_only"  # the record's "method": what replay dispatches on


# ------------------------------------------------------------------------------------------------------ pure math


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest with asymmetric min-max blocks: ``(dequantized weight, scale, zero_point)``, the scales and
    zero points shaped ``(out, blocks, 1)``.

    Example:
        >>> w = torch.randn(8, 64)
        >>> w_hat, s, z = rtn_quantize(w, 4, 32)
        >>> bool(((w - w_hat).abs() <= s.repeat_interleave(32, 1).squeeze(-1) / 2 + 1e-6).all())
        True
    """
    codes, scale, zero_point = quantize_weight(weight.float(), bits, False, "per_group", group_size)
    return ungroup((codes - zero_point) * scale, tuple(weight.shape)), scale, zero_point


def _block_params(columns: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``(out, 1)`` of one block of columns (min-max, range widened to include 0)."""
    scale, zero_point = qparams(columns.amin(1, keepdim=True), columns.amax(1, keepdim=True), bits, False)
    return scale.to(columns.dtype), zero_point.to(columns.dtype)


def _round(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    return (torch.clamp(torch.round(w / scale) + zero_point, 0, 2**bits - 1) - zero_point) * scale


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of one ``(out, in)`` weight given ``hessian = 2/n X^T X`` (``(in, in)``); returns the dequantized weight
    and the blocks' ``scale`` / ``zero_point`` ``(out, blocks, 1)``, all on the asymmetric min-max block grid.

    Example:
        >>> x = torch.randn(512, 64)
        >>> w_hat, s, z = gptq_quantize(torch.randn(16, 64), 2 * x.T @ x / 512, 4, 32)
    """
    out_features, columns = weight.shape
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs that are always 0: any weight works, take 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    blocks = math.ceil(columns / group_size)
    scale = torch.ones(out_features, blocks, 1, dtype=torch.float64)
    zero_point = torch.zeros_like(scale)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(columns)
    if act_order:  # static blocks: each block's grid from the float weight, before any error feedback
        for b in range(blocks):
            scale[:, b], zero_point[:, b] = _block_params(w[:, b * group_size : (b + 1) * group_size], bits)
        w, h = w[:, order], h[order][:, order]
    h_inv = _upper_cholesky_inverse(h, damp, name)
    done = torch.zeros(blocks, dtype=torch.bool)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        chunk = w[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        h_chunk = h_inv[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            b = column // group_size
            if not act_order and not done[b]:  # a block's grid from its columns as they are when it starts
                span = w[:, column : column + group_size].clone()  # the block's columns, updates included
                width = min(group_size, end - start - i)
                span[:, :width] = chunk[:, i : i + width]
                scale[:, b], zero_point[:, b] = _block_params(span, bits)
                done[b] = True
            quantized = _round(chunk[:, i], scale[:, b, 0], zero_point[:, b, 0], bits)
            err = (chunk[:, i] - quantized) / h_chunk[i, i]
            chunk[:, i:] -= err.unsqueeze(1) * h_chunk[i, i:].unsqueeze(0)
            chunk[:, i] = quantized
            errors[:, i] = err
        w[:, start:end] = chunk
        w[:, end:] -= errors @ h_inv[start:end, end:]
    if act_order:
        w = w[:, torch.argsort(order)]
    return w.to(weight.dtype), scale.float(), zero_point.float()


def _upper_cholesky_inverse(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``; the dampening grows until it factorises."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    mean_diag = float(torch.diag(h).mean())
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h + damp * 10**attempt * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise UsageError(
        f"quantize: GPTQ on layer {name!r}: its calibration Hessian is not positive definite even with "
        f"damp={damp * 1e5:g}; pass more (or more varied) calibration data, or use algorithm='rtn' / 'awq'"
    )


@torch.no_grad()
def awq_search(
    weight: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int, grid: int = 20
) -> tuple[torch.Tensor, float]:
    """AWQ's per-input-channel scales for one ``(out, in)`` weight and its calibration ``inputs`` ``(rows, in)``:
    ``s = mean|x| ** alpha / sqrt(max * min)`` with the ``alpha`` on the grid whose RTN of ``W diag(s)``, applied
    to ``x / s``, has the least output MSE. ``alpha = 0`` (``s = 1``: plain RTN) is on the grid, so the result is
    never worse than RTN on these inputs. Returns ``(s, alpha)``.
    """
    x = inputs.to(weight.dtype)
    reference = x @ weight.T
    magnitude = x.abs().mean(0)
    best_scale, best_alpha, best_err = torch.ones_like(magnitude), 0.0, math.inf
    for step in range(grid):
        alpha = step / grid
        scale = magnitude.pow(alpha).clamp(min=1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()
        w_hat = rtn_quantize(weight * scale, bits, group_size)[0]
        err = float((x @ (w_hat / scale).T - reference).pow(2).mean())
        if err < best_err:
            best_scale, best_alpha, best_err = scale, alpha, err
    return best_scale, best_alpha


# ------------------------------------------------------------------------------------------------------ the layers


class WeightOnlyLinear(QuantLinear):
    """``nn.Linear`` whose weight sits on an asymmetric per-block grid (no activation quantization); ``input_scale``
    (AWQ's ``1/s`` where it could not be folded upstream, else None) multiplies the input first."""

    input_scale: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        return F.linear(x, self.weight_quant(self.weight), self.bias)


class ScaledLinear(nn.Module):
    """``linear(x * input_scale)``: the float twin of a ``WeightOnlyLinear`` with an input scale (ONNX:
    ``Mul -> MatMul``)."""

    def __init__(self, linear: nn.Linear, input_scale: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.input_scale = nn.Buffer(input_scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.input_scale)


def weight_only_layer(layer: nn.Linear, spec: LayerSpec, input_scale: bool = False) -> WeightOnlyLinear:
    """A ``WeightOnlyLinear`` with ``layer``'s weights and an (RTN) grid of ``spec``'s bits and group size."""
    new = WeightOnlyLinear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if new.bias is not None and layer.bias is not None:
            new.bias.copy_(layer.bias)
    new._setup(spec.weight_bits, "affine", "per_group", spec.group_size, False, None)
    new.weight_quant.frozen = True  # the grid is the algorithm's (GPTQ's), never re-derived from the weight
    new.input_scale = nn.Buffer(torch.ones(layer.in_features, dtype=layer.weight.dtype)) if input_scale else None
    new.weight_quant.refresh(new.weight)
    return new.train(layer.training)


@torch.no_grad()
def _set_grid(layer: WeightOnlyLinear, w_hat: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    layer.weight.copy_(w_hat)
    layer.weight_quant.scale.copy_(scale)
    layer.weight_quant.zero_point.copy_(zero_point)


@register(FLOAT_TWIN, WeightOnlyLinear)
@torch.no_grad()
def float_weight_only(layer: WeightOnlyLinear) -> nn.Module:
    """The plain ``nn.Linear`` on the dequantized weight, wrapped in ``ScaledLinear`` when the layer has an input
    scale (registered float-twin handler)."""
    plain = typing.cast(nn.Linear, float_layer(layer))
    return plain if layer.input_scale is None else ScaledLinear(plain, layer.input_scale)


register(PACK, WeightOnlyLinear)(pack_state_dict)  # codes packed like any fake-quant layer's (4 bits: 2 per byte)


# ------------------------------------------------------------------------------------------------------ orchestration


class _Captured(Exception):
    """Stops the forward pass once the layer being calibrated has seen its input."""


def _layer_inputs(model: nn.Module, layer: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs ``layer`` receives on each batch, as ``(rows, in_features)``; the pass stops at the layer."""
    seen: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        raise _Captured

    handle = layer.register_forward_pre_hook(capture)
    try:
        for x in batches:
            try:
                run_batches(model, [x])
            except _Captured:
                continue
    finally:
        handle.remove()
    return seen


def _plan(model: nn.Module, cfg: QuantConfig) -> tuple[list[LayerSpec], dict[str, str]]:
    """``plan_layers`` limited to Linear layers, every spec on the asymmetric per-group grid; with
    ``keep_first_last_8bit`` the first and last of these Linear layers get 8 bits unless an override names them."""
    flat = copy.copy(cfg)
    flat.keep_first_last_8bit = False  # the ends are the first / last Linear layers, not a Conv2d kept in float
    flat.algorithm = None  # embeddings are planned as for PTQ: symmetric per-row codes (8 bits unless overridden)
    specs, skipped = plan_layers(model, flat)
    kept, tables = [], []
    for spec in specs:
        if spec.kind == "Embedding":  # half of a small transformer's bytes: int8 rows, gathered as codes
            tables.append(spec)
            continue
        if spec.kind != "Linear" or type(model.get_submodule(spec.name)) is not nn.Linear:
            skipped[spec.name] = "weight-only quantization covers nn.Linear layers (MatMulNBits); kept in float"
            continue
        if spec.act_bits is not None:
            raise UsageError(
                f"quantize: layer {spec.name!r}: weight-only quantization (algorithm={cfg.to_dict()['algorithm']!r}) "
                "keeps activations in float; drop the override's act_bits"
            )
        if spec.weight_bits not in (4, 8):
            raise UsageError(f"quantize: layer {spec.name!r}: weight-only needs 4 or 8 bits, got {spec.weight_bits}")
        spec.group_size = spec.group_size or cfg.group_size
        check_group_size(spec.group_size, f"quantize: layer {spec.name!r}")
        spec.scheme, spec.granularity = "affine", "per_group"
        kept.append(spec)
    if cfg.keep_first_last_8bit and kept:
        for spec in {kept[0].name: kept[0], kept[-1].name: kept[-1]}.values():
            if not any(matches(spec.name, pattern) for pattern in cfg.overrides):
                spec.weight_bits = 8
    return tables + kept, skipped


def _producers(model: nn.Module, names: list[str]) -> dict[str, str]:
    """``{layer: module}`` where ``module`` (a LayerNorm / RMSNorm with a weight, or a Linear, possibly followed
    by a ReLU) computes the layer's input and the layer is its only reader: AWQ's ``1/s`` folds into it exactly.
    Empty when the model cannot be traced with torch.fx."""
    wanted = set(names)
    modules = dict(model.named_modules())
    graph = trace_with_leaves(model, wanted)
    if graph is None:
        return {}
    found = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted or not node.args:
            continue
        source = node.args[0]
        relu = (
            isinstance(source, torch.fx.Node)
            and len(source.users) == 1
            and (
                (source.op == "call_module" and isinstance(modules.get(str(source.target)), nn.ReLU))
                or (source.op == "call_function" and source.target in (F.relu, torch.relu))
            )
        )
        if relu:
            source = source.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        producer = modules.get(str(source.target))
        norm = isinstance(producer, nn.LayerNorm | nn.RMSNorm) and producer.weight is not None
        if norm and relu:
            continue  # a norm's bias shifts what the ReLU clips: the scale does not commute through it
        if norm or type(producer) is nn.Linear:
            found[str(node.target)] = str(source.target)
    return found


@torch.no_grad()
def _fold_input_scale(producer: nn.Module, inverse: torch.Tensor) -> None:
    """Multiply ``producer``'s output channels by ``inverse`` (``1/s``, positive) in place."""
    weight = typing.cast(torch.Tensor, producer.weight)  # a Linear's rows, a norm's per-channel weight
    weight.mul_(inverse.unsqueeze(1) if isinstance(producer, nn.Linear) else inverse)
    bias = getattr(producer, "bias", None)
    if bias is not None:
        bias.mul_(inverse)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    return typing.cast(nn.Linear, model.get_submodule(name))  # planned layers are nn.Linear (or WeightOnlyLinear)


def _awq_(
    model: nn.Module, specs: list[LayerSpec], batches: list[torch.Tensor], settings: WeightOnlySettings
) -> tuple[dict[str, str], dict[str, float]]:
    """AWQ's scales from the float model's inputs, applied before any rounding: ``W diag(s)`` in each layer, ``1/s``
    folded upstream or kept as the layer's input scale. Returns ``({layer: producer folded into}, {layer: alpha})``."""
    producers = _producers(model, [s.name for s in specs])
    scales, alphas = {}, {}
    for spec in specs:
        layer = _linear(model, spec.name)
        rows = torch.cat(_layer_inputs(model, layer, batches))
        rows = rows[:: max(1, math.ceil(rows.shape[0] / settings.max_rows))]
        scales[spec.name], alphas[spec.name] = awq_search(
            layer.weight.detach(), rows, spec.weight_bits, spec.group_size, settings.awq_grid
        )
    folded = {}
    for spec in specs:
        layer, scale = _linear(model, spec.name), scales[spec.name]
        with torch.no_grad():
            layer.weight.mul_(scale)
        producer = producers.get(spec.name)
        if producer is not None:
            _fold_input_scale(model.get_submodule(producer), 1 / scale)
            folded[spec.name] = producer
        else:
            scaled = weight_only_layer(layer, spec, input_scale=True)
            typing.cast(torch.Tensor, scaled.input_scale).copy_(1 / scale)
            set_module(model, spec.name, scaled)
    return folded, alphas


def _hessian(rows: list[torch.Tensor]) -> torch.Tensor:
    """``2/n X^T X`` over the calibration rows (float64)."""
    count = sum(r.shape[0] for r in rows)
    total = torch.zeros(rows[0].shape[1], rows[0].shape[1], dtype=torch.float64)
    for r in rows:
        total += 2 * r.double().T @ r.double()
    return total / max(count, 1)


def quantize_weight_only(
    model: nn.Module, cfg: QuantConfig, train_data: Any = None, *, version: int = 1
) -> tuple[nn.Module, dict[str, Any]]:
    """Weight-only block quantization of a copy of ``model``: ``(quantized model, record)`` (``slimkit.quantize``
    calls it when ``cfg.algorithm`` is set; ``version``: the record's). GPTQ and AWQ need calibration inputs.

    Example:
        >>> cfg = QuantConfig(weight_bits=4, act_bits=None, group_size=32, algorithm="awq")   # doctest: +SKIP
        >>> qmodel, record = quantize_weight_only(model, cfg, torch.randn(256, 64))          # doctest: +SKIP
    """
    algorithm = WeightOnlyAlgorithm(cfg.algorithm)
    new = copy.deepcopy(model).eval()
    linearized = linearize(new)  # transformers' Conv1D (GPT-2) is quantized as the Linear it is
    specs, skipped = _plan(new, cfg)
    tables = [spec for spec in specs if spec.kind == "Embedding"]
    specs = [spec for spec in specs if spec.kind != "Embedding"]
    if not specs:
        raise UsageError(f"quantize: no nn.Linear layer left to quantize (skipped: {', '.join(skipped) or 'none'})")
    if algorithm is not WeightOnlyAlgorithm.RTN and train_data is None:
        raise UsageError(f"quantize: algorithm={algorithm.value!r} needs calibration data (input tensors)")
    batches = calibration_batches(train_data, cfg.batch_size, cfg.calibration_batches) if train_data is not None else []
    settings = cfg.weight_only
    folded: dict[str, str] = {}
    stats: dict[str, Any] = {}
    prepare(new, tables)  # embeddings first: GPTQ / AWQ calibrate on the rows the quantized model looks up
    if algorithm is WeightOnlyAlgorithm.AWQ:
        folded, stats["awq_alpha"] = _awq_(new, specs, batches, settings)
    for spec in specs:  # in module order: GPTQ sees the inputs of the layers already quantized (sequential)
        layer = _linear(new, spec.name)
        if not isinstance(layer, WeightOnlyLinear):
            layer = weight_only_layer(layer, spec)
            set_module(new, spec.name, layer)
        if algorithm is WeightOnlyAlgorithm.GPTQ:
            grid = gptq_quantize(
                layer.weight,
                _hessian(_layer_inputs(new, layer, batches)),
                spec.weight_bits,
                spec.group_size,
                damp=settings.damp,
                block_size=settings.block_size,
                act_order=settings.act_order,
                name=spec.name,
            )
        else:
            grid = rtn_quantize(layer.weight.detach(), spec.weight_bits, spec.group_size)
        _set_grid(layer, *grid)
    layers = []
    for spec in tables:
        entry = spec.to_dict()
        entry.update(layer_summary(typing.cast(Any, new.get_submodule(spec.name))))  # a QuantEmbedding
        layers.append(entry)
    for spec in specs:
        entry = spec.to_dict()
        layer = typing.cast(WeightOnlyLinear, new.get_submodule(spec.name))
        entry.update(layer_summary(layer))
        entry["input_scale"] = layer.input_scale is not None
        entry["awq_folded_into"] = folded.get(spec.name)
        layers.append(entry)
    record = {
        "version": version,
        "config": cfg.to_dict(),
        "method": METHOD,
        "algorithm": algorithm.value,
        "linearized": linearized,
        "layers": layers,
        "skipped": skipped,
        "stats": stats,
    }
    record_step(new, model, "quantize", record)
    return new.eval(), record


def replay_weight_only(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Rebuild the ``WeightOnlyLinear`` layers of a weight-only record on a fresh float model (in place); load the
    quantized state_dict afterwards (AWQ's folded scales are ordinary weights)."""
    linearize(model, only=list(record.get("linearized", [])))
    fields = LayerSpec.__dataclass_fields__
    for entry in record["layers"]:
        spec = LayerSpec(**{k: v for k, v in entry.items() if k in fields})
        try:
            layer = model.get_submodule(spec.name)
        except AttributeError:
            raise UsageError(f"replay: the model has no layer {spec.name!r} named in the quantization record") from None
        if spec.kind == "Embedding":
            if not isinstance(layer, nn.Embedding):
                raise UsageError(f"replay: embedding {spec.name!r} is a {type(layer).__name__}, not an nn.Embedding")
            prepare(model, [spec])
            continue
        if type(layer) is not nn.Linear:
            raise UsageError(f"replay: weight-only layer {spec.name!r} is a {type(layer).__name__}, not an nn.Linear")
        check_group_size(spec.group_size, f"replay: layer {spec.name!r}")
        set_module(model, spec.name, weight_only_layer(layer, spec, input_scale=bool(entry.get("input_scale"))))
    return model.eval()
