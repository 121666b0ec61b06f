"""Automatic search with Optuna (the verb ``slimkit.search``): training hyperparameters and compression plans
under an accuracy budget, stored so that killed runs resume, shareable by several workers, always leaving the best
model found so far on disk.

- ``config.py``: ``SearchConfig``; ``spaces.py``: declared spaces and presets; ``objectives.py``: accuracy,
  latency (cached by architecture signature), size, MACs; ``pareto.py``: pure selection math;
  ``plans.py``: what a trial runs; ``study.py``: the engine; ``report.py``: progress, report, plot.
"""

from slimkit.tuning.config import Pruner, Sampler, SearchConfig
from slimkit.tuning.pareto import best_index, dominates, feasible_front, pareto_front
from slimkit.tuning.results import SearchResult, SearchStudy
from slimkit.tuning.saving import load_model
from slimkit.tuning.study import search

__all__ = [
    "Pruner",
    "Sampler",
    "SearchConfig",
    "SearchResult",
    "SearchStudy",
    "best_index",
    "dominates",
    "feasible_front",
    "load_model",
    "pareto_front",
    "search",
]
