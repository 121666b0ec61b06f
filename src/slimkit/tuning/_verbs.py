"""Compression plans through the public verbs of slimkit.pruning, slimkit.quantization, slimkit.distillation.

A plan is ``prune_amount`` (fraction of MACs removed), ``prune_criterion``, ``prune_allocation``, ``bits`` /
``bits/<group>`` (32 float, 8 or 4 uniform, 2 ternary, 1 binary; weights only, the first and last layers stay
8-bit as usual) and ``distill`` (recover with a KD loss from the input model). Order: prune → recover
(fine-tune, or QAT when some weights go below 8 bits) → post-training int8 when 8 bits is the lowest.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from slimkit.errors import UsageError
from slimkit.train import fit

__all__ = ["apply_plan", "bit_overrides", "prune_choices"]

# criteria and allocations that need nothing but the model (taylor needs gradients, sensitivity a profile,
# bn_scale BatchNorm layers, random is a baseline)
CRITERIA = ("l1", "l2", "fpgm")
ALLOCATIONS = ("uniform", "global", "proportional")
SCHEMES = {8: "symmetric", 4: "symmetric", 2: "ternary", 1: "binary"}


def prune_choices() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from slimkit.pruning import Allocation, Importance

    crit = tuple(c for c in CRITERIA if c in {m.value for m in Importance})
    alloc = tuple(a for a in ALLOCATIONS if a in {m.value for m in Allocation})
    return crit, alloc


def _layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def bit_overrides(model: nn.Module, plan: dict[str, Any]) -> tuple[int | None, dict[str, dict], list[str]]:
    """``(lowest bits, per-layer overrides, layers kept float)`` for ``quantize`` from the plan's bit widths.

    ``bits`` sets every layer, ``bits/<prefix>`` the layers under that module prefix (a longer prefix wins).
    The first and last layers are left to QuantConfig's 8-bit rule. ``lowest`` is None when all stay float.
    """
    layers = _layers(model)
    per_layer: dict[str, int] = {}
    groups = sorted(((k.split("/", 1)[1], int(v)) for k, v in plan.items() if k.startswith("bits/")),
                    key=lambda kv: len(kv[0]))
    for name in layers:
        bits = int(plan.get("bits", 32))
        for prefix, value in groups:
            if name == prefix or name.startswith(prefix + ".") or prefix == "":
                bits = value
        if bits not in (32, *SCHEMES):
            raise UsageError(f"plan: bits={bits} for layer {name!r} is not valid; choose 32, 8, 4, 2 or 1")
        per_layer[name] = bits
    ends = {layers[0], layers[-1]} if len(layers) > 1 else set()
    quantized = {n: b for n, b in per_layer.items() if b < 32}
    if not quantized:
        return None, {}, []
    overrides = {f"re:{re.escape(n)}": {"weight_bits": b, "scheme": SCHEMES[b]} for n, b in quantized.items()
                 if n not in ends}
    floats = [n for n, b in per_layer.items() if b == 32 and n not in ends]
    return min(quantized.values()), overrides, floats


def apply_plan(plan: dict[str, Any], params: dict[str, Any], ctx: Any, on_epoch_end: Any) -> nn.Module:
    """The compressed model of one plan (a new model; ``ctx.model`` is the teacher and is not modified)."""
    from slimkit.tuning.plans import train_config

    tc = train_config(params, ctx)
    loss_fn = None
    if plan.get("distill"):
        from slimkit.distillation import kd_loss_fn

        loss_fn = kd_loss_fn(ctx.model, float(params.get("temperature", 4.0)), alpha=float(params.get("alpha", 0.9)))
    model = ctx.model
    amount = float(plan.get("prune_amount", 0.0))
    if amount > 0:
        from slimkit.pruning import PruneConfig, prune

        cfg = PruneConfig(amount=amount, target="macs", importance=plan.get("prune_criterion", "l2"),
                          allocation=plan.get("prune_allocation", "uniform"), seed=ctx.seed)
        model = prune(model, cfg, ctx.example_input).model
    lowest, overrides, floats = bit_overrides(model, plan)
    recover = amount > 0 or bool(plan.get("distill"))
    if lowest is not None and lowest < 8:
        from slimkit.quantization import QuantConfig, quantize

        qcfg = QuantConfig(weight_bits=8, act_bits=None, method="qat", overrides=overrides, ignore=tuple(floats),
                           epochs=tc.epochs, lr=tc.lr, batch_size=tc.batch_size, max_batches=ctx.max_batches,
                           seed=ctx.seed)
        return quantize(model, qcfg, ctx.train_data, val_data=ctx.val_data, loss_fn=loss_fn).model
    if recover:
        if model is ctx.model:
            import copy

            model = copy.deepcopy(model)
        fit(model, ctx.train_data, ctx.val_data, tc, loss_fn=loss_fn, on_epoch_end=on_epoch_end)
    if lowest is not None:  # 8-bit weights: post-training quantization is enough
        from slimkit.quantization import QuantConfig, quantize

        qcfg = QuantConfig(weight_bits=8, act_bits=None, method="ptq", ignore=tuple(floats), seed=ctx.seed)
        model = quantize(model, qcfg, ctx.train_data).model
    if model is ctx.model:
        import copy

        model = copy.deepcopy(model)
    return model
