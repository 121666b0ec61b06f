"""What a trial is scored on: accuracy, latency (measured, cached by architecture), bytes on disk, MACs."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.config import nearest
from slimkit.errors import UsageError

__all__ = ["OBJECTIVES", "LatencyCache", "Measurer", "accuracy_threshold", "architecture_signature", "check_objectives"]


@dataclass(frozen=True)
class Objective:
    direction: str
    metric: str  # key in a trial's metrics dict
    unit: str


OBJECTIVES = {
    "accuracy": Objective("maximize", "accuracy", "%"),
    "latency": Objective("minimize", "latency_ms", "ms"),
    "size": Objective("minimize", "size_bytes", "B"),
    "macs": Objective("minimize", "macs", ""),
}


def check_objectives(names: Sequence[str]) -> tuple[str, ...]:
    """Validate objective names (non-empty, known, no repeats)."""
    names = tuple(names)
    if not names:
        raise UsageError(f"objectives is empty; choose from {', '.join(OBJECTIVES)}")
    for name in names:
        if name not in OBJECTIVES:
            raise UsageError(
                f"unknown objective {name!r}; {nearest(str(name), OBJECTIVES)} (objectives: {', '.join(OBJECTIVES)})"
            )
    if len(set(names)) != len(names):
        raise UsageError(f"objectives {names} repeat a name")
    return names


def accuracy_threshold(baseline: float, max_drop: float | None, relative: bool) -> float | None:
    """The lowest accuracy (percent) that satisfies the budget, or None without a budget."""
    if max_drop is None:
        return None
    return baseline * (1.0 - max_drop / 100.0) if relative else baseline - max_drop


def architecture_signature(model: nn.Module) -> str:
    """A hash of what decides speed: module types, their settings (``extra_repr``), parameter/buffer shapes and
    dtypes. Two models with the same signature run the same kernels on the same shapes."""
    parts = []
    for name, module in model.named_modules():
        tensors = [
            (n, tuple(t.shape), str(t.dtype))
            for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        ]
        parts.append((name, type(module).__module__ + "." + type(module).__qualname__, module.extra_repr(), tensors))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class LatencyCache:
    """Speed-ups keyed by architecture signature, in a JSON file shared by workers and resumed runs."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self.memory: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            return {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
        except (ValueError, OSError, AttributeError):
            return {}  # a damaged cache only costs re-measuring

    def get(self, key: str) -> float | None:
        if key not in self.memory:
            self.memory.update(self._read())
        return self.memory.get(key)

    def put(self, key: str, value: float) -> None:
        self.memory[key] = value
        if self.path is not None:
            from slimkit._io import write_text

            write_text(self.path, json.dumps({**self._read(), key: value}, indent=1, sort_keys=True))


class Measurer:
    """Scores models against the input model: accuracy on ``val_data``, latency as a side-by-side ratio to the
    input model (so drift in machine load cancels), bytes on disk and MACs.

    ``baseline_ms``: the input model's latency measured before (a study stores it so that every worker and every
    resumed run scales by the same number); measured on first use when None."""

    def __init__(
        self,
        baseline: nn.Module,
        val_data: Any,
        example_input: torch.Tensor,
        objectives: Sequence[str],
        *,
        latency_batch: int = 64,
        threads: int = 2,
        cache: LatencyCache | None = None,
        macs: bool = True,
        baseline_ms: float | None = None,
    ) -> None:
        self.baseline, self.val_data, self.example = baseline, val_data, example_input
        self.objectives = tuple(objectives)
        self.latency_batch, self.threads = latency_batch, threads
        self.cache = cache or LatencyCache(None)
        self.macs = macs or "macs" in self.objectives  # counting MACs loads torch's dispatch machinery (seconds)
        self._baseline_ms: float | None = None if baseline_ms is None else float(baseline_ms)

    def baseline_ms(self) -> float:
        if self._baseline_ms is None:
            from slimkit.measure import measure_latency

            # the lowest of three medians: a burst of load from other processes must not scale every latency
            # this study reports (they are all baseline_ms x a side-by-side ratio)
            self._baseline_ms = min(
                measure_latency(
                    self.baseline,
                    self.example,
                    (self.latency_batch,),
                    threads=self.threads,
                    repeats=30,
                    max_seconds=2.0,
                )[self.latency_batch].median
                * 1e3
                for _ in range(3)
            )
        return self._baseline_ms

    def speedup(self, model: nn.Module) -> float:
        key = architecture_signature(model)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        from slimkit.measure import benchmark_latency

        res = benchmark_latency(
            {"base": self.baseline, "cand": model},
            self.example,
            (self.latency_batch,),
            threads=self.threads,
            repeats=20,
            max_seconds=5.0,
        )
        value = res["base"][self.latency_batch].median / res["cand"][self.latency_batch].median
        self.cache.put(key, value)
        return value

    def __call__(self, model: nn.Module, accuracy: float | None = None, *, latency: bool = True) -> dict[str, float]:
        """Every metric a trial records; latency only when it is an objective (it costs seconds)."""
        from slimkit.measure import count_params, profile
        from slimkit.train import evaluate

        model.eval()
        if accuracy is None:
            accuracy = evaluate(model, self.val_data).accuracy
        metrics = {
            "accuracy": float(accuracy),
            "size_bytes": float(model_size(model)),
            "params": float(count_params(model)[0]),
        }
        if self.macs:
            metrics["macs"] = float(profile(model, self.example[:1]).macs)
        if latency and "latency" in self.objectives:
            speedup = self.speedup(model)
            metrics["speedup"] = speedup
            metrics["latency_ms"] = self.baseline_ms() / speedup
        return metrics


def model_size(model: nn.Module) -> int:
    """Bytes of the weights file the saved best would hold (packed low-bit codes), however the model was built."""
    from slimkit.export.artifact import weights_size

    return weights_size(model)
