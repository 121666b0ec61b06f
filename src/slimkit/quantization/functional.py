"""Layers whose weights another module reads directly instead of calling the layer.

torchvision's Swin attention passes ``self.qkv.weight`` and ``self.proj.weight`` to a function that calls
``F.linear``: ``qkv``'s own forward never runs, so its quantizers would never see data and its fake-quant weight
would never be used. ``find_weight_readers`` runs one batch under a ``TorchFunctionMode`` that records every torch
function receiving such a layer's weight and the module whose forward was running. A layer read only by ``F.linear``
(or ``F.conv2d`` with the layer's own stride, padding, dilation and groups), always with its own bias, inside a module
that contains it, is *redirected*: ``redirect_`` hooks that module so that while its forward runs each such call is a
call of the layer itself (``layer(x)``: its input and weight quantizers, observers and hooks run), which is what the
module computes in float. Any other use leaves the layer in float, with the reason.

Example:
    >>> attn = torchvision.models.swin_t().features[1][0].attn               # doctest: +SKIP
    >>> find_weight_readers(attn, ["qkv", "proj"], torch.randn(1, 8, 8, 96))  # doctest: +SKIP
    ({'qkv': '', 'proj': ''}, {})
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from slimkit.errors import UsageError

__all__ = ["find_weight_readers", "redirect_"]

_LINEAR: Callable[..., Any] = F.linear
_CONV2D: Callable[..., Any] = F.conv2d
_CONV2D_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
# what may read a weight without computing with it (shape queries, attribute access)
_METADATA = {"size", "dim", "__get__", "numel", "ndimension"}


def _arguments(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``F.linear`` / ``F.conv2d`` arguments by name."""
    names = ["input", "weight", "bias"] + (["stride", "padding", "dilation", "groups"] if func is _CONV2D else [])
    given = dict(zip(names, args))
    given.update(kwargs)
    if func is _CONV2D:
        for key, value in _CONV2D_DEFAULTS.items():
            given.setdefault(key, value)
    given.setdefault("bias", None)
    return given


def _mismatch(layer: nn.Module, func: Callable[..., Any], given: dict[str, Any]) -> str | None:
    """Why this call does not compute ``layer(input)`` (None when it does)."""
    if given["bias"] is not layer.bias:
        return f"{func.__name__} is given a bias other than the layer's own"
    if func is _LINEAR:
        return None if isinstance(layer, nn.Linear) else f"{func.__name__} reads the weight of a {type(layer).__name__}"
    if not isinstance(layer, nn.Conv2d) or layer.padding_mode != "zeros":
        return f"conv2d reads the weight of a {type(layer).__name__} (padding_mode must be 'zeros')"
    padding = given["padding"]
    own = (
        _pair(given["stride"]),
        padding if isinstance(padding, str) else _pair(padding),
        _pair(given["dilation"]),
        given["groups"],
    )
    if own != (layer.stride, layer.padding, layer.dilation, layer.groups):
        return "conv2d is called with another stride / padding / dilation / groups than the layer's"
    return None


class _Recorder(TorchFunctionMode):
    """Records, per watched weight, which module's forward passed it to which torch function."""

    def __init__(self, layers: dict[str, nn.Module], running: list[str]) -> None:
        super().__init__()
        self.by_weight = {id(layer.weight): name for name, layer in layers.items()}
        self.layers, self.running = layers, running
        self.readers: dict[str, set[str]] = {}
        self.problems: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in [*args, *kwargs.values()]:
            name = self.by_weight.get(id(value)) if isinstance(value, torch.Tensor) else None
            if name is None or value is not self.layers[name].weight:
                continue
            reader = self.running[-1] if self.running else ""
            self.readers.setdefault(name, set()).add(reader)
            what = getattr(func, "__name__", str(func))
            if func in (_LINEAR, _CONV2D):
                given = _arguments(func, args, kwargs)
                problem = _mismatch(self.layers[name], func, given) if given["weight"] is value else None
                if given["weight"] is not value:
                    problem = f"{what} takes its weight as another argument"
            elif what in _METADATA:
                continue
            else:
                problem = f"its weight is read by {what}, which is not F.linear / F.conv2d"
            if problem is not None:
                self.problems.setdefault(name, f"{problem} (in {reader or 'the model'}'s forward)")
        return func(*args, **kwargs)


def find_weight_readers(
    model: nn.Module, names: Iterable[str], run: Callable[[], Any]
) -> tuple[dict[str, str], dict[str, str]]:
    """For layers whose forward never runs: ``({layer: module that reads its weight}, {layer: why it cannot be
    redirected})``; ``run`` runs the model once. A layer nobody reads appears in neither (it is unused)."""
    layers = {name: model.get_submodule(name) for name in names}
    running: list[str] = []  # the modules whose forward is running, innermost last

    def started(module: nn.Module, args: Any, name: str) -> None:
        running.append(name)

    def finished(module: nn.Module, args: Any, output: Any) -> None:
        running.pop()

    handles = []
    for module_name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(functools.partial(started, name=module_name)))
        handles.append(module.register_forward_hook(finished, always_call=True))
    recorder = _Recorder(layers, running)
    try:
        with recorder:
            run()
    finally:
        for handle in handles:
            handle.remove()
    readers, reasons = {}, {}
    for name, found in recorder.readers.items():
        reader = next(iter(found))
        if name in recorder.problems:
            reasons[name] = recorder.problems[name]
        elif len(found) > 1:
            reasons[name] = f"its weight is read in the forwards of several modules ({', '.join(sorted(found))})"
        elif reader and not name.startswith(reader + "."):
            reasons[name] = f"its weight is read by {reader}, which does not contain it"
        else:
            readers[name] = reader
    return readers, reasons


class _Redirect(TorchFunctionMode):
    """While active: ``F.linear`` / ``F.conv2d`` on a redirected layer's weight calls the layer instead."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.by_weight = {id(layer.weight): layer for layer in layers}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LINEAR or func is _CONV2D:
            given = _arguments(func, args, kwargs)
            layer = self.by_weight.get(id(given["weight"]))
            if layer is not None and given["weight"] is layer.weight and _mismatch(layer, func, given) is None:
                return layer(given["input"])
        return func(*args, **kwargs)


_ACTIVE: dict[int, list[_Redirect]] = {}  # per reading module (by id), the redirections its running forwards opened
_ATTRIBUTE = "_slimkit_redirected"  # on the reading module: the names (relative to it) of the layers it reads
_FLOAT = "_slimkit_redirect_float"  # on the reading module: redirect to float layers too (AdaRound's reference)


def _enter(module: nn.Module, args: Any) -> None:
    layers = [module.get_submodule(name) for name in getattr(module, _ATTRIBUTE, ())]
    if not getattr(module, _FLOAT, False):  # an exported float twin computes the same without redirection
        layers = [layer for layer in layers if hasattr(layer, "weight_quant")]
    mode = _Redirect(layers) if layers else None
    if mode is not None:
        mode.__enter__()
    _ACTIVE.setdefault(id(module), []).append(mode)  # type: ignore[arg-type]  # None: nothing opened


def _exit(module: nn.Module, args: Any, output: Any) -> None:
    stack = _ACTIVE.get(id(module))
    mode = stack.pop() if stack else None
    if stack == []:
        del _ACTIVE[id(module)]
    if mode is not None:
        mode.__exit__(None, None, None)


def redirect_(model: nn.Module, readers: dict[str, str], *, float_layers: bool = False) -> None:
    """Hook each reading module of ``readers`` (``{layer: reading module}``, as ``find_weight_readers`` returns) so
    that its ``F.linear`` / ``F.conv2d`` calls on the layers' weights call the quantized layers (in place; with
    ``float_layers`` the float ones too, so that hooks on them see their inputs). The hooks travel with
    ``copy.deepcopy``; ``replay_`` installs them again on a fresh model."""
    by_reader: dict[str, list[str]] = {}
    for layer, reader in readers.items():
        if reader and not layer.startswith(reader + "."):
            raise UsageError(f"redirect: {layer!r} is not inside {reader!r}, the module said to read its weight")
        model.get_submodule(layer)  # a name that is not in the model fails here, not at the first forward
        by_reader.setdefault(reader, []).append(layer[len(reader) + 1 :] if reader else layer)
    for reader, names in by_reader.items():
        module = model.get_submodule(reader)
        first = not hasattr(module, _ATTRIBUTE)
        setattr(module, _ATTRIBUTE, tuple(sorted({*getattr(module, _ATTRIBUTE, ()), *names})))
        if float_layers:
            setattr(module, _FLOAT, True)
        if first:
            module.register_forward_pre_hook(_enter)
            module.register_forward_hook(_exit, always_call=True)
