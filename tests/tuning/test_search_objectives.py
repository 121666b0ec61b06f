"""Objectives: latency on the deployed runtime (or side by side in eager), cached by architecture signature;
accuracy budget; where each latency was measured reaches the metrics and the report."""

import copy
import json

import pytest
import torch

import slimkit
from slimkit.errors import UsageError
from slimkit.export import deployed
from slimkit.export.deployed import Deployed
from slimkit.tuning.config import Runtime, SearchConfig
from slimkit.tuning.objectives import (
    EAGER_RUNTIME,
    LatencyCache,
    Measurer,
    accuracy_threshold,
    architecture_signature,
)
from slimkit.tuning.results import SearchResult, SearchStudy, format_metrics


def test_signature_follows_the_architecture_not_the_weights():
    a = slimkit.models.create("mlp", in_features=64, hidden=16)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[1].weight.add_(1.0)
    assert architecture_signature(a) == architecture_signature(b)
    assert architecture_signature(a) != architecture_signature(slimkit.models.create("mlp", in_features=64, hidden=8))


def test_eager_latency_is_a_ratio_to_the_input_and_cached(tmp_path, digits):
    _, test = digits
    base = slimkit.models.create("mlp", in_features=64, hidden=16)
    cache = LatencyCache(tmp_path / "latency.json")
    m = Measurer(
        base,
        test,
        test[0][0].unsqueeze(0),
        ("accuracy", "latency"),
        latency_batch=8,
        threads=1,
        cache=cache,
        runtime="eager",
    )
    small = slimkit.models.create("mlp", in_features=64, hidden=4)
    first = m(small)
    assert first["latency_ms"] == pytest.approx(m.baseline_ms() / first["speedup"])
    assert first["runtime"] == EAGER_RUNTIME
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
        runtime=Runtime.EAGER,
    )
    again._baseline_ms = m.baseline_ms()
    assert again(copy.deepcopy(small))["speedup"] == first["speedup"]


def test_accuracy_threshold():
    assert accuracy_threshold(98.0, 0.5, relative=False) == 97.5
    assert accuracy_threshold(98.0, 1.0, relative=True) == pytest.approx(97.02)
    assert accuracy_threshold(98.0, None, relative=False) is None


class FakeDeploy:
    """Stands in for ``fastest_form``: records its calls, answers ``ms`` by the model's hidden width."""

    def __init__(self, ms_by_width: dict[int, tuple[str, float]]):
        self.ms_by_width, self.calls = ms_by_width, []

    def __call__(self, model, example_input, *, batch_size, threads, calib=None, **kwargs):
        self.calls.append(
            {"model": model, "example": example_input, "batch": batch_size, "threads": threads, "calib": calib}
        )
        width = next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).out_features
        name, ms = self.ms_by_width[width]
        return Deployed(name, ms, batch_size, {name: ms, "eager fp32": ms * 2})


def test_deployed_latency_times_each_model_on_its_fastest_form(tmp_path, digits, monkeypatch):
    _, test = digits
    fake = FakeDeploy({16: ("eager fp32", 4.0), 4: ("onnxruntime fp32", 1.0)})
    monkeypatch.setattr(deployed, "fastest_form", fake)
    base = slimkit.models.create("mlp", in_features=64, hidden=16)
    example = test[0][0].unsqueeze(0)
    cache = LatencyCache(tmp_path / "latency.json")
    m = Measurer(base, test, example, ("accuracy", "latency"), latency_batch=8, threads=1, cache=cache)
    assert m.runtime is Runtime.DEPLOYED  # the default
    small = slimkit.models.create("mlp", in_features=64, hidden=4)
    metrics = m(small)
    # the input model first (the baseline: its fastest form), then the candidate, each with the study's settings
    assert [c["model"] for c in fake.calls] == [base, small]
    assert all(c["batch"] == 8 and c["threads"] == 1 and c["calib"] is None for c in fake.calls)
    assert torch.equal(fake.calls[1]["example"], example)
    assert m.baseline_ms() == 4.0 and m.baseline_runtime == "eager fp32"
    assert metrics["runtime"] == "onnxruntime fp32"
    assert metrics["speedup"] == pytest.approx(4.0) and metrics["latency_ms"] == pytest.approx(1.0)
    # cached with where it ran: same architecture, other weights, a fresh cache object: no new timing
    stored = json.loads((tmp_path / "latency.json").read_text())
    assert list(stored.values()) == [{"speedup": 4.0, "runtime": "onnxruntime fp32"}]
    again = Measurer(
        base,
        test,
        example,
        ("accuracy", "latency"),
        latency_batch=8,
        threads=1,
        cache=LatencyCache(tmp_path / "latency.json"),
        baseline_ms=4.0,  # what a study stores for its workers: the input model is not timed again
    )
    cached = again(copy.deepcopy(small))
    assert len(fake.calls) == 2
    assert (cached["runtime"], cached["speedup"], cached["latency_ms"]) == ("onnxruntime fp32", 4.0, 1.0)
    # an eager cache entry of the same architecture is not mistaken for a deployed one
    eager = Measurer(base, test, example, ("latency",), latency_batch=8, threads=1, cache=again.cache, runtime="eager")
    assert eager.cache_key(small) != again.cache_key(small)


def test_deployed_int8_trials_are_calibrated_on_the_validation_data(digits, monkeypatch):
    train, test = digits
    fake = FakeDeploy({16: ("onnxruntime fp32", 2.0)})
    monkeypatch.setattr(deployed, "fastest_form", fake)
    base = slimkit.models.create("mlp", in_features=64, hidden=16)
    config = slimkit.quantization.QuantConfig(weight_bits=8, act_bits=8, method="ptq")
    int8 = slimkit.quantize(base, config, train).model
    m = Measurer(base, test, test[0][0].unsqueeze(0), ("accuracy", "latency"), latency_batch=8, threads=1)
    m(int8)
    assert fake.calls[0]["calib"] is None  # the float input model needs none
    calib = fake.calls[1]["calib"]
    assert fake.calls[1]["model"] is int8 and calib
    assert torch.equal(calib[0][0], test[0][0]) and calib[0].shape[1:] == test[0][0].shape


def test_deployed_latency_on_the_real_runtimes(digits):
    _, test = digits
    base = slimkit.models.create("mlp", in_features=64, hidden=16)
    m = Measurer(base, test, test[0][0].unsqueeze(0), ("accuracy", "latency"), latency_batch=8, threads=1)
    metrics = m(slimkit.models.create("mlp", in_features=64, hidden=4))
    assert metrics["runtime"] in ("onnxruntime fp32", "eager fp32")
    assert m.baseline_runtime in ("onnxruntime fp32", "eager fp32")
    assert metrics["latency_ms"] > 0 and metrics["latency_ms"] == pytest.approx(m.baseline_ms() / metrics["speedup"])


def test_a_model_that_cannot_be_deployed_is_a_clear_error(digits, monkeypatch):
    _, test = digits

    def fail(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::weird' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(deployed, "fastest_form", fail)
    base = slimkit.models.create("mlp", in_features=64, hidden=16)
    m = Measurer(base, test, test[0][0].unsqueeze(0), ("latency",), latency_batch=8, threads=1)
    with pytest.raises(UsageError, match=r"input model .*aten::weird.*runtime='eager'"):
        m.baseline_ms()


def test_runtime_policy_is_validated_and_round_trips():
    assert SearchConfig().runtime is Runtime.DEPLOYED
    cfg = SearchConfig(objectives=("accuracy", "latency"), runtime="eager")
    assert cfg.runtime is Runtime.EAGER
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="runtime='onnx' is not valid; choose one of 'deployed', 'eager'"):
        SearchConfig(runtime="onnx")
    with pytest.raises(ValueError, match="runtime='gpu' is not valid"):
        Measurer(torch.nn.Linear(2, 2), None, torch.zeros(1, 2), ("latency",), runtime="gpu")


def test_the_report_says_where_each_latency_was_measured(tmp_path):
    metrics = {"accuracy": 97.5, "latency_ms": 0.5, "speedup": 2.0, "runtime": "onnxruntime int8"}
    assert "0.500 ms (2.00x, onnxruntime int8)" in format_metrics(metrics)
    best = SearchResult(3, {"bits": 8}, metrics, (97.5, 0.5), True, 0.0)
    baseline = {"accuracy": 98.0, "latency_ms": 1.0, "speedup": 1.0, "runtime": "onnxruntime fp32"}
    study = SearchStudy(best, [best], None, ("accuracy", "latency"), baseline, None, tmp_path, 1, 0, 0)
    text = str(study)
    assert "runtime" in text and "onnxruntime int8" in text and "onnxruntime fp32" in text
    # without latency there is no runtime column
    plain = SearchStudy(best, [best], None, ("accuracy", "size"), baseline, None, tmp_path, 1, 0, 0)
    assert "runtime" not in str(plain)
