"""Unstructured (local/global magnitude, N:M) sparsity and the bitmask + values storage."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimkit.models import create
from slimkit.pruning import SparsityConfig, pack_sparse, sparsify, unpack_sparse

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def test_local_zeroes_the_smallest_in_every_layer_and_leaves_the_caller_alone():
    model = create("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = sparsify(model, SparsityConfig(amount=0.6, mode="local", ignore=("fc",)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    old, new = _weights(model), _weights(res.model)
    for name, w in new.items():
        zero = w == 0
        if name == "fc":
            assert not zero.any()
            continue
        assert zero.float().mean().item() == pytest.approx(0.6, abs=1 / w.numel() + 1e-6)
        # every removed weight is no larger than every kept one
        assert old[name].abs()[zero].max() <= old[name].abs()[~zero].min()
        assert torch.equal(w[~zero], old[name][~zero])
    assert res.record["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert res.model(X).shape == (4, 10)


def test_global_uses_one_threshold_across_layers():
    model = create("resnet20")
    res = sparsify(model, SparsityConfig(amount=0.7, mode="global"))
    old, new = _weights(model), _weights(res.model)
    removed = torch.cat([old[n].abs()[new[n] == 0] for n in new])
    kept = torch.cat([old[n].abs()[new[n] != 0] for n in new])
    assert removed.max() <= kept.min()
    assert removed.numel() / (removed.numel() + kept.numel()) == pytest.approx(0.7, abs=1e-3)
    assert len({round(s, 2) for s in res.record["layers"].values()}) > 3  # ratios differ per layer


def test_two_four_pattern_along_inputs():
    model = create("resnet20")
    res = sparsify(model, SparsityConfig(mode="n:m", n=2, m=4))
    assert "conv1" in res.record["skipped"]  # 3 input channels: not a multiple of 4, kept dense and listed
    w = res.model.layer1[0].conv1.weight  # (16, 16, 3, 3)
    groups = (w.movedim(1, -1) != 0).reshape(-1, 4).sum(1)
    assert torch.all(groups == 2)
    old = model.layer1[0].conv1.weight.movedim(1, -1).abs().reshape(-1, 4)
    kept = (w.movedim(1, -1) != 0).reshape(-1, 4)
    assert torch.all(old[kept].reshape(-1, 2).min(1).values >= old[~kept].reshape(-1, 2).max(1).values)
    with pytest.raises(ValueError, match="n=4, m=4"):
        SparsityConfig(mode="n:m", n=4, m=4)
    with pytest.raises(ValueError, match="mode"):
        SparsityConfig(mode="blocky")


@pytest.mark.parametrize(
    "cfg, max_ratio", [(SparsityConfig(mode="n:m"), 0.56), (SparsityConfig(amount=0.9, mode="global"), 0.16)]
)
def test_pack_round_trip_is_bit_exact_and_the_file_is_smaller(tmp_path, cfg, max_ratio):
    model = sparsify(create("vgg11_cifar"), cfg).model
    state = model.state_dict()
    state["features.0.weight"].view(-1)[0] = -0.0  # negative zero must survive
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "dense.safetensors"))
    save_file(pack_sparse(state), str(tmp_path / "sparse.safetensors"))
    restored = unpack_sparse(load_file(str(tmp_path / "sparse.safetensors")))
    assert restored.keys() == state.keys()
    for k, v in state.items():
        assert restored[k].dtype == v.dtype and restored[k].shape == v.shape
        assert torch.equal(
            restored[k].view(torch.uint8) if v.is_floating_point() else restored[k],
            v.contiguous().view(torch.uint8) if v.is_floating_point() else v,
        )
    ratio = (tmp_path / "sparse.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio < max_ratio
    fresh = create("vgg11_cifar")
    fresh.load_state_dict(restored)
    assert torch.equal(fresh(X), model(X))


def test_corrupt_pack_is_refused():
    packed = pack_sparse({"w": torch.tensor([0.0, 0.0, 1.0, 0.0])})
    packed["w.__sparse_values"] = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="corrupted"):
        unpack_sparse(packed)
