"""Hugging Face transformers models: their layers, and a pruned model whose ``config`` still describes it.

transformers 5 builds every layer of a model from one config (``num_attention_heads``, ``intermediate_size``...)
and has no per-layer ``pruned_heads`` any more, so a pruned model round-trips ``save_pretrained`` /
``from_pretrained`` only when every layer keeps the same counts and the config can say them. slimkit therefore:

- keeps the counts uniform across layers: groups that differ only by a layer index form a *family* and keep the
  same number of units (each layer still chooses its own heads / neurons by importance);
- prunes attention heads only where the config can name the head size (``head_dim``: Llama, ViT...); where the
  model derives it from ``hidden_size / num_attention_heads`` (BERT, GPT-2) the heads are kept intact, and named;
- writes the kept counts into ``config`` and proves it by building the class from the new config (on the meta
  device) and comparing every parameter's shape with the pruned model.

Also here: GPT-2's ``Conv1D`` (a Linear with its weight stored (in, out)): graph handler, surgery and scoring.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from typing import Any

import torch
from torch import fx, nn

from slimkit.errors import UsageError
from slimkit.pruning.graph import (
    SCORING_VIEWS,
    Group,
    PruneGraph,
    Value,
    Walker,
    register_graph_handler,
    register_late,
)
from slimkit.pruning.surgery import _take, register_surgery

__all__ = [
    "config_dict",
    "families",
    "is_transformers",
    "mark_pruned",
    "restrict",
    "set_config",
    "uniform_counts",
    "update_config",
]

FFN_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim")


def _config(model: nn.Module) -> Any:
    """The transformers config of ``model`` (typed loosely: transformers is not imported here)."""
    return getattr(model, "config")  # noqa: B009


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The transformers config of ``model`` as a plain dict."""
    return dict(_config(model).to_dict())


def set_config(model: nn.Module, fields: dict[str, Any]) -> None:
    """Write recorded counts into ``model``'s config (replaying a pruning record on a freshly built model)."""
    config = _config(model)
    for key, value in fields.items():
        if not hasattr(config, key) and key != PRUNED_MARK:
            raise UsageError(f"pruning record sets config field {key!r}, which {type(config).__name__} does not have")
        setattr(config, key, value)


def is_transformers(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


@register_late
def register_transformers_layers() -> None:
    """Handlers for transformers' own layer types (only when transformers is already imported)."""
    if "transformers" not in sys.modules or _REGISTERED:
        return
    from transformers.pytorch_utils import Conv1D

    _REGISTERED.append(True)

    @register_graph_handler(Conv1D)
    def _conv1d(walker: Walker, node: fx.Node, x: Value | None) -> object:
        name, module, shape = str(node.target), walker.module_of(node), walker.dims(node.args[0])
        if x is None:
            return walker.unknown(node, f"input to Conv1D {name!r}")
        at = walker.at_dim(node, x, len(shape) - 1, shape)
        if at is None:
            return walker.unknown(node, f"Conv1D {name!r} applied to a non-channel dim")
        walker.read(name, at, "in")
        return walker.new_producer(name, int(module.nf), len(shape) - 1)

    @register_surgery(Conv1D)
    def _conv1d_surgery(module, out_keep, in_keep):
        _take(module.weight, out_keep, 1)
        _take(module.bias, out_keep, 0)
        _take(module.weight, in_keep, 0)
        module.nx, module.nf = module.weight.shape
        return module

    SCORING_VIEWS[Conv1D] = _LinearView


_REGISTERED: list[bool] = []


class _Transposed:
    """A (in, out) parameter read as (out, in) by the importance criteria (``.detach()`` and ``.grad``)."""

    def __init__(self, param: torch.Tensor) -> None:
        self.param = param

    def detach(self) -> torch.Tensor:
        return self.param.detach().t()

    @property
    def grad(self) -> torch.Tensor:
        grad = self.param.grad
        return (torch.zeros_like(self.param) if grad is None else grad).t()


class _LinearView(nn.Linear):
    """How importance criteria see a ``Conv1D``: a Linear with the same (transposed) weight, never called."""

    def __init__(self, source: nn.Module) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "_source", source)

    @property  # type: ignore[override,unused-ignore]
    def weight(self) -> Any:  # type: ignore[override]
        return _Transposed(object.__getattribute__(self, "_source").weight)

    @property  # type: ignore[override,unused-ignore]
    def bias(self) -> Any:  # type: ignore[override]
        return object.__getattribute__(self, "_source").bias


# -- uniform counts across layers -------------------------------------------------------------------------------
def families(graph: PruneGraph) -> list[list[int]]:
    """Indices of ``graph.groups`` that differ only by layer indices in their id and have the same size."""
    found: dict[tuple[str, int, int], list[int]] = {}
    for i, group in enumerate(graph.groups):
        found.setdefault((re.sub(r"\.\d+\.", ".*.", group.id), group.size, group.unit), []).append(i)
    return list(found.values())


def uniform_counts(
    keep_units: list[int], graph: PruneGraph, cost, target: str, amount: float, limits, model: nn.Module
) -> list[int]:
    """``keep_units`` (units kept per group) made equal within each family, still landing on ``amount``: start
    from each family's mean, then move one family by one ``round_to`` step at a time toward the target. Head
    counts the config class refuses (Llama: hidden_size must be a multiple of num_attention_heads) are skipped."""
    fams = families(graph)
    keep = list(keep_units)
    heads = _heads_groups(graph)
    allowed: dict[tuple[int, int], bool] = {}

    def valid(fam: list[int], value: int) -> bool:
        group = graph.groups[fam[0]]
        if group not in heads or value == group.units:
            return True
        key = (fam[0], value)
        if key not in allowed:
            allowed[key] = _config_accepts(model, _head_fields(model, graph, group, value * group.unit))
        return allowed[key]

    for fam in fams:
        mean = round(sum(keep[i] for i in fam) / len(fam))
        step = max(limits[i].step for i in fam)
        floor = max(limits[i].fixed or limits[i].min_keep for i in fam)
        value = min(max(math.ceil(mean / step) * step, floor), graph.groups[fam[0]].units)
        while not valid(fam, value):
            value += 1
        for i in fam:
            keep[i] = limits[i].fixed if limits[i].fixed is not None else value

    def reduction(k: list[int]) -> float:
        channels = [n * g.unit for n, g in zip(k, graph.groups)]
        if target == "channels":
            return 1 - sum(channels) / (sum(g.size for g in graph.groups) or 1)
        macs, params = cost.cost(channels)
        return 1 - (macs / cost.total_macs if target == "macs" else params / cost.total_params)

    for _ in range(10_000):
        current = reduction(keep)
        best: tuple[float, list[int]] | None = None
        for fam in fams:
            if any(limits[i].fixed is not None for i in fam):
                continue
            step = max(limits[i].step for i in fam)
            floor = max(limits[i].min_keep for i in fam)
            for delta in (-step, step):
                value = keep[fam[0]] + delta
                if floor <= value <= graph.groups[fam[0]].units and valid(fam, value):
                    trial = list(keep)
                    for i in fam:
                        trial[i] = value
                    gap = abs(reduction(trial) - amount)
                    if gap < abs(current - amount) and (best is None or gap < best[0]):
                        best = (gap, trial)
        if best is None:
            return keep
        keep = best[1]
    return keep


# -- what the config can say ------------------------------------------------------------------------------------
def _head_dim(graph: PruneGraph, group: Group) -> int:
    for member in group.members:
        if member.module in graph.out_repeat:
            return graph.out_repeat[member.module][1]
    return group.unit


def _head_fields(model: nn.Module, graph: PruneGraph, group: Group, kept: int) -> dict[str, int]:
    """The config fields that say a heads group keeps ``kept`` channels."""
    config = _config(model)
    head_dim = _head_dim(graph, group)
    fields = {"num_attention_heads": kept // head_dim, "head_dim": head_dim}
    kv = getattr(config, "num_key_value_heads", None)
    if kv:
        fields["num_key_value_heads"] = kept // head_dim // (int(config.num_attention_heads) // kv)
    return fields


def _config_accepts(model: nn.Module, fields: dict[str, int]) -> bool:
    """The config class validates ``fields`` (as ``from_pretrained`` will when it reads config.json)."""
    data = _config(model).to_dict()
    data.update(fields)
    try:
        type(_config(model)).from_dict(data)
    except Exception:
        return False
    return True


def _heads_groups(graph: PruneGraph) -> list[Group]:
    return [g for g in graph.groups if g.unit > 1 and any(m.role == "in" for m in g.members)]


def restrict(model: nn.Module, graph: PruneGraph) -> list[dict]:
    """Keep intact the attention heads ``model``'s config cannot describe with fewer heads; returns the
    ``kept_intact`` entries (the groups are taken out of ``graph``)."""
    heads = _heads_groups(graph)
    if not heads:
        return []
    group = heads[0]
    head_dim = _head_dim(graph, group)
    config = copy.deepcopy(_config(model))
    total = int(getattr(config, "num_attention_heads", 0) or 0)
    kv = getattr(config, "num_key_value_heads", None)
    repeat = total // kv if kv else 1
    ok = total > repeat and group.size == total * head_dim
    if ok:
        config.num_attention_heads = total - repeat
        if kv:
            config.num_key_value_heads = kv - 1
        config.head_dim = head_dim
        producer = next(m.module for m in group.members if m.role == "out")
        expected = _out_size(model.get_submodule(producer)) // total * (total - repeat)
        try:
            with torch.device("meta"):
                probe = type(model)(config)
            ok = _out_size(probe.get_submodule(producer)) == expected
        except Exception:
            ok = False
    if ok:
        return []
    reason = (
        f"attention heads: transformers' {type(model).__name__} derives the head size from hidden_size / "
        "num_attention_heads, so fewer heads could not be saved in its config (save_pretrained / from_pretrained)"
    )
    kept = [{"group": g.id, "modules": g.names, "reasons": [reason]} for g in heads]
    graph.groups = [g for g in graph.groups if g not in heads]
    graph.group_of_space = {k: g for k, g in graph.group_of_space.items() if g not in heads}
    return kept


def _out_size(module: nn.Module) -> int:
    if hasattr(module, "nf"):
        return int(getattr(module, "nf"))  # noqa: B009
    return int(getattr(module, "out_features", 0))


PRUNED_MARK = "slimkit_pruned"


def mark_pruned(model: nn.Module) -> dict[str, str]:
    """``PruneConfig(hf_config=False)``: the config keeps its counts and says why they are not the model's."""
    note = "pruned per layer by slimkit (hf_config=False): load with slimkit.load, not from_pretrained"
    setattr(_config(model), PRUNED_MARK, note)
    return {PRUNED_MARK: note}


def update_config(model: nn.Module, graph: PruneGraph, keep_channels: dict[int, torch.Tensor]) -> dict[str, int]:
    """Write the kept head / FFN counts into ``_config(model)`` and prove it: the class built from the new config
    has every parameter of the pruned model's shape. Returns the fields changed."""
    config = _config(model)
    changed: dict[str, int] = {}
    heads = _heads_groups(graph)
    for group in graph.groups:
        kept = len(keep_channels.get(id(group), range(group.size)))
        if kept == group.size:
            continue
        if group in heads:
            changed.update(_head_fields(model, graph, group, kept))
        else:
            field = next((f for f in FFN_FIELDS if hasattr(config, f)), None)
            if field is None:
                raise UsageError(
                    f"pruned {group.id!r} of {type(model).__name__}, whose config has none of {FFN_FIELDS}: "
                    "ignore that layer (PruneConfig.ignore) to keep the config consistent"
                )
            changed[field] = kept
    if not _config_accepts(model, changed):
        raise UsageError(
            f"transformers' {type(config).__name__} refuses the pruned counts {changed}: ignore the attention "
            "layers (PruneConfig.ignore) or choose another amount"
        )
    new = copy.deepcopy(config)
    for key, value in changed.items():
        setattr(new, key, value)
    with torch.device("meta"):
        rebuilt = type(model)(new)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, tensor in rebuilt.state_dict().items():
        if key in want and tuple(tensor.shape) != want[key]:
            raise UsageError(
                f"the pruned {type(model).__name__} cannot be described by its config ({changed}): {key} is "
                f"{want[key]} but the config builds {tuple(tensor.shape)}. Ignore that layer (PruneConfig.ignore)"
            )
    for key, value in changed.items():
        setattr(config, key, value)
    return changed
