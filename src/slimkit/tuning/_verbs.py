"""A compression plan as a ``Recipe``, run by the step runner ``compress`` uses (``slimkit.steps``).

A plan is ``prune_amount`` (fraction of MACs removed), ``prune_criterion``, ``prune_allocation``, ``bits`` /
``bits/<group>`` (32 float, 8 or 4 uniform, 2 ternary, 1 binary; weights only, the first and last layers stay
8-bit as usual) and ``distill`` (recover with a KD loss from the input model). Its recipe: ``prune`` ->
``quantize`` (QAT, which is the recovery, when some weights go below 8 bits), or ``prune`` -> ``finetune`` (when
pruned or distilled) -> ``quantize`` (post-training int8, when 8 bits is the lowest).

This module never implements pruning or quantization itself; the steps go through the public verbs.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from torch import nn

from slimkit._modules import matches
from slimkit.errors import UsageError
from slimkit.recipe import Recipe, Step, StepKind
from slimkit.steps import StepRunner, run_steps
from slimkit.tuning.context import EpochHook, TrialContext, train_config

__all__ = ["SCHEMES", "apply_plan", "bit_overrides", "plan_recipe"]

SCHEMES = {8: "symmetric", 4: "symmetric", 2: "ternary", 1: "binary"}


def _layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def bit_overrides(model: nn.Module, plan: dict[str, Any]) -> tuple[int | None, dict[str, dict], list[str]]:
    """``(lowest bits, per-layer overrides, layers kept float)`` for ``quantize`` from the plan's bit widths.

    ``bits`` sets every layer, ``bits/<prefix>`` the layers under that module prefix (a longer prefix wins).
    The first and last layers are left to QuantConfig's 8-bit rule. ``lowest`` is None when all stay float.
    """
    layers = _layers(model)
    per_layer: dict[str, int] = {}
    groups = sorted(
        ((k.split("/", 1)[1], int(v)) for k, v in plan.items() if k.startswith("bits/")), key=lambda kv: len(kv[0])
    )
    for name in layers:
        bits = int(plan.get("bits", 32))
        for prefix, value in groups:
            if prefix == "" or matches(name, [prefix]):  # "": every layer; else slimkit's one module-name rule
                bits = value
        if bits not in (32, *SCHEMES):
            raise UsageError(f"plan: bits={bits} for layer {name!r} is not valid; choose 32, 8, 4, 2 or 1")
        per_layer[name] = bits
    ends = {layers[0], layers[-1]} if len(layers) > 1 else set()
    quantized = {n: b for n, b in per_layer.items() if b < 32}
    if not quantized:
        return None, {}, []
    overrides = {
        f"re:{re.escape(n)}": {"weight_bits": b, "scheme": SCHEMES[b]} for n, b in quantized.items() if n not in ends
    }
    floats = [n for n, b in per_layer.items() if b == 32 and n not in ends]
    return min(quantized.values()), overrides, floats


def plan_recipe(plan: dict[str, Any], params: dict[str, Any], ctx: TrialContext) -> Recipe | None:
    """The plan as a Recipe of the API's own configs; None when the plan changes nothing (all float, no pruning,
    no distillation). Pruning keeps module names, so the bit widths are matched on the input model."""
    tc = train_config(params, ctx)
    steps: list[Step] = []
    amount = float(plan.get("prune_amount", 0.0))
    if amount > 0:
        from slimkit.pruning import PruneConfig, Target

        steps.append(
            Step(
                StepKind.PRUNE,
                PruneConfig(
                    amount=amount,
                    target=Target.MACS,
                    importance=plan.get("prune_criterion", "l2"),
                    allocation=plan.get("prune_allocation", "uniform"),
                    seed=ctx.seed,
                ),
            )
        )
    lowest, overrides, floats = bit_overrides(ctx.model, plan)
    recover = amount > 0 or bool(plan.get("distill"))
    if lowest is not None and lowest < 8:  # QAT trains: it is the recovery
        from slimkit.quantization import Method, QATSettings, QuantConfig

        steps.append(
            Step(
                StepKind.QUANTIZE,
                QuantConfig(
                    weight_bits=8,
                    act_bits=None,
                    method=Method.QAT,
                    overrides=overrides,
                    ignore=tuple(floats),
                    batch_size=tc.batch_size,
                    seed=ctx.seed,
                    qat=QATSettings(epochs=tc.epochs, lr=tc.lr, max_batches=ctx.max_batches),
                ),
            )
        )
    else:
        if recover:
            steps.append(Step(StepKind.FINETUNE, tc))
        if lowest is not None:  # 8-bit weights: post-training quantization is enough
            from slimkit.quantization import Method, QuantConfig

            steps.append(
                Step(
                    StepKind.QUANTIZE,
                    QuantConfig(weight_bits=8, act_bits=None, method=Method.PTQ, ignore=tuple(floats), seed=ctx.seed),
                )
            )
    if not steps:
        return None
    # no budget here: the search scores the result itself (max_accuracy_drop is not consulted without a floor)
    return Recipe(steps=steps, name="search-plan", max_accuracy_drop=100.0, recovery_epochs=0, max_backoffs=0)


def apply_plan(
    plan: dict[str, Any], params: dict[str, Any], ctx: TrialContext, on_epoch_end: EpochHook | None
) -> nn.Module:
    """The compressed model of one plan (a new model; ``ctx.model`` is the teacher and is not modified)."""
    recipe = plan_recipe(plan, params, ctx)
    if recipe is None:
        return copy.deepcopy(ctx.model)
    kd = None
    if plan.get("distill"):
        from slimkit.distillation import DistillConfig
        from slimkit.distillation.config import DEFAULT_ALPHA, DEFAULT_TEMPERATURE

        kd = DistillConfig(
            temperature=float(params.get("temperature", DEFAULT_TEMPERATURE)),
            alpha=float(params.get("alpha", DEFAULT_ALPHA)),
        )
    runner = StepRunner(ctx.model, ctx.train_data, ctx.val_data, ctx.example_input, kd=kd, on_epoch_end=on_epoch_end)
    model, _ = run_steps(ctx.model, recipe, runner)  # no floor: a step a verb cannot apply raises
    return model
