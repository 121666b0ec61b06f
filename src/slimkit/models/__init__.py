"""The model zoo: a registry by name, ``module:function`` specs for your own models, and weight loading.

Trust: ``create`` builds whatever spec your own code passes it. A spec read from a file someone else wrote (an
artifact's ``source.factory``) is resolved by ``trusted_factory`` instead, which imports nothing unless the spec is a
zoo name, a factory registered (or created) in this process, or allowed by the caller's ``trust=[...]`` list.

Example:
    >>> model = create("resnet56")
    >>> sum(p.numel() for p in model.parameters())
    855770
    >>> create("mlp", num_classes=10)(torch.zeros(1, 1, 28, 28)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from slimkit.config import nearest
from slimkit.errors import InputTypeError, UsageError
from slimkit.history import set_source
from slimkit.models import hf
from slimkit.models.weights import WeightsError, load_weights, save_weights
from slimkit.models.zoo import ZOO, ModelSpec, register

__all__ = [
    "ZOO",
    "ModelSpec",
    "WeightsError",
    "create",
    "input_shape",
    "load_weights",
    "register",
    "save_weights",
    "trusted_factory",
    "trusting",
]

# 'package.module:function': dotted identifiers, one colon, one identifier (no attribute paths, no spaces)
FACTORY_SPEC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


# 'module:function' specs this process's own code passed to ``create``, and the caller's current allow-list
_CREATED: set[str] = set()
_TRUSTED: list[str] = []


def _spec_of(factory: Callable) -> str:
    return f"{getattr(factory, '__module__', '')}:{getattr(factory, '__name__', '')}"


def _allowed(spec: str, trust: Iterable[str]) -> bool:
    module = spec.partition(":")[0]
    for entry in trust:
        entry = str(entry)
        if entry == spec or (":" not in entry and (module == entry or module.startswith(entry + "."))):
            return True
    return False


def trusted_factory(spec: str, trust: Iterable[str] = ()) -> Callable[..., nn.Module] | None:
    """The factory a spec from someone else's file names, or None if it is not trusted; imports nothing untrusted.

    Trusted: a zoo name, a ``module:function`` registered in the zoo or passed to ``create`` in this process, or one
    allowed by ``trust`` (module prefixes like ``"mypkg.models"``, or exact ``"mypkg.models:build"``) or by an
    enclosing ``trusting(...)``.

    Example:
        >>> trusted_factory("resnet20") is ZOO["resnet20"].factory
        True
        >>> trusted_factory("os:system") is None
        True
    """
    if not isinstance(spec, str):
        return None
    if spec in ZOO:
        return ZOO[spec].factory
    if spec == hf.FACTORY:  # builds only classes transformers exports, from their config (slimkit.models.hf)
        return hf.from_config
    if not FACTORY_SPEC.fullmatch(spec):
        return None
    for entry in ZOO.values():
        if _spec_of(entry.factory) == spec:
            return entry.factory
    if spec in _CREATED or _allowed(spec, [*_TRUSTED, *trust]):
        return _resolve(spec)
    return None


@contextlib.contextmanager
def trusting(trust: Iterable[str]) -> Iterator[None]:
    """Within the block, artifacts may name factories of these modules (as ``trust=[...]`` would allow).

    Example:
        >>> with trusting(["mypkg.models"]):                     # doctest: +SKIP
        ...     slimkit.report.write_report("out/mynet.slim")
    """
    added = [str(entry) for entry in trust]
    _TRUSTED.extend(added)
    try:
        yield
    finally:
        del _TRUSTED[len(_TRUSTED) - len(added) :]


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
    factory = _resolve(spec)
    _check_kwargs(spec, factory, kwargs)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model spec {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    set_source(model, spec, kwargs)  # lets slimkit.save/load rebuild the architecture without pickle
    if spec not in ZOO:
        _CREATED.add(spec)  # the caller's own code chose this factory: its artifacts reload in this process
    return model.eval()


def _check_kwargs(spec: str, factory: Callable[..., nn.Module], kwargs: dict) -> None:
    """Refuse keyword arguments the factory does not take, naming the closest ones it does."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C factory without a signature: let it check its own arguments
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in names:
            raise UsageError(f"model {spec!r} takes no argument {key!r}; {nearest(key, names)}")


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
