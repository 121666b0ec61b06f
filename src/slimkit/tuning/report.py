"""What a search shows and leaves behind: a progress bar with the best-so-far line, ``results.json``,
``report.md`` with the Pareto table and parameter importances, and ``pareto.png``."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimkit._io import write_text
from slimkit._plot import pyplot, save_png
from slimkit.errors import DependencyError
from slimkit.tuning.config import SearchConfig
from slimkit.tuning.objectives import OBJECTIVES
from slimkit.tuning.pareto import best_index
from slimkit.tuning.results import SearchStudy, candidate_of, format_metrics

__all__ = ["SearchProgress", "importances", "plot_pareto", "write_report"]


class SearchProgress:
    """An Optuna callback drawing a rich progress bar and one line per trial with the best result so far."""

    def __init__(self, config: SearchConfig, finished: int, threshold: float | None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.config, self.threshold = config, threshold
        self.enabled = enabled = config.progress and not os.environ.get("SLIMKIT_NO_PROGRESS")
        self.bar = Progress(
            TextColumn("search"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[best]}"),
            disable=not enabled,
        )
        self.task = self.bar.add_task("search", total=config.n_trials, completed=finished, best="")

    def __enter__(self) -> SearchProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, study: Any, trial: Any) -> None:
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in states for t in trials)
        done = [
            candidate_of(t) for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "metrics" in t.user_attrs
        ]
        bi = best_index(done, self.config.objectives, self.config.directions)
        best = "" if bi is None else f"best so far: trial {done[bi].number} {format_metrics(done[bi].extra['metrics'])}"
        if bi is not None and not done[bi].feasible:
            best += " (over budget)"
        self.bar.update(self.task, completed=min(finished, self.config.n_trials), best=best)
        if not self.enabled:
            return
        if trial.state == optuna.trial.TrialState.COMPLETE:
            what = format_metrics(trial.user_attrs.get("metrics", {}))
        else:
            what = trial.state.name.lower()
            if trial.user_attrs.get("pruned_reason"):
                what += f" ({trial.user_attrs['pruned_reason'][:100]})"
        self.bar.console.print(f"trial {trial.number}: {what}", highlight=False)


def _signed_value(index: int, sign: float) -> Callable[[Any], float]:
    """``sign`` x objective ``index`` of a trial (the importance evaluator's target)."""
    return lambda trial: sign * trial.values[index]


def importances(study: Any, objectives: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Optuna's parameter importances per objective (empty when there are too few finished trials)."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 3 or not any(len({str(t.params.get(k)) for t in done}) > 1 for k in done[0].params):
        return {}
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(objectives):
        sign = -1.0 if OBJECTIVES[name].direction == "maximize" else 1.0  # the evaluator ranks low targets
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # it warns whenever a target is given
                values = optuna.importance.get_param_importances(study, target=_signed_value(i, sign))
        except (RuntimeError, ValueError, ZeroDivisionError):
            continue
        out[name] = {k: float(v) for k, v in values.items()}
    return out


def plot_pareto(summary: SearchStudy, path: str | os.PathLike) -> Path | None:
    """Accuracy against the first cost objective (or against trial number for one objective), Pareto set and
    best highlighted, the input model and the accuracy budget drawn in. ``None`` without matplotlib."""
    try:
        plt = pyplot()
    except DependencyError:
        return None
    import optuna

    trials = [
        t
        for t in summary.study.get_trials(deepcopy=False)
        if t.state == optuna.trial.TrialState.COMPLETE and "metrics" in t.user_attrs
    ]
    costs = [o for o in summary.objectives if o != "accuracy"]
    xkey = OBJECTIVES[costs[0]].metric if costs else None

    def x_of(metrics: dict, number: int) -> float:
        return metrics.get(xkey, float("nan")) if xkey else number

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(
        [x_of(t.user_attrs["metrics"], t.number) for t in trials],
        [t.user_attrs["metrics"]["accuracy"] for t in trials],
        s=18,
        c="#9aa",
        label="trials",
    )
    front = sorted(summary.pareto, key=lambda r: x_of(r.metrics, r.trial))
    ax.plot(
        [x_of(r.metrics, r.trial) for r in front],
        [r.metrics["accuracy"] for r in front],
        "o-",
        c="#1f77b4",
        label="Pareto set",
    )
    if summary.best is not None:
        ax.scatter(
            [x_of(summary.best.metrics, summary.best.trial)],
            [summary.best.metrics["accuracy"]],
            s=120,
            marker="*",
            c="#d62728",
            zorder=5,
            label="best",
        )
    if xkey and xkey in summary.baseline:
        ax.scatter([summary.baseline[xkey]], [summary.baseline["accuracy"]], marker="s", c="k", label="input model")
    if summary.threshold is not None:
        ax.axhline(summary.threshold, ls="--", c="#d62728", lw=1, label="accuracy budget")
    ax.set_xlabel(f"{costs[0]} ({OBJECTIVES[costs[0]].unit or 'count'})" if costs else "trial")
    ax.set_ylabel("accuracy (%)")
    if costs and costs[0] in ("size", "macs"):
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def write_report(summary: SearchStudy, config: SearchConfig) -> Path:
    """``results.json`` (every finished trial), ``report.md`` and ``pareto.png`` in ``config.out``."""
    import optuna

    out = Path(config.out)
    summary.importances = importances(summary.study, summary.objectives)
    trials = [
        {
            "trial": t.number,
            "state": t.state.name.lower(),
            "plan": t.user_attrs.get("plan", t.params),
            "metrics": t.user_attrs.get("metrics"),
            "violation": t.user_attrs.get("violation"),
        }
        for t in summary.study.get_trials(deepcopy=False)
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    data = {
        "objectives": list(summary.objectives),
        "baseline": summary.baseline,
        "threshold": summary.threshold,
        "best": summary.best.to_dict() if summary.best else None,
        "pareto": [r.to_dict() for r in summary.pareto],
        "importances": summary.importances,
        "message": summary.message,
        "trials": trials,
        "config": config.to_dict(),
    }
    write_text(out / "results.json", json.dumps(data, indent=1, default=str) + "\n")
    plot = plot_pareto(summary, out / "pareto.png")
    lines = [
        f"# slimkit search: {config.study_name}",
        "",
        f"Storage: `{_redacted(config.storage_url)}`",
        "",
        "```",
        str(summary),
        "```",
        "",
    ]
    if plot is not None:
        lines += ["![Pareto set](pareto.png)", ""]
    for objective, values in summary.importances.items():
        lines += [f"## Parameter importances for {objective}", "", "| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in values.items()]
        lines.append("")
    report = write_text(out / "report.md", "\n".join(lines))
    summary.report = report
    return report


def _redacted(url: str) -> str:
    from slimkit.tuning.storage import redact

    return redact(url)
