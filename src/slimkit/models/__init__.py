"""The model zoo: a registry by name, ``module:function`` specs for your own models, and weight loading.

Example:
    >>> model = create("resnet56")
    >>> sum(p.numel() for p in model.parameters())
    855770
    >>> create("mlp", num_classes=10)(torch.zeros(1, 1, 28, 28)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimkit.config import nearest
from slimkit.errors import InputTypeError, UsageError
from slimkit.history import set_source
from slimkit.models.weights import WeightsError, load_weights, save_weights

__all__ = ["ZOO", "ModelSpec", "WeightsError", "create", "input_shape", "load_weights", "register", "save_weights"]


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry: the factory, the input it expects (C, H, W) and a one-line description."""

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str


ZOO: dict[str, ModelSpec] = {}


def register(name: str, input_shape: tuple[int, ...], description: str) -> Callable:
    """Decorator adding a factory to the zoo under ``name``."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ZOO[name] = ModelSpec(factory, input_shape, description)
        return factory

    return wrap


def _resolve(spec: str) -> Callable[..., nn.Module]:
    if spec in ZOO:
        return ZOO[spec].factory
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(f"model spec {spec!r}: cannot import module {module_name!r} ({exc})") from exc
        factory = getattr(module, attr, None)
        if not callable(factory):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise UsageError(f"model spec {spec!r}: {module_name} has no callable {attr!r}; {nearest(attr, public)}")
        return factory
    raise UsageError(f"unknown model {spec!r}; {nearest(spec, ZOO)} (or give 'package.module:function')")


def create(spec: str, weights: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build a model from a zoo name or ``'package.module:function'``, optionally loading weights.

    Args:
        spec: a name in ``ZOO`` (``mlp``, ``lenet5``, ``resnet56``, ...) or ``'pkg.mod:factory'``.
        weights: a ``.safetensors`` file or a torch checkpoint (read with ``weights_only=True``).
        kwargs: passed to the factory (e.g. ``num_classes=100``).
    """
    model = _resolve(spec)(**kwargs)
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model spec {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    set_source(model, spec, kwargs)  # lets slimkit.save/load rebuild the architecture without pickle
    return model.eval()


def input_shape(spec: str, **kwargs) -> tuple[int, ...]:
    """The (C, H, W) a zoo model expects; ``in_channels``/``image_size`` kwargs are honoured."""
    if spec not in ZOO:
        raise UsageError(f"no default input shape for {spec!r}: pass the input shape explicitly (e.g. 3x32x32)")
    c, h, _ = ZOO[spec].input_shape
    size = kwargs.get("image_size", h)
    return (kwargs.get("in_channels", c), size, size)


def example_input(spec: str, batch: int = 1, **kwargs) -> torch.Tensor:
    """A zero batch of the shape a zoo model expects."""
    return torch.zeros(batch, *input_shape(spec, **kwargs))


# Registering the zoo: importing the modules runs their @register decorators.
from slimkit.models import classic, cifar, resnet, mobilenet  # noqa: E402,F401,I001
