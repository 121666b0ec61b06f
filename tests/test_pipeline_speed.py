"""compress judges every step on the runtime the model ships on: a step that makes the deployed model slower is
backed off or skipped, and the report names the runtime and the baseline. Timings are injected through
``slimkit.steps.measure_deployed`` (the one place steps are timed); no test asserts a measured time."""

import json

import pytest
import torch
from rich.console import Console

import slimkit
import slimkit.steps
from slimkit._text import render
from slimkit.demo import demo_summary, demo_table
from slimkit.steps import DeployedSpeed, measure_deployed
from slimkit.train import TrainConfig, fit

X = torch.zeros(1, 1, 8, 8)
FP32 = DeployedSpeed("onnxruntime fp32", 11.2, 11.0, 11.4, {"onnxruntime fp32": 11.2, "eager fp32": 13.0})
INT8_SLOW = DeployedSpeed("onnxruntime int8", 12.9, 12.7, 13.1, {"onnxruntime int8": 12.9})
FAST = DeployedSpeed("onnxruntime fp32", 8.0, 7.9, 8.1, {"onnxruntime fp32": 8.0, "eager fp32": 9.5})
SLOW = DeployedSpeed("onnxruntime fp32", 12.0, 11.9, 12.1, {"onnxruntime fp32": 12.0, "eager fp32": 14.0})


@pytest.fixture(scope="module")
def tiny(digits):
    """An MLP 64-48-10 trained on sklearn's digits (2 s)."""
    train, test = digits
    torch.manual_seed(0)
    model = slimkit.models.create("mlp", in_features=64, hidden=48)
    fit(model, train, test, TrainConfig(epochs=6, lr=0.05, optimizer="sgd", progress=False))
    return model, train, test


def inject(monkeypatch, after_speed):
    """Replace the step timing: ``before`` runs 11.2 ms on ONNX Runtime fp32, ``after`` as ``after_speed(model)``
    says. Returns the list of (models, batch size) each call received."""
    calls = []

    def fake(models, example_input, batch_size, *, calib=None, **_):
        calls.append((dict(models), batch_size))
        assert calib, "oneDNN int8 needs calibration batches"
        return {"before": FP32, "after": after_speed(models["after"])}

    monkeypatch.setattr(slimkit.steps, "measure_deployed", fake)
    return calls


def test_quantize_that_slows_the_deployed_model_is_skipped_and_said_so(tiny, monkeypatch):
    model, train, test = tiny
    calls = inject(monkeypatch, lambda after: INT8_SLOW)
    recipe = {
        "name": "q",
        "max_accuracy_drop": 50,
        "recovery_epochs": 0,
        "steps": [
            {"quantize": {"method": "ptq", "weight_bits": 8, "act_bits": 8}},
            {"export": {"format": "onnx", "auto_batch_size": 1}},  # the recipe deploys at batch 1
        ],
    }
    result = slimkit.compress(model, recipe, train, test, example_input=X, latency_batch_sizes=(1,))
    outcome = result.steps[0]
    assert [batch for _, batch in calls] == [1]
    assert outcome.status == "skipped"
    assert "quantize skipped: onnxruntime int8 12.9 ms vs onnxruntime fp32 11.2 ms without it (batch 1)" in (
        outcome.notes
    )
    assert outcome.runtime == "onnxruntime fp32" and outcome.deployed_ms == 11.2  # what ships: the model before
    assert outcome.runtime_before == "onnxruntime fp32" and outcome.deploy_batch_size == 1
    assert outcome.deployed_all_ms["after: onnxruntime int8"] == 12.9
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(result.model(x), model(x))  # nothing quantized
    steps = json.loads(json.dumps(result.metrics))["runtime"]["steps"]
    assert steps == [{"kind": "quantize", "status": "skipped", "runtime": "onnxruntime fp32", "ms": 11.2}]


def test_onnx_int8_export_after_a_skipped_quantize_ships_fp32_and_says_so(tiny, monkeypatch):
    model, train, test = tiny
    inject(monkeypatch, lambda after: INT8_SLOW)
    recipe = {
        "name": "q8",
        "max_accuracy_drop": 50,
        "recovery_epochs": 0,
        "steps": [
            {"quantize": {"method": "ptq", "weight_bits": 8, "act_bits": 8}},
            {"export": {"format": "onnx-int8"}},
        ],
    }
    result = slimkit.compress(model, recipe, train, test, example_input=X, latency_batch_sizes=(1,))
    assert result.steps[0].status == "skipped"
    assert "export: onnx-int8 asked, but the quantize step was skipped, so model.onnx is fp32" in result.steps[0].notes
    import onnx

    ops = {node.op_type for node in onnx.load(str(result.exported)).graph.node}
    assert "QuantizeLinear" not in ops and "Gemm" in ops


def test_prune_that_slows_the_deployed_model_is_backed_off(tiny, monkeypatch):
    model, train, test = tiny
    # 24 kept neurons "leave the fast kernels"; 36 run faster than the original
    calls = inject(monkeypatch, lambda after: SLOW if after[1].out_features < 30 else FAST)
    recipe = {
        "name": "p",
        "max_accuracy_drop": 50,
        "recovery_epochs": 0,
        "steps": [{"prune": {"amount": 0.5, "target": "channels", "round_to": 1}}],
    }
    result = slimkit.compress(model, recipe, train, test, example_input=X, latency_batch_sizes=(1,))
    outcome = result.steps[0]
    assert [batch for _, batch in calls] == [64, 64]  # default deployment batch size, before vs each attempt
    assert outcome.status == "backed_off" and outcome.config["amount"] == 0.25
    assert (
        "makes the deployed model slower: onnxruntime fp32 12 ms vs onnxruntime fp32 11.2 ms before"
        in (outcome.notes[0])
    )
    assert outcome.notes[0].endswith("; backing off")
    assert outcome.runtime == "onnxruntime fp32" and outcome.deployed_ms == 8.0
    assert result.model[1].out_features == 36


def test_steps_that_keep_the_architecture_or_judge_speed_false_time_nothing(tiny, monkeypatch):
    model, train, test = tiny
    calls = inject(monkeypatch, lambda after: SLOW)
    finetune = {"finetune": {"epochs": 1, "lr": 0.01, "optimizer": "sgd", "progress": False}}
    recipe = {"name": "f", "max_accuracy_drop": 50, "recovery_epochs": 0, "steps": [finetune]}
    result = slimkit.compress(model, recipe, train, test, example_input=X, latency_batch_sizes=(1,))
    assert result.steps[0].status == "applied" and result.steps[0].runtime is None
    prune = {"prune": {"amount": 0.5, "target": "channels", "round_to": 1}}
    recipe = {"name": "p", "max_accuracy_drop": 50, "recovery_epochs": 0, "steps": [prune]}
    result = slimkit.compress(model, recipe, train, test, example_input=X, latency_batch_sizes=(1,), judge_speed=False)
    assert result.steps[0].status == "applied" and result.model[1].out_features == 24
    assert calls == []
    with pytest.raises(slimkit.errors.UsageError, match="deploy_batch_size=0"):
        slimkit.compress(model, recipe, train, test, example_input=X, deploy_batch_size=0)


def test_report_names_runtimes_baselines_and_the_shipped_file_in_80_columns(tiny, monkeypatch):
    model, train, test = tiny
    inject(monkeypatch, lambda after: FAST)
    recipe = {
        "name": "r",
        "max_accuracy_drop": 50,
        "recovery_epochs": 0,
        "steps": [{"prune": {"amount": 0.5, "target": "channels", "round_to": 1}}, {"export": {"format": "onnx"}}],
    }
    result = slimkit.compress(model, recipe, train, test, example_input=X, test_data=test, latency_batch_sizes=(1, 64))
    b, f = result.baseline, result.final
    assert set(b["runtime"]) == {"1", "64"} and set(b["runtime"].values()) <= {"onnxruntime fp32", "eager fp32"}
    assert set(b["eager_latency_ms"]) == set(b["latency_ms"]) == set(f["latency_ms"]) == {"1", "64"}
    assert f["shipped_file"] == "model.onnx" and f["runtime"] == "model.onnx on onnxruntime"
    assert f["shipped_bytes"] == f["deployed_bytes"] == result.exported.stat().st_size
    assert b["deployed_bytes"] > f["shipped_bytes"]  # the original's fp32 ONNX vs the pruned one
    assert result.metrics["runtime"]["steps"][0]["runtime"] == "onnxruntime fp32"
    text = render(result.table(), width=80)
    assert "vs PyTorch eager" in text and f"ms b64 vs {b['runtime']['64']}" in text and "model.onnx" in text
    summary = demo_summary("mlp", result)
    assert summary["size_ratio"] == b["deployed_bytes"] / f["shipped_bytes"]
    assert summary["speedup"]["64"] == b["latency_ms"]["64"] / f["latency_ms"]["64"]
    assert summary["row"][2] == "model.onnx"
    wide = Console(width=300)
    for table in (demo_table("fast-cpu", [summary["row"], summary["row"]]), result.table()):
        assert wide.measure(table).maximum <= 80, render(table, width=300)


def test_measure_deployed_times_every_form_side_by_side(tiny):
    model, _, _ = tiny
    pruned = slimkit.prune(model, slimkit.PruneConfig(amount=0.5, target="channels", round_to=1), X).model
    speeds = measure_deployed({"before": model, "after": pruned}, X, 8, max_seconds=0.5)
    for speed in speeds.values():
        assert set(speed.all_ms) == {"onnxruntime fp32", "eager fp32"}
        assert speed.runtime in speed.all_ms and speed.ms == speed.all_ms[speed.runtime]
        assert speed.p25_ms <= speed.ms <= speed.p75_ms
