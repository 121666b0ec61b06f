"""Runtime-aware pruning: channel counts in NCHWc blocks by default, and target="latency" over a measured table."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import slimkit
from slimkit.errors import UsageError
from slimkit.models import create
from slimkit.pruning import PruneConfig, prune
from slimkit.pruning.latency import LatencyTable, _interpolate, _Layer, _next_goal, _points


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_default_keeps_multiples_of_16_where_a_group_has_16_or_more():
    model = create("resnet56")
    x = torch.zeros(1, 3, 32, 32)
    result = prune(model, PruneConfig(amount=0.5, target="macs"), x)
    assert abs(result.record["reduction"]["macs"] - 0.5) <= 0.02
    assert all(w % 16 == 0 for w in _widths(result.model)), sorted(set(_widths(result.model)))
    assert "notes" not in result.record
    fine = prune(model, PruneConfig(amount=0.5, target="macs", round_to=1), x)
    assert any(w % 16 for w in _widths(fine.model))  # the same cut at any count leaves the blocks


def test_groups_below_the_block_keep_a_step_of_one():
    model = create("lenet5")  # conv1 has 6 channels: below the block, any count runs on the same kernels
    result = prune(model, PruneConfig(amount=0.3, target="macs"), torch.zeros(1, 1, 28, 28))
    small = [g for g in result.record["groups"] if g["size"] < 16]
    assert small and all(0 < g["kept"] < g["size"] for g in small)  # 6 -> 4 channels: a step of one
    assert all(g["kept"] % 16 == 0 or g["kept"] == g["size"] for g in result.record["groups"] if g["size"] >= 16)
    cfg = PruneConfig()
    assert (cfg.step_of(6, 1), cfg.step_of(16, 1), cfg.step_of(200, 1)) == (1, 16, 16)
    assert cfg.step_of(12, 64) == 1  # attention heads of 64 channels: one head at a time
    assert PruneConfig(round_to=8).step_of(6, 1) == 8


def test_unreachable_in_blocks_falls_back_to_finer_steps_and_says_so():
    model = create("resnet20")  # stage 1 has 16 channels: in blocks of 16 at most ~53% of the MACs can go
    x = torch.zeros(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="multiples of 16"):
        result = prune(model, PruneConfig(amount=0.6, target="macs"), x)
    assert abs(result.record["reduction"]["macs"] - 0.6) <= 0.02
    assert "multiples of 16 channels cannot remove 60%" in result.record["notes"][0]
    with pytest.raises(UsageError, match="could only reach 53"):
        prune(model, PruneConfig(amount=0.6, target="macs", round_to=16), x)


def test_grid_points_and_interpolation():
    assert _points(16, 64, 16) == [16, 32, 48, 64]
    assert _points(16, 512, 16)[0] == 16 and _points(16, 512, 16)[-1] == 512
    assert all(p % 16 == 0 for p in _points(16, 512, 16))
    assert _points(1, 6, 1) == [1, 3, 4, 6]
    assert _interpolate([16, 32, 64], 48) == (1, 2, 0.5)
    assert _interpolate([16, 32, 64], 8) == (0, 0, 0.0)
    assert _interpolate([16, 32, 64], 64) == (2, 2, 0.0)
    assert _next_goal([{"goal": 0.5, "measured": 0.6}], 0.5) == pytest.approx(0.4)
    two = [{"goal": 0.5, "measured": 0.7}, {"goal": 0.3, "measured": 0.5}]
    assert _next_goal(two, 0.5) == pytest.approx(0.3)  # slope 1 through both points: already there


def test_layer_rebuilds_at_other_widths():
    conv = nn.Conv2d(32, 64, 3, stride=2, padding=1)
    layer = _Layer.of(conv, (64, 32, 16, 16))
    module, x = layer.build(16, 48)
    assert module(x).shape == (1, 48, 8, 8)
    depthwise = _Layer.of(nn.Conv2d(32, 32, 3, padding=1, groups=32), (64, 32, 8, 8))
    module, x = depthwise.build(16, 32)
    assert module.groups == 16 and module(x).shape == (1, 16, 8, 8)
    assert _Layer.of(nn.Conv2d(32, 32, 3, groups=4), (1, 32, 8, 8)) is None  # grouped: not measured alone
    linear = _Layer.of(nn.Linear(20, 10), (64, 7, 20))
    module, x = linear.build(16, 8)
    assert module(x).shape == (1, 7, 8)
    assert layer.key(16, 48) != layer.key(16, 32)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 64, 3, padding=1)
        self.b = nn.Conv2d(64, 64, 3, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def test_latency_target_measures_a_table_caches_it_and_records_the_cut(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMKIT_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(1, 3, 16, 16)
    cfg = PruneConfig(amount=0.4, target="latency", latency_batch=4)
    with warnings.catch_warnings():  # a loaded 2-core machine may miss the tolerance: that only warns
        warnings.simplefilter("ignore", UserWarning)
        result = prune(model, cfg, x)
    latency = result.record["latency"]
    assert latency["runtime"] == "onnxruntime" and latency["batch_size"] == 4
    assert latency["layers_measured"] > 0 and 1 <= len(latency["attempts"]) <= 4
    assert latency["speedup"] == pytest.approx(latency["before_ms"] / latency["after_ms"])
    assert result.record["reduction"]["latency"] == latency["measured"]
    assert all(w % 16 == 0 for w in _widths(result.model))
    assert result.model(x).shape == (1, 10)
    table = json.loads((tmp_path / "latency").glob("*.json").__next__().read_text())
    assert len(table["entries"]) == latency["layers_measured"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        again = prune(model, cfg, x)
    assert again.record["latency"]["layers_measured"] == 0  # every layer width came from the cache
    assert prune(model, PruneConfig(amount=0.0, target="latency"), x).record["reduction"]["latency"] == 0.0


def test_a_broken_cache_file_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMKIT_CACHE_DIR", str(tmp_path))
    table = LatencyTable("onnxruntime", batch_size=2, threads=1)
    table.path.parent.mkdir(parents=True)
    table.path.write_text("{not json")
    fresh = LatencyTable("onnxruntime", batch_size=2, threads=1)
    layer = _Layer.of(nn.Linear(32, 16), (2, 32))
    ms = fresh.lookup(layer, [(16, 16), (32, 16)])
    assert all(v > 0 for v in ms.values()) and fresh.measured == 2
    assert json.loads(table.path.read_text())["entries"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"runtime": "tensorrt"}, "runtime='tensorrt'"),
        ({"latency_batch": 0}, "latency_batch=0"),
        ({"round_to": 0}, "round_to=0"),
    ],
)
def test_bad_settings_name_themselves(kwargs, message):
    with pytest.raises(UsageError, match=message):
        PruneConfig(**kwargs)


def test_record_replays_on_a_fresh_model():
    model = create("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    result = prune(model, PruneConfig(amount=0.4, target="macs"), x)
    clone = slimkit.pruning.apply_record_(create("resnet20"), result.record)
    clone.load_state_dict(result.model.state_dict())
    assert torch.equal(clone.eval()(x), result.model.eval()(x))
