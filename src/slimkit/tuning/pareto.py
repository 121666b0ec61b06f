"""Pure selection math for a search: Pareto dominance, the non-dominated front, and "the best" result.

Everything here works on plain numbers so it can be tested without Optuna or torch. A direction is
``"maximize"`` or ``"minimize"`` per objective.

Example:
    >>> pareto_front([(99.0, 3.0), (98.0, 1.0), (97.0, 2.0)], ("maximize", "minimize"))
    [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from slimkit.errors import UsageError

__all__ = ["Candidate", "best_index", "dominates", "feasible_front", "pareto_front"]


def _oriented(values: Sequence[float], directions: Sequence[str]) -> tuple[float, ...]:
    """Values turned into "smaller is better" numbers."""
    if len(values) != len(directions):
        raise UsageError(f"{len(values)} values for {len(directions)} objectives")
    out = []
    for v, d in zip(values, directions):
        if d not in ("maximize", "minimize"):
            raise UsageError(f"direction {d!r} is not valid; choose 'maximize' or 'minimize'")
        out.append(-float(v) if d == "maximize" else float(v))
    return tuple(out)


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """True when ``a`` is at least as good as ``b`` in every objective and strictly better in one."""
    oa, ob = _oriented(a, directions), _oriented(b, directions)
    return all(x <= y for x, y in zip(oa, ob)) and any(x < y for x, y in zip(oa, ob))


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices (ascending) of the points no other point dominates; equal points are all kept."""
    return [
        i for i, p in enumerate(points) if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)
    ]


@dataclass
class Candidate:
    """One finished trial as the selection sees it: objective values, and by how many accuracy points it misses
    the constraint (``violation`` <= 0 means feasible)."""

    number: int
    values: tuple[float, ...]
    violation: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.violation <= 0.0


def _best_key(c: Candidate, objectives: Sequence[str], directions: Sequence[str]) -> tuple:
    oriented = _oriented(c.values, directions)
    # cost objectives (latency, size, MACs) first in the order given, accuracy last: "the fastest/smallest
    # feasible result", ties broken by accuracy. Lexicographic minima are always Pareto-optimal.
    order = [i for i, o in enumerate(objectives) if o != "accuracy"] + [
        i for i, o in enumerate(objectives) if o == "accuracy"
    ]
    ranked = tuple(oriented[i] for i in order)
    if c.feasible:
        return (0, *ranked, c.number)
    return (1, c.violation, *ranked, c.number)


def best_index(candidates: Sequence[Candidate], objectives: Sequence[str], directions: Sequence[str]) -> int | None:
    """Index of the best candidate: the feasible one with the lowest cost (then the highest accuracy); when none
    is feasible, the one closest to the constraint. ``None`` for an empty list."""
    if not candidates:
        return None
    keys = [_best_key(c, objectives, directions) for c in candidates]
    return min(range(len(candidates)), key=keys.__getitem__)


def feasible_front(candidates: Sequence[Candidate], directions: Sequence[str]) -> list[int]:
    """The Pareto front among feasible candidates (among all of them when none is feasible)."""
    pool = [i for i, c in enumerate(candidates) if c.feasible] or list(range(len(candidates)))
    front = pareto_front([candidates[i].values for i in pool], directions)
    return [pool[i] for i in front]
