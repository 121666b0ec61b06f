"""The one latency harness every benchmark uses: fresh processes, allocator pinned, median and spread.

A latency measured in the process that built, trained or pruned the models flatters whichever model left the heap
in a better state, and glibc's default allocator returns large activation buffers to the OS after every forward,
so a big model pays tens of thousands of page faults per call that a smaller one does not (issue 11: the pruning
benchmark's 1.64x eager speed-up was mostly that). So ``time_forms``:

- starts ``processes`` fresh worker processes one after another (never two at once: they would share the cores),
  each with ``GLIBC_TUNABLES=PINNED`` (no mmap/trim of activation buffers) and OMP/MKL threads fixed;
- each worker seeds torch/random/numpy, calls the benchmark's ``build(**kwargs)`` to get its forms, times them
  interleaved with ``slimkit.measure.benchmark_latency`` and counts minor page faults per call (``ru_minflt``
  over one extra loop per form, so a report can prove they are ~0), then prints one JSON line;
- the parent returns, per form and batch size, the median of the process medians and their spread.

A build function lives in a module of this folder, takes keyword arguments (JSON-serialisable) and returns
``(forms, example_input)``: ``forms`` maps a name to a callable taking a batch tensor. A trained or pruned model is
either rebuilt deterministically in the worker (seeds are fixed before ``build`` runs) or loaded from a file the
parent wrote. ``speedups`` divides by the *fastest* of the given baseline forms (e.g. the original's
``"onnxruntime fp32"`` and ``"eager fp32"``), and ``table`` writes markdown cells such as ``21.6 (21.3-22.0)``.

Example:
    >>> results = time_forms("harness:tiny_linear", {"features": 64}, (1, 64), processes=3)   # doctest: +SKIP
    >>> results["linear"][64]["median_ms"], results["linear"][64]["page_faults_per_call"]    # doctest: +SKIP
    (0.012, 0.0)
    >>> speedups(results, ["linear"], 64)                                                   # doctest: +SKIP
    {'linear': 1.0, 'linear x2': 0.51}
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess  # nosec B404: runs this same file with the same interpreter
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

LOCK = "/tmp/slimkit-cpu.lock"  # the one lock every heavy run on this machine takes (DEVELOPERS: flock)
PINNED = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"
HERE = Path(__file__).resolve().parent
FAULT_SECONDS = 1.0  # time budget of the page-fault loop per form and batch size (3-30 calls)

Stats = dict[str, float | int]
Results = dict[str, dict[int, Stats]]


def time_forms(
    build: str,
    kwargs: dict,
    batch_sizes: tuple[int, ...] = (1, 64),
    *,
    processes: int = 3,
    threads: int = 2,
    max_seconds: float = 10.0,
    timeout_s: float = 3600.0,
) -> Results:
    """Time the forms ``build(**kwargs)`` returns in ``processes`` fresh processes, one after another.

    Args:
        build: ``"module:function"`` importable from the benchmarks folder, e.g. ``"prune:build_forms"``.
        kwargs: JSON-serialisable keyword arguments for it.
        max_seconds: timing budget per batch size in each process (``benchmark_latency``'s cap).

    Returns:
        ``{form: {batch_size: {"median_ms", "min_ms", "max_ms", "processes", "runs", "page_faults_per_call",
        "process_ms"}}}``: median of the process medians, the lowest and highest process median, the number of
        processes, timed calls over all processes, the most minor page faults per call any process saw, and each
        process's median.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if ":" not in build:
        raise ValueError(f"build must be 'module:function' from {HERE}, got {build!r}")
    job = {
        "build": build,
        "kwargs": kwargs,
        "batch_sizes": list(batch_sizes),
        "threads": threads,
        "max_seconds": max_seconds,
    }
    env = dict(os.environ, GLIBC_TUNABLES=PINNED, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    per_process = []
    for index in range(processes):
        started = time.perf_counter()
        done = subprocess.run(  # nosec B603: fixed argv, this interpreter and this file
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
            cwd=HERE,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        if done.returncode != 0 or not lines:
            raise RuntimeError(
                f"benchmark worker {index + 1}/{processes} for {build} exited with {done.returncode}; "
                "its traceback is on stderr above"
            )
        per_process.append(json.loads(lines[-1]))
        print(
            f"[harness] {build} process {index + 1}/{processes}: {time.perf_counter() - started:.0f} s", file=sys.stderr
        )
    return _combine(per_process)


def _combine(per_process: list[dict]) -> Results:
    results: Results = {}
    for form in per_process[0]:
        results[form] = {}
        for bs_key in per_process[0][form]:
            runs = [p[form][bs_key] for p in per_process]
            medians = [r["median_ms"] for r in runs]
            results[form][int(bs_key)] = {
                "median_ms": statistics.median(medians),
                "min_ms": min(medians),
                "max_ms": max(medians),
                "processes": len(runs),
                "runs": sum(r["runs"] for r in runs),
                "page_faults_per_call": max(r["page_faults_per_call"] for r in runs),
                "process_ms": medians,
            }
    return results


def speedups(results: Results, baseline_forms: list[str], bs: int) -> dict[str, float]:
    """Each form's speed-up at batch ``bs`` over the FASTEST of ``baseline_forms`` (> 1: faster than it)."""
    present = [f for f in baseline_forms if f in results and bs in results[f]]
    if not present:
        raise KeyError(f"none of the baseline forms {baseline_forms} was timed at batch {bs}")
    base = min(results[f][bs]["median_ms"] for f in present)
    return {form: base / by_bs[bs]["median_ms"] for form, by_bs in results.items() if bs in by_bs}


def fastest(results: Results, forms: Iterable[str], bs: int) -> str:
    """The name of the fastest of ``forms`` at batch ``bs``."""
    return min((f for f in forms if f in results), key=lambda f: results[f][bs]["median_ms"])


def _decimals(ms: float) -> int:
    """Three significant digits for the median, the same decimals for the spread."""
    return min(3, max(0, 2 - math.floor(math.log10(ms)))) if ms > 0 else 3


def ms_cell(stats: Stats) -> str:
    """``"21.6 (21.3-22.0)"``: median of the process medians in ms, and their lowest-highest spread."""
    d = _decimals(float(stats["median_ms"]))
    return f"{stats['median_ms']:.{d}f} ({stats['min_ms']:.{d}f}-{stats['max_ms']:.{d}f})"


def table(
    results: Results,
    batch_sizes: Sequence[int] = (1, 64),
    baseline_forms: list[str] | None = None,
    *,
    label: Callable[[str], str] = str,
    first_column: str = "form",
) -> list[str]:
    """Markdown rows: each form's ms (median and spread of process medians) per batch size, its speed-up over the
    fastest baseline form when given, and the most page faults per call seen."""
    header = [first_column] + [f"ms b{bs}" for bs in batch_sizes]
    if baseline_forms:
        header += [f"speed-up b{bs}" for bs in batch_sizes]
    header.append("page faults / call")
    ratios = {bs: speedups(results, baseline_forms, bs) for bs in batch_sizes} if baseline_forms else {}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for form, by_bs in results.items():
        cells = [label(form)] + [ms_cell(by_bs[bs]) for bs in batch_sizes]
        cells += [f"{ratios[bs][form]:.2f}x" for bs in ratios]
        cells.append(f"{max(by_bs[bs]['page_faults_per_call'] for bs in batch_sizes):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def method_note(processes: int = 3, threads: int = 2) -> str:
    """How the numbers were taken and on which CPU, for the markdown a benchmark writes."""
    return (
        f"Latency: {processes} fresh processes one after another, each timing every form interleaved "
        f"(slimkit.measure.benchmark_latency, {threads} threads), allocator pinned (GLIBC_TUNABLES={PINNED}); "
        "cells are the median of the process medians in ms and their spread (lowest-highest); speed-ups are "
        f"against the fastest fp32 form of the original at the same batch size. Machine: {machine()}."
    )


def machine() -> str:
    """The CPU by name, family and model, the cores this process may use, its measured fp32 / int8 peak now
    (``slimkit.peak.machine_peak``: a busy or throttled machine shows here) and the torch / ONNX Runtime versions,
    so tables from different machines or days can be told apart.

    Example:
        >>> machine()  # doctest: +SKIP
        'AMD EPYC (family 25 model 17), 2 cores, peak 147 fp32 / 541 int8 GMAC/s, torch 2.14.1, onnxruntime 1.32.0'
    """
    import torch

    from slimkit.peak import cpu_info, machine_peak

    info = cpu_info()
    cpu = info.get("model name", platform.processor() or platform.machine())
    if "cpu family" in info and "model" in info:
        cpu += f" (family {info['cpu family']} model {info['model']})"
    peak = machine_peak()
    text = (
        f"{cpu}, {peak.threads} cores, peak {peak.fp32_macs_per_s / 1e9:.0f} fp32 / "
        f"{peak.int8_macs_per_s / 1e9:.0f} int8 GMAC/s, torch {torch.__version__}"
    )
    with contextlib.suppress(ImportError):
        import onnxruntime

        text += f", onnxruntime {onnxruntime.__version__}"
    return text


@contextlib.contextmanager
def cpu_lock(what: str, path: str = LOCK) -> Iterator[None]:
    """Hold the machine's shared CPU lock for one phase of a long benchmark (other heavy runs wait meanwhile), so a
    long benchmark takes it phase by phase instead of for its whole run; prints how long it waited and held it."""
    started = time.perf_counter()
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        waited = time.perf_counter() - started
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    print(f"[lock] {what}: waited {waited:.0f} s, held {time.perf_counter() - started - waited:.0f} s", file=sys.stderr)


def load_lines(results: dict[str, dict]) -> list[str]:
    """Markdown lines stating the 1-minute load average before / after each model's runs, from entries that
    recorded ``"load_average_1min": [before, after]`` (none when no entry did)."""
    loads = ", ".join(
        f"{name} {res['load_average_1min'][0]:.1f} / {res['load_average_1min'][1]:.1f}"
        for name, res in results.items()
        if "load_average_1min" in res
    )
    return ["", f"1-minute load average before / after each model's runs (2 cores): {loads}."] if loads else []


def tiny_linear(features: int = 64) -> tuple[dict[str, Callable], object]:
    """The smallest build function (used by the harness's own test): one Linear layer, and it applied twice."""
    import torch

    layer = torch.nn.Linear(features, features).eval()
    return {"linear": layer, "linear x2": lambda x: layer(layer(x))}, torch.randn(1, features)


def _page_faults_per_call(fn: Callable, x: object, seconds_per_call: float) -> float:
    """Minor page faults per call over a short extra loop (every thread of this process counts)."""
    calls = max(3, min(30, int(FAULT_SECONDS / max(seconds_per_call, 1e-6))))
    fn(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn(x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def _worker(job: dict) -> dict:
    """Build the forms, time them interleaved, count page faults; ``{form: {bs: stats}}``."""
    import torch

    from slimkit.measure import _batch, benchmark_latency, fixed_threads

    sys.path.insert(0, str(HERE))
    random.seed(0)
    torch.manual_seed(0)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(0)
    torch.set_num_threads(job["threads"])
    module_name, function_name = job["build"].split(":", 1)
    forms, example = getattr(importlib.import_module(module_name), function_name)(**job["kwargs"])
    timed = benchmark_latency(
        forms, example, job["batch_sizes"], threads=job["threads"], max_seconds=job["max_seconds"]
    )
    out: dict[str, dict[int, dict]] = {name: {} for name in forms}
    with fixed_threads(job["threads"]), torch.inference_mode():
        for bs in job["batch_sizes"]:
            x = _batch(example, bs)
            for name, fn in forms.items():
                stats = timed[name][bs]
                out[name][bs] = {
                    "median_ms": stats.median * 1e3,
                    "p25_ms": stats.p25 * 1e3,
                    "p75_ms": stats.p75 * 1e3,
                    "runs": stats.runs,
                    "page_faults_per_call": _page_faults_per_call(fn, x, stats.median),
                }
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        job = json.loads(sys.argv[2])
        stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):  # the build's own prints must not corrupt the JSON line
            result = _worker(job)
        stdout.write(json.dumps(result) + "\n")
        stdout.flush()
        return
    raise SystemExit("harness.py is a module (import time_forms); it runs itself only as '--worker JOB'")


if __name__ == "__main__":
    main()
