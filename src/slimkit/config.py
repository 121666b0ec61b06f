"""The base every slimkit config derives from: typed dataclasses that round-trip through JSON/YAML.

Every algorithm has one small ``@dataclass`` config. They share this mixin so that a recipe is only a
serialization of the same objects the API takes (no second schema), unknown keys are rejected with the nearest
valid name, and ``str`` enums are accepted either as members or as their string values.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import numbers
import pathlib
import re
import types
import typing
from typing import Any, Generic, TypeVar

from slimkit.errors import UsageError

T = TypeVar("T", bound="Config")
V = TypeVar("V")


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
    """Raise ``UsageError`` naming the field when ``value`` is not a number in ``[low, high]`` (or ``(low, high]``)."""
    bracket = "(" if low_open else "["
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:  # NaN != NaN
        raise UsageError(f"{name}={short_repr(value)} is not a number; allowed {bracket}{low}, {high}]")
    below = value <= low if low_open else value < low
    if below or value > high:
        raise UsageError(f"{name}={short_repr(value)} is out of range; allowed {bracket}{low}, {high}]")


def check_patterns(where: str, patterns: typing.Iterable[Any]) -> None:
    """Raise ``UsageError`` naming the first ``re:`` pattern among ``patterns`` that does not compile."""
    for pattern in patterns:
        if isinstance(pattern, str) and pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except (re.error, OverflowError, RecursionError) as exc:
                raise UsageError(
                    f"{where}: {short_repr(pattern)} is not a valid regular expression ({exc}); "
                    "escape special characters with a backslash, or drop the 're:' prefix to match "
                    "a name exactly"
                ) from None


def check_type(where: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against a type hint (as config fields are); ``UsageError`` naming ``where`` if it fails."""
    try:
        return _coerce(value, annotation)
    except _Mismatch:
        raise UsageError(f"{where}={short_repr(value)}: expected {_type_name(annotation)}") from None


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (error messages stay one short line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


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


class _Mismatch(Exception):
    """A value that does not conform to a type hint (turned into a ``UsageError`` naming the field)."""


def _type_name(annotation: Any, nonfinite: bool = False) -> str:
    """A readable name of a type hint: ``int``, ``list of str``, ``mapping of str to float``, ``... or null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a, nonfinite) for a in args)
    if annotation is float:
        return "float" if nonfinite else "finite float"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    if isinstance(annotation, type) and issubclass(annotation, Config):
        return f"{annotation.__name__} or a mapping of its fields"
    if origin is tuple and args:
        if args[-1] is Ellipsis:
            return f"list of {_type_name(args[0], nonfinite)}"
        return "[" + ", ".join(_type_name(a, nonfinite) for a in args) + "]"
    if origin is list and args:
        return f"list of {_type_name(args[0], nonfinite)}"
    if origin is dict and args:
        return f"mapping of {_type_name(args[0], nonfinite)} to {_type_name(args[1], nonfinite)}"
    if annotation in (list, tuple):
        return "list"
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, nonfinite: bool = False) -> Any:
    """``value`` checked against ``annotation``: numpy scalars become Python ones, lists become tuples where a tuple
    is expected, mappings become nested configs; raises ``_Mismatch`` when it does not conform."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is None or isinstance(annotation, TypeVar):
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, nonfinite)
                except _Mismatch:
                    continue
        raise _Mismatch
    if annotation is type(None):
        if value is None:
            return None
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            return bool(value)
        raise _Mismatch
    if annotation is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_":
            return int(value)
        raise _Mismatch
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or type(value).__name__ == "bool_":
            raise _Mismatch
        if not nonfinite and not isinstance(value, numbers.Integral) and not math.isfinite(value):
            raise _Mismatch
        return value if type(value) in (int, float) else float(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, pathlib.PurePath):
            return str(value)
        raise _Mismatch
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, annotation):
            return value
        try:
            return annotation(value)
        except (ValueError, TypeError):
            raise _Mismatch from None
    if isinstance(annotation, type) and issubclass(annotation, Config):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return annotation.from_dict(value)
        raise _Mismatch
    if origin is tuple or annotation is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if not args:
            return tuple(value)
        if args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], nonfinite) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a, nonfinite) for v, a in zip(value, args))
    if origin is list or annotation is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, args[0], nonfinite) for v in value] if args else list(value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        if not args:
            return value
        return {_coerce(k, args[0], nonfinite): _coerce(v, args[1], nonfinite) for k, v in value.items()}
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _Mismatch
    return value  # Callable and other hints slimkit does not check


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a config class (computed once per class)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _fields(config: Config | type[Config]) -> tuple[dataclasses.Field[Any], ...]:
    """``dataclasses.fields`` of a config (every concrete ``Config`` is a dataclass; the mixin itself is not)."""
    return dataclasses.fields(typing.cast(Any, config))


class Config:
    """Mixin for slimkit's dataclass configs: ``to_dict`` / ``from_dict`` with strict keys and enum coercion.

    ``__post_init__`` checks every field against its type hint: ``int`` rejects floats and bools, ``float`` accepts
    ints but rejects NaN and infinity (unless the field's metadata has ``nonfinite=True``), ``str`` rejects other
    types, ``tuple[str, ...]`` takes a list (or one string) of strings, ``Optional`` takes ``None``; nested configs
    accept a mapping of their fields. Every ``re:`` pattern in a list of names or in the keys of a mapping must
    compile.
    """

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for field in _fields(self):
            annotation = hints.get(field.name)
            value = given = getattr(self, field.name)
            enum_type = _enum_type(annotation)
            if enum_type is not None and value is not None and not isinstance(value, enum_type):
                value = to_enum(enum_type, value, field.name)
            if isinstance(value, str) and _is_tuple(annotation):
                value = (value,)  # one name where a list of names is expected
            nonfinite = bool(field.metadata.get("nonfinite"))
            try:
                value = _coerce(value, annotation, nonfinite)
            except _Mismatch:
                raise UsageError(
                    f"{type(self).__name__}.{field.name}={short_repr(given)}: expected "
                    f"{_type_name(annotation, nonfinite)}"
                ) from None
            except UsageError as exc:  # a nested config given as a mapping
                raise UsageError(f"{type(self).__name__}.{field.name}: {exc}") from None
            object.__setattr__(self, field.name, value)
            if isinstance(value, dict) or (isinstance(value, tuple) and _is_tuple(annotation)):
                check_patterns(f"{type(self).__name__}.{field.name}", value)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (enums as their string values)."""
        return {f.name: _plain(getattr(self, f.name)) for f in _fields(self)}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
        """Build from a dict, rejecting unknown keys with the nearest valid name."""
        if data is not None and not isinstance(data, dict):
            raise UsageError(f"{cls.__name__}: expected a mapping of its fields, got {short_repr(data)}")
        data = dict(data or {})
        # fields, and the flat spellings of fields that moved into a nested section (FlatField)
        names = {f.name for f in _fields(cls)} | {n for n, v in vars(cls).items() if isinstance(v, FlatField)}
        for key in data:
            if not isinstance(key, str):
                raise UsageError(f"{cls.__name__}: keys are field names (strings), got {short_repr(key)}")
            if key not in names:
                raise UsageError(f"{cls.__name__}: unknown key {key!r}; {nearest(key, names)}")
        hints = _hints(cls)
        for key, value in list(data.items()):
            nested = hints.get(key)
            if isinstance(nested, type) and issubclass(nested, Config) and isinstance(value, dict):
                try:
                    data[key] = nested.from_dict(value)
                except UsageError as exc:
                    raise UsageError(f"{cls.__name__}.{key}: {exc}") from None
        return cls(**data)


def _is_tuple(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(typing.get_origin(a) is tuple for a in typing.get_args(annotation))
    return False


def nested_config(
    cls: type[T], owner: str, name: str, given: Any, flat: dict[str, Any], defaults: dict[str, Any] | None = None
) -> T | Any:
    """The section ``owner.name`` of type ``cls`` built from ``given`` (an instance, a mapping of its fields or None:
    ``cls(**defaults)``) with the flat keys applied on top; always a new object, so two configs never share one.

    Flat values are type-checked here so a bad one is named as a field of the owner (``QuantConfig.epochs=2.7:
    expected int``); ranges are then checked by the section itself. A ``given`` of another type is returned as it
    is, for the owner's field check to name.
    """
    hints = typing.get_type_hints(cls)
    checked = {key: check_type(f"{owner}.{key}", value, hints[key]) for key, value in flat.items()}
    if given is None:
        return cls(**{**(defaults or {}), **checked})
    if isinstance(given, dict):
        try:
            return cls.from_dict({**given, **checked})
        except UsageError as exc:
            raise UsageError(f"{owner}.{name}: {exc}") from None
    if isinstance(given, cls):
        return dataclasses.replace(given, **checked)  # type: ignore[type-var]  # a Config is always a dataclass
    return given


class FlatField(Generic[V]):
    """``owner.<name>`` reads and writes ``owner.<section>.<name>``: the flat spelling of a field that moved into
    a nested section config (``DistillConfig.epochs`` is ``DistillConfig.train.epochs``)."""

    def __init__(self, section: str) -> None:
        self.section = section

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @typing.overload
    def __get__(self, obj: None, owner: type) -> FlatField[V]: ...

    @typing.overload
    def __get__(self, obj: object, owner: type) -> V: ...

    def __get__(self, obj: object | None, owner: type) -> V | FlatField[V]:
        if obj is None:
            return self
        return typing.cast(V, getattr(getattr(obj, self.section), self.name))

    def __set__(self, obj: object, value: V) -> None:
        setattr(getattr(obj, self.section), self.name, value)
