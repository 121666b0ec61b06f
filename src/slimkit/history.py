"""How a compressed model remembers where it came from, so the artifact can rebuild it without pickle.

``slimkit.models.create`` stamps ``model.slimkit_source`` (the factory spec and its kwargs). Each compression
verb returns a new model whose ``slimkit_history`` is the input's history plus one entry
``{"kind": "prune" | "quantize" | "distill" | ..., "record": <JSON-safe dict>}``. ``slimkit.save`` writes both into
``slimkit.json``; ``slimkit.load`` calls the factory and replays the structural entries (pruning's kept channels,
quantization's per-layer spec) before loading the weights.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

SOURCE_ATTR = "slimkit_source"
HISTORY_ATTR = "slimkit_history"


def source_of(model: nn.Module) -> dict[str, Any] | None:
    """``{"factory": spec, "kwargs": {...}}`` if the model was built by ``slimkit.models.create``."""
    return getattr(model, SOURCE_ATTR, None)


def set_source(model: nn.Module, factory: str, kwargs: dict[str, Any]) -> None:
    setattr(model, SOURCE_ATTR, {"factory": factory, "kwargs": dict(kwargs)})


def history_of(model: nn.Module) -> list[dict[str, Any]]:
    """The ordered list of edits applied to ``model`` by slimkit verbs (a copy)."""
    return copy.deepcopy(getattr(model, HISTORY_ATTR, []))


def record_step(new_model: nn.Module, old_model: nn.Module, kind: str, record: dict[str, Any]) -> nn.Module:
    """Give ``new_model`` the source and history of ``old_model`` plus this step; returns ``new_model``."""
    source = source_of(old_model)
    if source is not None:
        setattr(new_model, SOURCE_ATTR, copy.deepcopy(source))
    setattr(new_model, HISTORY_ATTR, [*history_of(old_model), {"kind": kind, "record": record}])
    return new_model


# kind -> module exposing ``replay(model, record) -> model``, which re-applies a step's structural edit to a freshly
# built model (no weights needed: the artifact loads them afterwards). Kinds absent here change weights only.
REPLAY_MODULES = {"prune": "slimkit.pruning", "quantize": "slimkit.quantization"}


def replay_step(model: nn.Module, step: dict[str, Any]) -> nn.Module:
    """Re-apply one history entry's structural edit (kinds without one leave ``model`` as it is).

    The edit may be made in place (a freshly built model is expected); the edited model is returned."""
    import importlib

    module_name = REPLAY_MODULES.get(step["kind"])
    if module_name is None:
        return model
    return importlib.import_module(module_name).replay(model, step["record"])


def replay_(model: nn.Module, history: list[dict[str, Any]]) -> nn.Module:
    """Re-apply every structural step of ``history`` to ``model`` (built from the same source) in place; returns
    the edited model (the same object unless a step replaced the root module)."""
    for step in history:
        model = replay_step(model, step)
    setattr(model, HISTORY_ATTR, copy.deepcopy(history))
    return model


def replay(model: nn.Module, history: list[dict[str, Any]]) -> nn.Module:
    """A copy of ``model`` with every structural step of ``history`` re-applied; ``model`` is not modified.

    Example:
        >>> fresh = replay(slimkit.models.create("lenet5"), history_of(pruned))   # doctest: +SKIP
    """
    return replay_(copy.deepcopy(model), history)
