"""Small helpers on a model's named submodules, shared by every algorithm: one rule for selecting modules by name
in a config, and one way to replace a submodule by its qualified name."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

__all__ = ["matches", "set_module"]


def matches(name: str, patterns: str | Iterable[str]) -> bool:
    """True when module ``name`` is selected by ``patterns`` (one pattern or several; any may select it).

    The one rule of every config (``PruneConfig.ignore``/``overrides``, ``QuantConfig.ignore``/``overrides``,
    ...): a pattern is either the qualified name of a module (``"layer1.0.conv1"``) or ``"re:<regex>"``, which
    must match the whole qualified name (``re.fullmatch``). A selected module covers the modules inside it:
    ``"layer1"`` selects ``layer1`` and ``layer1.0.conv1``, and so does ``"re:layer\\d"``. The empty name is the
    root module. ``"layer1"`` does not select ``layer10``.

    Example:
        >>> matches("layer1.0.conv1", "layer1"), matches("layer10", "layer1")
        (True, False)
        >>> matches("features.3", ["fc", r"re:features\\.\\d"])
        True
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    scopes = _scopes(name)
    for pattern in patterns:
        if pattern.startswith("re:"):
            regex = re.compile(pattern[3:])
            if any(regex.fullmatch(scope) for scope in scopes):
                return True
        elif pattern in scopes:
            return True
    return False


def _scopes(name: str) -> list[str]:
    """``name`` and the names of the modules that contain it: ``a.b.c`` -> ``[a.b.c, a.b, a]``."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(len(parts), 0, -1)]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule of ``model`` at qualified ``name`` (``"layer1.0.conv1"``) by ``module``, in place.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
        >>> set_module(model, "1.0", nn.Identity())
        >>> type(model[1][0]).__name__
        'Identity'
    """
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)
