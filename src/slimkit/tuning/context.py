"""What every trial needs besides its parameters, and the ``TrainConfig`` its training parameters make."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.train import FitResult, TrainConfig

__all__ = ["EpochHook", "TrialContext", "train_config"]

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


def train_config(params: dict[str, Any], ctx: TrialContext) -> TrainConfig:
    """A ``TrainConfig`` from the trial's training parameters; ``TrainConfig`` defaults for the others."""
    keys = ("lr", "weight_decay", "batch_size", "optimizer", "momentum", "schedule", "epochs")
    kwargs = {k: params[k] for k in keys if k in params}
    kwargs.setdefault("epochs", ctx.epochs)
    kwargs["epochs"] = int(kwargs["epochs"])
    if "batch_size" in kwargs:
        kwargs["batch_size"] = int(kwargs["batch_size"])
    return TrainConfig(**kwargs, seed=ctx.seed, max_batches=ctx.max_batches, progress=False)
