"""Every zoo model prunes at 30% and 60% MACs, runs forward, and exports to ONNX that ONNX Runtime agrees with."""

import pytest
import torch

import slimkit
from slimkit.export.onnx import export_onnx
from slimkit.export.runtime import OrtModel
from slimkit.models import ZOO, create, example_input
from slimkit.pruning import PruneConfig, prune


@pytest.mark.parametrize("amount", [0.3, 0.6])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_prunes_runs_and_exports(name, amount, tmp_path):
    torch.manual_seed(0)
    model = create(name)
    x = example_input(name)
    result = prune(model, PruneConfig(amount=amount, target="macs"), x)
    before, after = slimkit.profile(model, x).macs, slimkit.profile(result.model, x).macs
    assert abs((1 - after / before) - amount) <= 0.02, name
    batch = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(2))
    expected = result.model(batch)
    assert expected.shape == (3, 10) and torch.isfinite(expected).all()
    onnx_path = export_onnx(result.model, x, tmp_path / f"{name}.onnx", int8=False)
    torch.testing.assert_close(OrtModel(onnx_path, threads=1)(batch), expected, rtol=1e-3, atol=1e-4)
