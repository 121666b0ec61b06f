"""The machine's measured multiply-accumulate peak, so a model's speed can be read as a fraction of it.

``machine_peak()`` runs a tiny micro-kernel per number format on every core of the process's affinity at once:
twelve independent accumulator chains of one instruction in a loop, no memory traffic, so the loop runs at the
core's issue rate. fp32 counts ``vfmadd231ps`` (one multiply-accumulate per float lane); int8 counts ``vpdpbusd``
(VNNI: four u8 x s8 multiply-accumulates into each 32-bit lane), or its AVX2/AVX-512BW emulation
``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd`` counted honestly as the same 4 MACs per lane for three instructions.
The widest ISA the CPU reports wins (AVX-512 zmm > AVX ymm). The kernels are machine code embedded below, each
next to the assembly it was assembled from (GNU as, Intel syntax; ``tests/test_peak.py`` re-assembles it and
compares), copied into a page mapped read+execute (never writable and executable at once) and called through
``ctypes``, which releases the GIL, from one Python thread per core. Every call's result is checked against the
arithmetic its inputs imply, so a number is only reported for a kernel that really ran. A dependent chain of
integer adds (one cycle each) gives the clock estimate.

Where no kernel can run (not x86-64 Linux, no executable pages, a failed result check) the peak is the best of a
large compute-bound GEMM (``torch.matmul`` fp32, ONNX Runtime ``MatMulInteger`` int8) and ``Peak.method`` says so.
The measurement takes well under a second and is memoized per thread count for the process (nothing on disk).

Example:
    >>> peak = machine_peak()                                           # doctest: +SKIP
    >>> print(peak.describe())                                          # doctest: +SKIP
    fp32 283 GMAC/s (AVX-512 FMA zmm), int8 1134 GMAC/s (AVX-512 VNNI zmm), 2 threads, ~4.32 GHz ...
    >>> round(percent_of_peak(8.05e9, 0.0134, "int8", peak), 1)        # doctest: +SKIP
    53.0

(ResNet-56 at batch 64 on oneDNN int8: 8.05 GMAC in 13.4 ms.)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import mmap
import os
import platform
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from slimkit.errors import UsageError

__all__ = ["Peak", "machine_peak", "percent_of_peak"]

ITERATIONS = 1 << 20  # loop trips per call: 12 x 2**20 fp32 accumulations of 0.125 stay exact in float32
TARGET_SECONDS = 0.03  # per timed repeat and thread
REPEATS = 3  # the best repeat is the peak
GEMM_SIZE = 1024  # the fallback's square matrices

# The kernels' calling convention (System V x86-64): rdi = loop trips (> 0), rsi = 16 bytes of inputs, rdx = 64
# bytes of output (the accumulators summed lane-wise). Inputs: fp32 a = 0.5, b = 0.25 (each FMA adds 0.125);
# int8 u8 bytes 0x83 (131, -125 if misread as signed) and s8 bytes 0xFE (-2, 254 if misread as unsigned), then
# int16 ones for the emulation's vpmaddwd (each MAC adds 131 * -2 = -262); clock: rcx = 1.
_INPUTS = {
    "fp32": struct.pack("<ff8x", 0.5, 0.25),
    "int8": struct.pack("<III4x", 0x83838383, 0xFEFEFEFE, 0x00010001),
    "clock": struct.pack("<q8x", 1),
}
_UNIT = {"fp32": 0.125, "int8": 131 * -2, "clock": 1}
_CHAINS = ".irp i,0,1,2,3,4,5,6,7,8,9,10,11"


@dataclass(frozen=True)
class Kernel:
    """One micro-kernel: ``work_per_iteration`` MACs (adds for the clock) per loop trip, summed into ``lanes``."""

    name: str
    kind: str  # "fp32", "int8" or "clock"
    isa: str
    flags: tuple[str, ...]  # /proc/cpuinfo flags it needs
    lanes: int
    work_per_iteration: int
    asm: str
    code: bytes

    def expected(self, iterations: int) -> float | int:
        """Each output lane after one call of ``iterations`` loop trips (int32 lanes wrap like the hardware)."""
        value = iterations * (self.work_per_iteration // self.lanes) * _UNIT[self.kind]
        if self.kind == "int8":
            return (int(value) + 2**31) % 2**32 - 2**31
        return value

    def read(self, out: ctypes.Array) -> list[float] | list[int]:
        formats = {"fp32": f"<{self.lanes}f", "int8": f"<{self.lanes}i", "clock": "<q"}
        return list(struct.unpack_from(formats[self.kind], out))


_FMA_ZMM = f"""
vbroadcastss zmm12, dword ptr [rsi]
vbroadcastss zmm13, dword ptr [rsi+4]
{_CHAINS}
vpxord zmm\\i, zmm\\i, zmm\\i
.endr
1:
{_CHAINS}
vfmadd231ps zmm\\i, zmm12, zmm13
.endr
dec rdi
jnz 1b
.irp i,1,2,3,4,5,6,7,8,9,10,11
vaddps zmm0, zmm0, zmm\\i
.endr
vmovups [rdx], zmm0
vzeroupper
ret
"""
_VNNI_ZMM = (
    _FMA_ZMM.replace("vbroadcastss", "vpbroadcastd")
    .replace("vfmadd231ps", "vpdpbusd")
    .replace("vaddps", "vpaddd")
    .replace("vmovups", "vmovdqu32")
)
_FMA_YMM = _FMA_ZMM.replace("zmm", "ymm").replace("vpxord", "vxorps")
_VNNI_YMM = (
    _FMA_YMM.replace("vbroadcastss", "vpbroadcastd")
    .replace("vxorps", "vpxor")
    .replace("vfmadd231ps", "{vex} vpdpbusd")
    .replace("vaddps", "vpaddd")
    .replace("vmovups", "vmovdqu")
)
_MADD_ZMM = """
vpbroadcastd zmm12, dword ptr [rsi]
vpbroadcastd zmm13, dword ptr [rsi+4]
vpbroadcastd zmm14, dword ptr [rsi+8]
.irp i,0,1,2,3,4,5
vpxord zmm\\i, zmm\\i, zmm\\i
.endr
1:
.irp i,0,1,2,3,4,5
vpmaddubsw zmm6, zmm12, zmm13
vpmaddwd zmm6, zmm6, zmm14
vpaddd zmm\\i, zmm\\i, zmm6
.endr
dec rdi
jnz 1b
.irp i,1,2,3,4,5
vpaddd zmm0, zmm0, zmm\\i
.endr
vmovdqu32 [rdx], zmm0
vzeroupper
ret
"""
_MADD_YMM = _MADD_ZMM.replace("zmm", "ymm").replace("vpxord", "vpxor").replace("vmovdqu32", "vmovdqu")
_CLOCK = """
mov rcx, qword ptr [rsi]
xor eax, eax
1:
.rept 8
add rax, rcx
.endr
dec rdi
jnz 1b
mov [rdx], rax
vzeroupper
ret
"""

# Preference order within a kind: the first whose flags the CPU reports is used.
KERNELS: tuple[Kernel, ...] = (
    Kernel(
        "fma_zmm", "fp32", "AVX-512 FMA zmm", ("avx512f",), 16, 12 * 16, _FMA_ZMM,
        bytes.fromhex(
            "62727d48182662727d48186e0162f17d48efc062f17548efc962f16d48efd262f16548efdb62f15d48efe462f15548efed"
            "62f14d48eff662f14548efff62513d48efc062513548efc962512d48efd262512548efdb62d21d48b8c562d21d48b8cd62"
            "d21d48b8d562d21d48b8dd62d21d48b8e562d21d48b8ed62d21d48b8f562d21d48b8fd62521d48b8c562521d48b8cd6252"
            "1d48b8d562521d48b8dd48ffcf75b362f17c4858c162f17c4858c262f17c4858c362f17c4858c462f17c4858c562f17c48"
            "58c662f17c4858c762d17c4858c062d17c4858c162d17c4858c262d17c4858c362f17c481102c5f877c3"
        ),
    ),
    Kernel(
        "fma_ymm", "fp32", "AVX2 FMA ymm", ("avx", "fma"), 8, 12 * 8, _FMA_YMM,
        bytes.fromhex(
            "c4627d1826c4627d186e04c5fc57c0c5f457c9c5ec57d2c5e457dbc5dc57e4c5d457edc5cc57f6c5c457ffc4413c57c0c4"
            "413457c9c4412c57d2c4412457dbc4c21db8c5c4c21db8cdc4c21db8d5c4c21db8ddc4c21db8e5c4c21db8edc4c21db8f5"
            "c4c21db8fdc4421db8c5c4421db8cdc4421db8d5c4421db8dd48ffcf75bfc5fc58c1c5fc58c2c5fc58c3c5fc58c4c5fc58"
            "c5c5fc58c6c5fc58c7c4c17c58c0c4c17c58c1c4c17c58c2c4c17c58c3c5fc1102c5f877c3"
        ),
    ),
    Kernel(
        "vnni_zmm", "int8", "AVX-512 VNNI zmm", ("avx512f", "avx512_vnni"), 16, 12 * 64, _VNNI_ZMM,
        bytes.fromhex(
            "62727d48582662727d48586e0162f17d48efc062f17548efc962f16d48efd262f16548efdb62f15d48efe462f15548efed"
            "62f14d48eff662f14548efff62513d48efc062513548efc962512d48efd262512548efdb62d21d4850c562d21d4850cd62"
            "d21d4850d562d21d4850dd62d21d4850e562d21d4850ed62d21d4850f562d21d4850fd62521d4850c562521d4850cd6252"
            "1d4850d562521d4850dd48ffcf75b362f17d48fec162f17d48fec262f17d48fec362f17d48fec462f17d48fec562f17d48"
            "fec662f17d48fec762d17d48fec062d17d48fec162d17d48fec262d17d48fec362f17e487f02c5f877c3"
        ),
    ),
    Kernel(
        "vnni_ymm", "int8", "AVX-VNNI ymm", ("avx2", "avx_vnni"), 8, 12 * 32, _VNNI_YMM,
        bytes.fromhex(
            "c4627d5826c4627d586e04c5fdefc0c5f5efc9c5edefd2c5e5efdbc5ddefe4c5d5efedc5cdeff6c5c5efffc4413defc0c4"
            "4135efc9c4412defd2c44125efdbc4c21d50c5c4c21d50cdc4c21d50d5c4c21d50ddc4c21d50e5c4c21d50edc4c21d50f5"
            "c4c21d50fdc4421d50c5c4421d50cdc4421d50d5c4421d50dd48ffcf75bfc5fdfec1c5fdfec2c5fdfec3c5fdfec4c5fdfe"
            "c5c5fdfec6c5fdfec7c4c17dfec0c4c17dfec1c4c17dfec2c4c17dfec3c5fe7f02c5f877c3"
        ),
    ),
    Kernel(
        "madd_zmm", "int8", "AVX-512BW vpmaddubsw+vpmaddwd zmm (no VNNI)", ("avx512f", "avx512bw"), 16, 6 * 64,
        _MADD_ZMM,
        bytes.fromhex(
            "62727d48582662727d48586e0162727d4858760262f17d48efc062f17548efc962f16d48efd262f16548efdb62f15d48ef"
            "e462f15548efed62d21d4804f562d14d48f5f662f17d48fec662d21d4804f562d14d48f5f662f17548fece62d21d4804f5"
            "62d14d48f5f662f16d48fed662d21d4804f562d14d48f5f662f16548fede62d21d4804f562d14d48f5f662f15d48fee662"
            "d21d4804f562d14d48f5f662f15548feee48ffcf758f62f17d48fec162f17d48fec262f17d48fec362f17d48fec462f17d"
            "48fec562f17e487f02c5f877c3"
        ),
    ),
    Kernel(
        "madd_ymm", "int8", "AVX2 vpmaddubsw+vpmaddwd ymm (no VNNI)", ("avx2",), 8, 6 * 32, _MADD_YMM,
        bytes.fromhex(
            "c4627d5826c4627d586e04c4627d587608c5fdefc0c5f5efc9c5edefd2c5e5efdbc5ddefe4c5d5efedc4c21d04f5c4c14d"
            "f5f6c5fdfec6c4c21d04f5c4c14df5f6c5f5fecec4c21d04f5c4c14df5f6c5edfed6c4c21d04f5c4c14df5f6c5e5fedec4"
            "c21d04f5c4c14df5f6c5ddfee6c4c21d04f5c4c14df5f6c5d5feee48ffcf75a7c5fdfec1c5fdfec2c5fdfec3c5fdfec4c5"
            "fdfec5c5fe7f02c5f877c3"
        ),
    ),
    Kernel(
        "clock", "clock", "dependent add chain", (), 1, 8, _CLOCK,
        bytes.fromhex("488b0e31c04801c84801c84801c84801c84801c84801c84801c84801c848ffcf75e3488902c5f877c3"),
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Peak:
    """Measured multiply-accumulates per second over ``threads`` threads, and how they were measured."""

    fp32_macs_per_s: float
    int8_macs_per_s: float
    threads: int
    isa_fp32: str
    isa_int8: str
    method: str
    ghz_estimate: float | None = None

    def macs_per_s(self, kind: str) -> float:
        """The peak of ``kind`` (``"fp32"`` or ``"int8"``)."""
        if kind not in ("fp32", "int8"):
            raise UsageError(f"peak kind {kind!r} is not one of 'fp32', 'int8'")
        return self.fp32_macs_per_s if kind == "fp32" else self.int8_macs_per_s

    def describe(self) -> str:
        """One line: both peaks with their ISA, the threads, the clock and MACs per cycle per thread."""
        text = (
            f"fp32 {self.fp32_macs_per_s / 1e9:.4g} GMAC/s ({self.isa_fp32}), "
            f"int8 {self.int8_macs_per_s / 1e9:.4g} GMAC/s ({self.isa_int8}), {self.threads} threads"
        )
        if self.ghz_estimate:
            per_cycle = self.threads * self.ghz_estimate * 1e9
            text += (
                f", ~{self.ghz_estimate:.2f} GHz ({self.fp32_macs_per_s / per_cycle:.3g} fp32 / "
                f"{self.int8_macs_per_s / per_cycle:.3g} int8 MACs per cycle per thread)"
            )
        return f"{text}; {self.method}"

    def to_dict(self) -> dict:
        return asdict(self)


class KernelCheckFailed(RuntimeError):
    """A micro-kernel's output differs from the arithmetic of its inputs: its timing cannot be trusted."""


def cpu_info() -> dict[str, str]:
    """The first CPU's fields in Linux's ``/proc/cpuinfo`` (``"model name"``, ``"cpu family"``, ``"model"``,
    ``"flags"``, ...; empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if not line.strip() and info:  # the first processor's block ends
                    break
                key, colon, value = line.partition(":")
                if colon:
                    info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (``/proc/cpuinfo``; empty where there is none)."""
    return set(cpu_info().get("flags", "").split())


def pick_kernel(kind: str, flags: set[str]) -> Kernel | None:
    """The first kernel of ``kind`` (in preference order) whose CPU flags are all in ``flags``."""
    return next((k for k in KERNELS if k.kind == kind and set(k.flags) <= flags), None)


def native_unavailable() -> str | None:
    """Why the micro-kernels cannot run here, or None when they can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine() or 'unknown'}, not x86-64"
    if not sys.platform.startswith("linux"):
        return f"executable pages are only set up on Linux, not {sys.platform}"
    return None


KernelFunction = Callable[[int, ctypes.Array, ctypes.Array], None]


@contextlib.contextmanager
def executable(code: bytes) -> Iterator[KernelFunction]:
    """``code`` in fresh pages, written while read+write, then switched to read+execute; unmapped afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = -(-len(code) // mmap.PAGESIZE) * mmap.PAGESIZE
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap of a code page failed")
    try:
        ctypes.memmove(address, code, len(code))
        if libc.mprotect(address, size, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            raise OSError(ctypes.get_errno(), "mprotect(PROT_READ | PROT_EXEC) refused")
        # CFUNCTYPE (not PYFUNCTYPE) releases the GIL for the call, so threads run the kernel truly in parallel
        signature = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)
        yield signature(address)
    finally:
        libc.munmap(address, size)


def run_kernel(kernel: Kernel, function: KernelFunction, threads: int, calls: int, iterations: int) -> float:
    """Wall seconds for ``threads`` threads each making ``calls`` calls at once; every thread's result checked."""
    inputs = ctypes.create_string_buffer(_INPUTS[kernel.kind], 64)
    outputs = [ctypes.create_string_buffer(64) for _ in range(threads)]
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * threads
    barrier = threading.Barrier(threads)

    def work(index: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        for _ in range(calls):
            function(iterations, inputs, outputs[index])
        spans[index] = (start, time.perf_counter())

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    expected = kernel.expected(iterations)
    for out in outputs:
        got = kernel.read(out)
        if any(value != expected for value in got):
            raise KernelCheckFailed(f"{kernel.name} returned {got[:4]}..., expected {expected} in every lane")
    return max(end for _, end in spans) - min(start for start, _ in spans)


def kernel_rate(kernel: Kernel, threads: int, iterations: int = ITERATIONS) -> float:
    """Best work per second (MACs, or adds for the clock) of ``kernel`` over ``threads`` threads."""
    with executable(kernel.code) as function:
        single = run_kernel(kernel, function, 1, 1, iterations)  # warm-up, and the call's length
        calls = max(1, math.ceil(TARGET_SECONDS / max(single, 1e-9)))
        best = min(run_kernel(kernel, function, threads, calls, iterations) for _ in range(REPEATS))
    return threads * calls * iterations * kernel.work_per_iteration / best


def gemm_fp32(threads: int, size: int) -> float:
    """Best MACs per second of a ``size``-cube fp32 ``torch.matmul`` on ``threads`` threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.matmul(a, b)
        best = math.inf
        for _ in range(REPEATS + 2):
            start = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)
    return size**3 / best


def gemm_int8(threads: int, size: int) -> float:
    """Best MACs per second of a ``size``-cube u8 x s8 ONNX Runtime ``MatMulInteger`` on ``threads`` threads."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (size, size), dtype=np.uint8)
    b = rng.integers(-128, 128, (size, size), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "peak",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])],
        [onnx.numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {"a": a})
    best = math.inf
    for _ in range(REPEATS + 2):
        start = time.perf_counter()
        session.run(None, {"a": a})
        best = min(best, time.perf_counter() - start)
    return size**3 / best


def _native(threads: int) -> Peak | None:
    """The micro-kernels' peak, or None when a kind has no kernel for this CPU."""
    flags = cpu_flags()
    fp32, int8, clock = pick_kernel("fp32", flags), pick_kernel("int8", flags), pick_kernel("clock", flags)
    if fp32 is None or int8 is None or clock is None:
        return None
    ghz = kernel_rate(clock, 1) / 1e9
    return Peak(
        kernel_rate(fp32, threads),
        kernel_rate(int8, threads),
        threads,
        fp32.isa,
        int8.isa,
        f"micro-kernels ({fp32.name}, {int8.name}: 12 independent accumulator chains, no memory traffic)",
        round(ghz, 3),
    )


def _fallback(threads: int, reason: str) -> Peak:
    size = GEMM_SIZE
    fp32 = gemm_fp32(threads, size)
    try:
        int8, isa_int8 = gemm_int8(threads, size), f"ONNX Runtime MatMulInteger {size}^3"
    except ImportError:
        int8, isa_int8 = 0.0, "not measured (onnxruntime missing)"
    method = f"GEMM fallback, a lower bound on the peak ({reason})"
    return Peak(fp32, int8, threads, f"torch.matmul fp32 {size}^3", isa_int8, method, None)


@functools.cache
def _measure(threads: int) -> Peak:
    reason = native_unavailable()
    if reason is None:
        try:
            found = _native(threads)
        except (OSError, AttributeError, KernelCheckFailed) as exc:  # no exec pages / no libc mmap / wrong result
            reason = f"micro-kernel could not run: {exc}"
        else:
            if found is not None:
                return found
            reason = "the CPU reports neither FMA nor AVX2"
    return _fallback(threads, reason)


def default_threads() -> int:
    """The cores this process may run on (its affinity mask), else the machine's CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_peak(threads: int | None = None, *, refresh: bool = False) -> Peak:
    """The machine's measured fp32 FMA and int8 multiply-accumulate peak over ``threads`` threads (default: every
    core of the process's affinity), memoized for the process (``refresh=True`` measures again).

    Example:
        >>> peak = machine_peak()
        >>> peak.fp32_macs_per_s > 0 and peak.int8_macs_per_s >= 0 and peak.threads >= 1
        True
    """
    if threads is None:
        threads = default_threads()
    if not isinstance(threads, int) or threads < 1:
        raise UsageError(f"machine_peak: threads must be a positive integer, got {threads!r}")
    if refresh:
        _measure.cache_clear()
    return _measure(threads)


def percent_of_peak(macs: float, seconds: float, kind: str = "int8", peak: Peak | None = None) -> float:
    """What percent of the machine's ``kind`` peak (``"int8"`` or ``"fp32"``) ``macs`` multiply-accumulates done in
    ``seconds`` reach (``peak``: default ``machine_peak()``).

    Example:
        >>> p = Peak(100e9, 400e9, 2, "fp32 isa", "int8 isa", "by hand")
        >>> percent_of_peak(8e9, 0.1, "int8", p), percent_of_peak(8e9, 0.1, "fp32", p)
        (20.0, 80.0)
    """
    if not seconds > 0:
        raise UsageError(f"percent_of_peak: seconds must be > 0, got {seconds!r}")
    if not macs >= 0:
        raise UsageError(f"percent_of_peak: macs must be >= 0, got {macs!r}")
    peak = peak if peak is not None else machine_peak()
    rate = peak.macs_per_s(kind)
    if rate <= 0:
        raise UsageError(f"percent_of_peak: no {kind} peak was measured on this machine ({peak.isa_int8})")
    return 100.0 * macs / seconds / rate
