"""quantize(): new model, record, provenance, PTQ accuracy, QAT, errors."""

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from slimkit import history, models
from slimkit.errors import UsageError
from slimkit.quantization import PTQSettings, QATSettings, QuantConfig, quantize, replay
from slimkit.quantization.fake import QuantConv2d, QuantLinear
from slimkit.quantization.ptq import find_conv_bn, fold_bn
from slimkit.recipe import Recipe, Step, StepKind
from slimkit.train import TrainConfig, evaluate, fit


@pytest.fixture(scope="module")
def digits_mlp(digits):
    train, _ = digits
    model = models.create("mlp", in_features=64, hidden=64)
    fit(model, train, None, TrainConfig(epochs=8, lr=0.05, optimizer="sgd", progress=False))
    return model


def test_ptq_returns_new_model_with_record_and_history(digits_mlp, digits):
    train, test = digits
    before = copy.deepcopy(digits_mlp.state_dict())
    result = quantize(digits_mlp, QuantConfig(), train)
    assert all(torch.equal(before[k], v) for k, v in digits_mlp.state_dict().items())
    assert isinstance(result.model[1], QuantLinear) and isinstance(digits_mlp[1], nn.Linear)
    record = json.loads(json.dumps(result.record))
    assert [layer["name"] for layer in record["layers"]] == ["1", "3"]
    assert record["layers"][0]["act_scale"] > 0 and record["observer"] == "minmax"
    steps = history.history_of(result.model)
    assert steps[-1]["kind"] == "quantize" and history.source_of(result.model)["factory"] == "mlp"
    fp32, int8 = evaluate(digits_mlp, test).accuracy, evaluate(result.model, test).accuracy
    assert int8 >= fp32 - 1.0


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse", "histogram"])
def test_every_observer_calibrates_a_usable_model(digits_mlp, digits, observer):
    train, test = digits
    result = quantize(digits_mlp, QuantConfig(observer=observer, bias_correction=False), train)
    assert evaluate(result.model, test).accuracy >= evaluate(digits_mlp, test).accuracy - 3.0


def test_histogram_observer_matches_minmax_accuracy_on_mnist(mnist):
    train, test = mnist
    torch.manual_seed(0)
    model = models.create("lenet5")
    fit(model, train.subset(3000), None, TrainConfig(epochs=5, lr=3e-3, progress=False))
    assert evaluate(model, test).accuracy > 90
    calib = train.subset(1024)
    accuracy = {
        obs: evaluate(quantize(model, QuantConfig(observer=obs), calib).model, test).accuracy
        for obs in ("minmax", "histogram")
    }
    assert accuracy["histogram"] >= accuracy["minmax"] - 0.5, accuracy


def test_bias_correction_removes_mean_output_shift(digits_mlp, digits):
    train, _ = digits
    x = torch.stack([train[i][0] for i in range(256)])
    cfg = dict(weight_bits=3, act_bits=None)
    plain = quantize(digits_mlp, QuantConfig(**cfg, bias_correction=False), train)
    corrected = quantize(digits_mlp, QuantConfig(**cfg, bias_correction=True), train)
    with torch.no_grad():
        ref = digits_mlp(x)
        shift_plain = (plain.model(x) - ref).mean(0).abs().mean()
        shift_corrected = (corrected.model(x) - ref).mean(0).abs().mean()
    assert shift_corrected < shift_plain


def test_first_last_kept_8bit_and_overrides(digits_mlp, digits):
    train, _ = digits
    result = quantize(digits_mlp, QuantConfig(weight_bits=4, act_bits=None), train)
    assert [layer["weight_bits"] for layer in result.record["layers"]] == [8, 8]
    result = quantize(
        digits_mlp,
        QuantConfig(
            weight_bits=4, act_bits=None, keep_first_last_8bit=False, overrides={"re:3": {"weight_bits": 6}}, ignore=()
        ),
        train,
    )
    assert [layer["weight_bits"] for layer in result.record["layers"]] == [4, 6]
    result = quantize(digits_mlp, QuantConfig(ignore=("3",)), train)
    assert "3" in result.record["skipped"] and isinstance(result.model[3], nn.Linear)
    assert not isinstance(result.model[3], QuantLinear)


def test_dynamic_quantizes_linear_only():
    model = models.create("lenet5", image_size=8, num_classes=10)
    result = quantize(model, QuantConfig(method="dynamic"))
    assert set(result.record["skipped"]) == {"features.0", "features.3"}
    assert all(layer["kind"] == "Linear" for layer in result.record["layers"])


def test_conv_bn_folding_is_exact():
    torch.manual_seed(0)
    model = models.create("resnet20").eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    pairs = find_conv_bn(model)
    assert len(pairs) == 21 and ("conv1", "bn1") in pairs
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs
    folded = copy.deepcopy(model)
    fold_bn(folded, pairs)
    torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_ptq_on_resnet_folds_and_replays():
    torch.manual_seed(0)
    model = models.create("resnet20").eval()
    calib = torch.randn(8, 3, 32, 32)
    result = quantize(model, QuantConfig(calibration_batches=1, batch_size=8), calib)
    assert isinstance(result.model.conv1, QuantConv2d) and isinstance(result.model.bn1, nn.Identity)
    fresh = replay(models.create("resnet20"), result.record)
    fresh.load_state_dict(result.model.state_dict())
    assert torch.equal(fresh(calib), result.model(calib))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(weight_bits=9), "weight_bits"),
        (dict(act_bits=1), "act_bits"),
        (dict(weight_bits=1, scheme="affine"), "binary"),
        (dict(method="dynamic", weight_bits=4), "dynamic"),
        (dict(scheme="ternary"), "ternary"),
        (dict(granularity="per_group"), "group_size"),
        (dict(method="int8"), "method"),
        (dict(overrides={"fc": {"bits": 4}}), "unknown keys"),
    ],
)
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**bad)


# --- per-method sections: shared fields at the top, ptq / qat sections, flat keys still accepted ----------------


FLAT = dict(
    weight_bits=4,
    act_bits=8,
    method="ptq",
    observer="histogram",
    batch_size=32,
    seed=3,
    adaround=True,
    adaround_iters=50,
    bias_correction=False,
    epochs=5,
    lr=2e-3,
    max_batches=7,
    lsq=False,
    freeze_bn_epoch=0,
    freeze_observer_epoch=2,
)
NESTED = dict(
    weight_bits=4,
    act_bits=8,
    method="ptq",
    observer="histogram",
    batch_size=32,
    seed=3,
    ptq=dict(adaround=True, adaround_iters=50, bias_correction=False),
    qat=dict(epochs=5, lr=2e-3, max_batches=7, lsq=False, freeze_bn_epoch=0, freeze_observer_epoch=2),
)


def test_nested_and_flat_forms_give_equal_configs():
    flat = QuantConfig(**FLAT)
    assert flat == QuantConfig(**NESTED) == QuantConfig.from_dict(FLAT) == QuantConfig.from_dict(NESTED)
    assert flat == QuantConfig(
        weight_bits=4,
        act_bits=8,
        observer="histogram",
        batch_size=32,
        seed=3,
        ptq=PTQSettings(bias_correction=False, adaround=True, adaround_iters=50),
        qat=QATSettings(epochs=5, lr=2e-3, max_batches=7, lsq=False, freeze_bn_epoch=0, freeze_observer_epoch=2),
    )
    assert isinstance(flat.ptq, PTQSettings) and isinstance(flat.qat, QATSettings)
    assert (flat.adaround, flat.adaround_iters, flat.epochs, flat.max_batches) == (True, 50, 5, 7)
    assert flat.ptq.adaround_iters == 50 and flat.qat.freeze_observer_epoch == 2
    # a flat keyword is applied on top of its section; None is a value (every batch), not "not given"
    cfg = QuantConfig(qat={"epochs": 2, "max_batches": 4}, epochs=6, max_batches=None)
    assert (cfg.qat.epochs, cfg.qat.max_batches) == (6, None)
    # attributes write through to the section
    cfg.epochs, cfg.adaround_lr = 9, 0.5
    assert cfg.qat.epochs == 9 and cfg.ptq.adaround_lr == 0.5 and cfg.to_dict()["qat"]["epochs"] == 9
    # a copy never shares a section with its source (dataclasses.replace is how back-off weakens a step)
    weaker = dataclasses.replace(cfg, weight_bits=8)
    weaker.epochs = 1
    assert cfg.epochs == 9 and weaker.qat is not cfg.qat
    # the shared fields stay at the top; each section holds only what its method reads
    assert set(cfg.to_dict()["ptq"]) == {"bias_correction", "adaround", "adaround_iters", "adaround_lr"}
    assert set(cfg.to_dict()["qat"]) == {
        "epochs",
        "lr",
        "max_batches",
        "lsq",
        "freeze_bn_epoch",
        "freeze_observer_epoch",
    }
    assert {"observer", "calibration_batches", "batch_size", "fold_bn", "seed"} <= set(cfg.to_dict())


def test_config_round_trips_through_dict_json_and_yaml():
    cfg = QuantConfig(**FLAT, overrides={"re:fc.*": {"weight_bits": 8}}, ignore=("0",))
    data = cfg.to_dict()
    assert "epochs" not in data and data["qat"]["epochs"] == 5 and data["ptq"]["adaround"] is True  # nested form
    assert QuantConfig.from_dict(data) == cfg
    assert QuantConfig.from_dict(json.loads(json.dumps(data))) == cfg
    recipe = Recipe(steps=[Step(StepKind.QUANTIZE, cfg)])
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again.steps[0].config == cfg and again.to_dict() == recipe.to_dict()
    # a recipe written with the flat keys of before loads to the same config
    flat = Recipe.from_yaml(
        "steps:\n  - quantize: {method: qat, weight_bits: 2, scheme: ternary, act_bits: null, epochs: 4, lr: 0.001}\n"
    )
    nested = Recipe.from_yaml(
        "steps:\n  - quantize: {method: qat, weight_bits: 2, scheme: ternary, act_bits: null, "
        "qat: {epochs: 4, lr: 0.001}}\n"
    )
    assert flat.steps[0].config == nested.steps[0].config
    assert flat.steps[0].config.qat == QATSettings(epochs=4, lr=0.001)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"qat": {"epoch": 3}}, r"QuantConfig.qat: QATSettings: unknown key 'epoch'; did you mean 'epochs'\?"),
        ({"ptq": {"adaround_iter": 3}}, r"QuantConfig.ptq: PTQSettings: unknown key 'adaround_iter'; did you mean"),
        (
            {"ptq": {"epochs": 3}},
            r"QuantConfig.ptq: PTQSettings: unknown key 'epochs'",
        ),  # a QAT field in the PTQ section
        ({"qat": {"lr": -1.0}}, r"QuantConfig.qat: lr=-1.0 is out of range"),
        ({"qat": {"max_batches": 2.5}}, r"QuantConfig.qat: QATSettings.max_batches=2.5: expected int or null"),
        ({"ptq": 5}, r"QuantConfig.ptq=5: expected PTQSettings or a mapping of its fields"),
        ({"epoch": 3}, r"QuantConfig: unknown key 'epoch'; did you mean 'epochs'\?"),
        ({"epochs": 2.7}, r"QuantConfig.epochs=2.7: expected int"),
        ({"method": "qat", "qat": {"epochs": 0}}, r"epochs=0 must be >= 1"),
        ({"method": "dynamic", "ptq": {"adaround": True}}, r"adaround=True needs method='ptq'"),
    ],
)
def test_a_bad_section_key_or_value_is_refused_naming_it(data, match):
    with pytest.raises(UsageError, match=match) as info:
        QuantConfig.from_dict(data)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match=r"steps\[0\] \(quantize\)"):
        Recipe.from_dict({"steps": [{"quantize": data}]})


def test_bad_input_errors(digits_mlp, digits):
    train, _ = digits
    with pytest.raises(ValueError, match="needs data"):
        quantize(digits_mlp, QuantConfig(), None)
    with pytest.raises(ValueError, match="empty"):
        quantize(digits_mlp, QuantConfig(), train.subset(0))
    with pytest.raises(ValueError, match="NaN"):
        quantize(digits_mlp, QuantConfig(), torch.full((4, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        quantize(digits_mlp, QuantConfig(), torch.zeros(4, 1, 5, 5))
    with pytest.raises(ValueError, match="matches no"):
        quantize(digits_mlp, QuantConfig(ignore=("fc9",)), train)
    broken = copy.deepcopy(digits_mlp)
    broken[1].weight.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"1\.weight"):
        quantize(broken, QuantConfig(), train)
    with pytest.raises(ValueError, match="record version"):
        replay(models.create("mlp"), {"version": 99})
    overflowing = copy.deepcopy(digits_mlp)  # finite weights whose activations overflow
    overflowing[1].weight.data.fill_(3e38)
    for cfg in (QuantConfig(), QuantConfig(act_bits=None), QuantConfig(method="dynamic")):
        with pytest.raises(ValueError, match=r"NaN( or |/)inf"):
            quantize(overflowing, cfg, train)


def test_a_configured_layer_that_cannot_be_quantized_is_an_error():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.conv, self.fc = nn.LSTM(8, 8, batch_first=True), nn.Conv1d(5, 5, 1), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.rnn(self.conv(x))[0][:, -1])

    x = torch.randn(16, 5, 8)
    for pattern, reason in [("rnn", "method='dynamic' quantizes it"), ("re:rnn.*", "LSTM"), ("conv", "Conv1d")]:
        with pytest.raises(ValueError, match=reason):
            quantize(Net(), QuantConfig(overrides={pattern: {"weight_bits": 4}}), x)
    with pytest.raises(ValueError, match="method='dynamic' needs 8-bit"):
        quantize(Net(), QuantConfig(method="dynamic", overrides={"rnn.ih_l0": {"weight_bits": 4}}))
    result = quantize(Net(), QuantConfig(ignore=("rnn",), overrides={"fc": {"weight_bits": 1}}, act_bits=None), x)
    assert [(layer["name"], layer["scheme"]) for layer in result.record["layers"]] == [("fc", "binary")]
    assert QuantConfig(weight_bits=1).scheme.value == "binary"


def test_qat_reduces_loss_of_ternary_model_on_real_digits(mnist):
    train, test = mnist
    train, test = train.subset(2000), test.subset(500)
    model = models.create("mlp", hidden=128)
    fit(model, train, None, TrainConfig(epochs=2, lr=0.05, optimizer="sgd", progress=False))
    cfg = dict(weight_bits=2, scheme="ternary", act_bits=8, keep_first_last_8bit=False, bias_correction=False)
    before = quantize(model, QuantConfig(**cfg), train)
    after = quantize(model, QuantConfig(**cfg, method="qat", epochs=2, lr=2e-3), train)
    loss_before, loss_after = evaluate(before.model, test).loss, evaluate(after.model, test).loss
    assert loss_after < 0.8 * loss_before
    assert after.record["stats"]["qat_train_loss"][-1] < after.record["stats"]["qat_train_loss"][0]
    assert all(layer["scheme"] == "ternary" for layer in after.record["layers"])
    # the trained weights really are ternary: three values per output channel
    w = after.model[1].weight_quant(after.model[1].weight)
    assert all(len(row.unique()) <= 3 for row in w)


def test_qat_binary_with_bn_freezing_on_a_conv_net(digits):
    train, test = digits
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    )
    cfg = QuantConfig(
        weight_bits=1,
        scheme="binary",
        method="qat",
        epochs=1,
        max_batches=3,
        freeze_bn_epoch=0,
        keep_first_last_8bit=True,
    )
    result = quantize(model, cfg, train, val_data=test)
    assert result.record["learnable"] is True and result.record["folded"] == [["0", "1"], ["3", "4"]]
    assert isinstance(result.model[4], nn.Identity) and isinstance(result.model[3], QuantConv2d)
    w = result.model[3].weight_quant(result.model[3].weight)
    assert all(len(row.abs().unique()) == 1 for row in w.reshape(8, -1))  # +-alpha per channel
    fresh = replay(copy.deepcopy(model), result.record)
    fresh.load_state_dict(result.model.state_dict())
    x = torch.stack([test[i][0] for i in range(32)])
    assert torch.equal(fresh(x), result.model(x))
