"""Search spaces: declared as ``{name: spec}`` (or a named preset) and turned into Optuna suggestions.

A spec is a dict ``{"type": "float", "low": 1e-4, "high": 0.1, "log": True}``, ``{"type": "int", "low": 1,
"high": 5, "step": 1}``, ``{"type": "categorical", "choices": ["sgd", "adam"]}``, or a plain value (a constant).

Names are what a trial does with them:

- training: ``lr``, ``weight_decay``, ``batch_size``, ``optimizer``, ``momentum``, ``epochs``, ``schedule``,
  and with a teacher ``temperature``, ``alpha`` (knowledge distillation);
- compression plan: ``prune_amount``, ``prune_criterion``, ``prune_allocation``, ``distill`` (on/off),
  ``bits`` (every layer) or ``bits/<module prefix>`` (one layer group), values 32 (float), 8, 4, 2 (ternary), 1
  (binary).

Example:
    >>> space = parse_space({"lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True}, "epochs": 2})
    >>> space["lr"].kind, space["epochs"].constant
    ('float', 2)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from slimkit.config import nearest
from slimkit.errors import InputTypeError, UsageError

__all__ = [
    "PLAN_PARAMS",
    "PRESETS",
    "TRAINING_PARAMS",
    "ParamSpec",
    "available",
    "compression_choices",
    "is_plan_param",
    "parse_space",
    "preset",
    "suggest",
]

TRAINING_PARAMS = (
    "lr",
    "weight_decay",
    "batch_size",
    "optimizer",
    "momentum",
    "epochs",
    "schedule",
    "temperature",
    "alpha",
)
PLAN_PARAMS = ("prune_amount", "prune_criterion", "prune_allocation", "distill", "bits")
BIT_CHOICES = (32, 8, 4, 2, 1)
PRESETS = ("training", "compression")

# criteria and allocations that need nothing but the model (taylor needs gradients, sensitivity a profile,
# bn_scale BatchNorm layers, random is a baseline)
CRITERIA = ("l1", "l2", "fpgm")
ALLOCATIONS = ("uniform", "global", "proportional")

_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


def available(module: str) -> bool:
    """True when a slimkit subpackage (``pruning``, ``quantization``, ``distillation``) is installed."""
    try:
        return importlib.util.find_spec(f"slimkit.{module}") is not None
    except (ImportError, ValueError):
        return False


def compression_choices() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(pruning criteria, allocations) offered by ``slimkit.pruning``."""
    if not available("pruning"):
        raise UsageError("the 'compression' space needs slimkit.pruning, which is not installed in this build")
    from slimkit.pruning import Allocation, Importance

    crit = tuple(c for c in CRITERIA if c in {m.value for m in Importance})
    alloc = tuple(a for a in ALLOCATIONS if a in {m.value for m in Allocation})
    return crit, alloc


def is_plan_param(name: str) -> bool:
    return name in PLAN_PARAMS or name.startswith("bits/")


@dataclass(frozen=True)
class ParamSpec:
    """One dimension of a search space (``kind`` ``"constant"`` holds a fixed value)."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    constant: Any = None

    def to_dict(self) -> dict[str, Any] | Any:
        if self.kind == "constant":
            return self.constant
        if self.kind == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.kind, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise UsageError(f"search space: parameter names must be non-empty strings, got {name!r}")
    if name in TRAINING_PARAMS or is_plan_param(name):
        return
    raise UsageError(
        f"search space: unknown parameter {name!r}; {nearest(name, [*TRAINING_PARAMS, *PLAN_PARAMS])}"
        " (or 'bits/<module prefix>')"
    )


def _parse_one(name: str, spec: Any) -> ParamSpec:
    _check_name(name)
    if not isinstance(spec, Mapping):
        return ParamSpec(name, "constant", constant=spec)
    kind = spec.get("type")
    if kind not in _KEYS:
        raise UsageError(f"search space {name!r}: type={kind!r} is not valid; choose 'float', 'int' or 'categorical'")
    unknown = set(spec) - _KEYS[kind]
    if unknown:
        raise UsageError(
            f"search space {name!r}: unknown key {sorted(unknown)[0]!r} for type {kind!r}; "
            f"allowed {sorted(_KEYS[kind])}"
        )
    if kind == "categorical":
        choices = tuple(spec.get("choices") or ())
        if not choices:
            raise UsageError(f"search space {name!r}: 'choices' must be a non-empty list")
        if len(choices) == 1:
            return ParamSpec(name, "constant", constant=choices[0])
        return ParamSpec(name, "categorical", choices=choices)
    if "low" not in spec or "high" not in spec:
        raise UsageError(f"search space {name!r}: type {kind!r} needs 'low' and 'high'")
    low, high = spec["low"], spec["high"]
    cast = int if kind == "int" else float
    try:
        low, high = cast(low), cast(high)
    except (TypeError, ValueError):
        raise UsageError(
            f"search space {name!r}: low={spec['low']!r} and high={spec['high']!r} must be numbers"
        ) from None
    if low > high:
        raise UsageError(f"search space {name!r}: low={low} is above high={high}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise UsageError(f"search space {name!r}: log=True needs low > 0, got low={low}")
    step = spec.get("step")
    if step is not None and log:
        raise UsageError(f"search space {name!r}: 'step' and 'log' cannot be combined")
    if low == high:
        return ParamSpec(name, "constant", constant=low)
    return ParamSpec(name, kind, low=low, high=high, log=log, step=None if step is None else cast(step))


def parse_space(space: Mapping[str, Any]) -> dict[str, ParamSpec]:
    """Validate a declared space. Raises ``ValueError`` for an empty space (nothing to search) or a bad spec."""
    if not isinstance(space, Mapping):
        raise InputTypeError(
            f"search space must be a dict of name -> spec or a preset name {PRESETS}, got {type(space).__name__}"
        )
    parsed = {name: _parse_one(name, spec) for name, spec in space.items()}
    if not any(p.kind != "constant" for p in parsed.values()):
        raise UsageError(
            "the search space is empty: declare at least one parameter with a range or several "
            f"choices (or use a preset: {', '.join(PRESETS)})"
        )
    return parsed


def layer_groups(model: nn.Module) -> list[str]:
    """Top-level children that hold weights: the default layer groups for per-group bit widths."""
    groups = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    return groups or [""]


def preset(
    name: str, model: nn.Module, *, epochs: int, teacher: bool = False, distill_available: bool = False
) -> dict[str, Any]:
    """The declared space of a named preset for ``model``.

    ``training``: learning rate, weight decay, batch size, optimizer (and distillation temperature/alpha when a
    teacher is given). ``compression``: pruning amount, criterion and allocation, bit width per layer group,
    distillation on/off.
    """
    if name == "training":
        space: dict[str, Any] = {
            "lr": {"type": "float", "low": 1e-4, "high": 0.3, "log": True},
            "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
            "batch_size": {"type": "categorical", "choices": [32, 64, 128, 256]},
            "optimizer": {"type": "categorical", "choices": ["sgd", "adam", "adamw"]},
            "epochs": epochs,
        }
        if teacher:
            space["temperature"] = {"type": "float", "low": 1.0, "high": 8.0}
            space["alpha"] = {"type": "float", "low": 0.1, "high": 0.9}
        return space
    if name == "compression":
        crit, alloc = compression_choices()
        space = {
            "prune_amount": {"type": "float", "low": 0.0, "high": 0.8, "step": 0.05},
            "prune_criterion": {"type": "categorical", "choices": list(crit)},
            "prune_allocation": {"type": "categorical", "choices": list(alloc)},
            "epochs": epochs,
            "lr": 1e-3,
        }
        for group in layer_groups(model):
            space[f"bits/{group}" if group else "bits"] = {"type": "categorical", "choices": list(BIT_CHOICES)}
        if distill_available:
            space["distill"] = {"type": "categorical", "choices": [False, True]}
        return space
    raise UsageError(f"unknown search space preset {name!r}; choose one of {', '.join(PRESETS)} or give a dict")


def suggest(trial: Any, space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Draw one value per parameter from an Optuna trial (constants pass through)."""
    params: dict[str, Any] = {}
    for name, p in space.items():
        if p.kind == "constant":
            params[name] = p.constant
        elif p.kind == "categorical":
            params[name] = trial.suggest_categorical(name, list(p.choices))
        elif p.kind == "int" and p.low is not None and p.high is not None:
            params[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
    return params
