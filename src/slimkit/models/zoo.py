"""The zoo's registry: ``ZOO`` maps a name to its factory, and ``register`` adds one (the zoo modules use it).

Kept apart from ``slimkit.models`` so the zoo modules import the registry, not the package that imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from slimkit.errors import InputTypeError, UsageError

__all__ = ["ZOO", "ModelSpec", "register"]


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry: the factory, the input it expects (C, H, W) and a one-line description."""

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str


ZOO: dict[str, ModelSpec] = {}


def register(name: str, input_shape: tuple[int, ...], description: str = "") -> Callable:
    """Decorator adding a factory to the zoo under ``name``; artifacts naming it (or its ``module:function``) load.

    Example:
        >>> @register("mynet", input_shape=(3, 32, 32), description="my CIFAR net")
        ... def mynet(num_classes=10):
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
        >>> import torch, slimkit
        >>> slimkit.models.create("mynet")(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> del ZOO["mynet"]  # (leaves the zoo as it was)
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise UsageError(f"register: model name {name!r} must be a non-empty string without ':'")

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not callable(factory):
            raise InputTypeError(f"register({name!r}): {factory!r} is not callable")
        ZOO[name] = ModelSpec(factory, tuple(input_shape), description or (factory.__doc__ or "").strip())
        return factory

    return wrap
