"""End-to-end: compress under a budget, save/load round trips of every compressed form, the CLI on a tiny model."""

import pytest
import torch
from typer.testing import CliRunner

import slimkit
from slimkit.cli import app
from slimkit.export.artifact import read_manifest
from slimkit.report import write_report
from slimkit.train import TrainConfig, evaluate, fit

X = torch.zeros(1, 1, 8, 8)


@pytest.fixture(scope="module")
def tiny(digits):
    """An MLP 64-48-10 trained on sklearn's digits (2 s)."""
    train, test = digits
    torch.manual_seed(0)
    model = slimkit.models.create("mlp", in_features=64, hidden=48)
    fit(model, train, test, TrainConfig(epochs=6, lr=0.05, optimizer="sgd", progress=False))
    return model, train, test


def _round_trip(model, tmp_path, name):
    path = slimkit.save(model, tmp_path / f"{name}.slim")
    again = slimkit.load(path)
    x = torch.randn(16, 1, 8, 8)
    assert torch.equal(model(x), again(x)), name
    return path


@pytest.mark.parametrize("bits,scheme", [(8, "symmetric"), (4, "symmetric"), (2, "ternary"), (1, "binary")])
def test_quantized_round_trip_bit_exact_and_smaller(tiny, tmp_path, bits, scheme):
    model, train, _ = tiny
    cfg = slimkit.QuantConfig(
        weight_bits=bits, scheme=scheme, method="ptq", act_bits=8 if bits == 8 else None, keep_first_last_8bit=False
    )
    quantized = slimkit.quantize(model, cfg, train).model
    path = _round_trip(quantized, tmp_path, f"q{bits}")
    float_bytes = slimkit.measure.size_on_disk(model)
    # a 3.6K-parameter model: file headers and per-channel scales weigh more than on real models
    assert (path / "model.safetensors").stat().st_size < float_bytes / {8: 2.8, 4: 4.0, 2: 6.0, 1: 8.0}[bits]


def test_pruned_then_quantized_round_trip(tiny, tmp_path):
    model, train, _ = tiny
    pruned = slimkit.prune(model, slimkit.PruneConfig(amount=0.5, target="params"), X).model
    assert pruned[1].out_features < 48
    _round_trip(pruned, tmp_path, "pruned")
    quantized = slimkit.quantize(pruned, slimkit.QuantConfig(weight_bits=8, act_bits=8, method="ptq"), train).model
    path = _round_trip(quantized, tmp_path, "pruned-int8")
    kinds = [step["kind"] for step in read_manifest(path)["history"]]
    assert kinds == ["prune", "quantize"]


def test_budget_back_off_and_report(tiny, tmp_path):
    model, train, test = tiny
    baseline = evaluate(model, test).accuracy
    # binary weights without QAT collapse an MLP far below a 2-point budget, int8 PTQ never does: the step must
    # back off (binary -> ternary -> 4 -> 8 bits) to a width that keeps the budget, never ship binary, never skip
    recipe = {
        "name": "harsh",
        "max_accuracy_drop": 2.0,
        "recovery_epochs": 0,
        "max_backoffs": 3,
        "steps": [
            {
                "quantize": {
                    "method": "ptq",
                    "weight_bits": 1,
                    "scheme": "binary",
                    "act_bits": None,
                    "keep_first_last_8bit": False,
                }
            }
        ],
    }
    result = slimkit.compress(model, recipe, train, test, example_input=X, latency_batch_sizes=(1, 8))
    outcome = result.steps[0]
    assert outcome.status == "backed_off", outcome.notes
    assert "backing off" in outcome.notes[0]
    assert outcome.config["weight_bits"] > 1 and outcome.config["scheme"] != "binary"
    assert result.final["accuracy"] >= baseline - 2.0
    path = slimkit.save(result, tmp_path / "harsh.slim")
    html = write_report(path)
    text = html.read_text()
    assert text.startswith("<!DOCTYPE html>") and "data:image/png;base64," in text and "before" in text
    assert (path / "report.md").is_file() and read_manifest(path)["files"]["report.html"]


def test_cli_compress_export_report(tiny, tmp_path):
    model, _, _ = tiny
    weights = slimkit.models.save_weights(model, tmp_path / "w.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: cli\nmax_accuracy_drop: 5\nrecovery_epochs: 1\nsteps:\n"
        "  - prune: {amount: 0.3, target: params}\n"
        "  - quantize: {method: ptq, weight_bits: 8, act_bits: 8}\n"
        "  - export: {format: onnx-int8}\n"
    )
    runner = CliRunner()
    args = [
        "compress",
        "--model",
        "mlp",
        "--model-args",
        '{"in_features": 64, "hidden": 48}',
        "--weights",
        str(weights),
        "--data",
        "digits",
        "--recipe",
        str(recipe),
        "--out",
        str(tmp_path / "out"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    artifact = tmp_path / "out" / "mlp.slim"
    manifest = read_manifest(artifact)
    assert {"model.onnx", "report.html", "model.safetensors"} <= set(manifest["files"])
    # the budget was checked on a holdout of the training split; the test split is reported separately
    final = manifest["metrics"]["final"]
    assert {"accuracy", "test_accuracy", "deployed_test_accuracy"} <= set(final)
    result = runner.invoke(app, ["export", str(artifact), "--format", "onnx", "--data", "digits"])
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output
    result = runner.invoke(app, ["report", str(artifact)])
    assert result.exit_code == 0 and "accuracy" in result.output
    result = runner.invoke(app, ["compress", "--model", "mlp", "--recipe", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "shipped recipe" in result.output
    result = runner.invoke(app, [*args[:-2], "--out", str(tmp_path / "out2"), "--holdout", "100"])
    assert result.exit_code == 2 and "--holdout 100.0: give a fraction" in result.output


def test_train_and_distill_cli_choose_epochs_on_a_holdout_and_report_test(tmp_path, monkeypatch):
    from slimkit.commands import core, distill

    seen = []
    real = core.holdout_split

    def spy(train, test, holdout):
        seen.append(holdout)
        chosen = real(train, test, holdout)
        assert chosen[1] is not test and len(chosen[0]) + len(chosen[1]) == len(train)
        return chosen

    monkeypatch.setattr(core, "holdout_split", spy)
    monkeypatch.setattr(distill, "holdout_split", spy)
    runner = CliRunner()
    mlp = ["--data", "digits", "--epochs", "1"]
    teacher = tmp_path / "t.safetensors"
    result = runner.invoke(
        app, ["train", "--model", "mlp", "--model-args", '{"in_features": 64}', *mlp, "--out", str(teacher)]
    )
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "best epoch on the held-out split" in result.output
    result = runner.invoke(
        app,
        [
            "distill",
            "--student",
            "mlp",
            "--student-args",
            '{"in_features": 64, "hidden": 8}',
            "--teacher",
            "mlp",
            "--teacher-args",
            '{"in_features": 64}',
            "--teacher-weights",
            str(teacher),
            *mlp,
            "--out",
            str(tmp_path / "s.safetensors"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "on the held-out split" in result.output and "test accuracy: teacher" in result.output
    assert seen == [0.1, 0.1]


def test_torch_export_format_and_html_is_valid(tiny, tmp_path):
    import base64
    from html.parser import HTMLParser

    model, train, test = tiny
    recipe = {
        "name": "te",
        "max_accuracy_drop": 10,
        "recovery_epochs": 0,
        "steps": [{"prune": {"amount": 0.25, "target": "params"}}, {"export": {"format": "torch-export"}}],
    }
    result = slimkit.compress(model, recipe, train, test, example_input=X, latency_batch_sizes=(1,))
    path = slimkit.save(result, tmp_path / "te.slim")
    program = torch.export.load(str(path / "model.pt2"))
    x = torch.randn(3, 1, 8, 8)[:1]
    torch.testing.assert_close(program.module()(x), result.model(x))
    html_path = write_report(path)

    class Images(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"])

    parser = Images()
    parser.feed(html_path.read_text())
    assert len(parser.images) >= 2  # accuracy-vs-size and kept channels
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
