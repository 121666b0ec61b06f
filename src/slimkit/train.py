"""Training and evaluation loops used by every algorithm (pruning fine-tune, distillation, QAT, search).

``fit`` trains the model it is given in place (it is a training loop, not a compression verb) and returns the
history; ``evaluate`` reports accuracy in percent. A pluggable ``loss_fn(outputs, targets, inputs)`` is the hook
distillation and regularizers use.

Devices: ``TrainConfig(device="auto")`` (the default) trains on CUDA when it is available, else on the CPU;
``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` name one. The model (and ``extra_parameters``) and every batch
(tensor, tuple / list or dict of tensors, nested) are moved there for the run; the model comes back on the device
it was on when ``fit`` was called, so the caller finds it where it left it. ``precision="bf16"`` / ``"fp16"`` runs
the forward pass and the loss under ``torch.autocast`` (fp16 only on CUDA, with a gradient scaler).

A user metric: ``score(evaluate, model)`` calls ``evaluate(model) -> float`` (higher is better: an embedding
cosine, a negative perplexity) in eval mode under ``no_grad`` and checks it returned a finite number; ``compress``,
``search`` and the iterative pruning loop check their accuracy budget on it instead of labelled accuracy.

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
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkit.config import Config, check_range, short_repr
from slimkit.errors import InputTypeError, TrainingDiverged, UsageError

__all__ = [
    "EvalResult",
    "Evaluate",
    "FitResult",
    "LossFn",
    "Optimizer",
    "Precision",
    "Schedule",
    "TrainConfig",
    "check_evaluate",
    "eval_mode",
    "evaluate",
    "fit",
    "make_loader",
    "metric_name",
    "module_device",
    "predict",
    "progress_bar",
    "resolve_device",
    "score",
    "seed_everything",
    "to_device",
]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(outputs, targets, inputs) -> scalar loss``; ``inputs`` lets a loss run a teacher on the batch."""

Evaluate = Callable[[nn.Module], float]
"""``evaluate(model) -> float``: a user metric, higher is better (``compress`` / ``search`` / ``prune``'s budget)."""


class Optimizer(str, enum.Enum):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


class Schedule(str, enum.Enum):
    COSINE = "cosine"
    CONSTANT = "constant"


class Precision(str, enum.Enum):
    """The arithmetic of the forward pass and the loss while training (weights and optimizer stay fp32)."""

    FP32 = "fp32"
    BF16 = "bf16"  # torch.autocast to bfloat16 (CUDA, and CPUs with bf16 kernels)
    FP16 = "fp16"  # torch.autocast to float16 with a gradient scaler (CUDA only)


@dataclass
class TrainConfig(Config):
    """Settings of ``fit``. ``max_batches`` caps the batches per epoch (for quick runs); ``patience`` stops early
    after that many epochs without a better validation accuracy (0: never). ``max_seconds`` bounds the training
    loop's wall-clock time: the cosine schedule runs on whichever is further along, the steps or the clock, so a run
    cut short by the clock has decayed its learning rate to near 0 by the cut, not stopped mid-schedule (the last
    epoch is then a partial one, still validated; the clock is read before each step and epoch, so the bound is
    passed by at most one step and one validation). ``device``: where training runs (``"auto"``: CUDA if available,
    else CPU; or a torch device string); ``precision``: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` mixed precision
    through ``torch.autocast``.

    Example:
        >>> TrainConfig(device="cpu", precision="bf16").precision.value
        'bf16'
    """

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
    max_seconds: float | None = None
    restore_best: bool = True
    progress: bool = True
    device: str = "auto"
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        super().__post_init__()
        _parse_device(self.device)  # the spelling now; whether this machine has it, when fit runs
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
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise UsageError(f"max_seconds={self.max_seconds} must be > 0 (or None: no time limit)")


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
    steps: int = 0  # optimizer steps taken
    out_of_time: bool = False  # TrainConfig.max_seconds ended the run before its last step


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _parse_device(device: str | torch.device) -> torch.device | None:
    """``torch.device(device)``, None for ``"auto"``; a one-line ``UsageError`` for anything torch does not know."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise UsageError(
            f"device={short_repr(device)}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or another torch device"
        )
    if device == "auto":
        return None
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"device={device!r} is not a torch device; use 'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or "
            "'cuda:N'"
        ) from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device to train on: ``"auto"`` is CUDA when available, else CPU; a named device must exist here.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("auto").type in ("cpu", "cuda")
        True
    """
    parsed = _parse_device(device)
    if parsed is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "meta":
        raise UsageError("device='meta' holds no data and cannot train or evaluate; use 'cpu', 'cuda' or 'auto'")
    backend = getattr(torch, parsed.type, None) if parsed.type != "mps" else torch.backends.mps
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UsageError(
            f"device={str(parsed)!r}: {parsed.type} is not available on this machine; use device='cpu', or 'auto' "
            "(CUDA if available, else CPU)"
        )
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise UsageError(
            f"device={str(parsed)!r}: this machine has {count()} {parsed.type} device(s), 0 to {count() - 1}"
        )
    return parsed


def module_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a module without tensors."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor moved to ``device``: a tensor, or a tuple / list / dict of them (nested); other
    values are left as they are.

    Example:
        >>> moved = to_device({"input_ids": torch.zeros(1, 4), "n": 3}, "cpu")
        >>> moved["input_ids"].device.type, moved["n"]
        ('cpu', 3)
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding: a plain dict of the moved values
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for fp32)."""
    if precision is Precision.FP32:
        return contextlib.nullcontext()
    if precision is Precision.FP16 and device.type != "cuda":
        raise UsageError(f"precision='fp16' needs CUDA (training on {device}); use precision='bf16' or 'fp32'")
    dtype = torch.float16 if precision is Precision.FP16 else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_materialized(model: nn.Module) -> None:
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_meta:
            raise UsageError(
                f"the model's {name!r} is on the meta device (no values): load its weights before training "
                "(e.g. model.to_empty(device='cpu') and load_state_dict)"
            )


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
    # torch's fused kernel updates every tensor in one pass (on 2 CPU cores: 6 ms against 19 ms a step for MiniLM)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


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
    device: str | torch.device | None = None,
) -> FitResult:
    """Train ``model`` in place and return its history.

    Args:
        loss_fn: ``(outputs, targets, inputs) -> loss``; cross-entropy by default. It receives the outputs, targets
            and inputs on the training device.
        extra_parameters: trained alongside the model (e.g. distillation adapters); moved with it.
        on_epoch_end: called after each epoch with (epoch, model, history); the model is on the training device.
        checkpoint: a ``.safetensors`` path; the best model so far is written there atomically every epoch.
        device: overrides ``config.device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ...). The model trains there and
            is moved back to the device it was on when ``fit`` was called.

    Example:
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
        >>> model = nn.Linear(4, 2)
        >>> history = fit(model, data, config=TrainConfig(epochs=1, progress=False), device="cpu")
        >>> module_device(model).type
        'cpu'
    """
    cfg = config or TrainConfig()
    target = resolve_device(cfg.device if device is None else device)
    autocast = _autocast(target, cfg.precision)  # fp16 off CUDA fails here, before any work
    _check_materialized(model)
    home = module_device(model)
    extras = [p for p in extra_parameters]
    extra_homes = [p.device for p in extras]
    model.to(target)
    for p in extras:
        if p.device != target:
            p.data = p.data.to(target)
    try:
        return _fit(model, train_data, val_data, cfg, loss_fn, extras, on_epoch_end, checkpoint, target, autocast)
    finally:  # the caller finds the model (and the extra parameters) where it left them
        model.to(home)
        for p, where in zip(extras, extra_homes, strict=True):
            if p.device != where:
                p.data = p.data.to(where)


def _fit(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    val_data: Dataset | DataLoader | None,
    cfg: TrainConfig,
    loss_fn: LossFn | None,
    extra_parameters: list[nn.Parameter],
    on_epoch_end: Callable[[int, nn.Module, FitResult], None] | None,
    checkpoint: str | os.PathLike | None,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
) -> FitResult:
    seed_everything(cfg.seed)
    loss_fn = loss_fn or default_loss
    loader = make_loader(train_data, cfg.batch_size, shuffle=True, seed=cfg.seed)
    optimizer = _optimizer([*model.parameters(), *extra_parameters], cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision is Precision.FP16 else None
    steps_per_epoch = min(len(loader), cfg.max_batches or len(loader))
    history = FitResult()
    clock = _RunClock(history, max(1, cfg.epochs * steps_per_epoch), cfg.max_seconds)
    scheduler = None
    if cfg.schedule is Schedule.COSINE:  # reads the progress itself: the steps, or the clock when that is ahead
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda _: 0.5 * (1 + math.cos(math.pi * clock.fraction()))
        )
    best_state = None
    with progress_bar(cfg.progress) as bar:
        task = bar.add_task("train", total=clock.total, info="")
        for epoch in range(cfg.epochs):
            if clock.spent():  # the clock ran out in a step or in the last epoch's validation
                break
            model.train()
            running, seen = 0.0, 0
            for step, (inputs, targets) in enumerate(loader):
                if step >= steps_per_epoch or clock.spent():
                    break
                inputs, targets = to_device(inputs, device), to_device(targets, device)
                with autocast:
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
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                history.steps += 1
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
        if history.out_of_time:
            bar.update(task, total=history.steps)
    if cfg.restore_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


class _RunClock:
    """How far a run is, as a fraction: of its ``total`` steps, or of ``max_seconds`` when the clock is further along
    (with a bound, the schedule then depends on the machine's speed: the same seed on a slower machine takes fewer
    steps)."""

    def __init__(self, history: FitResult, total: int, max_seconds: float | None) -> None:
        self.history, self.total, self.max_seconds = history, total, max_seconds
        self.start = time.perf_counter()

    def fraction(self) -> float:
        done = self.history.steps / self.total
        if self.max_seconds is not None:
            done = max(done, (time.perf_counter() - self.start) / self.max_seconds)
        return min(done, 1.0)

    def spent(self) -> bool:
        """True once ``max_seconds`` have passed with steps still to run (marks ``history.out_of_time``)."""
        if self.max_seconds is not None and self.history.steps < self.total:
            self.history.out_of_time |= time.perf_counter() - self.start >= self.max_seconds
        return self.history.out_of_time


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
    """``(logits, targets)`` over a whole dataset, in eval mode. Each batch runs on the model's device; the
    logits come back on the device of the data's labels (the CPU for ordinary datasets)."""
    logits, targets = [], []
    device = module_device(model)
    with eval_mode(model):
        for inputs, labels in make_loader(data, batch_size, shuffle=False):
            out = model(to_device(inputs, device))
            logits.append(out.to(labels.device) if isinstance(out, torch.Tensor) else out)
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


def metric_name(evaluate: Callable[..., Any]) -> str:
    """A user metric's name for reports: its qualified name (``embedding_cosine``, ``Scorer.__call__``)."""
    name = getattr(evaluate, "__qualname__", None) or getattr(evaluate, "__name__", None)
    if name is None:  # a callable object (a functools.partial, an instance with __call__)
        inner = getattr(evaluate, "func", None)
        name = metric_name(inner) if inner is not None else type(evaluate).__name__
    return str(name)


def check_evaluate(evaluate: Any, where: str) -> None:
    """``InputTypeError`` unless ``evaluate`` is callable (checked before any work)."""
    if evaluate is not None and not callable(evaluate):
        raise InputTypeError(
            f"{where}: evaluate must be a function model -> float (higher is better), got {type(evaluate).__name__}"
        )


def score(evaluate: Callable[[Any], Any], model: nn.Module | Callable) -> float:
    """``evaluate(model)`` as a float, called in eval mode under ``no_grad`` (the model's modes are restored);
    a one-line ``UsageError`` naming the function when it returns anything but a finite number.

    Example:
        >>> score(lambda m: -float(m.weight.abs().sum()), nn.Linear(2, 2, bias=False)) <= 0
        True
    """
    modes = eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with modes, torch.no_grad():  # an ONNX Runtime session (onnx-auto's variants) is scored as it is
        value = evaluate(model)
    if (isinstance(value, torch.Tensor) and value.numel() == 1) or isinstance(value, np.generic):
        value = value.item()
    name = metric_name(evaluate)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(
            f"evaluate={name} returned {type(value).__name__} {short_repr(value)}; it must return one float "
            "(higher is better, e.g. a mean cosine or a negative perplexity)"
        )
    if not math.isfinite(value):
        raise UsageError(
            f"evaluate={name} returned {value} for the model; it must return a finite float (higher is better)"
        )
    return float(value)


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
