"""The base every slimkit config derives from: typed dataclasses that round-trip through JSON/YAML.

Every algorithm has one small ``@dataclass`` config. They share this mixin so that a recipe is only a
serialization of the same objects the API takes (no second schema), unknown keys are rejected with the nearest
valid name, and ``str`` enums are accepted either as members or as their string values.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any, TypeVar

from slimkit.errors import UsageError

T = TypeVar("T", bound="Config")


def nearest(name: str, candidates: typing.Iterable[str]) -> str:
    """A hint naming the closest candidate, or listing all of them when none is close."""
    candidates = sorted(candidates)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"valid names: {', '.join(candidates)}"


def to_enum(enum_type: type[enum.Enum], value: Any, field_name: str) -> enum.Enum:
    """Convert ``value`` to ``enum_type``; the error lists the allowed values."""
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_type)
        raise UsageError(f"{field_name}={value!r} is not valid; choose one of {allowed}") from None


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    """Raise ``ValueError`` naming the field when ``value`` is outside ``[low, high]`` (or ``(low, high]``)."""
    below = value <= low if low_open else value < low
    if below or value > high:
        bracket = "(" if low_open else "["
        raise UsageError(f"{name}={value!r} is out of range; allowed {bracket}{low}, {high}]")


def _enum_type(annotation: Any) -> type[enum.Enum] | None:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return arg
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class Config:
    """Mixin for slimkit's dataclass configs: ``to_dict`` / ``from_dict`` with strict keys and enum coercion."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            enum_type = _enum_type(hints.get(field.name))
            value = getattr(self, field.name)
            if enum_type is not None and value is not None and not isinstance(value, enum_type):
                object.__setattr__(self, field.name, to_enum(enum_type, value, field.name))
            annotation = hints.get(field.name)
            if isinstance(value, list) and _is_tuple(annotation):
                object.__setattr__(self, field.name, tuple(value))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (enums as their string values)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
        """Build from a dict, rejecting unknown keys with the nearest valid name."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key in data:
            if key not in names:
                raise UsageError(f"{cls.__name__}: unknown key {key!r}; {nearest(key, names)}")
        hints = typing.get_type_hints(cls)
        for key, value in list(data.items()):
            nested = hints.get(key)
            if isinstance(nested, type) and issubclass(nested, Config) and isinstance(value, dict):
                data[key] = nested.from_dict(value)
        return cls(**data)


def _is_tuple(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(typing.get_origin(a) is tuple for a in typing.get_args(annotation))
    return False
