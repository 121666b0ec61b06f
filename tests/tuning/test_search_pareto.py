"""Pareto front and best selection on synthetic objectives (pure math, then on a tiny Optuna study)."""

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.tuning import SearchConfig
from slimkit.tuning.pareto import Candidate, best_index, dominates, feasible_front, pareto_front
from slimkit.tuning.study import ATTR, summarize

MAXMIN = ("maximize", "minimize")


def test_dominates_respects_directions():
    assert dominates((99.0, 1.0), (98.0, 2.0), MAXMIN)
    assert not dominates((99.0, 1.0), (99.0, 1.0), MAXMIN)  # equal: no domination
    assert not dominates((99.0, 3.0), (98.0, 2.0), MAXMIN)  # a trade-off
    assert dominates((1.0, 1.0), (2.0, 1.0), ("minimize", "minimize"))


def test_front_on_a_hand_checked_set():
    points = [(99.0, 5.0), (98.0, 2.0), (97.0, 2.0), (99.0, 6.0), (95.0, 1.0), (98.0, 2.0)]
    # (97,2) is dominated by (98,2); (99,6) by (99,5); the two (98,2) are equal and both kept
    assert pareto_front(points, MAXMIN) == [0, 1, 4, 5]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=25))
def test_front_matches_brute_force_definition(points):
    directions = ("maximize", "minimize", "minimize")
    front = set(pareto_front(points, directions))
    for i, p in enumerate(points):
        better = [q for q in points if q[0] >= p[0] and q[1] <= p[1] and q[2] <= p[2] and q != p]
        assert (i in front) == (not better)
    # every point off the front is dominated by a point on it
    for i in set(range(len(points))) - front:
        assert any(dominates(points[j], points[i], directions) for j in front)


def test_best_is_cheapest_feasible_then_most_accurate():
    cands = [
        Candidate(0, (99.0, 5.0), violation=-1.0),
        Candidate(1, (97.0, 1.0), violation=1.0),  # infeasible
        Candidate(2, (98.0, 2.0), violation=-0.1),
        Candidate(3, (98.5, 2.0), violation=-0.6),
    ]
    assert best_index(cands, ("accuracy", "latency"), MAXMIN) == 3
    only_acc = [Candidate(0, (90.0,)), Candidate(1, (95.0,)), Candidate(2, (93.0,))]
    assert best_index(only_acc, ("accuracy",), ("maximize",)) == 1
    assert best_index([], ("accuracy",), ("maximize",)) is None


def test_best_without_feasible_is_the_closest_and_front_falls_back_to_all():
    cands = [
        Candidate(0, (90.0, 1.0), violation=5.0),
        Candidate(1, (94.0, 3.0), violation=1.0),
        Candidate(2, (93.0, 4.0), violation=2.0),
    ]
    assert best_index(cands, ("accuracy", "size"), MAXMIN) == 1
    assert feasible_front(cands, MAXMIN) == [0, 1]
    cands.append(Candidate(3, (96.0, 9.0), violation=-0.5))
    assert feasible_front(cands, MAXMIN) == [3]


def _synthetic_study(points, violations):
    study = optuna.create_study(directions=list(MAXMIN))
    for i, ((acc, size), v) in enumerate(zip(points, violations)):
        metrics = {"accuracy": acc, "size_bytes": size, "macs": 1.0}
        study.add_trial(
            optuna.trial.create_trial(
                values=[acc, size],
                params={"prune_amount": i / 10},
                distributions={"prune_amount": optuna.distributions.FloatDistribution(0, 1)},
                user_attrs={"metrics": metrics, "violation": v, "plan": {"prune_amount": i / 10}},
            )
        )
    return study


def test_summary_of_a_tiny_study(tmp_path):
    points = [(96.0, 500.0), (97.0, 1e3), (97.5, 3e3), (98.0, 4e3), (98.0, 5e3), (97.2, 3.5e3)]
    violations = [97.0 - acc for acc, _ in points]  # budget: accuracy >= 97
    study = _synthetic_study(points, violations)
    study.set_user_attr(ATTR, {"threshold": 97.0, "baseline": {"accuracy": 98.5, "size_bytes": 64e3}})
    cfg = SearchConfig(objectives=("accuracy", "size"), max_accuracy_drop=1.5, out=str(tmp_path), progress=False)
    summary = summarize(study, cfg, None)
    feasible = [i for i, v in enumerate(violations) if v <= 0]
    expected = {feasible[j] for j in pareto_front([points[i] for i in feasible], MAXMIN)}
    # (96, 500 B) misses the budget; (97.2, 3.5 KB) and (98, 5 KB) are dominated
    assert {r.trial for r in summary.pareto} == expected == {1, 2, 3}
    assert [r.trial for r in summary.pareto] == [1, 2, 3]  # sorted by accuracy
    assert summary.best.trial == 1 and summary.best.feasible  # the smallest feasible
    assert (tmp_path / "report.md").is_file() and (tmp_path / "pareto.png").stat().st_size > 1000
    assert "closest" not in summary.message


@pytest.mark.parametrize("threshold", [99.5])
def test_unsatisfiable_budget_is_reported_and_closest_kept(tmp_path, threshold):
    points = [(96.0, 1e3), (98.0, 4e3), (97.0, 2e3)]
    study = _synthetic_study(points, [threshold - acc for acc, _ in points])
    study.set_user_attr(ATTR, {"threshold": threshold, "baseline": {"accuracy": 99.6}})
    cfg = SearchConfig(objectives=("accuracy", "size"), max_accuracy_drop=0.1, out=str(tmp_path), progress=False)
    summary = summarize(study, cfg, None)
    assert not summary.feasible
    assert summary.best.trial == 1
    assert "no trial satisfied max_accuracy_drop" in summary.message and "closest" in summary.message
