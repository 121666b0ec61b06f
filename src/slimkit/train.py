"""Training and evaluation loops used by every algorithm (pruning fine-tune, distillation, QAT, search).

``fit`` trains the model it is given in place (it is a training loop, not a compression verb) and returns the
history; ``evaluate`` reports accuracy in percent. A pluggable ``loss_fn(outputs, targets, inputs)`` is the hook
distillation and regularizers use.

Example:
    >>> import slimkit
    >>> train, test = slimkit.data.load("digits")                 # 8x8 digits, bundled
    >>> model = slimkit.models.create("mlp", in_features=64, hidden=32)
    >>> history = fit(model, train, test, TrainConfig(epochs=3, progress=False))
    >>> len(history.train_loss), history.best_epoch is not None
    (3, True)
    >>> result = evaluate(model, test)
    >>> result.count, 0 <= result.accuracy <= 100
    (359, True)
"""

from __future__ import annotations

import contextlib
import copy
import enum
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkit.config import Config, check_range
from slimkit.errors import TrainingDiverged, UsageError

__all__ = [
    "EvalResult",
    "FitResult",
    "LossFn",
    "Optimizer",
    "Schedule",
    "TrainConfig",
    "eval_mode",
    "evaluate",
    "fit",
    "make_loader",
    "predict",
    "progress_bar",
    "seed_everything",
]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(outputs, targets, inputs) -> scalar loss``; ``inputs`` lets a loss run a teacher on the batch."""


class Optimizer(str, enum.Enum):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


class Schedule(str, enum.Enum):
    COSINE = "cosine"
    CONSTANT = "constant"


@dataclass
class TrainConfig(Config):
    """Settings of ``fit``. ``max_batches`` caps the batches per epoch (for quick runs); ``patience`` stops early
    after that many epochs without a better validation accuracy (0: never)."""

    epochs: int = 5
    lr: float = 1e-3
    optimizer: Optimizer = Optimizer.ADAM
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    schedule: Schedule = Schedule.COSINE
    seed: int = 0
    patience: int = 0
    max_batches: int | None = None
    restore_best: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1:
            raise UsageError(f"epochs={self.epochs} must be >= 1")
        check_range("lr", self.lr, 0.0, 10.0, low_open=True)
        if self.batch_size < 1:
            raise UsageError(f"batch_size={self.batch_size} must be >= 1")
        if self.weight_decay < 0:
            raise UsageError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.momentum < 0:
            raise UsageError(f"momentum={self.momentum} must be >= 0")
        if self.patience < 0:
            raise UsageError(f"patience={self.patience} must be >= 0 (0: never stop early)")
        if self.max_batches is not None and self.max_batches < 1:
            raise UsageError(f"max_batches={self.max_batches} must be >= 1 (or None: every batch)")


@dataclass
class EvalResult:
    accuracy: float  # percent, 0-100
    loss: float
    count: int


@dataclass
class FitResult:
    """Per-epoch history; ``best_accuracy`` is the best validation accuracy seen (percent)."""

    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_accuracy: float | None = None
    best_epoch: int | None = None
    stopped_early: bool = False


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(data: Dataset | DataLoader, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over ``data`` (returned as is if it already is one), shuffled by a seeded generator."""
    if isinstance(data, DataLoader):
        return data
    if len(data) == 0:  # type: ignore[arg-type]  # torch's Dataset declares no __len__; a map-style one has it
        raise UsageError("the dataset is empty")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)


def _optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer is Optimizer.SGD:
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
        )
    cls = torch.optim.Adam if cfg.optimizer is Optimizer.ADAM else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def default_loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


def progress_bar(enabled: bool) -> Progress:
    """slimkit's transient rich progress bar (off when ``enabled`` is False or $SLIMKIT_NO_PROGRESS is set)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not enabled or bool(os.environ.get("SLIMKIT_NO_PROGRESS")),
        transient=True,
    )


def fit(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    val_data: Dataset | DataLoader | None = None,
    config: TrainConfig | None = None,
    *,
    loss_fn: LossFn | None = None,
    extra_parameters: Iterable[nn.Parameter] = (),
    on_epoch_end: Callable[[int, nn.Module, FitResult], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> FitResult:
    """Train ``model`` in place and return its history.

    Args:
        loss_fn: ``(outputs, targets, inputs) -> loss``; cross-entropy by default.
        extra_parameters: trained alongside the model (e.g. distillation adapters).
        on_epoch_end: called after each epoch with (epoch, model, history).
        checkpoint: a ``.safetensors`` path; the best model so far is written there atomically every epoch.
    """
    cfg = config or TrainConfig()
    seed_everything(cfg.seed)
    loss_fn = loss_fn or default_loss
    loader = make_loader(train_data, cfg.batch_size, shuffle=True, seed=cfg.seed)
    optimizer = _optimizer([*model.parameters(), *extra_parameters], cfg)
    steps_per_epoch = min(len(loader), cfg.max_batches or len(loader))
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    scheduler = None
    if cfg.schedule is Schedule.COSINE:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
    history = FitResult()
    best_state = None
    with progress_bar(cfg.progress) as bar:
        task = bar.add_task("train", total=total_steps, info="")
        for epoch in range(cfg.epochs):
            model.train()
            running, seen = 0.0, 0
            for step, (inputs, targets) in enumerate(loader):
                if step >= steps_per_epoch:
                    break
                outputs = model(inputs)
                try:
                    loss = loss_fn(outputs, targets, inputs)
                except IndexError:
                    _check_labels(outputs, targets, "training data")
                    raise
                if not torch.isfinite(loss):
                    where = f"loss became {loss.item()} at epoch {epoch + 1}, step {step}"
                    row = _first_nonfinite_row(inputs)
                    if row is not None:
                        raise TrainingDiverged(
                            f"{where}: the input batch holds NaN or infinity (row {row} of the "
                            "batch); clean the data or fix the transform that produces it"
                        )
                    raise TrainingDiverged(f"{where}: lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                running += loss.item() * len(targets)
                seen += len(targets)
                bar.update(
                    task, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs}", info=f"loss {running / seen:.4f}"
                )
            history.train_loss.append(running / max(seen, 1))
            if val_data is not None:
                acc = evaluate(model, val_data).accuracy
                history.val_accuracy.append(acc)
                bar.update(task, info=f"loss {history.train_loss[-1]:.4f} val {acc:.2f}%")
                if history.best_accuracy is None or acc > history.best_accuracy:
                    history.best_accuracy, history.best_epoch = acc, epoch
                    best_state = copy.deepcopy(model.state_dict())
                    if checkpoint is not None:
                        from slimkit.models.weights import save_weights

                        save_weights(model, checkpoint, metadata={"epoch": str(epoch), "accuracy": f"{acc:.4f}"})
                elif cfg.patience and epoch - (history.best_epoch or 0) >= cfg.patience:
                    history.stopped_early = True
                    if on_epoch_end:
                        on_epoch_end(epoch, model, history)
                    break
            if on_epoch_end:
                on_epoch_end(epoch, model, history)
    if cfg.restore_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode inside the block, then give every submodule back the mode it had (a model whose
    parts are in different modes, e.g. a frozen batch-norm inside a training model, comes back unchanged).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> with eval_mode(model):
        ...     model.training, model[1].training
        (False, False)
        >>> model.training, model[1].training
        (True, True)
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def predict(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)`` over a whole dataset, in eval mode."""
    logits, targets = [], []
    with eval_mode(model):
        for inputs, labels in make_loader(data, batch_size, shuffle=False):
            logits.append(model(inputs))
            targets.append(labels)
    return torch.cat(logits), torch.cat(targets)


def evaluate(model: nn.Module | Callable, data: Dataset | DataLoader, batch_size: int = 512) -> EvalResult:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` on ``data``.

    ``model`` may also be any callable mapping a batch tensor to logits (an ONNX Runtime wrapper, say).
    """
    if isinstance(model, nn.Module):
        logits, targets = predict(model, data, batch_size)
    else:
        pairs = [(torch.as_tensor(model(x)), y) for x, y in make_loader(data, batch_size, shuffle=False)]
        logits, targets = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
        raise UsageError(
            f"evaluate: expected logits (N, classes) for {targets.shape[0]} targets, got {tuple(logits.shape)}"
        )
    accuracy = (logits.argmax(1) == targets).float().mean().item() * 100.0
    try:
        loss = F.cross_entropy(logits.float(), targets).item()
    except IndexError:
        _check_labels(logits, targets, "evaluation data")
        raise
    return EvalResult(accuracy, loss, len(targets))


def _check_labels(outputs: object, targets: object, where: str) -> None:
    """``UsageError`` when integer class labels fall outside the model's output classes."""
    if not (
        isinstance(outputs, torch.Tensor)
        and outputs.ndim == 2
        and isinstance(targets, torch.Tensor)
        and targets.ndim == 1
        and len(targets)
        and not targets.is_floating_point()
    ):
        return
    classes, low, high = outputs.shape[1], int(targets.min()), int(targets.max())
    if low < 0:
        raise UsageError(f"{where}: label {low} is negative; labels are class indices in [0, {classes})")
    if high >= classes:
        raise UsageError(
            f"{where}: label {high} is outside the model's {classes} output classes [0, {classes}); "
            f"relabel the data or build the model with num_classes={high + 1}"
        )


def _first_nonfinite_row(inputs: object) -> int | None:
    """The first row of a batch (tensor, tuple/list or dict of tensors) holding NaN or infinity, if any."""
    parts = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    for part in parts:
        if isinstance(part, torch.Tensor) and part.is_floating_point() and part.ndim and len(part):
            bad = ~torch.isfinite(part.detach()).reshape(len(part), -1).all(1)
            if bad.any():
                return int(bad.nonzero()[0])
    return None
