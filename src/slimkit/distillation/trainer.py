"""Distillation training: ``distill`` (a teacher trains a copy of the student) and ``kd_loss_fn`` (the recovery hook).

The teacher always runs frozen: in eval mode, under ``torch.no_grad``, never handed to the optimizer; the mode of
each of its modules is restored afterwards, so the caller's teacher is left as it was. Everything else is
``slimkit.train.fit`` with a distillation ``loss_fn``; hint adapters train alongside the student through
``extra_parameters``.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkit.config import nearest
from slimkit.distillation.config import DistillConfig, LayerPairs
from slimkit.distillation.losses import attention_map, attention_transfer_loss, hint_adapter, hint_loss, hinton_loss
from slimkit.errors import InputTypeError, UsageError
from slimkit.history import record_step
from slimkit.train import FitResult, LossFn, eval_mode, evaluate, fit, predict

__all__ = ["DistillResult", "distill", "kd_loss_fn"]

Data = Dataset | DataLoader


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
    focal_gamma); hints need ``distill``. The teacher is not modified: each call switches it to eval mode for its
    forward pass and then restores the mode of every module.

    Args:
        config: a ``DistillConfig``, or the temperature as a number (then ``alpha`` is the soft-term weight,
            0.9 by default). ``None`` means ``DistillConfig()``.

    Example:
        >>> teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
        >>> loss_fn = kd_loss_fn(teacher, 4.0, alpha=0.9)
        >>> inputs, labels = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss_fn(student(inputs), labels, inputs).ndim, teacher.training
        (0, True)
        >>> fit(pruned, train, val, TrainConfig(epochs=3), loss_fn=loss_fn)    # doctest: +SKIP
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
        raise InputTypeError(
            f"kd_loss_fn: config must be a DistillConfig or a temperature, got {type(config).__name__}"
        )
    temperature, weight, gamma = cfg.temperature, cfg.alpha, cfg.focal_gamma

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        # eval mode for every call (dropout/batch-norm updates would corrupt the targets), the caller's mode after
        with eval_mode(teacher), torch.no_grad():
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
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, module in _layers(model, names, role).items():
            self.handles.append(module.register_forward_hook(self._hook(name, only_with_grad)))

    def _hook(self, name: str, only_with_grad: bool) -> Callable[[nn.Module, Any, Any], None]:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
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
        return _size(self.data)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        inputs, label = self.data[index]
        return inputs, torch.tensor([int(label), index])


def _size(data: Dataset) -> int:
    return len(data)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; a map-style one has it


def _probe_inputs(data: Data, n: int = 8) -> torch.Tensor:
    if isinstance(data, DataLoader):
        return next(iter(data))[0][:n]
    if _size(data) == 0:
        raise UsageError("distill: the training data is empty")
    return torch.stack([data[i][0] for i in range(min(n, _size(data)))])


def _check_cacheable(data: Data) -> Dataset:
    """``data`` itself, once known to be a Dataset that reads the same example twice (its logits can be cached)."""
    if isinstance(data, DataLoader):
        raise UsageError("cache_teacher=True needs a Dataset (the logits are stored per example), not a DataLoader")
    for i in range(min(2, _size(data))):
        if not torch.equal(data[i][0], data[i][0]):
            raise UsageError(
                f"cache_teacher=True needs data without augmentation, but example {i} of the training "
                "data differs between two reads: set cache_teacher=False"
            )
    return data


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
    train_data: Data | None = None,
    val_data: Data | None = None,
) -> DistillResult:
    """Train a copy of ``student`` to match ``teacher`` (Hinton KD, plus optional hints and attention transfer).

    The caller's student is not modified; the teacher is only switched to eval mode for the run (the mode of each
    of its modules is restored afterwards). All checks (output sizes, layer names, feature shapes) run before any
    training.

    Args:
        train_data: the training set (Dataset or DataLoader of ``(inputs, labels)``); required.
        val_data: validation set: the best epoch is kept and the record gets teacher/student accuracies.

    Example:
        >>> import slimkit
        >>> train, test = slimkit.data.load("digits")                    # 8x8 digits, bundled
        >>> teacher = slimkit.models.create("mlp", in_features=64, hidden=64)
        >>> student = slimkit.models.create("mlp", in_features=64, hidden=16)
        >>> cfg = DistillConfig(temperature=4.0, alpha=0.9, epochs=1, max_batches=2, progress=False)
        >>> result = distill(student, teacher, cfg, train, test)
        >>> result.model is not student, sorted(result.record["loss_terms"])
        (True, ['hard', 'kd'])
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
    hint_s, hint_t = _pair_names(cfg.hints)
    att_s, att_t = _pair_names(cfg.attention)
    student_features = _Capture(model, hint_s + att_s, "student", only_with_grad=True)
    teacher_features = _Capture(teacher, hint_t + att_t, "teacher", only_with_grad=False)
    try:
        with eval_mode(teacher):
            adapters = _check_and_build(model, teacher, cfg, train_data, student_features, teacher_features)
            history, terms, cached = _train(
                model, teacher, cfg, train_data, val_data, adapters, student_features, teacher_features
            )
    finally:
        student_features.remove()
        teacher_features.remove()
    record = {
        "config": cfg.to_dict(),
        "teacher_cached": cached,
        "train_loss": history.train_loss,
        "loss_terms": dict(terms.per_epoch),
        "val_accuracy": history.val_accuracy,
        "best_epoch": history.best_epoch,
        "adapters": {
            key: {"type": type(a).__name__, "weight_shape": list(getattr(a, "weight", torch.empty(0)).shape)}
            for key, a in adapters.items()
        },
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


def _run(role: str, model: nn.Module, inputs: torch.Tensor) -> Any:
    try:
        return model(inputs)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"the {role} cannot run on the training data (inputs of shape {tuple(inputs.shape)}): {first}"
        ) from exc


def _check_and_build(
    model: nn.Module,
    teacher: nn.Module,
    cfg: DistillConfig,
    train_data: Data,
    student_features: _Capture,
    teacher_features: _Capture,
) -> nn.ModuleDict:
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
        raise UsageError(
            f"output sizes differ: the student predicts {student_out.shape[1]} classes, the teacher "
            f"{teacher_out.shape[1]}; distillation needs one output space (same num_classes)"
        )
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


def _train(
    model: nn.Module,
    teacher: nn.Module,
    cfg: DistillConfig,
    train_data: Data,
    val_data: Data | None,
    adapters: nn.ModuleDict,
    student_features: _Capture,
    teacher_features: _Capture,
) -> tuple[FitResult, _Terms, bool]:
    cache = None
    if cfg.cache_teacher:
        dataset = _check_cacheable(train_data)
        cache, _ = predict(teacher, dataset)
        train_data = _IndexedTargets(dataset)
    terms = _Terms()

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if cache is not None:
            targets, teacher_logits = targets[:, 0], cache[targets[:, 1]]
        else:
            with torch.no_grad():
                teacher_logits = teacher(inputs)
        parts: dict[str, torch.Tensor] = {}
        total = hinton_loss(outputs, teacher_logits, targets, cfg.temperature, cfg.alpha, cfg.focal_gamma, terms=parts)
        for i, (s_name, t_name) in enumerate(cfg.hints):
            parts[f"hint:{s_name}"] = hint_loss(
                student_features.take(s_name), teacher_features.take(t_name), adapters[f"hint{i}"]
            )
            total = total + cfg.hint_weight * parts[f"hint:{s_name}"]
        for s_name, t_name in cfg.attention:
            parts[f"attention:{s_name}"] = attention_transfer_loss(
                student_features.take(s_name), teacher_features.take(t_name)
            )
            total = total + cfg.attention_weight * parts[f"attention:{s_name}"]
        terms.add(parts, len(targets))
        return total

    history = fit(
        model,
        train_data,
        val_data,
        cfg.train,
        loss_fn=loss_fn,
        extra_parameters=adapters.parameters(),
        on_epoch_end=terms.end_epoch,
    )
    return history, terms, cache is not None
