"""Objectives: latency measured side by side and cached by architecture signature; accuracy budget."""

import copy
import json

import pytest
import torch

import slimkit
from slimkit.tuning.objectives import LatencyCache, Measurer, accuracy_threshold, architecture_signature


def test_signature_follows_the_architecture_not_the_weights():
    a = slimkit.models.create("mlp", in_features=64, hidden=16)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[1].weight.add_(1.0)
    assert architecture_signature(a) == architecture_signature(b)
    assert architecture_signature(a) != architecture_signature(slimkit.models.create("mlp", in_features=64, hidden=8))


def test_latency_is_a_ratio_to_the_input_and_cached(tmp_path, digits):
    _, test = digits
    base = slimkit.models.create("mlp", in_features=64, hidden=16)
    cache = LatencyCache(tmp_path / "latency.json")
    m = Measurer(base, test, test[0][0].unsqueeze(0), ("accuracy", "latency"), latency_batch=8, threads=1, cache=cache)
    small = slimkit.models.create("mlp", in_features=64, hidden=4)
    first = m(small)
    assert first["latency_ms"] == pytest.approx(m.baseline_ms() / first["speedup"])
    stored = json.loads((tmp_path / "latency.json").read_text())
    assert stored == {architecture_signature(small): first["speedup"]}
    # same architecture, other weights: the cached ratio is reused (a fresh cache object reads the file)
    again = Measurer(
        base,
        test,
        test[0][0].unsqueeze(0),
        ("accuracy", "latency"),
        latency_batch=8,
        threads=1,
        cache=LatencyCache(tmp_path / "latency.json"),
    )
    again._baseline_ms = m.baseline_ms()
    assert again(copy.deepcopy(small))["speedup"] == first["speedup"]


def test_accuracy_threshold():
    assert accuracy_threshold(98.0, 0.5, relative=False) == 97.5
    assert accuracy_threshold(98.0, 1.0, relative=True) == pytest.approx(97.02)
    assert accuracy_threshold(98.0, None, relative=False) is None
