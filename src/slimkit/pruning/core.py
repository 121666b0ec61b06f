"""One-shot structured pruning: trace -> score -> allocate -> cut, and the record that replays it."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit._modules import matches
from slimkit.errors import UsageError
from slimkit.pruning import hf
from slimkit.pruning.allocate import CostModel, GroupLimits, allocate, measure
from slimkit.pruning.calibrate import calibration_inputs, input_energy, reconstruct_
from slimkit.pruning.config import BLOCK, PruneConfig
from slimkit.pruning.graph import Group, PruneGraph, build_graph, trace
from slimkit.pruning.importance import NEEDS_ACTIVATIONS, NEEDS_GRADIENTS, resolve
from slimkit.pruning.latency import latency_model, meet_latency
from slimkit.pruning.surgery import apply_plan, decode_indices, encode_indices

__all__ = [
    "PruneResult",
    "apply_record",
    "apply_record_",
    "compose_records",
    "compute_gradients",
    "group_scores",
    "is_ignored",
    "matches_any",
    "plan_edits",
    "prune_once",
    "replay",
]

RECORD_FORMAT = 1


@dataclass
class PruneResult:
    """``model``: the pruned copy; ``record``: JSON-safe edits and before/after metrics; ``steps``: per-step log
    of the iterative loop (empty for one shot)."""

    model: nn.Module
    record: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)


def compute_gradients(model: nn.Module, train_data, loss_fn, batches: int) -> None:
    """Accumulate ``.grad`` of ``model`` over the first ``batches`` batches of ``train_data`` (for ``taylor``)."""
    from slimkit.train import default_loss, make_loader

    if train_data is None:
        raise UsageError("importance='taylor' needs gradients: pass train_data= to prune (a few batches are used)")
    loss_fn = loss_fn or default_loss
    model.zero_grad(set_to_none=True)
    for i, (inputs, targets) in enumerate(make_loader(train_data, 64, shuffle=False)):
        if i >= batches:
            break
        loss_fn(model(inputs), targets, inputs).backward()


def _limits(graph: PruneGraph, cfg: PruneConfig, block: int = BLOCK) -> list[GroupLimits]:
    limits = []
    for group in graph.groups:
        step = cfg.step_of(group.units, group.unit, block)
        min_keep = max(1, math.ceil(group.units * (1 - cfg.max_sparsity) - 1e-9))
        producers = [m.module for m in group.members if m.role in ("out", "heads")]
        fixed = None
        for pattern, ratio in cfg.overrides.items():
            if matches_any(producers, pattern):
                fixed = max(1, round(group.units * (1 - ratio)))
        limits.append(GroupLimits(min_keep, step, fixed))
    return limits


def matches_any(names: list[str], pattern: str) -> bool:
    """Some module of ``names`` is selected by ``pattern`` (``slimkit._modules.matches``)."""
    return any(matches(n, pattern) for n in names)


def plan_edits(graph: PruneGraph, keep_channels: dict[int, torch.Tensor], model: nn.Module) -> dict[str, dict]:
    """``{module: {"type", "out", "in"}}`` with runs of kept indices into the original layer, when group
    ``id(group)`` keeps ``keep_channels[id(group)]`` (groups not listed keep every channel)."""

    def keep_of(space: int) -> torch.Tensor | None:
        group = graph.group_of_space.get(graph.root(space))
        return None if group is None else keep_channels.get(id(group))

    plan: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys([*graph.out_space, *graph.in_segs, *graph.heads_space]):
        space = graph.out_space.get(name, graph.heads_space.get(name))
        out = keep_of(space) if space is not None else None
        copies = graph.out_copies.get(name, 1)
        if space is not None and out is not None and copies > 1:  # fused q/k/v: the same heads in every part
            size = graph.group_of_space[graph.root(space)].size
            out = torch.cat([out + part * size for part in range(copies)])
        if out is not None and name in graph.out_repeat:  # grouped-query k/v: the kv head of each kept unit
            repeat, head_dim = graph.out_repeat[name]
            out = torch.unique(out // (repeat * head_dim) * head_dim + out % head_dim)
        parts, offset, changed = [], 0, False
        for seg in graph.in_segs.get(name, ()):
            keep = keep_of(seg.space)
            if keep is None:
                parts.append(torch.arange(offset, offset + seg.channels * seg.block))
            else:
                changed = True
                parts.append((offset + keep[:, None] * seg.block + torch.arange(seg.block)).flatten())
            offset += seg.channels * seg.block
        inn = torch.cat(parts) if changed else None
        if out is not None or inn is not None:
            plan[name] = {
                "type": type(model.get_submodule(name)).__name__,
                "out": None if out is None else encode_indices(out),
                "in": None if inn is None else encode_indices(inn),
            }
    for name, (space, dim) in graph.params.items():  # per-channel parameters used in forward (x * self.scale)
        keep = keep_of(space)
        if keep is not None:
            plan[name] = {"type": "Parameter", "out": None, "in": encode_indices(keep), "dim": dim}
    for group in graph.groups:  # head counts read by reshapes (num_heads...)
        keep = keep_channels.get(id(group))
        if keep is None:
            continue
        for module, attr, per in group.attrs:
            edit = plan.setdefault(
                module, {"type": type(model.get_submodule(module)).__name__, "out": None, "in": None}
            )
            edit.setdefault("attrs", {})[attr] = len(keep) // per
    return plan


def prune_once(
    model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor, *, train_data=None, loss_fn=None
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a deep copy of ``model`` once, by ``cfg.amount`` of ``cfg.target``; returns (model, record)."""
    work = copy.deepcopy(model).eval()
    calibration = _calibration(train_data, cfg)
    graph = build_graph(work, example_input, tuple(cfg.leaf_modules))
    ignored = [g for g in graph.groups if is_ignored(g, cfg)]
    kept_intact = list(graph.kept_intact) + [
        {"group": g.id, "modules": g.names, "reasons": ["ignored by config"]} for g in ignored
    ]
    graph.groups = [g for g in graph.groups if g not in ignored]
    graph.group_of_space = {k: g for k, g in graph.group_of_space.items() if g not in ignored}
    describe = hf.is_transformers(work) and cfg.hf_config  # the config must say the pruned shapes (pruning.hf)
    if describe and getattr(work.config, hf.PRUNED_MARK, None):
        raise UsageError(
            f"this {type(model).__name__} was pruned with hf_config=False, so its config no longer describes it; "
            "prune it again with PruneConfig(hf_config=False)"
        )
    if describe:  # heads the config cannot describe stay intact
        kept_intact += hf.restrict(work, graph)
    cost = CostModel(work, graph, example_input)
    before = {"params": cost.total_params, "macs": cost.total_macs}
    target = cfg.target.value
    keep_channels: dict[int, torch.Tensor] = {}
    latency: dict[str, Any] | None = None
    notes: list[str] = []
    if cfg.amount > 0:
        if not graph.groups:
            reasons = "; ".join(dict.fromkeys(r for k in kept_intact for r in k["reasons"][:1]))
            raise UsageError(
                f"cannot remove {cfg.amount:.0%} of the {target}: nothing to prune, every channel "
                f"group is ignored or kept intact ({reasons}). Ignore fewer layers"
            )
        criterion = resolve(cfg.importance, cfg.seed)
        if cfg.importance_name in NEEDS_GRADIENTS:
            compute_gradients(work, train_data, loss_fn, cfg.taylor_batches)
        if cfg.importance_name in NEEDS_ACTIVATIONS:
            _measure_energy(work, graph, calibration)
        scores = [group_scores(criterion, g) for g in graph.groups]
        work.zero_grad(set_to_none=True)
        keep_channels, latency, notes = _choose(work, graph, scores, cost, cfg, kept_intact, example_input)
    plan = plan_edits(graph, keep_channels, work)
    with torch.no_grad():
        apply_plan(work, plan)
    reconstructed = []
    if cfg.reconstruct and cfg.amount > 0:
        scope = "all" if cfg.reconstruct == "all" else "pruned"
        reconstructed = reconstruct_(model, work, plan, calibration, scope)
    hf_before = hf.config_dict(work) if hf.is_transformers(work) else {}  # a new dict: update_config sets attributes
    hf_config = None
    if hf.is_transformers(work) and keep_channels:
        hf_config = hf.update_config(work, graph, keep_channels) if describe else hf.mark_pruned(work)
    _check_head_splits(work, graph, keep_channels, example_input, cfg)
    try:
        after_cost = measure(work, example_input)
    except Exception as exc:  # a tensor the trace could not follow (one computed from a buffer) kept its width
        if not keep_channels:
            raise
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UsageError(
            f"the pruned {type(model).__name__} fails on the example input ({first}): a tensor the "
            "trace could not follow depends on pruned channels. Name the layers around it in "
            "PruneConfig.ignore or PruneConfig.leaf_modules"
        ) from exc
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "config": cfg.to_dict(strict=False),  # an unregistered callable criterion is recorded by its __name__
        "modules": plan,
        "groups": [
            {
                "id": g.id,
                "size": g.size,
                "unit": g.unit,
                "kept": len(keep_channels.get(id(g), range(g.size))),
                "keep": encode_indices(keep_channels.get(id(g), torch.arange(g.size))),
                "members": g.names,
                **({"params": [name for name, _ in g.params]} if g.params else {}),
            }
            for g in graph.groups
        ],
        "kept_intact": kept_intact,
        "before": before,
        "after": after_cost,
        "reduction": {k: 1 - after_cost[k] / before[k] if before[k] else 0.0 for k in ("params", "macs")},
    }
    if cfg.allocation.value == "sensitivity" and cfg.sensitivity:
        record["sensitivity"] = {g: [[float(r), float(a)] for r, a in pts] for g, pts in cfg.sensitivity.items()}
    if notes:
        record["notes"] = notes
    if cfg.reconstruct:
        record["reconstructed"] = reconstructed
    if hf_config:  # the new counts, and the values before them (an artifact rebuilds the original config)
        record["hf_config"] = hf_config
        record["hf_config_before"] = {key: hf_before.get(key) for key in hf_config if key != hf.PRUNED_MARK}
    if latency is not None:
        record["latency"] = latency
        record["reduction"]["latency"] = latency["measured"]
    elif target == "latency":  # amount 0: nothing was cut, nothing timed
        record["reduction"]["latency"] = 0.0
    if cfg.amount > 0 and target not in ("channels", "latency"):
        achieved = record["reduction"][target]
        if abs(achieved - cfg.amount) > cfg.tolerance:
            raise UsageError(
                f"could only reach {achieved:.1%} {target} reduction instead of {cfg.amount:.1%}: "
                "the channel groups are too coarse; use allocation='global', a smaller round_to or a "
                "larger max_sparsity"
            )
    return work, record


def _calibration(train_data, cfg: PruneConfig) -> list:
    """The calibration inputs ``activation`` and ``reconstruct`` share (read once; none when neither runs)."""
    if cfg.amount == 0:
        return []
    if cfg.importance_name in NEEDS_ACTIVATIONS:
        return calibration_inputs(train_data, cfg.calibration_batches, "importance='activation'")
    if cfg.reconstruct:
        return calibration_inputs(train_data, cfg.calibration_batches, "reconstruct=True")
    return []


def _measure_energy(model: nn.Module, graph: PruneGraph, inputs: list) -> None:
    """Fill each group's ``energy``: the mean square of every input feature of the layers that read it."""
    readers = [m.module for g in graph.groups for m in g.members if m.role == "in"]
    energy = input_energy(model, list(dict.fromkeys(readers)), inputs)
    for group in graph.groups:
        group.energy = {m.module: energy[m.module] for m in group.members if m.module in energy}


def _check_head_splits(
    model: nn.Module,
    graph: PruneGraph,
    keep_channels: dict[int, torch.Tensor],
    example_input: torch.Tensor,
    cfg: PruneConfig,
) -> None:
    """After rewriting head-count attributes, every head split must see the kept head count (the attribute was
    matched by value, so prove it is the one the reshape reads)."""
    expected: dict[str, tuple[tuple[int, ...], Group]] = {}
    for node, space, dim, shape in graph.head_splits:
        group = graph.group_of_space.get(graph.root(space))
        keep = None if group is None else keep_channels.get(id(group))
        if group is not None and keep is not None:
            per = shape[dim + 1]
            expected[node] = (*shape[:dim], len(keep) // per, *shape[dim + 1 :]), group
    if not expected:
        return
    failure = ""
    try:
        nodes = {n.name: n for n in trace(model, example_input, tuple(cfg.leaf_modules)).graph.nodes}
    except ValueError as exc:
        nodes, failure = {}, str(exc).split(":", 1)[-1].strip()[:200]
    for name, (shape, group) in expected.items():
        meta = nodes[name].meta.get("tensor_meta") if name in nodes else None
        got = tuple(meta.shape) if meta is not None else f"an error ({failure})" if not nodes else None
        if got != shape:
            raise UsageError(
                f"after removing heads of {group.id!r} (attributes {group.attrs}), reshape {name!r} "
                f"gives {got} instead of {shape}: the head count it reads is not that attribute. Name "
                "the attention module in PruneConfig.leaf_modules or ignore it"
            )


def is_ignored(group: Group, cfg: PruneConfig) -> bool:
    """``cfg.ignore`` selects a module that produces the group's channels."""
    producers = [m.module for m in group.members if m.role in ("out", "heads")]
    return any(matches_any(producers, p) for p in cfg.ignore)


def group_scores(criterion: Callable[[Group], Any], group: Group) -> torch.Tensor:
    """``criterion(group)`` as a float tensor, checked: one finite score per unit."""
    scores = torch.as_tensor(criterion(group), dtype=torch.float32).flatten()
    if scores.numel() != group.units or not torch.isfinite(scores).all():
        raise UsageError(
            f"importance criterion returned {scores.numel()} scores (finite: "
            f"{bool(torch.isfinite(scores).all())}) for group {group.id!r}, which has {group.units} "
            "units: return one finite score per unit"
        )
    return scores


def _choose(
    work: nn.Module,
    graph: PruneGraph,
    scores: list[torch.Tensor],
    cost: CostModel,
    cfg: PruneConfig,
    kept_intact: list[dict],
    example_input: torch.Tensor,
) -> tuple[dict[int, torch.Tensor], dict[str, Any] | None, list[str]]:
    """Channels kept per group (``id(group)``), the latency record (``target="latency"``) and notes.

    The default ``round_to`` keeps groups of 16+ channels in multiples of ``BLOCK``; when that cannot reach a
    MACs/params target within the tolerance, the step halves (8, 4, 2, 1) until it can, and a note says so.
    ``target="latency"`` keeps the blocks: it measures, and sub-block widths are what makes a runtime slow."""
    target = cfg.target.value
    curves = _sensitivity_curves(graph, cfg)
    blocks = (BLOCK,) if cfg.round_to is not None or target == "latency" else (16, 8, 4, 2, 1)
    for block in blocks:
        limits = _limits(graph, cfg, block)
        last = block == blocks[-1]
        if target == "latency":
            predict = latency_model(work, cost, limits, example_input, cfg)
        else:
            predict = None
            if (
                not last
                and target != "channels"
                and _best_reduction(graph, limits, cost, cfg) < cfg.amount - cfg.tolerance
            ):
                continue
            _check_reachable(graph, limits, cost, cfg, kept_intact)

        def keep_for(amount: float, limits: list[GroupLimits] = limits, predict=predict) -> dict[int, torch.Tensor]:
            keep_units = allocate(graph, scores, limits, cost, cfg.allocation.value, target, amount, curves, predict)
            if predict is None and hf.is_transformers(work) and cfg.hf_config:  # one count per layer family
                keep_units = hf.uniform_counts(keep_units, graph, cost, target, amount, limits, work)
            keep: dict[int, torch.Tensor] = {}
            for group, score, k in zip(graph.groups, scores, keep_units):
                if k < group.units:
                    units = torch.sort(torch.topk(score, k).indices).values
                    keep[id(group)] = (units[:, None] * group.unit + torch.arange(group.unit)).flatten()
            return keep

        if predict is not None:

            def cut(keep: dict[int, torch.Tensor]) -> nn.Module:
                candidate = copy.deepcopy(work)
                with torch.no_grad():
                    return apply_plan(candidate, plan_edits(graph, keep, candidate))

            keep, latency = meet_latency(work, graph, keep_for, predict, example_input, cfg, cut)
            return keep, latency, []
        keep = keep_for(cfg.amount)
        kept = [len(keep[id(g)]) if id(g) in keep else g.size for g in graph.groups]
        if last or abs(_reduction(cost, kept, target) - cfg.amount) <= cfg.tolerance:
            notes = []
            if block != blocks[0]:
                notes.append(
                    f"round_to: multiples of {BLOCK} channels cannot remove {cfg.amount:.0%} of the {target}; "
                    f"kept counts are multiples of {block} (slower kernels on ONNX Runtime / oneDNN: lower "
                    "amount or pass round_to explicitly to choose)"
                )
                warnings.warn(notes[-1], stacklevel=4)
            return keep, None, notes
    raise AssertionError("unreachable: the last block always returns")


def _reduction(cost: CostModel, kept: list[int], target: str) -> float:
    if target == "channels":
        return 1 - sum(kept) / (sum(cost.sizes) or 1)
    macs, params = cost.cost(kept)
    return 1 - (macs / cost.total_macs if target == "macs" else params / cost.total_params)


def _best_reduction(graph, limits, cost, cfg) -> float:
    """The largest MACs/params reduction ``limits`` allow (every group at its floor)."""
    floor = [(lim.fixed or lim.min_keep) * g.unit for g, lim in zip(graph.groups, limits)]
    return _reduction(cost, floor, cfg.target.value)


def _check_reachable(graph, limits, cost, cfg, kept_intact) -> None:
    if cfg.target.value == "channels":
        return
    best = _best_reduction(graph, limits, cost, cfg)
    if best < cfg.amount - cfg.tolerance:
        intact = ", ".join(dict.fromkeys(m for k in kept_intact for m in k["modules"][:2]))[:300]
        raise UsageError(
            f"cannot remove {cfg.amount:.0%} of the {cfg.target.value}: with max_sparsity="
            f"{cfg.max_sparsity} and the ignored/intact layers ({intact or 'none'}) at most "
            f"{best:.1%} can go. Lower amount, raise max_sparsity or ignore fewer layers"
        )


def _sensitivity_curves(graph, cfg: PruneConfig):
    """Per group ``[(ratio, accuracy drop in points)]`` from ``cfg.sensitivity`` (accuracy curves)."""
    if cfg.allocation.value != "sensitivity":
        return None
    if not cfg.sensitivity:
        raise UsageError(
            "allocation='sensitivity' needs PruneConfig.sensitivity (the result of "
            "slimkit.pruning.sensitivity(...)) or val_data passed to prune"
        )
    curves = []
    for group in graph.groups:
        if group.id not in cfg.sensitivity:
            raise UsageError(f"sensitivity table has no entry for group {group.id!r}; rerun the analysis on this model")
        points = sorted((float(r), float(a)) for r, a in cfg.sensitivity[group.id])
        if not points or points[0][0] != 0.0:
            raise UsageError(
                f"sensitivity curve of group {group.id!r} lacks the [0, baseline accuracy] point; "
                "use slimkit.pruning.sensitivity(...)"
            )
        curves.append([(r, points[0][1] - a) for r, a in points])
    return curves


def _compose(first: list | None, second: list | None) -> list | None:
    if first is None or second is None:
        return second if first is None else first
    return encode_indices(decode_indices(first)[decode_indices(second)])


def compose_records(first: dict | None, second: dict) -> dict:
    """One record equivalent to applying ``first`` then ``second`` (indices into the original layers)."""
    if first is None:
        return second
    modules = copy.deepcopy(first["modules"])
    for name, edit in second["modules"].items():
        old = modules.get(name, {"type": edit["type"], "out": None, "in": None})
        modules[name] = {
            "type": old["type"],
            "out": _compose(old["out"], edit["out"]),
            "in": _compose(old["in"], edit["in"]),
        }
        if "attrs" in old or "attrs" in edit:  # absolute values: the later step wins
            modules[name]["attrs"] = {**old.get("attrs", {}), **edit.get("attrs", {})}
        if "dim" in old or "dim" in edit:  # a per-channel parameter: cut along the same dim every time
            modules[name]["dim"] = old.get("dim", edit.get("dim"))
    groups = {g["id"]: g for g in first["groups"]}
    for g in second["groups"]:
        if g["id"] in groups:
            merged = dict(g, size=groups[g["id"]]["size"], keep=_compose(groups[g["id"]]["keep"], g["keep"]))
            groups[g["id"]] = merged
    merged = dict(second, modules=modules, groups=list(groups.values()), before=first["before"])
    merged["reduction"] = {k: 1 - merged["after"][k] / merged["before"][k] for k in ("params", "macs")}
    if "latency" in first["reduction"] and "latency" in second["reduction"]:  # each step's measured ratio
        merged["reduction"]["latency"] = 1 - (1 - first["reduction"]["latency"]) * (1 - second["reduction"]["latency"])
    return merged


def apply_record_(fresh_model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Rebuild the pruned shapes on a freshly built model of the same architecture, in place (returned).
    ``apply_record`` and ``replay`` are older names of this function.

    Example:
        >>> pruned = slimkit.prune(model, PruneConfig(amount=0.5), x)                  # doctest: +SKIP
        >>> clone = apply_record_(slimkit.models.create("resnet20"), pruned.record)    # doctest: +SKIP
        >>> clone.load_state_dict(pruned.model.state_dict())                           # doctest: +SKIP
    """
    if not isinstance(record, dict) or "modules" not in record:
        raise UsageError("not a pruning record: expected a dict with 'modules' (PruneResult.record)")
    if record.get("format", RECORD_FORMAT) > RECORD_FORMAT:
        raise UsageError(
            f"pruning record format {record['format']} is newer than this slimkit understands "
            f"({RECORD_FORMAT}); upgrade slimkit"
        )
    with torch.no_grad():
        model = apply_plan(fresh_model, record["modules"])
    if record.get("hf_config"):  # a transformers model's config says the pruned counts again
        hf.set_config(model, record["hf_config"])
    return model


apply_record = replay = apply_record_
