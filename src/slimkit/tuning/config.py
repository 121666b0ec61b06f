"""``SearchConfig``: what to optimize, under which accuracy budget, over which space, stored where."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimkit.config import Config, check_range
from slimkit.errors import InputTypeError, UsageError
from slimkit.tuning.objectives import Runtime

__all__ = ["Pruner", "Runtime", "Sampler", "SearchConfig"]


class Sampler(str, enum.Enum):
    AUTO = "auto"  # TPE for one objective, NSGA-II for several
    TPE = "tpe"
    NSGA2 = "nsga2"
    RANDOM = "random"


class Pruner(str, enum.Enum):
    MEDIAN = "median"
    PERCENTILE = "percentile"
    HYPERBAND = "hyperband"
    HALVING = "halving"
    NONE = "none"


@dataclass
class SearchConfig(Config):
    """Settings of ``slimkit.search``.

    Args:
        objectives: any of ``accuracy`` (maximized), ``latency`` (median ms at ``latency_batch`` on ``runtime``),
            ``size`` (bytes on disk), ``macs`` (per image); all but accuracy are minimized.
        max_accuracy_drop: the accuracy budget against the input model (points; percent of its accuracy when
            ``relative``). ``None``: no constraint.
        n_trials: trials in the whole study, counting finished trials of earlier (killed) runs and other workers.
        timeout: seconds after which this run starts no new trial (``None``: no limit).
        storage: an Optuna storage URL (``sqlite:///f.db``, ``postgresql://...``), ``journal:PATH`` (a journal
            file several processes can share) or ``None`` for ``sqlite:///<out>/study.db``.
        workers: local worker processes sharing the study (more machines: run the same command with the same
            ``storage``).
        space: ``{name: spec}`` (see ``slimkit.tuning.spaces``) or a preset: ``"training"``, ``"compression"``.
        epochs: training (or fine-tuning) epochs per trial when the space does not set ``epochs``.
        max_batches: caps the batches per epoch (quick runs).
        runtime: where ``latency`` is timed. ``"deployed"``: every trial's model in each form it can ship in
            (ONNX Runtime fp32 and BN-folded channels-last eager for float models; ONNX Runtime int8 and oneDNN
            int8 for int8 models), the fastest counts and is recorded as the trial's ``runtime``; the input
            model's fastest fp32 form is the baseline. ``"eager"``: PyTorch eager, side by side with the input.
        out: folder for the study database, the saved best model, the Pareto set and the report.

    Example:
        >>> SearchConfig(objectives=("accuracy", "latency"), max_accuracy_drop=0.5, n_trials=30).directions
        ('maximize', 'minimize')
    """

    objectives: tuple[str, ...] = ("accuracy",)
    max_accuracy_drop: float | None = None
    relative: bool = False
    n_trials: int = 20
    timeout: float | None = None
    storage: str | None = None
    study_name: str = "slimkit-search"
    workers: int = 1
    sampler: Sampler = Sampler.AUTO
    pruner: Pruner = Pruner.MEDIAN
    space: dict[str, Any] | str = "training"
    epochs: int = 3
    max_batches: int | None = None
    latency_batch: int = 64
    threads: int = 2
    runtime: Runtime = Runtime.DEPLOYED
    out: str = "slimkit-search"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        from slimkit.tuning.objectives import check_objectives

        if isinstance(self.objectives, str):
            self.objectives = (self.objectives,)
        self.objectives = check_objectives(self.objectives)
        if self.max_accuracy_drop is not None:
            check_range("max_accuracy_drop", self.max_accuracy_drop, 0.0, 100.0)
        if self.n_trials < 1:
            raise UsageError(f"n_trials={self.n_trials} must be >= 1")
        if self.timeout is not None and self.timeout <= 0:
            raise UsageError(f"timeout={self.timeout} must be > 0 seconds (or None)")
        if self.workers < 1:
            raise UsageError(f"workers={self.workers} must be >= 1")
        if self.epochs < 1:
            raise UsageError(f"epochs={self.epochs} must be >= 1")
        if self.latency_batch < 1 or self.threads < 1:
            raise UsageError(f"latency_batch={self.latency_batch} and threads={self.threads} must be >= 1")
        if not self.study_name:
            raise UsageError("study_name must not be empty")
        if not isinstance(self.space, (dict, str)):
            raise InputTypeError(
                f"space must be a dict of name -> spec or a preset name, got {type(self.space).__name__}"
            )
        self.out = str(self.out)

    @property
    def directions(self) -> tuple[str, ...]:
        from slimkit.tuning.objectives import OBJECTIVES

        return tuple(OBJECTIVES[o].direction for o in self.objectives)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out).resolve() / 'study.db'}"
