"""What a trial is scored on: accuracy, latency (measured on the deployed runtime or PyTorch eager, cached by
architecture), bytes on disk, MACs."""

from __future__ import annotations

import enum
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimkit._inputs import head
from slimkit.config import nearest, to_enum
from slimkit.errors import SlimkitError, UsageError

if TYPE_CHECKING:
    from slimkit.export.deployed import Deployed


class Runtime(str, enum.Enum):
    """Where the ``latency`` objective times a trial's model."""

    DEPLOYED = "deployed"  # the fastest form it ships in (ONNX Runtime fp32 / int8, BN-folded eager, oneDNN int8)
    EAGER = "eager"  # PyTorch eager as the model stands, side by side with the input model


__all__ = [
    "EAGER_RUNTIME",
    "OBJECTIVES",
    "LatencyCache",
    "Measurer",
    "Runtime",
    "accuracy_threshold",
    "architecture_signature",
    "check_objectives",
]


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
    """Speed-ups keyed by architecture signature, in a JSON file shared by workers and resumed runs.

    An entry is a plain number (the speed-up), or ``{"speedup": x, "runtime": name}`` when it was measured on a
    runtime chosen per model (the deployed policy), so a cached trial still reports where it runs fastest."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self.memory: dict[str, tuple[float, str | None]] = {}

    def _read(self) -> dict[str, tuple[float, str | None]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            entries = {}
            for key, value in raw.items():
                if isinstance(value, dict):
                    runtime = value.get("runtime")
                    entries[str(key)] = (float(value["speedup"]), None if runtime is None else str(runtime))
                else:
                    entries[str(key)] = (float(value), None)
            return entries
        except (ValueError, OSError, AttributeError, KeyError, TypeError):
            return {}  # a damaged cache only costs re-measuring

    def entry(self, key: str) -> tuple[float, str | None] | None:
        """``(speed-up, runtime name or None)`` for ``key``, or None when it was never measured."""
        if key not in self.memory:
            self.memory.update(self._read())
        return self.memory.get(key)

    def get(self, key: str) -> float | None:
        entry = self.entry(key)
        return None if entry is None else entry[0]

    def put(self, key: str, value: float, runtime: str | None = None) -> None:
        self.memory[key] = (value, runtime)
        if self.path is not None:
            from slimkit._io import write_text

            stored = {**self._read(), key: (value, runtime)}
            encoded = {k: v if r is None else {"speedup": v, "runtime": r} for k, (v, r) in stored.items()}
            write_text(self.path, json.dumps(encoded, indent=1, sort_keys=True))


EAGER_RUNTIME = "pytorch eager"  # what a trial's ``runtime`` metric says under ``runtime="eager"``


class Measurer:
    """Scores models against the input model: accuracy on ``val_data``, latency, bytes on disk and MACs.

    Latency (``runtime``):

    - ``"deployed"`` (default): each model is timed in every form it can ship in (``slimkit.export.deployed.
      fastest_form``: ONNX Runtime fp32 and BN-folded channels-last eager for float models, ONNX Runtime int8 and
      oneDNN int8 for slimkit int8 models, calibrated on a few ``val_data`` batches); the fastest form's median
      is its latency and its name the trial's ``runtime`` metric. The speed-up is against the input model's
      fastest form, measured once.
    - ``"eager"``: PyTorch eager as the model stands, as a side-by-side ratio to the input model (so drift in
      machine load cancels), scaled by the input model's eager latency.

    ``baseline_ms``: the input model's latency measured before, on the same ``runtime`` (a study stores it so
    that every worker and every resumed run scales by the same number); measured on first use when None.

    ``evaluate``: ``fn(model) -> float`` (higher is better) measured as the ``accuracy`` metric instead of labelled
    accuracy on ``val_data``; ``metric`` says which (``"accuracy"`` or the function's name).

    Example:
        >>> m = Measurer(model, val, x, ("accuracy", "latency"), latency_batch=64)      # doctest: +SKIP
        >>> m(candidate)["runtime"], m.baseline_runtime                                 # doctest: +SKIP
        ('onnxruntime fp32', 'onnxruntime fp32')
    """

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
        runtime: Runtime | str = Runtime.DEPLOYED,
        evaluate: Callable[[nn.Module], float] | None = None,
    ) -> None:
        from slimkit.train import metric_name

        self.baseline, self.val_data, self.example = baseline, val_data, example_input
        self.evaluate = evaluate
        self.metric = "accuracy" if evaluate is None else metric_name(evaluate)
        self.objectives = tuple(objectives)
        self.latency_batch, self.threads = latency_batch, threads
        self.cache = cache or LatencyCache(None)
        self.macs = macs or "macs" in self.objectives  # counting MACs loads torch's dispatch machinery (seconds)
        self.runtime = Runtime(to_enum(Runtime, runtime, "runtime"))
        self._baseline_ms: float | None = None if baseline_ms is None else float(baseline_ms)
        # the input model's fastest form; None until measured here (a stored baseline_ms does not name it)
        self.baseline_runtime: str | None = EAGER_RUNTIME if self.runtime is Runtime.EAGER else None
        self._calib: list[torch.Tensor] | None = None

    def baseline_ms(self) -> float:
        if self._baseline_ms is None:
            if self.runtime is Runtime.DEPLOYED:
                best = self._deploy(self.baseline, "the input model")
                self._baseline_ms, self.baseline_runtime = best.ms, best.name
                return self._baseline_ms
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

    def cache_key(self, model: nn.Module) -> str:
        """The latency cache's key: the architecture signature, with the runtime policy, batch and threads when
        the model is timed on its deployed runtime (eager keys stay the bare signature)."""
        signature = architecture_signature(model)
        if self.runtime is Runtime.EAGER:
            return signature
        return f"deployed/b{self.latency_batch}/t{self.threads}:{signature}"

    def speedup(self, model: nn.Module) -> float:
        """The input model's latency over ``model``'s (cached by architecture)."""
        return self.timed(model)[0]

    def timed(self, model: nn.Module) -> tuple[float, str]:
        """``(speed-up over the input model, the runtime it was timed on)``, cached by architecture."""
        key = self.cache_key(model)
        cached = self.cache.entry(key)
        if cached is not None and (self.runtime is Runtime.EAGER or cached[1] is not None):
            return cached[0], cached[1] or EAGER_RUNTIME
        if self.runtime is Runtime.DEPLOYED:
            baseline_ms = self.baseline_ms()  # first: the input model is timed before any candidate
            best = self._deploy(model, "this trial's model")
            value, runtime = baseline_ms / best.ms, best.name
            self.cache.put(key, value, runtime)
            return value, runtime
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
        return value, EAGER_RUNTIME

    def _deploy(self, model: nn.Module, what: str) -> Deployed:
        """``model``'s fastest deployed form at ``latency_batch``; a clear error when it cannot be deployed."""
        from slimkit.export import deployed
        from slimkit.export.lowering import is_int8_model

        calib = self._calibration() if is_int8_model(model) else None
        try:
            with warnings.catch_warnings():  # export warnings once per trial would bury the progress lines
                warnings.simplefilter("ignore")
                return deployed.fastest_form(
                    model, self.example, batch_size=self.latency_batch, threads=self.threads, calib=calib
                )
        except (SlimkitError, RuntimeError, TypeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(
                f"search: {what} ({type(model).__name__}) could not be timed on its deployed runtime ({reason}); "
                "time PyTorch eager instead with SearchConfig(runtime='eager')"
            ) from exc

    def _calibration(self) -> list[torch.Tensor]:
        """A few ``val_data`` input batches: what PyTorch's oneDNN int8 form is calibrated on."""
        if self._calib is None:
            from slimkit.quantization.ptq import calibration_batches

            self._calib = calibration_batches(self.val_data, batch_size=64, batches=2)
        return self._calib

    def __call__(self, model: nn.Module, accuracy: float | None = None, *, latency: bool = True) -> dict[str, Any]:
        """Every metric a trial records; latency only when it is an objective (it costs seconds), with the
        ``runtime`` it was timed on (e.g. ``"onnxruntime int8"``)."""
        from slimkit.measure import count_params, profile
        from slimkit.train import evaluate, score

        model.eval()
        if accuracy is None:
            accuracy = evaluate(model, self.val_data).accuracy if self.evaluate is None else score(self.evaluate, model)
        metrics: dict[str, Any] = {
            "accuracy": float(accuracy),
            "size_bytes": float(model_size(model)),
            "params": float(count_params(model)[0]),
        }
        if self.evaluate is not None:
            metrics["metric"] = self.metric
        if self.macs:
            metrics["macs"] = float(profile(model, head(self.example, 1)).macs)
        if latency and "latency" in self.objectives:
            speedup, runtime = self.timed(model)
            metrics["speedup"] = speedup
            metrics["latency_ms"] = self.baseline_ms() / speedup
            metrics["runtime"] = runtime
        return metrics


def model_size(model: nn.Module) -> int:
    """Bytes of the weights file the saved best would hold (packed low-bit codes), however the model was built."""
    from slimkit.export.artifact import weights_size

    return weights_size(model)
