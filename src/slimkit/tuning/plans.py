"""Run one trial's parameters: train with the suggested hyperparameters, or apply a compression plan through the
public verbs (``slimkit.prune`` → fine-tune, optionally distilled from the input model → ``slimkit.quantize``).

This module never implements pruning or quantization itself; it only composes the verbs.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.errors import UsageError
from slimkit.train import FitResult, TrainConfig, fit
from slimkit.tuning.spaces import is_plan_param

__all__ = ["TrialContext", "compression_choices", "run_params", "train_config"]

EpochHook = Callable[[int, nn.Module, FitResult], None]


@dataclass
class TrialContext:
    """What every trial needs besides its parameters."""

    model: nn.Module
    train_data: Any
    val_data: Any
    example_input: torch.Tensor
    epochs: int
    seed: int = 0
    max_batches: int | None = None
    teacher: nn.Module | None = None


def available(module: str) -> bool:
    """True when a slimkit subpackage (``pruning``, ``quantization``, ``distillation``) is installed."""
    try:
        return importlib.util.find_spec(f"slimkit.{module}") is not None
    except (ImportError, ValueError):
        return False


def train_config(params: dict[str, Any], ctx: TrialContext) -> TrainConfig:
    """A ``TrainConfig`` from the trial's training parameters; ``TrainConfig`` defaults for the others."""
    keys = ("lr", "weight_decay", "batch_size", "optimizer", "momentum", "schedule", "epochs")
    kwargs = {k: params[k] for k in keys if k in params}
    kwargs.setdefault("epochs", ctx.epochs)
    kwargs["epochs"] = int(kwargs["epochs"])
    if "batch_size" in kwargs:
        kwargs["batch_size"] = int(kwargs["batch_size"])
    return TrainConfig(**kwargs, seed=ctx.seed, max_batches=ctx.max_batches, progress=False)


def _kd_loss(teacher: nn.Module, params: dict[str, Any]):
    from slimkit.distillation import kd_loss_fn

    return kd_loss_fn(teacher, float(params.get("temperature", 4.0)), alpha=float(params.get("alpha", 0.9)))


def run_params(params: dict[str, Any], ctx: TrialContext, on_epoch_end: EpochHook | None = None) -> nn.Module:
    """The model a trial produces (a new model; ``ctx.model`` is never modified)."""
    plan = {k: v for k, v in params.items() if is_plan_param(k)}
    if plan:
        return run_plan(plan, params, ctx, on_epoch_end)
    model = copy.deepcopy(ctx.model)
    loss_fn = None
    if ctx.teacher is not None and ("temperature" in params or "alpha" in params):
        loss_fn = _kd_loss(ctx.teacher, params)
    fit(model, ctx.train_data, ctx.val_data, train_config(params, ctx), loss_fn=loss_fn,
        on_epoch_end=on_epoch_end)
    return model


def compression_choices() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(pruning criteria, allocations) offered by ``slimkit.pruning``."""
    if not available("pruning"):
        raise UsageError("the 'compression' space needs slimkit.pruning, which is not installed in this build")
    from slimkit.tuning._verbs import prune_choices

    return prune_choices()


def run_plan(plan: dict[str, Any], params: dict[str, Any], ctx: TrialContext,
             on_epoch_end: EpochHook | None) -> nn.Module:
    from slimkit.tuning._verbs import apply_plan

    return apply_plan(plan, params, ctx, on_epoch_end)
