"""Measure what users care about: parameters, MACs/FLOPs, bytes on disk, peak memory, latency.

MACs are counted by PyTorch's own ``FlopCounterMode`` on the real forward pass (convolutions, matmuls, attention),
so any traceable model is covered; norm, pooling and activation layers add to FLOPs (not MACs) through forward
hooks. Latency is a harness: warm-up, interleaved repeats, median and spread, threads fixed, several batch sizes,
and several models measured side by side in one process so their ratio is meaningful.

Example:
    >>> import slimkit
    >>> model = slimkit.models.create("resnet56")
    >>> prof = slimkit.profile(model, torch.zeros(1, 3, 32, 32))
    >>> round(prof.macs / 1e6, 1), round(prof.params / 1e6, 2)
    (125.7, 0.86)
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from slimkit._text import human, make_table, render
from slimkit.errors import UsageError

__all__ = [
    "LatencyStats",
    "LayerProfile",
    "Peak",
    "Profile",
    "benchmark_latency",
    "compare_latency",
    "count_macs",
    "count_params",
    "machine_peak",
    "measure_latency",
    "peak_memory",
    "percent_of_peak",
    "profile",
    "size_on_disk",
]

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)
POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.PReLU, nn.LeakyReLU)


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(total, nonzero)`` parameter counts (shared parameters counted once)."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


@dataclass
class LayerProfile:
    name: str
    kind: str
    params: int
    macs: int
    flops: int
    output_shape: tuple[int, ...]


@dataclass
class Profile:
    """What ``slimkit.profile`` returns; ``str(profile)`` is a per-layer table with totals.

    ``size_bytes`` is ``size_on_disk``: the packed model (a quantized model's integer codes, not its float
    simulation)."""

    params: int
    nonzero_params: int
    macs: int
    flops: int
    size_bytes: int
    batch_size: int
    layers: list[LayerProfile] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self, max_layers: int = 60):
        rows: list[list[object]] = [
            [lp.name, lp.kind, human(lp.params), human(lp.macs), "x".join(map(str, lp.output_shape))]
            for lp in self.layers[:max_layers]
        ]
        if len(self.layers) > max_layers:
            rows.append([f"... {len(self.layers) - max_layers} more layers", "", "", "", ""])
        rows.append(["total", "", human(self.params), human(self.macs), ""])
        title = (
            f"params {human(self.params)} ({human(self.nonzero_params)} non-zero), MACs {human(self.macs)}, "
            f"FLOPs {human(self.flops)}, {human(self.size_bytes, 'B')} on disk (batch {self.batch_size})"
        )
        return make_table(title, ["layer", "type", "params", "MACs", "output"], rows)

    def __str__(self) -> str:
        return render(self.table())


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of the CPU flash-attention kernel, which FlopCounterMode has no formula for."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_macs(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> tuple[dict[str, int], int]:
    """``({qualified module name: MACs}, total MACs)`` of one inference forward pass on ``example_input``.

    Counted by PyTorch's ``FlopCounterMode`` (MACs = FLOPs / 2 of convolutions, matmuls and attention; ``""`` is
    the root module), in eval mode with the plain path of ``nn.MultiheadAttention`` (its fused kernel is
    invisible to the counter) and a formula for CPU scaled-dot-product attention. The model's training mode is
    restored; nothing else is changed. ``profile`` and pruning's cost model both count with this.

    Example:
        >>> per_module, total = count_macs(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.zeros(2, 4))
        >>> total, per_module["0"]
        (24, 24)
    """
    from slimkit._inputs import as_args

    args, kwargs = as_args(example_input)  # a tensor, a tuple of positional tensors or a dict of keyword tensors
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
            model(*args, **kwargs)
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        name = key[len(root) + 1 :] if key.startswith(root + ".") else ("" if key == root else None)
        if name is not None:
            per_module[name] = int(sum(ops.values()) // 2)
    return per_module, int(counter.get_total_flops() // 2)


def _leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Leaf modules, treating MultiheadAttention as one leaf (its forward bypasses out_proj.forward)."""
    skip: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, nn.MultiheadAttention):
            skip.add(name)
            yield name, module
        elif not any(True for _ in module.children()):
            yield name, module


def _extra_flops(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    if not isinstance(output, torch.Tensor):
        return 0
    if isinstance(module, NORMS):
        return 2 * output.numel()
    if isinstance(module, POOLS):
        return inputs[0].numel() if inputs and isinstance(inputs[0], torch.Tensor) else output.numel()
    if isinstance(module, ACTIVATIONS):
        return output.numel()
    return 0


def profile(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> Profile:
    """Count parameters, MACs and FLOPs of one forward pass, per leaf layer, and the bytes on disk.

    MACs are per example batch given (use batch size 1 for the usual per-image figure).
    """
    from slimkit._inputs import tensors_of

    inputs = [t for _, t in tensors_of(example_input)]  # a tensor, a tuple (positional) or a dict (keywords)
    leaves = list(_leaf_modules(model))
    outputs: dict[str, tuple[tuple[int, ...], int]] = {}

    def hook(name):
        def record(module, args, output):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
            outputs[name] = (shape, _extra_flops(module, args, output))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    try:
        by_module, total = count_macs(model, example_input)
    except Exception as exc:
        shapes = [tuple(t.shape) for t in inputs]
        raise UsageError(f"profile: the model failed on an example input of shape {shapes}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    layers: list[LayerProfile] = []
    for name, module in leaves:
        macs = int(by_module.get(name, 0))
        shape, extra = outputs.get(name, ((), 0))
        params = sum(p.numel() for p in module.parameters(recurse=True))
        if params or macs:
            layers.append(LayerProfile(name, type(module).__name__, params, macs, 2 * macs + extra, shape))
    total_macs = int(total)
    total, nonzero = count_params(model)
    extra_total = sum(extra for _, extra in outputs.values())
    return Profile(
        total,
        nonzero,
        total_macs,
        2 * total_macs + extra_total,
        size_on_disk(model),
        inputs[0].shape[0] if inputs[0].ndim else 1,
        layers,
    )


def size_on_disk(model: nn.Module, *, metadata: dict[str, str] | None = None) -> int:
    """Bytes on disk of the packed model: its weights as the safetensors file slimkit ships, quantized layers as
    packed integer codes plus scales (through the packing their algorithm registers), other tensors as they are.

    The same for any model, however it was built (``slimkit.models.create`` or not). ``metadata``: the file's
    header metadata (``slimkit.save`` writes its format name there; ``export.artifact.weights_size``).

    Example:
        >>> size_on_disk(nn.Linear(10, 10))    # 110 float32 and the header
        576
    """
    from safetensors.torch import save_file

    from slimkit.export.registry import packed_state

    tensors, _ = packed_state(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        return path.stat().st_size


class _LiveTensors(TorchDispatchMode):
    """Tracks bytes of tensors created by ops that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t)
        return out


def peak_memory(model: nn.Module, example_input: torch.Tensor) -> int:
    """Peak bytes during one inference forward pass: parameters and buffers plus the most activations alive."""
    static = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    tracker = _LiveTensors()
    with torch.inference_mode(), tracker:
        out = model(example_input)
    del out
    return static + tracker.peak


@dataclass
class LatencyStats:
    """Seconds per call at one batch size: median and spread of ``runs`` timed calls."""

    batch_size: int
    median: float
    p25: float
    p75: float
    mean: float
    stdev: float
    runs: int

    @property
    def throughput(self) -> float:
        """Samples per second at the median."""
        return self.batch_size / self.median


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """Pin torch's intra-op thread count for the block (None leaves it)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _batch(example_input: torch.Tensor, batch_size: int) -> torch.Tensor:
    one = example_input[:1]
    return one.expand(batch_size, *one.shape[1:]).contiguous()


@contextlib.contextmanager
def _eval_mode(candidates: Sequence[object]) -> Iterator[None]:
    """Every ``nn.Module`` among ``candidates`` in eval mode for the block, each submodule's own training flag
    restored afterwards (the caller's models come back as they were)."""
    modes = [(m, m.training) for c in candidates if isinstance(c, nn.Module) for m in c.modules()]
    for candidate in candidates:
        if isinstance(candidate, nn.Module):
            candidate.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


ROUNDS = 5  # blocks per candidate and batch size
IDLE_BETWEEN_BLOCKS = 0.05  # seconds; ONNX Runtime / OpenMP worker threads spin-wait for a while after a call


def benchmark_latency(
    candidates: Mapping[str, nn.Module | Callable[[torch.Tensor], object]],
    example_input: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 64),
    *,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = 2,
    max_seconds: float = 20.0,
    min_seconds: float = 1.0,
) -> dict[str, dict[int, LatencyStats]]:
    """Time several models (or any callables taking a batch tensor) side by side in one process.

    Candidates take turns in short blocks (a a a, b b b, c c c, a a a, ...) over ``rounds`` rounds, so drift in
    machine load hits every candidate alike. Between blocks the harness idles 50 ms and the first call of every
    block is not timed: runtimes keep their worker threads spinning for a while after a call (ONNX Runtime and
    OpenMP both do), which would otherwise steal the cores from whichever candidate runs next and make strict
    a/b alternation unfair. ``max_seconds``
    caps the time per batch size (``repeats`` shrinks, never below 5); ``min_seconds`` is the least time per
    batch size (``repeats`` grows for sub-millisecond models, whose medians over 30 calls vary by tens of
    percent from run to run). ONNX Runtime sessions fix their own
    thread count when created; pass the same number there. Models run in eval mode and get their training mode
    back afterwards.
    """
    fns: dict[str, Callable[[torch.Tensor], object]] = dict(candidates)
    results: dict[str, dict[int, LatencyStats]] = {name: {} for name in fns}
    with fixed_threads(threads), torch.inference_mode(), _eval_mode(list(fns.values())):
        for bs in batch_sizes:
            x = _batch(example_input, bs)
            for fn in fns.values():
                for _ in range(warmup):
                    fn(x)
            start = time.perf_counter()
            for fn in fns.values():
                fn(x)
            per_round = max(time.perf_counter() - start, 1e-9)
            runs = max(5, min(max(repeats, int(min_seconds / per_round)), int(max_seconds / per_round)))
            rounds = min(ROUNDS, runs)
            times: dict[str, list[float]] = {name: [] for name in fns}
            for r in range(rounds):
                block = runs // rounds + (1 if r < runs % rounds else 0)
                for name, fn in fns.items():
                    time.sleep(IDLE_BETWEEN_BLOCKS)  # let the previous runtime's spinning threads park
                    fn(x)  # untimed: wakes this runtime's own thread pool
                    for _ in range(block):
                        t0 = time.perf_counter()
                        fn(x)
                        times[name].append(time.perf_counter() - t0)
            for name, ts in times.items():
                q = statistics.quantiles(ts, n=4)
                results[name][bs] = LatencyStats(
                    bs, statistics.median(ts), q[0], q[2], statistics.fmean(ts), statistics.stdev(ts), len(ts)
                )
    return results


def measure_latency(
    model: nn.Module | Callable, example_input: torch.Tensor, batch_sizes: Sequence[int] = (1, 64), **kwargs
) -> dict[int, LatencyStats]:
    """Latency of one model at each batch size (see ``benchmark_latency`` for the options)."""
    return benchmark_latency({"model": model}, example_input, batch_sizes, **kwargs)["model"]


@dataclass
class LatencyComparison:
    """Two models timed side by side; ``speedup[bs]`` = median(a) / median(b) (> 1: b is faster)."""

    a: dict[int, LatencyStats]
    b: dict[int, LatencyStats]
    threads: int | None

    @property
    def speedup(self) -> dict[int, float]:
        return {bs: self.a[bs].median / self.b[bs].median for bs in self.a}

    def table(self, names: tuple[str, str] = ("a", "b")):
        rows = [
            [bs, f"{self.a[bs].median * 1e3:.3f}", f"{self.b[bs].median * 1e3:.3f}", f"{self.speedup[bs]:.2f}x"]
            for bs in self.a
        ]
        return make_table(
            f"latency (median ms, {self.threads} threads)",
            ["batch", f"{names[0]} ms", f"{names[1]} ms", "speed-up"],
            rows,
        )

    def __str__(self) -> str:
        return render(self.table())


def compare_latency(
    model_a: nn.Module | Callable,
    model_b: nn.Module | Callable,
    example_input: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 64),
    **kwargs,
) -> LatencyComparison:
    """Time ``model_a`` and ``model_b`` interleaved in one run; ``.speedup`` is b's speed-up over a.

    Example:
        >>> cmp = compare_latency(big, small, torch.zeros(1, 3, 32, 32), batch_sizes=(1, 64))  # doctest: +SKIP
        >>> cmp.speedup[64]                                                                     # doctest: +SKIP
        1.9
    """
    res = benchmark_latency({"a": model_a, "b": model_b}, example_input, batch_sizes, **kwargs)
    return LatencyComparison(res["a"], res["b"], kwargs.get("threads", 2))


# The machine's measured fp32 / int8 multiply-accumulate peak, beside the latency harness it puts in proportion.
from slimkit.peak import Peak, machine_peak, percent_of_peak  # noqa: E402
