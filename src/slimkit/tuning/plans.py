"""Run one trial's parameters: train with the suggested hyperparameters, or run a compression plan as a Recipe
through the step runner ``slimkit.compress`` uses (``slimkit.tuning._verbs``: prune -> recover -> quantize).

This module never implements pruning or quantization itself; it only composes the verbs.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from slimkit.train import fit
from slimkit.tuning import _verbs
from slimkit.tuning.context import EpochHook, TrialContext, train_config
from slimkit.tuning.spaces import available, compression_choices, is_plan_param

__all__ = ["TrialContext", "available", "compression_choices", "run_params", "train_config"]


def _kd_loss(teacher: nn.Module, params: dict[str, Any]) -> Any:
    from slimkit.distillation import kd_loss_fn
    from slimkit.distillation.config import DEFAULT_ALPHA, DEFAULT_TEMPERATURE

    return kd_loss_fn(
        teacher, float(params.get("temperature", DEFAULT_TEMPERATURE)), alpha=float(params.get("alpha", DEFAULT_ALPHA))
    )


def run_params(params: dict[str, Any], ctx: TrialContext, on_epoch_end: EpochHook | None = None) -> nn.Module:
    """The model a trial produces (a new model; ``ctx.model`` is never modified)."""
    plan = {k: v for k, v in params.items() if is_plan_param(k)}
    if plan:
        return _verbs.apply_plan(plan, params, ctx, on_epoch_end)
    model = copy.deepcopy(ctx.model)
    loss_fn = None
    if ctx.teacher is not None and ("temperature" in params or "alpha" in params):
        loss_fn = _kd_loss(ctx.teacher, params)
    fit(model, ctx.train_data, ctx.val_data, train_config(params, ctx), loss_fn=loss_fn, on_epoch_end=on_epoch_end)
    return model
