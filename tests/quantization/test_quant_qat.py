"""QAT schedules: BatchNorm statistics and quantizer ranges really stop changing from their freezing epoch on."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.quantization import QuantConfig, pack_state_dict, quantize, replay, unpack_state_dict
from slimkit.quantization.config import plan_layers
from slimkit.quantization.ptq import calibrate, calibration_batches, find_conv_bn, fold_bn, prepare
from slimkit.quantization.qat import train_qat


def _prepared(digits, cfg):
    train, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)
    )
    specs, _ = plan_layers(model, cfg)
    prepare(model, specs, learnable=cfg.lsq)
    calibrate(model, calibration_batches(train, cfg.batch_size, 2))
    return model


def _train_recording(model, digits, cfg, read):
    """Train with a loss hook that snapshots ``read(model)`` after every step's forward pass."""
    snapshots = []

    def loss_fn(outputs, targets, inputs):
        snapshots.append(read(model).detach().clone())
        return F.cross_entropy(outputs, targets)

    train_qat(model, digits[0], None, cfg, loss_fn)
    return snapshots


@pytest.mark.parametrize("freeze_bn_epoch", [0, 1])
def test_bn_freezing_schedule_stops_running_statistics(digits, freeze_bn_epoch):
    cfg = QuantConfig(method="qat", epochs=2, max_batches=3, batch_size=32, freeze_bn_epoch=freeze_bn_epoch)
    model = _prepared(digits, cfg)
    before = model[1].running_mean.clone()
    stats = _train_recording(model, digits, cfg, lambda m: m[1].running_mean)
    assert len(stats) == 6
    if freeze_bn_epoch == 0:
        assert all(torch.equal(s, before) for s in stats)
    else:  # epoch 0 updates the statistics at every step, epoch 1 keeps the last value
        assert not torch.equal(stats[0], before) and not torch.equal(stats[1], stats[0])
        assert all(torch.equal(s, stats[2]) for s in stats[3:])
    assert model[0].weight_quant.scale.requires_grad  # BN freezing leaves the quantizers alone


@pytest.mark.parametrize("lsq", [True, False])
def test_observer_freezing_schedule_stops_quantizer_ranges(digits, lsq):
    cfg = QuantConfig(method="qat", epochs=2, max_batches=3, batch_size=32, lr=1e-2, lsq=lsq, freeze_observer_epoch=1)
    model = _prepared(digits, cfg)

    def ranges(m):
        return torch.cat(
            [m[0].weight_quant.scale.flatten(), m[4].weight_quant.scale.flatten(), m[4].input_quant.scale.flatten()]
        )

    weights = _train_recording(model, digits, cfg, lambda m: m[4].weight)
    scales = _train_recording(_prepared(digits, cfg), digits, cfg, ranges)
    assert not torch.equal(scales[0], scales[2])  # epoch 0: ranges move (LSQ steps or min-max of moving weights)
    assert all(torch.equal(s, scales[3]) for s in scales[4:])  # epoch 1: frozen
    assert not torch.equal(weights[3], weights[5])  # while the weights keep training


def test_freeze_epochs_are_validated():
    with pytest.raises(ValueError, match="freeze_observer_epoch=-1"):
        QuantConfig(freeze_observer_epoch=-1)


@pytest.mark.parametrize("scheme", ["symmetric", "affine"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_folding_bn_into_a_learned_grid_is_exact(scheme, granularity):
    """Negative BN gains mirror the codes (affine zero points flip); a per-tensor grid becomes per channel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten())
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.5, -0.7, 0.3, -2.0]))
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
        model[0].weight.add_(0.3)  # skewed weights: non-zero affine zero points
    cfg = QuantConfig(
        method="qat", act_bits=None, weight_bits=4, scheme=scheme, granularity=granularity, keep_first_last_8bit=False
    )
    specs, _ = plan_layers(model, cfg)
    prepare(model, specs, learnable=True)
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        before = model.eval()(x)
        fold_bn(model, find_conv_bn(model))
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_per_tensor_qat_on_a_conv_bn_net_converts_and_replays(digits):
    train, _ = digits
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)
    )
    cfg = QuantConfig(
        method="qat",
        epochs=1,
        max_batches=4,
        granularity="per_tensor",
        weight_bits=4,
        scheme="affine",
        keep_first_last_8bit=False,
    )
    result = quantize(net, cfg, train.subset(256))
    assert result.record["layers"][0]["granularity"] == "per_channel"
    assert result.record["layers"][1]["granularity"] == "per_tensor"
    tensors, meta = pack_state_dict(result.model)
    fresh = replay(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)),
        result.record,
    )
    fresh.load_state_dict(unpack_state_dict(tensors, meta))
    x = torch.stack([train[i][0] for i in range(16)])
    assert torch.equal(fresh(x), result.model(x))
