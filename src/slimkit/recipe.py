"""Recipes: an ordered list of steps (prune, finetune, distill, quantize, export) plus an accuracy budget.

A recipe is only a serialization of the configs the API takes (``PruneConfig``, ``TrainConfig``, ``DistillConfig``,
``QuantConfig``, ``ExportConfig``): no second schema. ``slimkit.compress`` runs one under its budget and a search
trial's plan is one (both through ``slimkit.steps``). In YAML::

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
from typing import Any, ClassVar

import yaml

from slimkit._io import write_text
from slimkit.config import Config, check_range, nearest, short_repr, to_enum
from slimkit.errors import MissingFileError, UsageError
from slimkit.export.config import ExportConfig, ExportFormat  # re-exported: slimkit.recipe.ExportConfig still works

SHIPPED = Path(__file__).with_name("recipes")
MAX_YAML_CHARS = 1_000_000  # recipes and search spaces are a few hundred bytes
MAX_YAML_DEPTH = 32


class _Refused(yaml.MarkedYAMLError):
    """A YAML feature slimkit does not read (aliases, duplicate keys, deep nesting, non-plain types)."""


def _refuse(node: yaml.Node, problem: str) -> None:
    raise _Refused(problem=problem, problem_mark=node.start_mark)


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses aliases, duplicate keys, nesting deeper than ``MAX_YAML_DEPTH`` and tags beyond
    null, bool, int, float, str, list and mapping (dates stay strings)."""

    yaml_implicit_resolvers: ClassVar[dict] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(
                problem=f"YAML aliases (*{event.anchor}) are not allowed; write the value out",
                problem_mark=event.start_mark,
            )
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise _Refused(
                problem=f"nested deeper than {MAX_YAML_DEPTH} levels", problem_mark=self.peek_event().start_mark
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    _refuse(key_node, f"duplicate key {short_repr(key)}; keep one")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


for _tag in ("timestamp", "binary", "omap", "pairs", "set"):
    _StrictLoader.add_constructor(
        f"tag:yaml.org,2002:{_tag}",
        lambda loader, node: _refuse(node, f"the YAML tag {node.tag!r} is not allowed; use plain values"),
    )


def load_yaml(text: str, source: str = "<yaml>") -> Any:
    """Parse YAML from a stranger safely: at most ``MAX_YAML_CHARS``, no aliases (a billion-laughs bomb fails at
    once), no duplicate keys, only null/bool/int/float/str/list/mapping. Errors are one-line ``UsageError``s naming
    ``source`` and the line."""
    if not isinstance(text, str):
        raise UsageError(f"{source}: expected YAML text, got {type(text).__name__}")
    if len(text) > MAX_YAML_CHARS:
        raise UsageError(f"{source}: {len(text):,} characters; slimkit reads YAML files of at most {MAX_YAML_CHARS:,}")
    loader = None
    try:
        loader = _StrictLoader(text)
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        kind = "refused YAML" if isinstance(exc, _Refused) else "malformed YAML"
        problem = " ".join(str(exc.problem or exc.context or "").split())
        raise UsageError(f"{source}: {kind} at {where}: {problem}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: ints beyond Python's digit limit
        raise UsageError(f"{source}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | os.PathLike) -> Any:
    """``load_yaml`` of a file, refusing files over ``MAX_YAML_CHARS`` bytes before reading them."""
    return load_yaml(_read_text(Path(path)), str(path))


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise MissingFileError(f"YAML file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_YAML_CHARS:
        raise UsageError(f"{path}: {size:,} bytes; slimkit reads YAML files of at most {MAX_YAML_CHARS:,}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return text


class StepKind(str, enum.Enum):
    PRUNE = "prune"
    FINETUNE = "finetune"  # train on the labels (or a KD loss, when the runner has one): how a search plan recovers
    DISTILL = "distill"
    QUANTIZE = "quantize"
    EXPORT = "export"


CONFIG_CLASSES = {
    StepKind.PRUNE: ("slimkit.pruning", "PruneConfig"),
    StepKind.FINETUNE: ("slimkit.train", "TrainConfig"),
    StepKind.DISTILL: ("slimkit.distillation", "DistillConfig"),
    StepKind.QUANTIZE: ("slimkit.quantization", "QuantConfig"),
    StepKind.EXPORT: ("slimkit.export.config", "ExportConfig"),
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
            raise UsageError(
                f"{where}: a step is a mapping with one key (prune, finetune, distill, quantize or "
                f"export), got {short_repr(data)}"
            )
        ((key, body),) = data.items()
        if not isinstance(key, str) or key not in {k.value for k in StepKind}:
            raise UsageError(
                f"{where}: unknown step {short_repr(key)}; {nearest(str(key), [k.value for k in StepKind])}"
            )
        kind = StepKind(key)
        if body is not None and not isinstance(body, dict):
            raise UsageError(f"{where}: the settings of {key!r} must be a mapping, got {short_repr(body)}")
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
        if not isinstance(self.steps, (list, tuple)):
            raise UsageError(
                f"steps={short_repr(self.steps)}: expected a list of steps, e.g. "
                "[{prune: {amount: 0.5}}, {quantize: {method: ptq}}]"
            )
        self.steps = [s if isinstance(s, Step) else Step.from_dict(s, f"steps[{i}]") for i, s in enumerate(self.steps)]
        super().__post_init__()
        check_range("max_accuracy_drop", self.max_accuracy_drop, 0.0, 100.0)
        if self.recovery_epochs < 0 or self.max_backoffs < 0:
            raise UsageError("recovery_epochs and max_backoffs must be >= 0")
        check_range("recovery_lr", self.recovery_lr, 0.0, 10.0, low_open=True)
        self._check_order()

    def _check_order(self) -> None:
        kinds = [s.kind for s in self.steps]
        if not kinds:
            raise UsageError("a recipe needs at least one step (prune, finetune, distill, quantize or export)")
        if StepKind.EXPORT in kinds[:-1]:
            raise UsageError(
                f"steps in an impossible order: 'export' must be the last step, got {[k.value for k in kinds]}"
            )
        if StepKind.QUANTIZE in kinds:
            first_q = kinds.index(StepKind.QUANTIZE)
            late = [k.value for k in kinds[first_q + 1 :] if k in (StepKind.PRUNE, StepKind.QUANTIZE)]
            if late:
                raise UsageError(
                    f"steps in an impossible order: {late[0]!r} after 'quantize' (prune before you "
                    f"quantize, and quantize once); got {[k.value for k in kinds]}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_accuracy_drop": self.max_accuracy_drop,
            "recovery_epochs": self.recovery_epochs,
            "recovery_lr": self.recovery_lr,
            "max_backoffs": self.max_backoffs,
            "steps": [s.to_dict() for s in self.steps],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> Path:
        return write_text(path, self.to_yaml())

    @classmethod
    def from_yaml(cls, text: str, source: str = "<recipe>") -> Recipe:
        """Parse a recipe with ``load_yaml`` (size limit, no aliases, no duplicate keys, plain types only)."""
        data = load_yaml(text, source)
        if not isinstance(data, dict):
            raise UsageError(
                f"{source}: a recipe is a mapping with 'steps' (and 'max_accuracy_drop'), got {short_repr(data)}"
            )
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
            return cls._from_file(path)
        shipped = SHIPPED / f"{spec}.yaml"
        if shipped.is_file():
            return cls._from_file(shipped)
        raise UsageError(
            f"recipe {str(spec)!r} is neither a file nor a shipped recipe; {nearest(str(spec), shipped_recipes())}"
        )

    @classmethod
    def _from_file(cls, path: Path) -> Recipe:
        return cls.from_yaml(_read_text(path), str(path))


def shipped_recipes() -> list[str]:
    """Names of the recipes that come with slimkit."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


__all__ = [
    "ExportConfig",
    "ExportFormat",
    "Recipe",
    "Step",
    "StepKind",
    "load_yaml",
    "read_yaml",
    "shipped_recipes",
    "to_enum",
]
