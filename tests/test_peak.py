"""slimkit.peak: the embedded kernels are the assembly beside them, compute exactly the arithmetic of their inputs
(checked on every kernel this CPU can run), and the peak falls back to GEMMs where they cannot run. No timing is
asserted beyond "positive"."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

import slimkit.measure
from slimkit import peak
from slimkit.errors import UsageError

NATIVE = peak.native_unavailable() is None
FLAGS = peak.cpu_flags()
RUNNABLE = [k for k in peak.KERNELS if NATIVE and set(k.flags) <= FLAGS]


@pytest.fixture
def fresh_measurement():
    peak._measure.cache_clear()
    yield
    peak._measure.cache_clear()


def assemble(source: str, folder: Path) -> bytes:
    (folder / "k.s").write_text(".intel_syntax noprefix\n.text\n" + source)
    subprocess.run(["as", "--64", "-o", str(folder / "k.o"), str(folder / "k.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(folder / "k.o"), str(folder / "k.bin")], check=True)
    return (folder / "k.bin").read_bytes()


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("objcopy")), reason="needs GNU as and objcopy")
@pytest.mark.parametrize("kernel", peak.KERNELS, ids=lambda k: k.name)
def test_embedded_bytes_are_the_assembly_beside_them(kernel, tmp_path):
    try:
        code = assemble(kernel.asm, tmp_path)
    except subprocess.CalledProcessError:
        pytest.skip("this assembler does not target x86-64")
    assert code == kernel.code


def test_expected_arithmetic_by_hand():
    by_name = {k.name: k for k in peak.KERNELS}
    # fp32: 12 accumulators per lane, each FMA adds 0.5 * 0.25
    assert by_name["fma_zmm"].expected(1000) == 12 * 1000 * 0.125
    assert by_name["fma_ymm"].expected(8) == 12.0
    # int8: 12 vpdpbusd per trip, 4 MACs of 131 * -2 each into every int32 lane
    assert by_name["vnni_zmm"].expected(10) == 10 * 12 * 4 * -262
    assert by_name["vnni_ymm"].expected(10) == 10 * 12 * 4 * -262
    # emulation: 6 chains of vpmaddubsw (2 products) + vpmaddwd (2 pairs) = 4 MACs per lane
    assert by_name["madd_zmm"].expected(10) == by_name["madd_ymm"].expected(10) == 10 * 6 * 4 * -262
    # int32 lanes wrap as the hardware does
    trips = 2**20
    wrapped = by_name["vnni_zmm"].expected(trips)
    assert -(2**31) <= wrapped < 2**31 and (wrapped - trips * 48 * -262) % 2**32 == 0
    assert by_name["clock"].expected(5) == 40
    # fp32 accumulations stay exact at the default trip count: 12 * 2**20 * 0.125 < 2**21
    assert by_name["fma_zmm"].expected(peak.ITERATIONS) == 1.5 * 2**20


def test_kernel_preference_follows_the_isa():
    zen = {"avx", "fma", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni"}
    assert peak.pick_kernel("fp32", zen).name == "fma_zmm"
    assert peak.pick_kernel("int8", zen).name == "vnni_zmm"
    assert peak.pick_kernel("int8", {"avx", "fma", "avx2", "avx_vnni"}).name == "vnni_ymm"
    assert peak.pick_kernel("int8", {"avx2", "avx512f", "avx512bw"}).name == "madd_zmm"
    assert peak.pick_kernel("int8", {"avx", "avx2"}).name == "madd_ymm"
    assert peak.pick_kernel("fp32", {"avx", "fma"}).name == "fma_ymm"
    assert peak.pick_kernel("fp32", {"sse2"}) is None


@pytest.mark.skipif(not RUNNABLE, reason="no micro-kernel runs on this machine")
@pytest.mark.parametrize("kernel", RUNNABLE, ids=lambda k: k.name)
def test_every_runnable_kernel_computes_its_arithmetic(kernel):
    with peak.executable(kernel.code) as function:
        for trips in (1, 777, peak.ITERATIONS):  # run_kernel raises KernelCheckFailed on any wrong lane
            assert peak.run_kernel(kernel, function, threads=2, calls=2, iterations=trips) > 0


@pytest.mark.skipif(not RUNNABLE, reason="no micro-kernel runs on this machine")
def test_a_wrong_result_is_caught():
    kernel = RUNNABLE[0]
    claimed = dataclasses.replace(kernel, work_per_iteration=kernel.work_per_iteration * 2)
    with peak.executable(kernel.code) as function, pytest.raises(peak.KernelCheckFailed, match=kernel.name):
        peak.run_kernel(claimed, function, threads=1, calls=1, iterations=100)


@pytest.mark.skipif(not RUNNABLE, reason="no micro-kernel runs on this machine")
def test_machine_peak_measures_with_kernels(fresh_measurement):
    measured = slimkit.measure.machine_peak(2)
    assert measured is peak.machine_peak(2)  # memoized
    assert peak.machine_peak(2, refresh=True) is not measured
    assert measured.fp32_macs_per_s > 0 and measured.int8_macs_per_s > 0 and measured.threads == 2
    assert measured.isa_fp32 == peak.pick_kernel("fp32", FLAGS).isa
    assert measured.isa_int8 == peak.pick_kernel("int8", FLAGS).isa
    assert measured.method.startswith("micro-kernels") and measured.ghz_estimate > 0
    assert measured.isa_int8 in measured.describe() and "GHz" in measured.describe()
    assert peak.machine_peak().threads == peak.default_threads()


def test_percent_of_peak_arithmetic():
    p = peak.Peak(200e9, 800e9, 2, "a", "b", "by hand")
    assert slimkit.measure.percent_of_peak(4e9, 0.01, "int8", p) == pytest.approx(50.0)
    assert slimkit.measure.percent_of_peak(4e9, 0.04, "fp32", p) == pytest.approx(50.0)
    assert peak.percent_of_peak(0, 1.0, "fp32", p) == 0.0
    with pytest.raises(UsageError, match="'int4'"):
        peak.percent_of_peak(1e9, 0.01, "int4", p)
    with pytest.raises(UsageError, match="seconds"):
        peak.percent_of_peak(1e9, 0.0, "int8", p)
    with pytest.raises(UsageError, match="no int8 peak"):
        peak.percent_of_peak(1e9, 0.01, "int8", dataclasses.replace(p, int8_macs_per_s=0.0))
    with pytest.raises(UsageError, match="threads"):
        peak.machine_peak(0)


def test_fallback_when_no_kernel_can_run(monkeypatch, fresh_measurement):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(peak, "GEMM_SIZE", 64)
    monkeypatch.setattr(peak, "native_unavailable", lambda: "the CPU is riscv64, not x86-64")
    measured = peak.machine_peak(1)
    assert measured.method.startswith("GEMM fallback") and "riscv64" in measured.method
    assert measured.fp32_macs_per_s > 0 and measured.int8_macs_per_s > 0 and measured.ghz_estimate is None
    assert "torch.matmul" in measured.isa_fp32 and "MatMulInteger" in measured.isa_int8


@pytest.mark.parametrize(
    "failure", [OSError(1, "mprotect(PROT_READ | PROT_EXEC) refused"), peak.KernelCheckFailed("fma_zmm returned")]
)
def test_fallback_when_the_kernel_fails(monkeypatch, fresh_measurement, failure):
    pytest.importorskip("onnxruntime")

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(peak, "GEMM_SIZE", 64)
    monkeypatch.setattr(peak, "native_unavailable", lambda: None)
    monkeypatch.setattr(peak, "cpu_flags", lambda: {"avx", "fma", "avx2"})
    monkeypatch.setattr(peak, "kernel_rate", broken)
    measured = peak.machine_peak(1)
    assert measured.method.startswith("GEMM fallback") and str(failure) in measured.method
