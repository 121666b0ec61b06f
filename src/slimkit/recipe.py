"""Recipes: an ordered list of steps (prune, distill, quantize, export) plus an accuracy budget.

A recipe is only a serialization of the configs the API takes (``PruneConfig``, ``DistillConfig``, ``QuantConfig``,
``ExportConfig``): no second schema. In YAML::

    name: fast-cpu
    max_accuracy_drop: 0.5        # points of top-1 accuracy the whole pipeline may lose
    steps:
      - prune: {amount: 0.5, target: macs, importance: l2}
      - distill: {temperature: 4.0, alpha: 0.9, epochs: 2}
      - quantize: {method: ptq, weight_bits: 8, act_bits: 8}
      - export: {format: onnx-int8}

Unknown keys are rejected with the nearest valid name; malformed YAML names the line and column.

Example:
    >>> recipe = Recipe.load("fast-cpu")          # a shipped recipe, a YAML path, or a dict
    >>> [step.kind.value for step in recipe.steps]
    ['prune', 'distill', 'quantize', 'export']
"""

from __future__ import annotations

import enum
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimkit._io import write_text
from slimkit.config import Config, check_range, nearest, to_enum
from slimkit.errors import UsageError

SHIPPED = Path(__file__).with_name("recipes")


class StepKind(str, enum.Enum):
    PRUNE = "prune"
    DISTILL = "distill"
    QUANTIZE = "quantize"
    EXPORT = "export"


class ExportFormat(str, enum.Enum):
    ONNX = "onnx"
    ONNX_INT8 = "onnx-int8"
    ONNX_AUTO = "onnx-auto"  # int8 and fp32 ONNX measured side by side; the faster one inside the budget ships
    TORCH_EXPORT = "torch-export"


@dataclass
class ExportConfig(Config):
    """The deployable format written next to the weights; ``parity`` checks it against PyTorch on the val data.

    ``onnx-auto`` exports fp32, QDQ int8 and (for nets with convolutions and fully connected layers) int8 for the
    fully connected layers only, times them on ONNX Runtime at ``auto_batch_size`` (threads fixed) and, among the
    variants that keep the budget and run within ``size_slack`` (10%) of the fastest, ships the smallest file:
    int8 kernels lose to fp32 on thin convolutions, where quantize/dequantize and layout reorders outweigh the
    cheaper arithmetic.
    """

    format: ExportFormat = ExportFormat.ONNX_INT8
    parity: bool = True
    auto_batch_size: int = 64
    size_slack: float = 0.10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("size_slack", self.size_slack, 0.0, 10.0)
        if self.auto_batch_size < 1:
            raise UsageError(f"auto_batch_size={self.auto_batch_size} must be >= 1")


CONFIG_CLASSES = {
    StepKind.PRUNE: ("slimkit.pruning", "PruneConfig"),
    StepKind.DISTILL: ("slimkit.distillation", "DistillConfig"),
    StepKind.QUANTIZE: ("slimkit.quantization", "QuantConfig"),
    StepKind.EXPORT: ("slimkit.recipe", "ExportConfig"),
}


def config_class(kind: StepKind) -> type[Config]:
    module, name = CONFIG_CLASSES[kind]
    return getattr(importlib.import_module(module), name)


@dataclass
class Step:
    kind: StepKind
    config: Any

    def to_dict(self) -> dict[str, Any]:
        return {self.kind.value: self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, where: str = "step") -> Step:
        if not isinstance(data, dict) or len(data) != 1:
            raise UsageError(f"{where}: a step is a mapping with one key (prune, distill, quantize or export), "
                             f"got {data!r}")
        (key, body), = data.items()
        if key not in {k.value for k in StepKind}:
            raise UsageError(f"{where}: unknown step {key!r}; {nearest(key, [k.value for k in StepKind])}")
        kind = StepKind(key)
        if body is not None and not isinstance(body, dict):
            raise UsageError(f"{where}: the settings of {key!r} must be a mapping, got {body!r}")
        try:
            config = config_class(kind).from_dict(body or {})
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{where} ({key}): {exc}") from exc
        return cls(kind, config)


@dataclass
class Recipe(Config):
    """Ordered steps and the global accuracy budget (points of top-1 accuracy).

    ``recovery_epochs`` bounds the distillation run that repairs a step which broke the budget (SGD at
    ``recovery_lr``: on pruned LeNet-5, KD recovered more than labels with SGD but less with Adam, see
    docs/distillation.md); ``max_backoffs`` is how many times a step's strength is halved before it is skipped.
    """

    steps: list[Step] = field(default_factory=list)
    max_accuracy_drop: float = 1.0
    name: str = "custom"
    recovery_epochs: int = 2
    recovery_lr: float = 0.01
    max_backoffs: int = 2

    def __post_init__(self) -> None:
        self.steps = [s if isinstance(s, Step) else Step.from_dict(s, f"steps[{i}]") for i, s in enumerate(self.steps)]
        check_range("max_accuracy_drop", self.max_accuracy_drop, 0.0, 100.0)
        if self.recovery_epochs < 0 or self.max_backoffs < 0:
            raise UsageError("recovery_epochs and max_backoffs must be >= 0")
        check_range("recovery_lr", self.recovery_lr, 0.0, 10.0, low_open=True)
        self._check_order()

    def _check_order(self) -> None:
        kinds = [s.kind for s in self.steps]
        if not kinds:
            raise UsageError("a recipe needs at least one step (prune, distill, quantize or export)")
        if StepKind.EXPORT in kinds[:-1]:
            raise UsageError("steps in an impossible order: 'export' must be the last step, "
                             f"got {[k.value for k in kinds]}")
        if StepKind.QUANTIZE in kinds:
            first_q = kinds.index(StepKind.QUANTIZE)
            late = [k.value for k in kinds[first_q + 1:] if k in (StepKind.PRUNE, StepKind.QUANTIZE)]
            if late:
                raise UsageError(f"steps in an impossible order: {late[0]!r} after 'quantize' (prune before you "
                                 f"quantize, and quantize once); got {[k.value for k in kinds]}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "max_accuracy_drop": self.max_accuracy_drop,
                "recovery_epochs": self.recovery_epochs, "recovery_lr": self.recovery_lr,
                "max_backoffs": self.max_backoffs,
                "steps": [s.to_dict() for s in self.steps]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> Path:
        return write_text(path, self.to_yaml())

    @classmethod
    def from_yaml(cls, text: str, source: str = "<recipe>") -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
            raise UsageError(f"{source}: malformed YAML at {where}: {exc.problem}") from None
        if not isinstance(data, dict):
            raise UsageError(f"{source}: a recipe is a mapping with 'steps' (and 'max_accuracy_drop'), got {data!r}")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise UsageError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, spec: Recipe | dict | str | os.PathLike) -> Recipe:
        """A Recipe from itself, a dict, a YAML file path, or the name of a shipped recipe."""
        if isinstance(spec, Recipe):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        path = Path(spec)
        if path.is_file():
            return cls.from_yaml(path.read_text(), str(path))
        shipped = SHIPPED / f"{spec}.yaml"
        if shipped.is_file():
            return cls.from_yaml(shipped.read_text(), str(shipped))
        raise UsageError(f"recipe {str(spec)!r} is neither a file nor a shipped recipe; "
                         f"{nearest(str(spec), shipped_recipes())}")


def shipped_recipes() -> list[str]:
    """Names of the recipes that come with slimkit."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


__all__ = ["ExportConfig", "ExportFormat", "Recipe", "Step", "StepKind", "shipped_recipes", "to_enum"]
