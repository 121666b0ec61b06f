"""Physical channel removal, keyed by module type, and the replayable record of it.

A plan says, per module, which output channels (``out``) and which input channels / features (``in``) survive,
as indices into the *original* layer. ``SURGERY[type](module, out_keep, in_keep) -> module`` rewrites one layer
(weights, biases, running statistics, sizes); it may return a new module (attention heads do). The same plan,
stored as JSON in the record, is all ``apply_record_`` needs to rebuild the shapes on a freshly built model.

Register surgery for your own layer with ``@register_surgery(MyLayer)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimkit._modules import set_module
from slimkit.errors import InputTypeError, UsageError
from slimkit.pruning.attention import PrunedMultiheadAttention, prune_heads
from slimkit.pruning.graph import CONVS, TRANSPOSED, run_late_registrations

__all__ = ["SURGERY", "apply_plan", "decode_indices", "encode_indices", "register_surgery"]

Surgery = Callable[[nn.Module, "torch.Tensor | None", "torch.Tensor | None"], nn.Module]
SURGERY: dict[type, Surgery] = {}


def register_surgery(*types: type) -> Callable[[Surgery], Surgery]:
    def wrap(fn: Surgery) -> Surgery:
        for t in types:
            SURGERY[t] = fn
        return fn

    return wrap


def _take(param: torch.Tensor | None, index: torch.Tensor | None, dim: int) -> None:
    if param is None or index is None:
        return
    new = param.detach().index_select(dim, index).clone()
    if isinstance(param, nn.Parameter):
        param.data = new
        param.grad = None
    else:
        param.data = new


def _grouped(module, keep):
    """Grouped conv with in == out channels (depthwise: one per group): ``keep`` holds whole groups, the same
    indices for input and output; dim 0 of the weight is per channel for Conv and ConvTranspose alike."""
    per = module.in_channels // module.groups
    if len(keep) % per or not torch.equal(keep.view(-1, per) % per, torch.arange(per).expand(len(keep) // per, -1)):
        raise UsageError(
            f"grouped {type(module).__name__} (groups={module.groups}) is pruned by whole groups of "
            f"{per} channels; got {len(keep)} kept channels that split a group"
        )
    _take(module.weight, keep, 0)
    _take(module.bias, keep, 0)
    module.in_channels = module.out_channels = len(keep)
    module.groups = len(keep) // per
    return module


@register_surgery(*CONVS)
def _conv(module, out_keep, in_keep):
    if module.groups > 1:
        return _grouped(module, in_keep if in_keep is not None else out_keep)
    _take(module.weight, out_keep, 0)
    _take(module.bias, out_keep, 0)
    _take(module.weight, in_keep, 1)
    module.out_channels = module.weight.shape[0]
    module.in_channels = module.weight.shape[1]
    return module


@register_surgery(*TRANSPOSED)
def _conv_transposed(module, out_keep, in_keep):
    if module.groups > 1:
        return _grouped(module, in_keep if in_keep is not None else out_keep)
    _take(module.weight, in_keep, 0)
    _take(module.weight, out_keep, 1)
    _take(module.bias, out_keep, 0)
    module.in_channels, module.out_channels = module.weight.shape[0], module.weight.shape[1]
    return module


@register_surgery(nn.Linear)
def _linear(module, out_keep, in_keep):
    _take(module.weight, out_keep, 0)
    _take(module.bias, out_keep, 0)
    _take(module.weight, in_keep, 1)
    module.out_features, module.in_features = module.weight.shape
    return module


@register_surgery(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d
)
def _batch_norm(module, out_keep, in_keep):
    for t in (module.weight, module.bias, module.running_mean, module.running_var):
        _take(t, in_keep, 0)
    module.num_features = len(in_keep)
    return module


@register_surgery(nn.LayerNorm)
def _layer_norm(module, out_keep, in_keep):
    _take(module.weight, in_keep, 0)
    _take(module.bias, in_keep, 0)
    module.normalized_shape = (len(in_keep),)
    return module


@register_surgery(nn.GroupNorm)
def _group_norm(module, out_keep, in_keep):
    per_group = module.num_channels // module.num_groups
    _take(module.weight, in_keep, 0)
    _take(module.bias, in_keep, 0)
    module.num_channels, module.num_groups = len(in_keep), len(in_keep) // per_group
    return module


@register_surgery(nn.PReLU)
def _prelu(module, out_keep, in_keep):
    _take(module.weight, in_keep, 0)
    module.num_parameters = len(in_keep)
    return module


@register_surgery(nn.MultiheadAttention, PrunedMultiheadAttention)
def _attention(module, out_keep, in_keep):
    return prune_heads(module, out_keep)


def encode_indices(index: torch.Tensor | list[int]) -> list[list[int]]:
    """Sorted indices as ``[[start, stop), ...]`` runs (flatten blocks and untouched spans stay tiny in JSON)."""
    runs: list[list[int]] = []
    for i in index.tolist() if isinstance(index, torch.Tensor) else index:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def decode_indices(runs: list[list[int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in runs]) if runs else torch.zeros(0, dtype=torch.long)


def _slots(module: nn.Module):
    """``(holder, store, attr, tensor)`` for every parameter and buffer of ``module`` and its submodules."""
    for _, holder in module.named_modules(remove_duplicate=False):
        for store in (holder._parameters, holder._buffers):
            for attr, tensor in store.items():
                if tensor is not None:
                    yield holder, store, attr, tensor


def _shared_ids(model: nn.Module, plan: dict[str, dict]) -> set[int]:
    """Tensors cut by more than one edit: held by several modules, or a module's tensor also cut on its own."""
    seen: dict[int, int] = {}
    for owner in model.modules():
        for store in (owner._parameters, owner._buffers):
            for tensor in store.values():
                if tensor is not None:
                    seen[id(tensor)] = seen.get(id(tensor), 0) + 1
    direct = {id(_tensor_at(model, name)) for name, edit in plan.items() if "dim" in edit}
    return {key for key, count in seen.items() if count > 1} | direct


def _tensor_at(model: nn.Module, name: str) -> torch.Tensor | None:
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
    except AttributeError:
        return None
    return owner._parameters.get(attr, owner._buffers.get(attr))


def _cut_tensor(model: nn.Module, name: str, edit: dict, cut: dict[int, torch.Tensor]) -> None:
    """A per-channel parameter used in forward (``x * self.scale``): keep ``edit["in"]`` along ``edit["dim"]``."""
    tensor = _tensor_at(model, name)
    dim = edit.get("dim")
    if tensor is None or not isinstance(dim, int) or not 0 <= dim < tensor.ndim or edit.get("in") is None:
        raise UsageError(
            f"the pruning record cuts tensor {name!r} along dim {dim!r}, which this model does not "
            "have: apply the record to the same architecture it was made on"
        )
    keep = decode_indices(edit["in"])
    size = cut[id(tensor)].shape[dim] if id(tensor) in cut else tensor.shape[dim]
    if keep.numel() and int(keep.max()) >= size:
        raise UsageError(
            f"the pruning record keeps index {int(keep.max())} of {name!r}, which has {size} along "
            f"dim {dim}: apply the record to the same architecture it was made on"
        )
    if id(tensor) in cut:  # shared with a layer cut before: it must have been cut the same way
        if not torch.equal(cut[id(tensor)].index_select(dim, keep), tensor):
            raise UsageError(
                f"tensor {name!r} is shared with a layer that was pruned differently; keep them "
                "intact (PruneConfig.ignore)"
            )
        return
    cut[id(tensor)] = tensor.detach().clone()
    _take(tensor, keep, dim)


def apply_plan(model: nn.Module, plan: dict[str, dict]) -> nn.Module:
    """Apply ``{module name: {"out": runs | None, "in": runs | None[, "attrs": {name: int}]}}`` to ``model`` in
    place (``attrs``: head counts the forward reads, e.g. ``num_heads``); returns it. An entry with ``"dim"``
    names a parameter/buffer kept at ``in`` along that dim. A tensor shared by several layers is cut once."""
    run_late_registrations()  # GPT-2's Conv1D, when transformers is imported (slimkit.pruning.hf)
    shared = _shared_ids(model, plan)
    cut: dict[int, torch.Tensor] = {}  # shared tensors already cut -> their original value
    for name, edit in plan.items():
        if "dim" in edit:
            _cut_tensor(model, name, edit, cut)
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UsageError(
                f"the pruning record names module {name!r}, which this model does not have: "
                "apply the record to the same architecture it was made on"
            ) from None
        for attr, value in (edit.get("attrs") or {}).items():
            if not isinstance(getattr(module, attr, None), int):
                raise UsageError(
                    f"the pruning record sets {name}.{attr}, which is not an int attribute of "
                    f"{type(module).__name__}: apply the record to the same architecture"
                )
            setattr(module, attr, int(value))
        if edit.get("out") is None and edit.get("in") is None:
            continue
        handler = next((fn for cls, fn in SURGERY.items() if type(module) is cls), None)
        handler = handler or next((fn for cls, fn in SURGERY.items() if isinstance(module, cls)), None)
        if handler is None:
            raise InputTypeError(
                f"no channel surgery for {type(module).__name__} ({name!r}); register one with "
                "slimkit.pruning.surgery.register_surgery"
            )
        out_keep = decode_indices(edit["out"]) if edit.get("out") is not None else None
        in_keep = decode_indices(edit["in"]) if edit.get("in") is not None else None
        # a shared tensor already cut by another layer: this layer's surgery cuts a stand-in copy of the original,
        # which must come out equal to the shared one, and the layer gets the shared tensor back
        stand_ins = []
        for _, store, attr, tensor in list(_slots(module)):
            if id(tensor) in cut:
                stand_in = cut[id(tensor)].clone()
                if isinstance(tensor, nn.Parameter):
                    stand_in = nn.Parameter(stand_in, tensor.requires_grad)
                store[attr] = stand_in
                stand_ins.append((store, attr, tensor, stand_in))
            elif id(tensor) in shared:
                cut[id(tensor)] = tensor.detach().clone()
        new = handler(module, out_keep, in_keep)
        for store, attr, tensor, stand_in in stand_ins:
            if store.get(attr) is not stand_in or not torch.equal(stand_in, tensor):
                raise UsageError(
                    f"{name}.{attr} is shared with a layer that was pruned differently; keep them intact "
                    "(PruneConfig.ignore) or untie them"
                )
            store[attr] = tensor
        if new is not module:
            set_module(model, name, new)
    return model
