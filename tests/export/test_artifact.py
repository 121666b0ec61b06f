import pytest
import torch

import slimkit
from slimkit.export.artifact import ArtifactError, read_manifest, update


def test_round_trip_is_bit_exact_and_pickle_free(tmp_path):
    model = slimkit.models.create("resnet20")
    with torch.no_grad():  # non-trivial BN statistics so buffers matter
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = slimkit.save(model, tmp_path / "r20.slim", metrics={"accuracy": 91.5})
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "slimkit.json", "slimkit.json.sha256"]
    again = slimkit.load(path)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), again(x))
    manifest = read_manifest(path)
    assert manifest["source"] == {"factory": "resnet20", "kwargs": {}}
    assert manifest["metrics"]["accuracy"] == 91.5
    assert again.slimkit_metrics["accuracy"] == 91.5


def test_tampering_is_detected(tmp_path):
    path = slimkit.save(slimkit.models.create("mlp"), tmp_path / "mlp.slim")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors was modified"):
        slimkit.load(path)


def test_missing_and_foreign_folders(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact folder"):
        slimkit.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="slimkit.json is missing"):
        slimkit.load(tmp_path / "empty")
    path = slimkit.save(slimkit.models.create("mlp"), tmp_path / "m.slim")
    (path / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        slimkit.load(path)


def test_models_without_source_need_one(tmp_path):
    with pytest.raises(ArtifactError, match="source="):
        slimkit.save(torch.nn.Linear(3, 3), tmp_path / "x.slim")
    path = slimkit.save(
        torch.nn.Linear(3, 3),
        tmp_path / "x.slim",
        source={"factory": "torch.nn:Linear", "kwargs": {"in_features": 3, "out_features": 3}},
    )
    with pytest.raises(ArtifactError, match=r"'torch.nn:Linear' is not trusted.*trust=\['torch.nn'\]"):
        slimkit.load(path)  # a factory the artifact names is not run unless the caller allows it
    assert isinstance(slimkit.load(path, trust=["torch.nn:Linear"]), torch.nn.Linear)


def test_failed_save_leaves_old_artifact_intact(tmp_path):
    path = slimkit.save(slimkit.models.create("mlp"), tmp_path / "m.slim", metrics={"v": 1})
    with pytest.raises(FileNotFoundError):
        slimkit.save(slimkit.models.create("mlp"), path, metrics={"v": 2}, extra_files={"a.onnx": tmp_path / "nope"})
    assert read_manifest(path)["metrics"] == {"v": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_update_adds_files_and_rehashes(tmp_path):
    path = slimkit.save(slimkit.models.create("mlp"), tmp_path / "m.slim")
    extra = tmp_path / "report.md"
    extra.write_text("# report\n")
    update(path, files={"report.md": extra}, metrics={"speedup": 2.0})
    manifest = read_manifest(path)
    assert "report.md" in manifest["files"] and manifest["metrics"]["speedup"] == 2.0
    slimkit.load(path)  # hashes still verify


@pytest.mark.parametrize("step", ["none", "prune", "int8"])
def test_float64_models_come_back_float64(tmp_path, mnist, step):
    model = slimkit.models.create("lenet5").double()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    if step == "prune":
        model = slimkit.prune(model, slimkit.PruneConfig(amount=0.5), x).model
    elif step == "int8":
        images, labels = mnist[0].images[:256].double(), mnist[0].labels[:256]  # data in the model's dtype
        calibration = torch.utils.data.TensorDataset(images, labels)
        model = slimkit.quantize(model, slimkit.QuantConfig(), calibration).model
    again = slimkit.load(slimkit.save(model, tmp_path / "f64.slim"))
    assert {p.dtype for p in again.parameters()} == {p.dtype for p in model.parameters()} >= {torch.float64}
    assert torch.equal(model(x), again(x))
