"""Data-aware pruning: the ``activation`` criterion and least-squares ``reconstruct`` (slimkit.pruning.calibrate)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slimkit.errors import UsageError
from slimkit.pruning import PruneConfig, prune


def _mlp_with_dead_units():
    """8 -> 16 -> 4; hidden units 0-7 never fire (bias -1e3 under ReLU) yet have the largest weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[:8] *= 10
        model[0].bias[:8] = -1e3
        model[2].weight[:, :8] *= 10
    return model


def _data(n=256, *shape):
    torch.manual_seed(1)
    return TensorDataset(torch.randn(n, *shape), torch.zeros(n, dtype=torch.long))


def _kept(result, name):
    return result.record["groups"][0]["keep"] if name is None else result.record["modules"][name]["in"]


def test_activation_prunes_the_units_that_never_fire_where_l2_keeps_them():
    model, data = _mlp_with_dead_units(), _data(256, 8)
    cfg = dict(amount=0.5, target="channels", round_to=1)
    by_energy = prune(model, PruneConfig(importance="activation", **cfg), torch.zeros(1, 8), train_data=data)
    by_weight = prune(model, PruneConfig(importance="l2", **cfg), torch.zeros(1, 8))
    assert by_energy.record["modules"]["2"]["in"] == [[8, 16]]
    assert by_weight.record["modules"]["2"]["in"] == [[0, 8]]
    x = torch.randn(32, 8)
    torch.testing.assert_close(by_energy.model(x), model(x))  # the dead units contributed nothing


def _duplicated_mlp():
    """8 -> 16 -> 4 where hidden unit 8 + i is half of unit i (ReLU(z / 2) = ReLU(z) / 2): half the units carry no
    information of their own, and ``l2`` ranks the halves last."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[8:] = model[0].weight[:8] / 2
        model[0].bias[8:] = model[0].bias[:8] / 2
    return model


def test_reconstruct_restores_the_output_when_the_cut_units_are_copies():
    model, data = _duplicated_mlp(), _data(256, 8)
    cfg = dict(amount=0.5, target="channels", round_to=1, importance="l2")
    plain = prune(model, PruneConfig(**cfg), torch.zeros(1, 8)).model
    fitted = prune(model, PruneConfig(reconstruct=True, **cfg), torch.zeros(1, 8), train_data=data)
    x = torch.randn(64, 8)
    assert fitted.record["reconstructed"] == ["2"] and fitted.record["modules"]["2"]["in"] == [[0, 8]]
    lost, left = (plain(x) - model(x)).abs().max(), (fitted.model(x) - model(x)).abs().max()
    assert left < 1e-2 and left < lost / 20  # exact up to the ridge term


def test_reconstruct_refits_convolutions_through_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1, stride=2)
    ).eval()
    with torch.no_grad():  # channels 8-15 are 0-7 at half scale, which BatchNorm's statistics undo: copies
        model[0].weight[8:] = model[0].weight[:8] / 2
        model[0].bias[8:] = model[0].bias[:8] / 2
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_mean[8:] = model[1].running_mean[:8] / 2
        model[1].running_var[8:] = model[1].running_var[:8] / 4
    model.train()  # the caller's mode and BatchNorm statistics are left as they were
    stats = model[1].running_mean.clone()
    cfg = PruneConfig(amount=0.5, target="channels", round_to=1, importance="l2", reconstruct=True)
    fitted = prune(model, cfg, torch.zeros(1, 3, 8, 8), train_data=_data(64, 3, 8, 8))
    assert model.training and torch.equal(model[1].running_mean, stats)
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    torch.testing.assert_close(fitted.model.eval()(x), model(x), atol=5e-3, rtol=5e-3)


def test_reconstruct_lowers_the_error_on_held_out_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    x = torch.randn(512, 16)
    errors = {}
    for reconstruct in (False, True):
        cfg = PruneConfig(amount=0.5, importance="activation", reconstruct=reconstruct, round_to=1)
        pruned = prune(model, cfg, torch.zeros(1, 16), train_data=_data(512, 16)).model
        errors[reconstruct] = (pruned(x) - model(x)).pow(2).mean().item()
    assert errors[True] < 0.5 * errors[False]


def test_zero_amount_with_reconstruct_is_bit_identical():
    model, data = _duplicated_mlp(), _data(64, 8)
    result = prune(model, PruneConfig(amount=0.0, reconstruct=True), torch.zeros(1, 8), train_data=data)
    x = torch.randn(8, 8)
    assert torch.equal(result.model(x), model(x)) and result.record["reconstructed"] == []


@pytest.mark.parametrize("options", [{"importance": "activation"}, {"reconstruct": True}])
def test_data_aware_options_without_data_say_what_to_pass(options):
    with pytest.raises(UsageError, match="train_data="):
        prune(_duplicated_mlp(), PruneConfig(amount=0.5, round_to=1, **options), torch.zeros(1, 8))


def test_transformers_bert_with_padded_dict_batches():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (64, 12))
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0
    batches = DataLoader(
        [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)], batch_size=16, shuffle=False
    )
    example = {"input_ids": ids[:2], "attention_mask": mask[:2]}
    errors = {}
    for reconstruct in (False, True):
        cfg = PruneConfig(amount=0.3, target="macs", importance="activation", reconstruct=reconstruct)
        result = prune(model, cfg, example, train_data=batches)
        with torch.no_grad():
            out = result.model(input_ids=ids, attention_mask=mask).last_hidden_state
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        errors[reconstruct] = (out - ref)[mask.bool()].pow(2).mean().item()
        if reconstruct:
            assert result.record["reconstructed"] == [f"encoder.layer.{i}.output.dense" for i in range(2)]
    assert errors[True] < errors[False]


def test_reconstruct_all_also_refits_the_layers_after_the_cut():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
    data, x = _data(1024, 16), torch.randn(512, 16)
    errors = {}
    for reconstruct in (True, "all"):
        cfg = PruneConfig(amount=0.6, target="channels", reconstruct=reconstruct, round_to=1, ignore=("2",))
        result = prune(model, cfg, torch.zeros(1, 16), train_data=data)  # layer 4's input drifts, its width not
        errors[reconstruct] = (result.model(x) - model(x)).pow(2).mean().item()
        assert result.record["reconstructed"] == (["2"] if reconstruct is True else ["2", "4"])
    assert errors["all"] < errors[True]


def test_reconstruct_rejects_unknown_scopes():
    with pytest.raises(UsageError, match="reconstruct='some'"):
        PruneConfig(reconstruct="some")


def test_reconstruct_reads_the_original_once_per_batch_and_groups_layers_sharing_an_input(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from slimkit.pruning import calibrate

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (32, 12))
    batches = DataLoader([{"input_ids": i} for i in ids], batch_size=8, shuffle=False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.layer.0.")]
    assert calibrate._groups(model, names, {"input_ids": ids[:2]}) == [
        [f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")],
        ["encoder.layer.0.attention.output.dense"],
        ["encoder.layer.0.intermediate.dense"],
        ["encoder.layer.0.output.dense"],
    ]
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    cfg = PruneConfig(amount=0.3, target="macs", importance="activation", reconstruct="all")
    example = {"input_ids": ids[:2]}
    cached = prune(model, cfg, example, train_data=batches)
    passes = len(calls)
    monkeypatch.setattr(calibrate, "CACHE_BYTES", 1)  # no room: one chunk per group, the same fit
    calls.clear()
    chunked = prune(model, cfg, example, train_data=batches)
    layer1 = [f"encoder.layer.1.{p}" for p in ("attention.self.query", "attention.self.key", "attention.self.value")]
    layer1 += [f"encoder.layer.1.{p}" for p in ("attention.output.dense", "intermediate.dense", "output.dense")]
    # FFN neurons cut (heads kept at this size): every Linear from the first cut on, query/key/value as one group
    assert cached.record["reconstructed"] == ["encoder.layer.0.output.dense", *layer1, "pooler.dense"]
    assert chunked.record["reconstructed"] == cached.record["reconstructed"]
    for (name, a), (_, b) in zip(cached.model.state_dict().items(), chunked.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert len(calls) - passes == 3 * (6 - 1)  # 6 groups, each its own chunk: 5 more passes of batches 1-3 (batch 0
    # is read once, when the cache is sized)
