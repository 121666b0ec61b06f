"""benchmarks/harness.py: fresh pinned-allocator processes, combined into median and spread (no timing asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import harness


def test_time_forms_combines_processes_and_counts_page_faults():
    results = harness.time_forms("harness:tiny_linear", {"features": 32}, (1, 8), processes=2, max_seconds=0.2)
    assert set(results) == {"linear", "linear x2"}
    for by_bs in results.values():
        assert set(by_bs) == {1, 8}
        for stats in by_bs.values():
            assert stats["processes"] == 2
            assert len(stats["process_ms"]) == 2
            assert stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
            assert stats["min_ms"] == min(stats["process_ms"]) and stats["max_ms"] == max(stats["process_ms"])
            assert stats["runs"] >= 2 * 5  # benchmark_latency times at least 5 calls per process
            assert isinstance(stats["page_faults_per_call"], float) and stats["page_faults_per_call"] >= 0
    ratios = harness.speedups(results, ["linear", "linear x2"], 8)
    assert max(ratios.values()) == pytest.approx(1.0)  # the fastest baseline form divides by itself
    rows = harness.table(results, (1, 8), ["linear"])
    assert rows[0].startswith("| form | ms b1 | ms b8 | speed-up b1 | speed-up b8 | page faults / call |")
    assert len(rows) == 2 + 2


def test_combine_and_cells_are_exact():
    runs = [
        {"a": {"64": {"median_ms": m, "runs": 10, "page_faults_per_call": f}}}
        for m, f in ((21.3, 0.0), (22.0, 3.5), (21.6, 1.0))
    ]
    stats = harness._combine(runs)["a"][64]
    assert (stats["median_ms"], stats["min_ms"], stats["max_ms"]) == (21.6, 21.3, 22.0)
    assert (stats["runs"], stats["page_faults_per_call"], stats["processes"]) == (30, 3.5, 3)
    assert harness.ms_cell(stats) == "21.6 (21.3-22.0)"
    assert harness.ms_cell({"median_ms": 0.5123, "min_ms": 0.5, "max_ms": 0.53}) == "0.512 (0.500-0.530)"


def test_bad_build_is_refused():
    with pytest.raises(ValueError, match="module:function"):
        harness.time_forms("tiny_linear", {}, processes=1)


def test_machine_names_the_cpu_its_measured_peak_and_the_versions():
    import torch

    from slimkit.peak import machine_peak

    text = harness.machine()
    peak = machine_peak()
    assert f"{peak.threads} cores" in text and f"{peak.fp32_macs_per_s / 1e9:.0f} fp32 /" in text
    assert f"torch {torch.__version__}" in text and "onnxruntime " in text
    assert text.split(",")[0].strip()  # the CPU's name comes first
    assert f"Machine: {text}." in harness.method_note()
