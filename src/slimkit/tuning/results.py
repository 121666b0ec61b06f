"""``SearchResult`` / ``SearchStudy``: what ``slimkit.search`` returns, built from the trials in storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from slimkit._text import human, make_table, render
from slimkit.errors import MissingFileError, UsageError
from slimkit.tuning.objectives import OBJECTIVES
from slimkit.tuning.pareto import Candidate

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["SearchResult", "SearchStudy", "candidate_of", "format_metrics"]


def format_metrics(metrics: dict[str, Any], objectives: tuple[str, ...] = ()) -> str:
    """``acc 97.85% | 0.412 ms (1.85x, onnxruntime fp32) | 12.3KB | 0.42M MACs`` (objectives first)."""
    parts = [f"acc {metrics['accuracy']:.2f}%"] if "accuracy" in metrics else []
    if "latency_ms" in metrics:
        runtime = f", {metrics['runtime']}" if metrics.get("runtime") else ""
        parts.append(f"{metrics['latency_ms']:.3f} ms ({metrics.get('speedup', 1.0):.2f}x{runtime})")
    if "size_bytes" in metrics:
        parts.append(human(metrics["size_bytes"], "B"))
    if "macs" in metrics:
        parts.append(f"{human(metrics['macs'])} MACs")
    return " | ".join(parts)


def candidate_of(trial: Any) -> Candidate:
    """A finished Optuna trial as the selection math sees it."""
    return Candidate(
        trial.number,
        tuple(trial.values),
        float(trial.user_attrs.get("violation", 0.0)),
        {
            "params": dict(trial.params),
            "metrics": dict(trial.user_attrs.get("metrics", {})),
            "plan": dict(trial.user_attrs.get("plan", trial.params)),
        },
    )


@dataclass
class SearchResult:
    """One finished trial: the plan (its parameters), its metrics and where its model is saved.

    ``model`` is loaded from ``path`` on first use (the trial may have run in another process)."""

    trial: int
    plan: dict[str, Any]
    metrics: dict[str, Any]  # numbers, and ``runtime`` (where latency was timed) when latency is an objective
    values: tuple[float, ...]
    feasible: bool
    violation: float
    path: Path | None = None
    template: nn.Module | None = field(default=None, repr=False)
    _model: nn.Module | None = field(default=None, repr=False)

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            if self.path is None:
                raise MissingFileError(
                    f"trial {self.trial}: its model was not saved (it never improved the best result or the Pareto set)"
                )
            from slimkit.tuning.saving import load_model

            self._model = load_model(self.path, self.template)
        return self._model

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "plan": self.plan,
            "metrics": self.metrics,
            "values": list(self.values),
            "feasible": self.feasible,
            "violation": self.violation,
            "path": str(self.path) if self.path else None,
        }


@dataclass
class SearchStudy:
    """The outcome of ``slimkit.search``: ``best`` (saved under ``<out>/best``), ``pareto`` (saved under
    ``<out>/pareto/trial-N``), the Optuna ``study`` and a ``message`` (e.g. an unsatisfiable budget).

    ``slimkit.save(study, folder)`` saves the best model (``.model``) with its trial, plan and metrics
    (``.metrics``); save another trial with ``slimkit.save(study.pareto[i], folder)``.
    """

    best: SearchResult | None
    pareto: list[SearchResult]
    study: Any
    objectives: tuple[str, ...]
    baseline: dict[str, float]
    threshold: float | None
    out: Path
    finished: int
    pruned: int
    failed: int
    message: str = ""
    importances: dict[str, dict[str, float]] = field(default_factory=dict)
    report: Path | None = None

    @property
    def feasible(self) -> bool:
        return self.best is not None and self.best.feasible

    def _best(self) -> SearchResult:
        if self.best is None:
            raise UsageError(
                f"search in {self.out}: no trial finished, so there is no best model to save or use; "
                "rerun the search with more n_trials"
            )
        return self.best

    @property
    def model(self) -> nn.Module:
        """The best trial's model (loaded from ``<out>/best``): what ``slimkit.save(study, folder)`` writes."""
        return self._best().model

    @property
    def metrics(self) -> dict[str, Any]:
        """The best trial's metrics with its trial number and plan, stored by ``slimkit.save``."""
        best = self._best()
        return {**best.metrics, "trial": best.trial, "plan": dict(best.plan), "baseline": dict(self.baseline)}

    def table(self) -> Table:
        shown = [*self.pareto]
        if self.best is not None and all(r.trial != self.best.trial for r in self.pareto):
            shown.append(self.best)
        # where each latency was measured (the fastest deployed form, or PyTorch eager)
        runtime = "latency" in self.objectives and any(r.metrics.get("runtime") for r in shown)
        cols = [
            "",
            "trial",
            *[f"{o} ({OBJECTIVES[o].unit})" if OBJECTIVES[o].unit else o for o in self.objectives],
            *(["runtime"] if runtime else []),
            "feasible",
            "plan",
        ]
        rows: list[list[object]] = [
            [
                "input",
                "-",
                *[_fmt(o, self.baseline) for o in self.objectives],
                *([self.baseline.get("runtime") or "-"] if runtime else []),
                "-",
                "",
            ]
        ]
        for r in shown:
            mark = "best" if self.best is not None and r.trial == self.best.trial else "pareto"
            rows.append(
                [
                    mark,
                    r.trial,
                    *[_fmt(o, r.metrics) for o in self.objectives],
                    *([r.metrics.get("runtime") or "-"] if runtime else []),
                    "yes" if r.feasible else "no",
                    _short_plan(r.plan),
                ]
            )
        budget = "" if self.threshold is None else f", accuracy >= {self.threshold:.2f}%"
        return make_table(
            f"search: {self.finished} finished, {self.pruned} pruned, {self.failed} failed{budget}", cols, rows
        )

    def __str__(self) -> str:
        text = render(self.table(), width=160)
        return f"{text}\n{self.message}" if self.message else text


def _fmt(objective: str, metrics: dict[str, Any]) -> str:
    value = metrics.get(OBJECTIVES[objective].metric)
    if value is None:
        return "-"
    if objective == "accuracy":
        return f"{value:.2f}"
    if objective == "latency":
        return f"{value:.3f}"
    return human(value)


def _short_plan(plan: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={one(v)}" for k, v in plan.items())
