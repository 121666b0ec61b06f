"""Packing: bit-exact round trips through safetensors for every bit width, and really smaller files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimkit import models
from slimkit.quantization import QuantConfig, pack_state_dict, quantize, replay, unpack_state_dict
from slimkit.quantization.pack import pack_bits, unpack_bits


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_pack_bits_round_trip(width):
    codes = torch.randint(0, 2**width, (1001,))
    packed = pack_bits(codes, width)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * width // 8)
    assert torch.equal(unpack_bits(packed, width, 1001), codes)


def test_pack_bits_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([4]), 2)


CONFIGS = {
    "int8": QuantConfig(weight_bits=8, act_bits=8, keep_first_last_8bit=False),
    "int7-affine": QuantConfig(weight_bits=7, act_bits=8, scheme="affine", keep_first_last_8bit=False),
    "int6-affine": QuantConfig(weight_bits=6, act_bits=8, scheme="affine", keep_first_last_8bit=False),
    "int5": QuantConfig(weight_bits=5, act_bits=None, keep_first_last_8bit=False),
    "int4": QuantConfig(weight_bits=4, act_bits=8, keep_first_last_8bit=False),
    "int4-adaround": QuantConfig(
        weight_bits=4, act_bits=8, keep_first_last_8bit=False, adaround=True, adaround_iters=40
    ),
    "int3-group": QuantConfig(
        weight_bits=3, act_bits=None, granularity="per_group", group_size=16, keep_first_last_8bit=False
    ),
    "int2": QuantConfig(weight_bits=2, act_bits=None, keep_first_last_8bit=False),
    "ternary": QuantConfig(weight_bits=2, scheme="ternary", act_bits=None, keep_first_last_8bit=False),
    "binary": QuantConfig(weight_bits=1, scheme="binary", act_bits=None, keep_first_last_8bit=False),
    "dynamic": QuantConfig(method="dynamic"),
}
# file size vs fp32 safetensors on LeNet-300-100 (the targets)
MIN_RATIO = {"int8": 3.9, "int4": 7.5, "ternary": 14.0, "binary": 25.0}


@pytest.fixture(scope="module")
def lenet300(digits):
    torch.manual_seed(0)
    return models.create("lenet300", in_features=64)


@pytest.fixture(scope="module")
def lenet300_full():
    torch.manual_seed(0)
    return models.create("lenet300")


def _file_bytes(tmp_path, name, tensors, meta=None):
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={"slimkit.pack": json.dumps(meta)} if meta else None)
    return path


@pytest.mark.parametrize("name", CONFIGS)
def test_pack_save_load_unpack_is_bit_exact(name, lenet300, digits, tmp_path):
    train, test = digits
    result = quantize(lenet300, CONFIGS[name], train.subset(256))
    tensors, meta = pack_state_dict(result.model)
    path = _file_bytes(tmp_path, name, tensors, meta)
    loaded = load_file(str(path))
    meta = json.loads(json.dumps(meta))
    fresh = replay(models.create("lenet300", in_features=64), json.loads(json.dumps(result.record)))
    fresh.load_state_dict(unpack_state_dict(loaded, meta))
    x = torch.stack([test[i][0] for i in range(128)])
    with torch.no_grad():
        assert torch.equal(fresh(x), result.model(x))
    assert set(fresh.state_dict()) == set(result.model.state_dict())


@pytest.mark.parametrize("name", MIN_RATIO)
def test_packed_file_is_really_smaller(name, lenet300_full, tmp_path):
    calib = torch.randn(64, 1, 28, 28)
    result = quantize(lenet300_full, CONFIGS[name], calib)
    fp32 = _file_bytes(tmp_path, "fp32", {k: v.contiguous() for k, v in lenet300_full.state_dict().items()})
    tensors, meta = pack_state_dict(result.model)
    packed = _file_bytes(tmp_path, name, tensors, meta)
    ratio = fp32.stat().st_size / packed.stat().st_size
    assert ratio >= MIN_RATIO[name], f"{name}: {ratio:.2f}x"


def test_unpack_rejects_missing_codes(lenet300, digits):
    result = quantize(lenet300, CONFIGS["int4"], digits[0].subset(64))
    tensors, meta = pack_state_dict(result.model)
    tensors.pop("1.weight.codes")
    with pytest.raises(ValueError, match=r"1\.weight\.codes"):
        unpack_state_dict(tensors, meta)
