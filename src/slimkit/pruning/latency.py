"""``PruneConfig(target="latency")``: channel allocation driven by latencies measured on the deployment runtime.

Fewer MACs is not fewer milliseconds: a runtime's fast kernels want particular channel counts (ONNX Runtime's and
oneDNN's blocked NCHWc convolutions take multiples of 16 on AVX-512), memory-bound layers barely speed up, and
small layers cost their fixed overhead whatever their width. As in NetAdapt (Yang et al. 2018) and HALP (Shen et
al. 2022), a lookup table holds the measured latency of every Conv2d / Linear of the model, alone, at a few kept
(input, output) channel counts on the chosen runtime at the deployment batch size; the latency of a candidate
allocation is the sum over layers, interpolated bilinearly between the measured counts. The allocation rule then
bisects on that prediction exactly as it does on MACs.

The prediction leaves out what no single layer shows (layout reorders, activations, the runtime's fusions), so
after the cut the pruned and the original model are timed side by side on the same runtime; when the measured
reduction misses the target by more than the tolerance, the goal handed to the allocation is corrected and the
cut redone (at most ``ATTEMPTS`` times, the closest kept). The record says what was predicted and measured.

The table is cached per machine (CPU model and flags, runtime and library versions, threads) in
``$SLIMKIT_CACHE_DIR/latency`` (default ``~/.cache/slimkit/latency``), one JSON file per machine, so a second
pruning of the same architecture measures nothing.

Example:
    >>> cfg = slimkit.PruneConfig(amount=0.5, target="latency")  # 2x faster, ONNX Runtime, b64  # doctest: +SKIP
    >>> result = slimkit.prune(model, cfg, x)                                                   # doctest: +SKIP
    >>> result.record["latency"]["speedup"]                                                     # doctest: +SKIP
    1.97
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.errors import UsageError
from slimkit.measure import fixed_threads
from slimkit.peak import cpu_info

__all__ = ["ATTEMPTS", "LatencyModel", "LatencyTable", "cache_dir", "machine_key", "time_pair"]

RUNTIMES = ("onnxruntime", "eager")
FORM = {"onnxruntime": "onnxruntime fp32", "eager": "eager fp32"}  # the deployed form timed on each
ATTEMPTS = 4  # cuts tried against the whole-model measurement
POINTS = 4  # measured kept counts per dimension of a layer (the ends included)


def cache_dir() -> Path:
    """``$SLIMKIT_CACHE_DIR`` or ``~/.cache/slimkit``."""
    return Path(os.environ.get("SLIMKIT_CACHE_DIR") or Path.home() / ".cache" / "slimkit")


def _cpu() -> str:
    info = cpu_info()
    if not info:
        return platform.processor() or platform.machine()
    return f"{info.get('model name', '')}|{info.get('flags', '')}"


def machine_key(runtime: str, threads: int) -> str:
    """What a latency table is valid for: this CPU (model and flags), the runtime and its version, torch's version
    and the thread count."""
    versions = [torch.__version__]
    if runtime == "onnxruntime":
        import onnxruntime

        versions.append(onnxruntime.__version__)
    text = "|".join([_cpu(), runtime, *versions, str(threads), str(os.cpu_count())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Layer:
    """One Conv2d / Linear as it runs in the model: enough to rebuild it alone at other widths."""

    kind: str  # conv | depthwise | linear
    shape: tuple[int, ...]  # its input at the deployment batch size
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    bias: bool = True

    @staticmethod
    def of(module: nn.Module, shape: tuple[int, ...]) -> _Layer | None:
        if isinstance(module, nn.Linear):
            return _Layer("linear", shape, module.in_features, module.out_features, bias=module.bias is not None)
        if type(module) is nn.Conv2d and isinstance(module.padding, tuple):
            depthwise = module.groups == module.in_channels == module.out_channels
            if module.groups != 1 and not depthwise:
                return None
            return _Layer(
                "depthwise" if depthwise else "conv",
                shape,
                module.in_channels,
                module.out_channels,
                _pair(module.kernel_size),
                _pair(module.stride),
                _pair(module.padding),
                _pair(module.dilation),
                module.bias is not None,
            )
        return None

    def key(self, kept_in: int, kept_out: int) -> str:
        dims = "x".join(map(str, (*self.shape[:1], *self.shape[2:]) if self.kind != "linear" else self.shape[:-1]))
        geometry = f"k{self.kernel}s{self.stride}p{self.padding}d{self.dilation}" if self.kind != "linear" else ""
        return f"{self.kind}|{dims}|{geometry}|b{int(self.bias)}|{kept_in}x{kept_out}"

    def build(self, kept_in: int, kept_out: int) -> tuple[nn.Module, torch.Tensor]:
        """The layer alone at ``kept_in`` -> ``kept_out`` channels, and an input for it (batch size 1)."""
        one = (1, *self.shape[1:])
        if self.kind == "linear":
            return nn.Linear(kept_in, kept_out, bias=self.bias), torch.randn(*one[:-1], kept_in)
        groups = kept_in if self.kind == "depthwise" else 1
        conv = nn.Conv2d(
            kept_in,
            kept_in if self.kind == "depthwise" else kept_out,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            groups=groups,
            bias=self.bias,
        )
        return conv, torch.randn(1, kept_in, *self.shape[2:])


def _pair(value: Any) -> tuple[int, int]:
    return int(value[0]), int(value[1])


def _form(
    model: nn.Module, example_input: torch.Tensor, runtime: str, threads: int, folder: str
) -> Callable[[torch.Tensor], object]:
    """``model`` in its deployed fp32 form on ``runtime`` (an ONNX file goes into ``folder``)."""
    from slimkit.export.deployed import deployed_forms

    return deployed_forms(model, example_input, folder, threads=threads, only=(FORM[runtime],))[FORM[runtime]]


def _median_ms(fn: Callable[[torch.Tensor], object], x: torch.Tensor, budget: float = 0.2) -> float:
    """Median ms of ``fn(x)`` over at least 5 calls and about ``budget`` seconds, after 2 untimed calls."""
    with torch.inference_mode():
        for _ in range(2):
            fn(x)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - start < budget and len(times) < 50):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


class LatencyTable:
    """Measured milliseconds of single layers at given widths on one runtime, cached on disk per machine."""

    def __init__(self, runtime: str = "onnxruntime", batch_size: int = 64, threads: int = 2) -> None:
        if runtime not in RUNTIMES:
            raise UsageError(f"latency runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
        self.runtime, self.batch_size, self.threads = runtime, batch_size, threads
        self.path = cache_dir() / "latency" / f"{machine_key(runtime, threads)}.json"
        self.entries: dict[str, float] = self._read()
        self.measured = 0

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # no table yet, or an unreadable one: it is measured again and rewritten
            return {}
        return {k: float(v) for k, v in data.get("entries", {}).items()} if isinstance(data, dict) else {}

    def lookup(self, layer: _Layer, points: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
        """Milliseconds of ``layer`` at every ``(kept_in, kept_out)`` of ``points``; missing ones are measured."""
        missing = [p for p in points if layer.key(*p) not in self.entries]
        if missing:
            with tempfile.TemporaryDirectory(prefix="slimkit-latency-") as folder, fixed_threads(self.threads):
                for kept_in, kept_out in missing:
                    module, x = layer.build(kept_in, kept_out)
                    form = _form(module.eval(), x, self.runtime, self.threads, folder)
                    batch = x.expand(self.batch_size, *x.shape[1:]).contiguous()
                    self.entries[layer.key(kept_in, kept_out)] = _median_ms(form, batch)
                    self.measured += 1
            self.save()
        return {p: self.entries[layer.key(*p)] for p in points}

    def save(self) -> None:
        """Merge this table into the cached file (entries other processes measured meanwhile are kept)."""
        from slimkit._io import write_text

        merged = {**self._read(), **self.entries}
        payload = {"machine": _cpu().split("|")[0], "runtime": self.runtime, "threads": self.threads}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps({**payload, "entries": merged}, indent=0, sort_keys=True))


def _points(low: int, full: int, step: int) -> list[int]:
    """Up to ``POINTS`` kept counts from ``low`` to ``full``, multiples of ``step`` (``full`` itself included)."""
    low = min(max(step, low), full)
    values = sorted({min(full, low + round(i * (full - low) / (POINTS - 1) / step) * step) for i in range(POINTS)})
    return sorted({*values, full})


def _interpolate(axis: list[int], value: int) -> tuple[int, int, float]:
    """Indices ``(i, j)`` of ``axis`` around ``value`` and the weight of ``j`` (clamped at the ends)."""
    if len(axis) == 1 or value <= axis[0]:
        return 0, 0, 0.0
    if value >= axis[-1]:
        return len(axis) - 1, len(axis) - 1, 0.0
    j = bisect.bisect_left(axis, value)
    i = j - 1
    return i, j, (value - axis[i]) / (axis[j] - axis[i])


class LatencyModel:
    """Predicted latency (ms) of the model when group ``i`` keeps ``keep[i]`` channels.

    Built from a ``CostModel`` (which layers read and write which groups), the groups' smallest kept counts and
    steps, and a ``LatencyTable``; layers it cannot rebuild alone (grouped or transposed convolutions, attention
    matmuls) are left out of the sum, i.e. assumed to scale with the layers it measures.
    """

    def __init__(
        self, model: nn.Module, cost: Any, limits: list[Any], example_input: torch.Tensor, table: LatencyTable
    ):
        self.cost, self.table = cost, table
        shapes = _input_shapes(model, example_input, {e.name for e in cost.entries if e.name})
        units = [group.unit for group in cost.graph.groups]
        self.layers: list[tuple[Any, _Layer, list[int], list[int], dict[tuple[int, int], float]]] = []
        for entry in cost.entries:
            module = model.get_submodule(entry.name) if entry.name in shapes else None
            shape = shapes.get(entry.name)
            layer = None if module is None or shape is None else _Layer.of(module, (table.batch_size, *shape[1:]))
            if layer is None:
                continue
            low_in, low_out = _low(entry, limits, units)
            full_in, full_out = layer.in_channels, layer.out_channels
            ins = _points(low_in, full_in, _step(entry.in_parts, limits, units, full_in))
            if layer.kind == "depthwise":
                outs = [full_out]
            else:
                group = entry.out_group
                outs = [full_out] if group is None else _points(low_out, full_out, limits[group].step * units[group])
            grid = table.lookup(layer, [(i, o) for i in ins for o in outs])
            self.layers.append((entry, layer, ins, outs, grid))

    def __call__(self, keep: list[int]) -> float:
        total = 0.0
        for entry, layer, ins, outs, grid in self.layers:
            kept_in, kept_out = self.cost.kept(entry, keep)
            kept_out = layer.out_channels if kept_out < 0 or layer.kind == "depthwise" else kept_out
            i0, i1, wi = _interpolate(ins, kept_in)
            o0, o1, wo = _interpolate(outs, kept_out)
            low = grid[ins[i0], outs[o0]] * (1 - wo) + grid[ins[i0], outs[o1]] * wo
            high = grid[ins[i1], outs[o0]] * (1 - wo) + grid[ins[i1], outs[o1]] * wo
            total += low * (1 - wi) + high * wi
        return total


def _low(entry: Any, limits: list[Any], units: list[int]) -> tuple[int, int]:
    """The fewest input and output channels ``entry`` can be left with."""
    kept_in = sum(
        c * b if g is None else (limits[g].fixed or limits[g].min_keep) * units[g] * b for g, c, b in entry.in_parts
    )
    g = entry.out_group
    return kept_in, -1 if g is None else (limits[g].fixed or limits[g].min_keep) * units[g]


def _step(parts: list[tuple[int | None, int, int]], limits: list[Any], units: list[int], full: int) -> int:
    """Grid step of a layer's input: its one cut group's step in channels, else 1."""
    cut = [(g, b) for g, _, b in parts if g is not None]
    if len(cut) == 1:
        g, block = cut[0]
        return min(limits[g].step * units[g] * block, full)
    return 1


def _input_shapes(model: nn.Module, example_input: torch.Tensor, names: set[str]) -> dict[str, tuple[int, ...]]:
    """Input shape of each named module on ``example_input`` (first call; modules called on no input are left out)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if name in names:

            def hook(mod, args, name=name):
                if args and isinstance(args[0], torch.Tensor):
                    shapes.setdefault(name, tuple(args[0].shape))

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def time_pair(
    before: nn.Module, after: nn.Module, example_input: torch.Tensor, runtime: str, batch_size: int, threads: int
) -> tuple[float, float]:
    """Median ms of ``before`` and ``after`` on ``runtime`` at ``batch_size``, timed interleaved in one process."""
    from slimkit.export.deployed import fastest_forms

    models = {"before": copy.deepcopy(before).eval(), "after": after.eval()}
    speed = fastest_forms(models, example_input, batch_size, threads=threads, max_seconds=6.0, only=(FORM[runtime],))
    return speed["before"].ms, speed["after"].ms


LATENCY_TOLERANCE = 0.025  # measured latency reduction this close to the target ends the search (timing noise)


def latency_model(
    model: nn.Module, cost: Any, limits: list[Any], example_input: torch.Tensor, cfg: Any
) -> LatencyModel:
    """The ``LatencyModel`` of ``cfg`` (its runtime, batch size and threads), over the machine's cached table."""
    table = LatencyTable(cfg.runtime, cfg.latency_batch, cfg.latency_threads)
    return LatencyModel(model, cost, limits, example_input, table)


def meet_latency(
    model: nn.Module,
    graph: Any,
    keep_for: Callable[[float], dict[int, torch.Tensor]],
    predict: LatencyModel,
    example_input: torch.Tensor,
    cfg: Any,
    cut: Callable[[dict[int, torch.Tensor]], nn.Module],
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Cut for ``cfg.amount`` of predicted latency, time the result against ``model`` and correct the goal until
    the measured reduction is within the tolerance (at most ``ATTEMPTS`` cuts; the closest is returned with its
    record)."""
    full = predict([g.size for g in graph.groups])
    tolerance = max(cfg.tolerance, LATENCY_TOLERANCE)
    goal, tries = cfg.amount, list[dict[str, Any]]()
    for _ in range(ATTEMPTS):
        keep = keep_for(goal)
        kept = [len(keep[id(g)]) if id(g) in keep else g.size for g in graph.groups]
        if any(t["kept"] == kept for t in tries):  # the goal moved, the cut did not (a bound or a plateau)
            break
        before, after = time_pair(model, cut(keep), example_input, cfg.runtime, cfg.latency_batch, cfg.latency_threads)
        measured = 1 - after / before
        tries.append(
            {
                "goal": goal,
                "kept": kept,
                "predicted": 1 - predict(kept) / full,
                "measured": measured,
                "ms": [before, after],
            }
        )
        if abs(measured - cfg.amount) <= tolerance:
            break
        goal = _next_goal(tries, cfg.amount)
    best_index = min(range(len(tries)), key=lambda i: abs(tries[i]["measured"] - cfg.amount))
    best = tries[best_index]
    before, after = best["ms"]
    record = {
        "runtime": cfg.runtime,
        "batch_size": cfg.latency_batch,
        "threads": cfg.latency_threads,
        "before_ms": before,
        "after_ms": after,
        "speedup": before / after,
        "predicted": best["predicted"],
        "measured": best["measured"],
        "attempts": [{k: t[k] for k in ("goal", "predicted", "measured")} for t in tries],
        "layers_measured": predict.table.measured,
        "table": str(predict.table.path),
    }
    if abs(best["measured"] - cfg.amount) > tolerance:
        import warnings

        warnings.warn(
            f"target='latency': measured {best['measured']:.1%} latency reduction ({before / after:.2f}x) on "
            f"{cfg.runtime} at batch {cfg.latency_batch} instead of {cfg.amount:.1%} after {len(tries)} cuts",
            stacklevel=3,
        )
    return keep_for(best["goal"]), record


def _next_goal(tries: list[dict[str, Any]], amount: float) -> float:
    """The next goal for the allocation: a secant step through the last two (goal, measured) pairs, or a step of
    the miss itself; kept in [0, 0.95]."""
    last = tries[-1]
    slope = 1.0
    if len(tries) > 1:
        prev = tries[-2]
        if abs(last["goal"] - prev["goal"]) > 1e-6 and abs(last["measured"] - prev["measured"]) > 1e-3:
            slope = (last["measured"] - prev["measured"]) / (last["goal"] - prev["goal"])
            slope = min(max(slope, 0.25), 4.0)
    return min(max(last["goal"] + (amount - last["measured"]) / slope, 0.0), 0.95)
