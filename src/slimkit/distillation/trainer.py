"""Distillation training: ``distill`` (a teacher trains a copy of the student) and ``kd_loss_fn`` (the recovery hook).

Data may yield inputs only (a tensor, a tuple of positional arguments, a dict of keyword arguments such as
``{"input_ids": ..., "attention_mask": ...}``) or ``(inputs, labels)``; models may return a tensor, a tuple, a dict
or a transformers ``ModelOutput`` (the first tensor is compared unless ``output_key`` names another).

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

from slimkit import _inputs
from slimkit._inputs import call, first_tensor, named_outputs
from slimkit.config import nearest
from slimkit.distillation.config import DistillConfig, LayerPairs, OutputLoss, Pooling
from slimkit.distillation.losses import (
    attention_map,
    attention_transfer_loss,
    hint_adapter,
    hint_loss,
    hinton_loss,
    mean_pool,
    output_distance,
)
from slimkit.errors import InputTypeError, UsageError
from slimkit.history import record_step
from slimkit.train import (
    FitResult,
    LossFn,
    eval_mode,
    evaluate,
    fit,
    make_loader,
    module_device,
    predict,
    resolve_device,
    to_device,
)

__all__ = ["DistillResult", "distill", "kd_loss_fn"]

Data = _inputs.Data


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
            ``DistillConfig``'s default 0.5 when not given). ``None`` means ``DistillConfig()`` (T=1, alpha=0.5).

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
    output_term = _output_term(cfg)
    copies: dict[torch.device, nn.Module] = {}

    def loss_fn(outputs: Any, targets: torch.Tensor, inputs: Any) -> torch.Tensor:
        runner = _teacher_on(teacher, inputs, copies)
        # eval mode for every call (dropout/batch-norm updates would corrupt the targets), the caller's mode after
        with eval_mode(runner), torch.no_grad():
            teacher_out = first_tensor(call(runner, inputs), cfg.output_key)
        return output_term(first_tensor(outputs, cfg.output_key), teacher_out, targets, inputs, None)

    return loss_fn


def _teacher_on(teacher: nn.Module, inputs: Any, copies: dict[torch.device, nn.Module]) -> nn.Module:
    """``teacher``, or a frozen copy of it on the device of ``inputs`` when training runs elsewhere (``fit`` moved
    the student and the batches there; the caller's teacher stays where it is). One copy per device."""
    found = [t for _, t in _inputs.tensors_of(inputs)]
    if not found or found[0].device == module_device(teacher):
        return teacher
    device = found[0].device
    if device not in copies:
        copies[device] = copy.deepcopy(teacher).to(device)
    return copies[device]


OutputTerm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, "dict[str, torch.Tensor] | None"], torch.Tensor]


def _output_term(cfg: DistillConfig) -> OutputTerm:
    """``(student_out, teacher_out, targets, inputs, terms) -> loss``: the output term ``cfg`` asks for (Hinton KD
    with the hard-label term, or the mse / cosine distance, mean-pooled over the attention mask when asked)."""

    def term(
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor,
        inputs: Any,
        parts: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        if cfg.output_loss is OutputLoss.KL:
            return hinton_loss(student, teacher, targets, cfg.temperature, cfg.alpha, cfg.focal_gamma, terms=parts)
        mask = _inputs.attention_mask(inputs)
        if cfg.pooling is Pooling.MEAN:
            student, teacher, mask = mean_pool(student, mask), mean_pool(teacher, mask), None
        loss = output_distance(student, teacher, cfg.output_loss.value, mask)
        if parts is not None:
            parts[cfg.output_loss.value] = loss
        return loss

    return term


class _Selected(nn.Module):
    """A model as ``fit`` / ``evaluate`` call it: inputs of any form in, the compared output tensor out."""

    def __init__(self, model: nn.Module, key: str | None) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, inputs: Any) -> torch.Tensor:
        return first_tensor(call(self.model, inputs), self.key)


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
            if not isinstance(output, torch.Tensor):  # a transformer layer returns a tuple (hidden states first)
                found = named_outputs(output)
                output = found[0][1] if found else None
            if output is not None and (torch.is_grad_enabled() or not only_with_grad):
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


def _check_cacheable(data: Data) -> Dataset:
    """``data`` itself, once known to be a Dataset that reads the same example twice (its logits can be cached)."""
    if isinstance(data, DataLoader):
        raise UsageError("cache_teacher=True needs a Dataset (the logits are stored per example), not a DataLoader")
    for i in range(min(2, _size(data))):
        if not _inputs.same(data[i][0], data[i][0]):
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
    *,
    device: str | torch.device | None = None,
) -> DistillResult:
    """Train a copy of ``student`` to match ``teacher`` (Hinton KD or an output distance, plus optional hints and
    attention transfer).

    The caller's student is not modified; the teacher is only switched to eval mode for the run (the mode of each
    of its modules is restored afterwards). All checks (output sizes, layer names, feature shapes, labels) run
    before any training.

    Args:
        train_data: the training set, a Dataset or DataLoader of inputs (tensor, tuple or dict) or of
            ``(inputs, labels)``; required. Labels are needed only by ``output_loss="kl"`` with ``alpha < 1``.
        val_data: validation set: the best epoch is kept (by accuracy with labels and ``"kl"``, else by the output
            loss) and the record gets teacher/student accuracies, or the output loss and cosine to the teacher.
        device: where the run trains (overrides ``config.train.device``; ``"auto"``: CUDA if available, else CPU).
            The student and the teacher are moved there for the run and batches as they are read; the returned
            student is on the device the caller's student is on, and the teacher is moved back where it was.

    Example:
        >>> import slimkit
        >>> train, test = slimkit.data.load("digits")                    # 8x8 digits, bundled
        >>> teacher = slimkit.models.create("mlp", in_features=64, hidden=64)
        >>> student = slimkit.models.create("mlp", in_features=64, hidden=16)
        >>> cfg = DistillConfig(epochs=1, max_batches=2, progress=False)
        >>> result = distill(student, teacher, cfg, train, test)
        >>> result.model is not student, sorted(result.record["loss_terms"])
        (True, ['hard', 'kd'])
        >>> images = [x for x, _ in train]                                # no labels: compare the outputs
        >>> cfg = DistillConfig(output_loss="cosine", epochs=1, max_batches=2, progress=False)
        >>> sorted(distill(student, teacher, cfg, images).record["loss_terms"])
        ['cosine']
    """
    cfg = config if config is not None else DistillConfig()
    if not isinstance(cfg, DistillConfig):
        raise InputTypeError(f"config must be a DistillConfig, got {type(cfg).__name__}")
    for role, module in (("student", student), ("teacher", teacher)):
        if not isinstance(module, nn.Module):
            raise InputTypeError(f"{role} must be a torch.nn.Module, got {type(module).__name__}")
    if train_data is None:
        raise UsageError("distill needs train_data (a Dataset or DataLoader of inputs or (inputs, labels))")
    target = resolve_device(cfg.train.device if device is None else device)
    model = copy.deepcopy(student)
    hint_s, hint_t = _pair_names(cfg.hints)
    att_s, att_t = _pair_names(cfg.attention)
    student_features = _Capture(model, hint_s + att_s, "student", only_with_grad=True)
    teacher_features = _Capture(teacher, hint_t + att_t, "teacher", only_with_grad=False)
    try:
        with eval_mode(teacher):
            adapters, labelled = _check_and_build(model, teacher, cfg, train_data, student_features, teacher_features)
            val_labelled = val_data is not None and _inputs.probe(val_data)[1]
            teacher_home = module_device(teacher)
            teacher.to(target)
            rates = _silence_dropout(model) if not cfg.dropout_active else {}
            try:
                run = _train(
                    model,
                    teacher,
                    cfg,
                    train_data,
                    labelled,
                    val_data,
                    val_labelled,
                    adapters,
                    student_features,
                    teacher_features,
                    target,
                )
            finally:
                teacher.to(teacher_home)
                for module, rate in rates.items():
                    module.p = rate
    finally:
        student_features.remove()
        teacher_features.remove()
    history, terms, cached, val_outputs = run
    record: dict[str, Any] = {
        "config": cfg.to_dict(),
        "teacher_cached": cached,
        "labelled": labelled,
        "train_loss": history.train_loss,
        "steps": history.steps,
        "out_of_time": history.out_of_time,
        "loss_terms": dict(terms.per_epoch),
        "val_accuracy": history.val_accuracy,
        "val_output_loss": val_outputs.losses,
        "best_epoch": history.best_epoch if val_outputs.best_epoch is None else val_outputs.best_epoch,
        "adapters": {
            key: {"type": type(a).__name__, "weight_shape": list(getattr(a, "weight", torch.empty(0)).shape)}
            for key, a in adapters.items()
        },
        "teacher_accuracy": None,
        "student_accuracy_before": None,
        "student_accuracy": None,
        "student_cosine": None,
    }
    if val_data is not None and val_labelled and cfg.output_loss is OutputLoss.KL:
        record["teacher_accuracy"] = evaluate(_Selected(teacher, cfg.output_key), val_data).accuracy
        record["student_accuracy_before"] = evaluate(_Selected(student, cfg.output_key), val_data).accuracy
        record["student_accuracy"] = evaluate(_Selected(model, cfg.output_key), val_data).accuracy
    elif val_data is not None:
        record["student_cosine"] = _validate(model, teacher, cfg, val_data, val_labelled)[1]
    record_step(model, student, "distill", record)
    return DistillResult(model.eval(), record, adapters)


def _run(role: str, model: nn.Module, inputs: Any, key: str | None) -> torch.Tensor:
    try:
        return first_tensor(call(model, inputs), key)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"the {role} cannot run on the training data (inputs {_inputs.describe(inputs)}): {first}"
        ) from exc
    except InputTypeError as exc:
        raise UsageError(f"the {role}: {exc}") from None


def _check_outputs(cfg: DistillConfig, student_out: torch.Tensor, teacher_out: torch.Tensor) -> None:
    if cfg.output_loss is OutputLoss.KL:
        for role, out in (("student", student_out), ("teacher", teacher_out)):
            if out.ndim != 2:
                raise UsageError(
                    f"the {role} must return logits of shape (batch, classes) for output_loss='kl'; got "
                    f"{tuple(out.shape)} (outputs that are not logits: output_loss='cosine' or 'mse')"
                )
        if student_out.shape[1] != teacher_out.shape[1]:
            raise UsageError(
                f"output sizes differ: the student predicts {student_out.shape[1]} classes, the teacher "
                f"{teacher_out.shape[1]}; distillation needs one output space (same num_classes)"
            )
        return
    if cfg.pooling is Pooling.MEAN and (student_out.ndim != 3 or teacher_out.ndim != 3):
        raise UsageError(
            f"pooling='mean' needs token outputs (N, T, C); the student returns {tuple(student_out.shape)}, the "
            f"teacher {tuple(teacher_out.shape)} (name the token output with output_key=, or pooling='none')"
        )
    s_shape, t_shape = student_out.shape, teacher_out.shape
    if cfg.pooling is Pooling.MEAN:
        s_shape, t_shape = s_shape[::2], t_shape[::2]  # (N, C) after pooling
    if s_shape != t_shape:
        raise UsageError(
            f"output_loss={cfg.output_loss.value!r}: the student's output {tuple(student_out.shape)} and the "
            f"teacher's {tuple(teacher_out.shape)} differ in shape; compare outputs of one width (output_key=), "
            "or inner layers through hints (they learn a projection)"
        )


def _check_and_build(
    model: nn.Module,
    teacher: nn.Module,
    cfg: DistillConfig,
    train_data: Data,
    student_features: _Capture,
    teacher_features: _Capture,
) -> tuple[nn.ModuleDict, bool]:
    """Run both models on a few training examples: check the outputs agree, build the hint adapters, and tell
    whether the data has labels."""
    inputs, labelled = _inputs.probe(train_data)
    if not labelled and cfg.output_loss is OutputLoss.KL and cfg.alpha < 1:
        raise UsageError(
            f"alpha={cfg.alpha} weighs a hard-label term, but the training data yields inputs only: set "
            "alpha=1.0 (soft targets only), or output_loss='cosine' / 'mse', or give (inputs, labels)"
        )
    if cfg.cache_teacher and not labelled:
        raise UsageError("cache_teacher=True needs (inputs, labels) examples; set cache_teacher=False")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the student's hooks capture only when gradients are on
            student_out = _run("student", model, inputs, cfg.output_key)
        with torch.no_grad():
            teacher_out = _run("teacher", teacher, inputs, cfg.output_key)
    finally:
        model.train(was_training)
    _check_outputs(cfg, student_out, teacher_out)
    adapters = nn.ModuleDict()
    for i, (s_name, t_name) in enumerate(cfg.hints):
        s_feat, t_feat = student_features.features[s_name], teacher_features.features[t_name]
        if s_feat.ndim == t_feat.ndim == 3 and s_feat.shape[1] != t_feat.shape[1]:
            raise UsageError(
                f"hint ({s_name!r}, {t_name!r}): token features {tuple(s_feat.shape)} and {tuple(t_feat.shape)} "
                "differ in the number of tokens (N, T, C); pair layers that see the same tokens"
            )
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
    return adapters, labelled


@dataclass
class _ValOutputs:
    """The validation output loss per epoch (when it, not accuracy, picks the best epoch) and the best state."""

    losses: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None


@torch.no_grad()
def _validate(
    model: nn.Module, teacher: nn.Module, cfg: DistillConfig, val_data: Data, labelled: bool
) -> tuple[float, float]:
    """``(mean output loss, mean cosine similarity of the compared outputs)`` of ``model`` against the teacher."""
    term = _output_term(cfg)
    total = cosine = 0.0
    count = 0
    device, teacher_device = module_device(model), module_device(teacher)
    with eval_mode(model), eval_mode(teacher):
        for batch in make_loader(val_data, cfg.train.batch_size, shuffle=False):
            inputs, labels = _inputs.split_batch(batch) if labelled else (batch, None)
            t_out = first_tensor(call(teacher, to_device(inputs, teacher_device)), cfg.output_key).to(device)
            inputs, labels = to_device(inputs, device), to_device(labels, device)
            s_out = first_tensor(call(model, inputs), cfg.output_key)
            rows = _inputs.rows(inputs)
            targets = labels if labels is not None else torch.full((rows,), -1, dtype=torch.long, device=device)
            total += float(term(s_out, t_out, targets, inputs, None)) * rows
            mask = _inputs.attention_mask(inputs)
            if cfg.pooling is Pooling.MEAN:
                s_out, t_out, mask = mean_pool(s_out, mask), mean_pool(t_out, mask), None
            cosine += (1 - float(output_distance(s_out, t_out, "cosine", mask))) * rows
            count += rows
    return total / max(count, 1), cosine / max(count, 1)


def _silence_dropout(model: nn.Module) -> dict[nn.modules.dropout._DropoutNd, float]:
    """Set the rate of every Dropout module of ``model`` to 0; returns the rates to restore."""
    rates = {m: m.p for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)}
    for module in rates:
        module.p = 0.0
    return rates


def _train(
    model: nn.Module,
    teacher: nn.Module,
    cfg: DistillConfig,
    train_data: Data,
    labelled: bool,
    val_data: Data | None,
    val_labelled: bool,
    adapters: nn.ModuleDict,
    student_features: _Capture,
    teacher_features: _Capture,
    device: torch.device,
) -> tuple[FitResult, _Terms, bool, _ValOutputs]:
    cache = None
    if cfg.cache_teacher:
        dataset = _check_cacheable(train_data)
        cache, _ = predict(_Selected(teacher, cfg.output_key), dataset)
        train_data = _IndexedTargets(dataset)
    terms = _Terms()
    output_term = _output_term(cfg)

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor, inputs: Any) -> torch.Tensor:
        if cache is not None:
            targets, teacher_out = targets[:, 0], cache[targets[:, 1].to(cache.device)].to(outputs.device)
        else:
            with torch.no_grad():
                teacher_out = first_tensor(call(teacher, inputs), cfg.output_key)
        parts: dict[str, torch.Tensor] = {}
        total = output_term(outputs, teacher_out, targets, inputs, parts)
        mask = _inputs.attention_mask(inputs)
        for i, (s_name, t_name) in enumerate(cfg.hints):
            parts[f"hint:{s_name}"] = hint_loss(
                student_features.take(s_name), teacher_features.take(t_name), adapters[f"hint{i}"], mask
            )
            total = total + cfg.hint_weight * parts[f"hint:{s_name}"]
        for s_name, t_name in cfg.attention:
            parts[f"attention:{s_name}"] = attention_transfer_loss(
                student_features.take(s_name), teacher_features.take(t_name)
            )
            total = total + cfg.attention_weight * parts[f"attention:{s_name}"]
        terms.add(parts, len(targets))
        return total

    # accuracy picks the best epoch only for logits with labelled validation data; otherwise the output loss does
    by_accuracy = val_data is not None and val_labelled and cfg.output_loss is OutputLoss.KL
    val_outputs = _ValOutputs()

    def end_epoch(epoch: int, wrapped: nn.Module, history: FitResult) -> None:
        terms.end_epoch(epoch, wrapped, history)
        if val_data is None or by_accuracy:
            return
        loss = _validate(model, teacher, cfg, val_data, val_labelled)[0]
        val_outputs.losses.append(loss)
        if val_outputs.best_epoch is None or loss < min(val_outputs.losses[:-1], default=float("inf")):
            val_outputs.best_epoch = epoch
            val_outputs.best_state = copy.deepcopy(model.state_dict())

    history = fit(
        _Selected(model, cfg.output_key),
        _inputs.with_targets(train_data, labelled),
        val_data if by_accuracy else None,
        cfg.train,
        loss_fn=loss_fn,
        extra_parameters=adapters.parameters(),
        on_epoch_end=end_epoch,
        device=device,
    )
    if cfg.train.restore_best and val_outputs.best_state is not None:
        model.load_state_dict(val_outputs.best_state)
    return history, terms, cache is not None, val_outputs
