"""Distillation training: ``distill`` (a teacher trains a copy of the student) and ``kd_loss_fn`` (the recovery hook).

The teacher always runs frozen: in eval mode, under ``torch.no_grad``, never handed to the optimizer. Everything
else is ``slimkit.train.fit`` with a distillation ``loss_fn``; hint adapters train alongside the student through
``extra_parameters``.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkit.config import nearest
from slimkit.distillation.config import DistillConfig, LayerPairs
from slimkit.distillation.losses import (
    attention_map,
    attention_transfer_loss,
    focal_loss,
    hint_adapter,
    hint_loss,
    hinton_loss,
    kd_loss,
)
from slimkit.errors import InputTypeError, UsageError
from slimkit.history import record_step
from slimkit.train import FitResult, LossFn, evaluate, fit, predict

__all__ = ["DistillResult", "distill", "kd_loss_fn"]


@dataclass
class DistillResult:
    """The trained student (a new model), the record of the run, and the hint adapters it learned."""

    model: nn.Module
    record: dict[str, Any]
    adapters: nn.ModuleDict = field(default_factory=nn.ModuleDict)


def kd_loss_fn(teacher: nn.Module, config: DistillConfig | float | None = None, alpha: float | None = None) -> LossFn:
    """A ``slimkit.train`` loss ``(outputs, targets, inputs) -> loss`` distilling from a frozen ``teacher``.

    This is the recovery hook of pruning, QAT and the pipeline: the teacher (usually the uncompressed model) runs
    on each batch in eval mode under ``no_grad``. Only the soft/hard terms are used (temperature, alpha,
    focal_gamma); hints need ``distill``.

    Args:
        config: a ``DistillConfig``, or the temperature as a number (then ``alpha`` is the soft-term weight,
            0.9 by default). ``None`` means ``DistillConfig()``.

    Example:
        >>> loss_fn = kd_loss_fn(original, 4.0, alpha=0.9)                              # doctest: +SKIP
        >>> slimkit.train.fit(pruned, train, val, TrainConfig(epochs=3), loss_fn=loss_fn)  # doctest: +SKIP
    """
    if not isinstance(teacher, nn.Module):
        raise InputTypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if isinstance(config, DistillConfig):
        if alpha is not None:
            raise InputTypeError("kd_loss_fn: give alpha either in the DistillConfig or as a number, not both")
        cfg = config
    elif config is None or (isinstance(config, (int, float)) and not isinstance(config, bool)):
        settings: dict[str, Any] = {} if config is None else {"temperature": float(config)}
        if alpha is not None:
            settings["alpha"] = alpha
        cfg = DistillConfig(**settings)
    else:
        raise InputTypeError(f"kd_loss_fn: config must be a DistillConfig or a temperature, "
                             f"got {type(config).__name__}")
    temperature, weight, gamma = cfg.temperature, cfg.alpha, cfg.focal_gamma
    teacher.eval()

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if teacher.training:  # somebody switched it back: dropout/batch-norm updates would corrupt the targets
            teacher.eval()
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        return hinton_loss(outputs, teacher_logits, targets, temperature, weight, gamma)

    return loss_fn


def _layers(model: nn.Module, names: list[str], role: str) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        name = missing[0]
        raise UsageError(f"{role} has no layer {name!r}; {nearest(name, [n for n in modules if n])}")
    return {n: modules[n] for n in names}


class _Capture:
    """Forward hooks keeping the latest output of named layers (cloned: a later in-place ReLU must not alter it)."""

    def __init__(self, model: nn.Module, names: list[str], role: str, only_with_grad: bool) -> None:
        self.features: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, module in _layers(model, names, role).items():
            self.handles.append(module.register_forward_hook(self._hook(name, only_with_grad)))

    def _hook(self, name: str, only_with_grad: bool):
        def keep(module, args, output):
            if isinstance(output, torch.Tensor) and (torch.is_grad_enabled() or not only_with_grad):
                self.features[name] = output.clone()

        return keep

    def take(self, name: str) -> torch.Tensor:
        return self.features.pop(name)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.features.clear()


class _IndexedTargets(Dataset):
    """Wraps a dataset so targets become ``[label, index]``: the loss looks up the cached teacher logits by index."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        inputs, label = self.data[index]
        return inputs, torch.tensor([int(label), index])


def _probe_inputs(data: Dataset | DataLoader, n: int = 8) -> torch.Tensor:
    if isinstance(data, DataLoader):
        return next(iter(data))[0][:n]
    if len(data) == 0:  # type: ignore[arg-type]
        raise UsageError("distill: the training data is empty")
    return torch.stack([data[i][0] for i in range(min(n, len(data)))])  # type: ignore[arg-type]


def _check_cacheable(data: Dataset | DataLoader) -> None:
    if isinstance(data, DataLoader):
        raise UsageError("cache_teacher=True needs a Dataset (the logits are stored per example), not a DataLoader")
    for i in range(min(2, len(data))):  # type: ignore[arg-type]
        if not torch.equal(data[i][0], data[i][0]):
            raise UsageError(f"cache_teacher=True needs data without augmentation, but example {i} of the training "
                             "data differs between two reads: set cache_teacher=False")


class _Terms:
    """Running means of the loss terms, flushed into per-epoch lists."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0
        self.per_epoch: dict[str, list[float]] = defaultdict(list)

    def add(self, terms: dict[str, torch.Tensor], batch: int) -> None:
        for name, value in terms.items():
            self.sums[name] += float(value.detach()) * batch
        self.count += batch

    def end_epoch(self, epoch: int, model: nn.Module, history: FitResult) -> None:
        for name, total in self.sums.items():
            self.per_epoch[name].append(total / max(self.count, 1))
        self.sums, self.count = defaultdict(float), 0


def _pair_names(pairs: LayerPairs) -> tuple[list[str], list[str]]:
    return [s for s, _ in pairs], [t for _, t in pairs]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    config: DistillConfig | None = None,
    train_data: Dataset | DataLoader | None = None,
    val_data: Dataset | DataLoader | None = None,
) -> DistillResult:
    """Train a copy of ``student`` to match ``teacher`` (Hinton KD, plus optional hints and attention transfer).

    The caller's student is not modified; the teacher is only switched to eval mode for the run (its mode is
    restored afterwards). All checks (output sizes, layer names, feature shapes) run before any training.

    Example:
        >>> teacher = slimkit.models.create("mlp_wide", weights="teacher.safetensors")      # doctest: +SKIP
        >>> student = slimkit.models.create("mlp", hidden=30)                               # doctest: +SKIP
        >>> cfg = slimkit.DistillConfig(temperature=4.0, alpha=0.9, epochs=10)               # doctest: +SKIP
        >>> result = slimkit.distill(student, teacher, cfg, train, test)                    # doctest: +SKIP
        >>> result.record["student_accuracy"], result.record["teacher_accuracy"]             # doctest: +SKIP
    """
    cfg = config if config is not None else DistillConfig()
    if not isinstance(cfg, DistillConfig):
        raise InputTypeError(f"config must be a DistillConfig, got {type(cfg).__name__}")
    for role, module in (("student", student), ("teacher", teacher)):
        if not isinstance(module, nn.Module):
            raise InputTypeError(f"{role} must be a torch.nn.Module, got {type(module).__name__}")
    if train_data is None:
        raise UsageError("distill needs train_data (a Dataset or DataLoader of (inputs, labels))")
    model = copy.deepcopy(student)
    teacher_was_training = teacher.training
    teacher.eval()
    hint_s, hint_t = _pair_names(cfg.hints)
    att_s, att_t = _pair_names(cfg.attention)
    student_features = _Capture(model, hint_s + att_s, "student", only_with_grad=True)
    teacher_features = _Capture(teacher, hint_t + att_t, "teacher", only_with_grad=False)
    try:
        adapters = _check_and_build(model, teacher, cfg, train_data, student_features, teacher_features)
        history, terms, cached = _train(model, teacher, cfg, train_data, val_data, adapters,
                                        student_features, teacher_features)
    finally:
        student_features.remove()
        teacher_features.remove()
        teacher.train(teacher_was_training)
    record = {
        "config": cfg.to_dict(),
        "teacher_cached": cached,
        "train_loss": history.train_loss,
        "loss_terms": dict(terms.per_epoch),
        "val_accuracy": history.val_accuracy,
        "best_epoch": history.best_epoch,
        "adapters": {key: {"type": type(a).__name__, "weight_shape": list(getattr(a, "weight", torch.empty(0)).shape)}
                     for key, a in adapters.items()},
        "teacher_accuracy": None,
        "student_accuracy_before": None,
        "student_accuracy": None,
    }
    if val_data is not None:
        record["teacher_accuracy"] = evaluate(teacher, val_data).accuracy
        record["student_accuracy_before"] = evaluate(student, val_data).accuracy
        record["student_accuracy"] = evaluate(model, val_data).accuracy
    record_step(model, student, "distill", record)
    return DistillResult(model.eval(), record, adapters)


def _run(role: str, model: nn.Module, inputs: torch.Tensor):
    try:
        return model(inputs)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"the {role} cannot run on the training data (inputs of shape {tuple(inputs.shape)}): "
                         f"{first}") from exc


def _check_and_build(model: nn.Module, teacher: nn.Module, cfg: DistillConfig, train_data,
                     student_features: _Capture, teacher_features: _Capture) -> nn.ModuleDict:
    """Run both models on a few training examples: check the outputs agree and build the hint adapters."""
    inputs = _probe_inputs(train_data)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the student's hooks capture only when gradients are on
            student_out = _run("student", model, inputs)
        with torch.no_grad():
            teacher_out = _run("teacher", teacher, inputs)
    finally:
        model.train(was_training)
    for role, out in (("student", student_out), ("teacher", teacher_out)):
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UsageError(f"the {role} must return logits of shape (batch, classes); got {shape}")
    if student_out.shape[1] != teacher_out.shape[1]:
        raise UsageError(f"output sizes differ: the student predicts {student_out.shape[1]} classes, the teacher "
                         f"{teacher_out.shape[1]}; distillation needs one output space (same num_classes)")
    adapters = nn.ModuleDict()
    for i, (s_name, t_name) in enumerate(cfg.hints):
        s_feat, t_feat = student_features.features[s_name], teacher_features.features[t_name]
        try:
            adapters[f"hint{i}"] = hint_adapter(tuple(s_feat.shape), tuple(t_feat.shape))
        except ValueError as exc:
            raise UsageError(f"hint ({s_name!r}, {t_name!r}): {exc}") from None
    for s_name, t_name in cfg.attention:
        for role, name, feats in (("student", s_name, student_features), ("teacher", t_name, teacher_features)):
            try:
                attention_map(feats.features[name][:1])
            except ValueError as exc:
                raise UsageError(f"attention ({s_name!r}, {t_name!r}): {role} layer {name!r}: {exc}") from None
    student_features.features.clear()
    teacher_features.features.clear()
    return adapters


def _train(model, teacher, cfg: DistillConfig, train_data, val_data, adapters: nn.ModuleDict,
           student_features: _Capture, teacher_features: _Capture) -> tuple[FitResult, _Terms, bool]:
    cache = None
    if cfg.cache_teacher:
        _check_cacheable(train_data)
        cache, _ = predict(teacher, train_data)
        train_data = _IndexedTargets(train_data)
    terms = _Terms()

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if cache is not None:
            targets, teacher_logits = targets[:, 0], cache[targets[:, 1]]
        else:
            with torch.no_grad():
                teacher_logits = teacher(inputs)
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float32)
        if cfg.alpha > 0:
            parts["kd"] = kd_loss(outputs, teacher_logits, cfg.temperature)
            total = total + cfg.alpha * parts["kd"]
        if cfg.alpha < 1:
            parts["hard"] = focal_loss(outputs, targets, cfg.focal_gamma)
            total = total + (1 - cfg.alpha) * parts["hard"]
        for i, (s_name, t_name) in enumerate(cfg.hints):
            parts[f"hint:{s_name}"] = hint_loss(student_features.take(s_name), teacher_features.take(t_name),
                                                adapters[f"hint{i}"])
            total = total + cfg.hint_weight * parts[f"hint:{s_name}"]
        for s_name, t_name in cfg.attention:
            parts[f"attention:{s_name}"] = attention_transfer_loss(student_features.take(s_name),
                                                                   teacher_features.take(t_name))
            total = total + cfg.attention_weight * parts[f"attention:{s_name}"]
        terms.add(parts, len(targets))
        return total

    history = fit(model, train_data, val_data, cfg.train_config(), loss_fn=loss_fn,
                  extra_parameters=adapters.parameters(), on_epoch_end=terms.end_epoch)
    return history, terms, cache is not None
