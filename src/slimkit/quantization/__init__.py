"""Quantization from int8 down to ternary and binary: ``quantize(model, QuantConfig(...), data)``.

The returned model is a NEW fake-quant model (evaluable and trainable in PyTorch); ``result.record`` is the
JSON-safe per-layer spec and statistics. ``replay_`` rebuilds the module structure on a fresh float model and
``pack_state_dict`` / ``unpack_state_dict`` store the weights as packed integer codes (see ``pack.py``).

Example:
    >>> train, test = slimkit.data.load("mnist10k")                                    # doctest: +SKIP
    >>> result = quantize(model, QuantConfig(weight_bits=8, act_bits=8, method="ptq"), train)  # doctest: +SKIP
    >>> slimkit.train.evaluate(result.model, test).accuracy                           # doctest: +SKIP
    97.9
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.errors import InputTypeError, UsageError, renamed_keyword
from slimkit.history import record_step
from slimkit.quantization.config import (
    LayerSpec,
    Method,
    PTQSettings,
    QATSettings,
    QuantConfig,
    Scheme,
    WeightOnlyAlgorithm,
    WeightOnlySettings,
    plan_layers,
)
from slimkit.quantization.conv1d import linearize
from slimkit.quantization.dynamic import decompose
from slimkit.quantization.functional import find_weight_readers, redirect_
from slimkit.quantization.math import Granularity, ObserverKind
from slimkit.quantization.pack import pack_state_dict, unpack_state_dict
from slimkit.quantization.ptq import (
    activation_feeders,
    attach_output_quant,
    calibrate,
    calibration_batches,
    correct_bias,
    find_conv_bn,
    fold_bn,
    fold_structure,
    layer_summary,
    prepare,
    quant_layers,
    residual_feeders,
    run_batches,
)

__all__ = [
    "Granularity",
    "LayerSpec",
    "Method",
    "ObserverKind",
    "PTQSettings",
    "QATSettings",
    "QuantConfig",
    "QuantResult",
    "Scheme",
    "WeightOnlyAlgorithm",
    "WeightOnlySettings",
    "pack_state_dict",
    "quantize",
    "replay",
    "replay_",
    "unpack_state_dict",
]

RECORD_VERSION = 1


@dataclass
class QuantResult:
    """``model``: the fake-quant model; ``record``: JSON-safe per-layer spec, scales summary and statistics."""

    model: nn.Module
    record: dict[str, Any] = field(default_factory=dict)


def _check_finite(model: nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UsageError(
                f"quantize: {name} contains NaN or inf; fix the weights (or, if it appeared while "
                "quantizing, the activations) before quantizing"
            )


@renamed_keyword("data", "train_data")  # data= was its name before 0.2 (one name and order for data in every verb)
def quantize(
    model: nn.Module, config: QuantConfig | None = None, train_data=None, val_data=None, *, loss_fn=None
) -> QuantResult:
    """Quantize a copy of ``model``; the caller's model is untouched.

    Args:
        config: what to quantize (see ``QuantConfig``); with ``algorithm="rtn" | "gptq" | "awq"`` weight-only
            block quantization of the Linear layers (``weight_only.py``).
        train_data: calibration data for ``ptq`` (Dataset, DataLoader or input tensor), training data for ``qat``;
            optional for ``dynamic`` and ``algorithm="rtn"``.
        val_data: QAT validation data (the best epoch is kept).
        loss_fn: QAT loss hook ``(outputs, targets, inputs) -> loss`` (distillation passes a KD loss).
    """
    cfg = config or QuantConfig()
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"quantize: expected a torch.nn.Module, got {type(model).__name__}")
    _check_finite(model)
    if cfg.algorithm is not None:
        from slimkit.quantization.weight_only import quantize_weight_only

        return QuantResult(*quantize_weight_only(model, cfg, train_data, version=RECORD_VERSION))
    new = copy.deepcopy(model).eval()
    linearized = linearize(new)  # transformers' Conv1D (GPT-2) is a Linear with its weight transposed
    # LSTM / GRU / attention as Linear layers (those the user keeps in float stay whole); static methods take only
    # the attention (its projections see one calibrated range each; a recurrence's per-step states do not)
    decomposed = decompose(new, skip=cfg.ignore, only=None if cfg.method is Method.DYNAMIC else _attention(new))
    specs, skipped = plan_layers(new, cfg, decomposed)
    if not specs:
        raise UsageError(
            f"quantize: no Linear or Conv2d layer left to quantize (skipped: {', '.join(skipped) or 'none'})"
        )
    needs_data = cfg.method is Method.QAT or (
        cfg.method is Method.PTQ
        and (cfg.ptq.bias_correction or cfg.ptq.adaround or any(s.act_bits is not None for s in specs))
    )
    if needs_data and train_data is None:
        raise UsageError(f"quantize: method={cfg.method.value!r} needs data (calibration or training set)")
    batches = calibration_batches(train_data, cfg.batch_size, cfg.calibration_batches) if train_data is not None else []
    readers: dict[str, str] = {}
    if batches:  # a layer the forward never calls: read through F.linear (redirected), or unused (kept float)
        readers, unused = _weight_readers(new, [s.name for s in specs], batches[0])
        skipped.update(unused)
        specs = [s for s in specs if s.name not in unused]
    pairs = find_conv_bn(new) if cfg.fold_bn else []
    qat = cfg.method is Method.QAT
    if not qat:
        fold_bn(new, pairs)
    reference = copy.deepcopy(new) if cfg.ptq.adaround else None
    if reference is not None:  # AdaRound captures the float layers' inputs with hooks
        redirect_(reference, readers, float_layers=True)
    prepare(new, specs, cfg.observer.value, learnable=qat and cfg.qat.lsq)
    redirect_(new, readers)
    stats: dict[str, Any] = {}
    if batches:
        calibrate(new, batches)
    if reference is not None and batches:
        from slimkit.quantization.adaround import adaround

        stats["adaround"] = adaround(
            new, reference, batches, cfg.ptq.adaround_iters, cfg.ptq.adaround_lr, seed=cfg.seed
        )
    if cfg.method is Method.PTQ and cfg.ptq.bias_correction and batches:
        stats["bias_correction_max_abs"] = correct_bias(new, batches)
    if qat:
        from slimkit.quantization.qat import train_qat

        history = train_qat(new, train_data, val_data, cfg, loss_fn)
        stats["qat_train_loss"] = history.train_loss
        stats["qat_val_accuracy"] = history.val_accuracy
        fold_bn(new, pairs)
        grids = {name: layer.weight_quant.granularity for name, layer in quant_layers(new)}
        for spec in specs:  # folding a BN into a per-tensor learned grid makes it per-channel
            spec.granularity = grids.get(spec.name, spec.granularity)
    stats["quantized_residual_outputs"] = _quantize_residual_outputs(new, specs, cfg, batches)
    new.eval()
    _check_finite(new)
    layers = []
    by_name = dict(quant_layers(new))
    for spec in specs:
        entry = spec.to_dict()
        layer: Any = by_name[spec.name] if spec.name in by_name else new.get_submodule(spec.name)  # an embedding
        entry.update(layer_summary(layer))
        layers.append(entry)
    record = {
        "version": RECORD_VERSION,
        "config": cfg.to_dict(),
        "method": cfg.method.value,
        "folded": [list(p) for p in pairs],
        "linearized": linearized,
        "decomposed": decomposed,
        "redirected": readers,
        "learnable": qat and cfg.qat.lsq,
        "observer": cfg.observer.value,
        "layers": layers,
        "skipped": skipped,
        "stats": stats,
    }
    record_step(new, model, "quantize", record)
    return QuantResult(new, record)


def _quantize_residual_outputs(
    model: nn.Module, specs: list[LayerSpec], cfg: QuantConfig, batches: list[torch.Tensor]
) -> list[str]:
    """8-bit static models: quantize the outputs of layers feeding a residual add or a SiLU / sigmoid / hardswish
    gate (calibrated on the same batches, after bias correction / QAT and BN folding), so the runtime keeps the whole
    residual block, and EfficientNet / MobileNetV3 blocks with their squeeze-excitation, in integers."""
    if not batches:
        return []
    static8 = [s.name for s in specs if s.act_bits == 8 and not s.dynamic]
    feeders = set(residual_feeders(model, static8)) | set(activation_feeders(model, static8))
    names = [name for name in static8 if name in feeders]
    for spec in specs:
        if spec.name in names:
            spec.output_act_bits = 8
    if names:
        calibrate(model, batches, only=attach_output_quant(model, names, cfg.observer.value))
    return names


def replay_(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Rebuild the fake-quant structure of ``record`` on a fresh float ``model`` (in place; returned in eval
    mode). Load the quantized state_dict afterwards.

    Example:
        >>> q = replay_(slimkit.models.create("mlp"), result.record)          # doctest: +SKIP
        >>> q.load_state_dict(result.model.state_dict())                     # doctest: +SKIP
    """
    version = record.get("version")
    if version != RECORD_VERSION:
        raise UsageError(f"quantization record version {version!r} is not supported (expected {RECORD_VERSION})")
    if record.get("method") == "weight_only":
        from slimkit.quantization.weight_only import replay_weight_only

        return replay_weight_only(model, record)
    linearize(model, only=list(record.get("linearized", [])))
    fold_structure(model, [tuple(p) for p in record["folded"]])
    if record.get("decomposed"):
        names = decompose(model, only=record["decomposed"])
        if names != record["decomposed"]:
            raise UsageError(
                f"replay: the record's LSTM / GRU / attention layers {record['decomposed']} do not match "
                f"the model's {names}"
            )
    fields = LayerSpec.__dataclass_fields__
    specs = [LayerSpec(**{k: v for k, v in layer.items() if k in fields}) for layer in record["layers"]]
    for spec in specs:
        try:
            model.get_submodule(spec.name)
        except AttributeError:
            raise UsageError(f"replay: the model has no layer {spec.name!r} named in the quantization record") from None
    prepare(model, specs, record.get("observer", "minmax"), learnable=bool(record.get("learnable")))
    readers = record.get("redirected", {})
    if not isinstance(readers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in readers.items()):
        raise UsageError("replay: the quantization record's 'redirected' must map layer names to module names")
    for layer_name, reader in readers.items():
        try:
            model.get_submodule(reader)
        except AttributeError:
            raise UsageError(f"replay: the model has no module {reader!r} (reads {layer_name!r}'s weight)") from None
    redirect_(model, readers)
    for _, layer in quant_layers(model):
        if layer.input_quant is not None:
            layer.input_quant.observer = None
    return model.eval()


replay = replay_  # the name ``slimkit.history`` looks up for every kind of step (it mutates: prefer ``replay_``)


def _attention(model: nn.Module) -> list[str]:
    """The ``nn.MultiheadAttention`` modules of ``model`` (what static quantization decomposes)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]


def _weight_readers(model: nn.Module, names: list[str], batch: Any) -> tuple[dict[str, str], dict[str, str]]:
    """Of the named layers, those whose forward one pass on ``batch`` never calls: ``({layer: the module whose forward
    reads its weight through F.linear / F.conv2d}, {layer: why it stays float})``; a warning names the layers whose
    weights are read in a way that cannot be redirected."""
    unused = _unused_layers(model, names, batch)
    if not unused:
        return {}, {}
    order = [name for name in names if name in unused]
    readers, problems = find_weight_readers(model, order, lambda: run_batches(model, [batch]))
    kept = {}
    for name in order:
        if name in problems:
            kept[name] = f"its forward() never runs; its weight is read directly and {problems[name]}; kept in float"
        elif name not in readers:
            kept[name] = "its forward() never runs on the calibration data and nothing reads its weight; kept in float"
    if problems:
        warnings.warn(
            "quantize: layer(s) "
            + "; ".join(f"{name} ({problems[name]})" for name in order if name in problems)
            + " are used through their weights, not their forward; kept in float",
            stacklevel=3,
        )
    return readers, kept


def _unused_layers(model: nn.Module, names: list[str], batch: torch.Tensor) -> set[str]:
    """Which of the named layers one forward pass on ``batch`` never calls."""
    called: set[str] = set()
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: called.add(name))
        for name in names
    ]
    try:
        run_batches(model, [batch])  # a model that fails on the data says so in one line
    finally:
        for handle in handles:
            handle.remove()
    return set(names) - called
