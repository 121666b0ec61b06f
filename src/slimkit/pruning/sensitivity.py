"""Sensitivity analysis: accuracy versus pruning ratio for each channel group, pruned alone.

For every group ``g`` and ratio ``r`` a copy of the model loses the ``floor(r * units)`` least important units of
``g`` only (no fine-tuning) and is evaluated on ``val_data``. The curves feed
``PruneConfig(allocation="sensitivity", sensitivity=result)``: each group then gets the largest measured ratio
whose accuracy drop stays under one shared threshold, found by bisection on the MACs/params target.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimkit._plot import pyplot, save_png
from slimkit.errors import UsageError
from slimkit.pruning.config import PruneConfig
from slimkit.pruning.core import compute_gradients, group_scores, is_ignored, plan_edits
from slimkit.pruning.graph import build_graph
from slimkit.pruning.importance import NEEDS_GRADIENTS, resolve
from slimkit.pruning.surgery import apply_plan

__all__ = ["SensitivityResult", "sensitivity"]


@dataclass
class SensitivityResult:
    """``curves``: ``{group id: [[ratio, accuracy %], ...]}`` starting at ``[0.0, baseline]``; ``units``: the
    prunable units of each group."""

    baseline: float
    curves: dict[str, list[list[float]]]
    units: dict[str, int] = field(default_factory=dict)

    def drops(self) -> dict[str, list[list[float]]]:
        """The same curves as accuracy *drops* (points) from the baseline."""
        return {g: [[r, self.baseline - a] for r, a in pts] for g, pts in self.curves.items()}

    def table(self) -> str:
        """A rich table (rendered to text): one row per group, one column per ratio."""
        from slimkit._text import make_table, render

        ratios = sorted({r for pts in self.curves.values() for r, _ in pts if r > 0})
        rows = []
        for group, pts in self.curves.items():
            acc = dict((r, a) for r, a in pts)
            rows.append([group, self.units.get(group, ""), *(f"{acc[r]:.2f}" if r in acc else "" for r in ratios)])
        return render(
            make_table(
                f"sensitivity (accuracy %, baseline {self.baseline:.2f})",
                ["group", "units", *(f"{r:.0%}" for r in ratios)],
                rows,
            )
        )

    def plot(self, path: str | Path) -> Path:
        """Accuracy versus ratio, one line per group, as a PNG (matplotlib, imported here)."""
        return plot_curves(self.curves, path)


def plot_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: str | Path) -> Path:
    """Accuracy versus the pruning ratio of each group alone, one line per group, as a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for group, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=group)
    ax.set_xlabel("pruning ratio of the group alone")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("pruning sensitivity per group")
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    return save_png(fig, path)


def sensitivity(
    model: nn.Module,
    example_input: torch.Tensor,
    val_data,
    ratios=(0.1, 0.3, 0.5, 0.7, 0.9),
    groups=None,
    *,
    importance="l2",
    ignore=(),
    leaf_modules=(),
    train_data=None,
) -> SensitivityResult:
    """Accuracy of ``model`` on ``val_data`` when each group alone is pruned at each ratio (no fine-tuning).

    Args:
        ratios: fractions in (0, 1) of a group's units to remove.
        groups: group ids to analyse (default: every prunable group not ignored).
        importance, ignore, leaf_modules: as in ``PruneConfig``; ``train_data`` feeds ``taylor``.

    Example:
        >>> res = slimkit.pruning.sensitivity(model, x, val, ratios=(0.25, 0.5))          # doctest: +SKIP
        >>> print(res.table()); res.plot("sensitivity.png")                               # doctest: +SKIP
        >>> slimkit.prune(model, slimkit.PruneConfig(allocation="sensitivity", sensitivity=res), x)  # doctest: +SKIP
    """
    from slimkit.train import evaluate

    ratios = sorted(float(r) for r in ratios)
    if not ratios or ratios[0] <= 0 or ratios[-1] >= 1:
        raise UsageError(f"sensitivity: ratios={ratios} must be fractions strictly between 0 and 1")
    cfg = PruneConfig(importance=importance, ignore=tuple(ignore), leaf_modules=tuple(leaf_modules))
    work = copy.deepcopy(model).eval()
    graph = build_graph(work, example_input, cfg.leaf_modules)
    candidates = [g for g in graph.groups if not is_ignored(g, cfg)]
    if groups is not None:
        known = {g.id for g in candidates}
        unknown = [g for g in groups if g not in known]
        if unknown:
            raise UsageError(f"sensitivity: unknown or ignored group(s) {unknown}; prunable groups: {sorted(known)}")
        candidates = [g for g in candidates if g.id in set(groups)]
    if cfg.importance_name in NEEDS_GRADIENTS:
        compute_gradients(work, train_data, None, cfg.taylor_batches)
    criterion = resolve(cfg.importance, cfg.seed)
    scores = {g.id: group_scores(criterion, g) for g in candidates}
    work.zero_grad(set_to_none=True)
    baseline = evaluate(model, val_data).accuracy
    curves: dict[str, list[list[float]]] = {}
    for group in candidates:
        points = [[0.0, baseline]]
        for ratio in ratios:
            keep = max(1, group.units - math.floor(group.units * ratio + 1e-9))
            units = torch.sort(torch.topk(scores[group.id], keep).indices).values
            channels = (units[:, None] * group.unit + torch.arange(group.unit)).flatten()
            plan = plan_edits(graph, {id(group): channels}, work)
            with torch.no_grad():
                pruned = apply_plan(copy.deepcopy(model), plan)
            points.append([ratio, evaluate(pruned, val_data).accuracy])
        curves[group.id] = points
    return SensitivityResult(baseline, curves, {g.id: g.units for g in candidates})
