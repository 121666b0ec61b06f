import pytest
import torch

import slimkit
from slimkit import models
from slimkit.measure import profile

# published parameter counts (He et al. 2016: ResNet-20 0.27M, ResNet-56 0.85M; LeNet-300-100 266,610)
EXPECTED_PARAMS = {"mlp": 159_010, "lenet300": 266_610, "lenet5": 61_706}


@pytest.mark.parametrize("name", sorted(models.ZOO))
def test_zoo_forward(name):
    model = models.create(name)
    out = model(models.example_input(name, batch=2))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_parameter_counts():
    for name, count in EXPECTED_PARAMS.items():
        assert sum(p.numel() for p in models.create(name).parameters()) == count
    assert round(sum(p.numel() for p in models.create("resnet20").parameters()) / 1e6, 2) == 0.27
    assert round(sum(p.numel() for p in models.create("resnet56").parameters()) / 1e6, 2) == 0.86


def test_hand_computed_macs():
    # MLP: 784*200 + 200*10
    assert slimkit.profile(models.create("mlp"), torch.zeros(1, 1, 28, 28)).macs == 784 * 200 + 200 * 10
    # LeNet-5: conv1 28*28*6*25, conv2 10*10*16*150, fc 400*120 + 120*84 + 84*10
    lenet = 28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    assert slimkit.profile(models.create("lenet5"), torch.zeros(1, 1, 28, 28)).macs == lenet
    # ResNet-56: stem + 3 stages of 18 3x3 convs + two 1x1 shortcuts + fc
    hw = {16: 32 * 32, 32: 16 * 16, 64: 8 * 8}
    macs = hw[16] * 16 * 27 + 18 * hw[16] * 16 * 144
    macs += hw[32] * 32 * 144 + 17 * hw[32] * 32 * 288 + hw[32] * 32 * 16
    macs += hw[64] * 64 * 288 + 17 * hw[64] * 64 * 576 + hw[64] * 64 * 32 + 64 * 10
    prof = slimkit.profile(models.create("resnet56"), torch.zeros(1, 3, 32, 32))
    assert prof.macs == macs
    assert abs(prof.macs - 125.5e6) / 125.5e6 < 0.01  # the published figure
    assert abs(profile(models.create("resnet20"), torch.zeros(1, 3, 32, 32)).macs - 41e6) / 41e6 < 0.01


def test_module_function_spec_and_errors():
    model = models.create("torch.nn:Identity")
    assert isinstance(model, torch.nn.Identity)
    with pytest.raises(ValueError, match="did you mean 'resnet56'"):
        models.create("resnet65")
    with pytest.raises(ValueError, match="cannot import module"):
        models.create("no_such_pkg.mod:build")
    with pytest.raises(ValueError, match="has no callable 'Linearr'.*Linear"):
        models.create("torch.nn:Linearr")


def test_weights_round_trip_and_errors(tmp_path):
    model = models.create("lenet5")
    path = models.save_weights(model, tmp_path / "w.safetensors")
    again = models.create("lenet5", weights=path)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), again(x))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert torch.equal(models.create("lenet5", weights=tmp_path / "w.pt")(x), model(x))
    mismatch = r"w.safetensors.*'features.0.weight'.*\(6, 1, 5, 5\).*\(6, 3, 5, 5\)"
    with pytest.raises(models.WeightsError, match=mismatch):
        models.create("lenet5", weights=path, in_channels=3)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(models.WeightsError, match="corrupt.safetensors"):
        models.create("lenet5", weights=corrupt)
    with pytest.raises(models.WeightsError, match="missing tensor"):
        models.create("mlp", weights=path)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": models.create("mlp")}, tmp_path / "whole.pt")  # a pickled module, not a state_dict
    with pytest.raises(models.WeightsError, match="weights_only=True"):
        models.create("mlp", weights=tmp_path / "whole.pt")
