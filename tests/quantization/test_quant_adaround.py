"""AdaRound: the rectified sigmoid, lower layer reconstruction error than round-to-nearest, and learned codes that
every back end (packing, ONNX Runtime, a re-derived min-max scale) reproduces exactly."""

import pytest
import torch
from torch import nn

from slimkit.export.onnx import export_onnx
from slimkit.export.runtime import OrtModel, parity
from slimkit.quantization import QuantConfig, quantize
from slimkit.quantization.adaround import GAMMA, ZETA, _inverse, rectified_sigmoid
from slimkit.quantization.ptq import quant_layers
from slimkit.train import TrainConfig, evaluate, fit


def test_rectified_sigmoid_reaches_zero_and_one_and_inverts():
    v = torch.tensor([-20.0, 0.0, 20.0])
    assert rectified_sigmoid(v).tolist() == [0.0, pytest.approx(0.5), 1.0]
    frac = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(rectified_sigmoid(_inverse(frac)), frac, atol=1e-5)
    assert ZETA > 1 and GAMMA < 0  # stretched beyond [0, 1] so the clip is reached with a finite V


@pytest.fixture(scope="module")
def digits_cnn(digits):
    train, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10),
    )
    fit(model, train, None, TrainConfig(epochs=4, lr=0.05, optimizer="sgd", progress=False))
    return model.eval()


def test_adaround_lowers_reconstruction_error_and_keeps_accuracy(digits_cnn, digits):
    train, test = digits
    cfg = dict(weight_bits=4, keep_first_last_8bit=False, calibration_batches=4)
    nearest = quantize(digits_cnn, QuantConfig(**cfg), train)
    learned = quantize(digits_cnn, QuantConfig(**cfg, adaround=True, adaround_iters=150), train)
    stats = learned.record["stats"]["adaround"]
    assert set(stats) == {"0", "3", "6"}
    for name, s in stats.items():
        assert 0 < s["flipped"] < 0.5, name
        assert s["recon_mse_adaround"] < s["recon_mse_nearest"], (name, s)
    fp32 = evaluate(digits_cnn, test).accuracy
    assert evaluate(learned.model, test).accuracy >= min(evaluate(nearest.model, test).accuracy, fp32) - 1.5


def test_adaround_codes_are_what_every_back_end_sees(digits_cnn, digits, tmp_path):
    import onnx
    from onnx import numpy_helper

    train, test = digits
    result = quantize(digits_cnn, QuantConfig(adaround=True, adaround_iters=60, calibration_batches=4), train)
    onnx_path = export_onnx(result.model, torch.zeros(1, 1, 8, 8), tmp_path / "int8.onnx")
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(onnx_path)).graph.initializer}
    for name, layer in quant_layers(result.model):
        wq = layer.weight_quant
        codes = wq.codes(layer.weight)
        # the stored weight is exactly the dequantized learned codes, and min-max re-derives the same scale
        assert torch.equal(wq.dequantize(codes), layer.weight.detach()), name
        scale = wq.scale.clone()
        wq.refresh(layer.weight)
        assert torch.allclose(wq.scale, scale, rtol=1e-6, atol=0), name
        wq.scale.copy_(scale)
        exported = torch.from_numpy(initializers[f"{name}.weight.int8"].astype("float32"))
        assert torch.equal(exported, codes.reshape(layer.weight.shape)), name
    report = parity(result.model, OrtModel(onnx_path, threads=1), test)
    assert report["top1_agreement"] >= 0.99, report


def test_adaround_config_errors():
    with pytest.raises(ValueError, match="adaround_iters=0"):
        QuantConfig(adaround=True, adaround_iters=0)
    with pytest.raises(ValueError, match="method='ptq'"):
        QuantConfig(adaround=True, method="qat")
