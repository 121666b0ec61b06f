"""Real architectures: torchvision ResNet-18, MobileNetV2, DenseNet-121 (concat), ViT-B/16 (attention heads)
prune at 30% and 60% MACs, run forward, replay bit-exactly and export to ONNX (checked with ONNX Runtime)."""

import io

import numpy as np
import pytest
import torch

from slimkit.pruning import PruneConfig, prune, replay

tvm = pytest.importorskip("torchvision.models")
ort = pytest.importorskip("onnxruntime")

MODELS = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), 32),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(num_classes=10), 32),
    "densenet121": (lambda: tvm.densenet121(num_classes=10), 32),
    "vit_b_16": (lambda: tvm.vit_b_16(image_size=32, num_classes=10), 32),
}
SLOW = {"densenet121", "vit_b_16"}


def _cases():
    for name in MODELS:
        for amount in (0.3, 0.6):
            marks = [pytest.mark.slow] if name in SLOW and amount == 0.3 else []
            yield pytest.param(name, amount, marks=marks, id=f"{name}-{int(amount * 100)}")


@pytest.mark.parametrize(("name", "amount"), list(_cases()))
def test_torchvision_prune_forward_replay_onnx(name, amount):
    build, size = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, size, size)
    result = prune(model, PruneConfig(amount=amount, target="macs"), x)
    assert abs(result.record["reduction"]["macs"] - amount) <= 0.02
    y = result.model(x)
    assert y.shape == (1, 10)
    fresh = replay(build(), result.record)
    fresh.load_state_dict(result.model.state_dict())
    assert torch.equal(fresh.eval()(x), y)
    buf = io.BytesIO()
    torch.onnx.export(result.model, (x,), buf, dynamo=False, input_names=["x"])
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], y.detach().numpy(), rtol=1e-3, atol=1e-4)


def test_vit_heads_are_removed_whole():
    build, size = MODELS["vit_b_16"]
    model = build().eval()
    result = prune(model, PruneConfig(amount=0.5, target="macs", allocation="uniform"), torch.randn(1, 3, size, size))
    attention = result.model.encoder.layers[0].self_attention
    assert attention.num_heads < 12
    assert attention.in_proj_weight.shape == (3 * attention.num_heads * 64, 768)
    heads = [g for g in result.record["groups"] if g["id"].endswith(":heads")]
    assert len(heads) == 12 and all(g["kept"] % 64 == 0 for g in heads)
