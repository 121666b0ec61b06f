"""Loading an artifact from a stranger: no code it names runs, an edited manifest is refused, names stay inside."""

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import slimkit
from slimkit.cli import app
from slimkit.export.artifact import ArtifactError, read_manifest, trusted_manifest, update
from slimkit.export.manifest import DIGEST, MANIFEST, SIGNATURE, digest_line
from slimkit.tuning.saving import load_model

runner = CliRunner()

# a module whose mere import leaves a trace: the check must refuse its factory before importing anything
EVIL_MODULE = "slimkit_test_evil_factory"
USER_MODULE = "slimkit_test_user_nets"
CREATED_MODULE = "slimkit_test_created_nets"  # only ever passed to create(): trusted for the rest of the process


@pytest.fixture
def modules_dir(tmp_path, monkeypatch):
    """A folder on sys.path with a hostile module (writes a sentinel on import) and a user's model module."""
    folder = tmp_path / "site"
    folder.mkdir()
    sentinel = tmp_path / "IMPORTED"
    (folder / f"{EVIL_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('pwned')\n"
        "def build(**kwargs):\n    raise SystemExit('ran')\n"
    )
    for name in (USER_MODULE, CREATED_MODULE):
        (folder / f"{name}.py").write_text("import torch\ndef build(width=4):\n    return torch.nn.Linear(3, width)\n")
    monkeypatch.syspath_prepend(str(folder))
    yield sentinel
    for name in (EVIL_MODULE, USER_MODULE, CREATED_MODULE):
        sys.modules.pop(name, None)


def rewrite(folder: Path, edit) -> None:
    """Edit slimkit.json and re-digest it, so only the schema and trust checks stand between it and load."""
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    (folder / MANIFEST).write_bytes(data)
    (folder / DIGEST).write_text(digest_line(data))


def hostile(folder: Path, factory: str, kwargs: dict) -> None:
    def edit(manifest):
        manifest["source"] = {"factory": factory, "kwargs": kwargs}
        manifest["metrics"] = {"baseline": {"accuracy": 1.0}, "final": {"accuracy": 1.0}}  # report gets past its check

    rewrite(folder, edit)


@pytest.fixture
def mlp_artifact(tmp_path):
    return slimkit.save(slimkit.models.create("mlp", in_features=8, hidden=6), tmp_path / "mlp.slim")


@pytest.fixture(scope="module")
def compressed(digits, tmp_path_factory):
    """A pruned + int8-quantized artifact: history and packing to tamper with."""
    train, _ = digits
    model = slimkit.models.create("mlp", in_features=64, hidden=32)
    pruned = slimkit.prune(model, slimkit.PruneConfig(amount=0.5), torch.zeros(1, 64))
    quantized = slimkit.quantize(pruned.model, slimkit.QuantConfig(), train)
    path = slimkit.save(quantized, tmp_path_factory.mktemp("compressed") / "q.slim")
    return path, quantized.model


def fresh_copy(path: Path, tmp_path: Path) -> Path:
    target = tmp_path / f"copy{len(list(tmp_path.iterdir()))}.slim"
    shutil.copytree(path, target)
    return target


HOSTILE = [
    ("os:system", {"command": "touch {sentinel}"}),
    ("subprocess:getoutput", {"cmd": "touch {sentinel}"}),
    ("builtins:open", {"file": "{sentinel}", "mode": "w"}),
    (f"{EVIL_MODULE}:build", {}),
]


def _hostile_cases(tmp_path, mlp_artifact, factory, kwargs):
    sentinel = tmp_path / "RAN"
    hostile(mlp_artifact, factory, {k: v.format(sentinel=sentinel) for k, v in kwargs.items()})
    return sentinel


@pytest.mark.parametrize(("factory", "kwargs"), HOSTILE)
def test_load_runs_no_factory_the_artifact_names(tmp_path, mlp_artifact, modules_dir, factory, kwargs):
    sentinel = _hostile_cases(tmp_path, mlp_artifact, factory, kwargs)
    with pytest.raises(ArtifactError, match=rf"source.factory '{factory}' is not trusted.*trust=\["):
        slimkit.load(mlp_artifact)
    with pytest.raises(ArtifactError, match="not trusted"):
        trusted_manifest(mlp_artifact)
    assert not sentinel.exists() and not modules_dir.exists() and EVIL_MODULE not in sys.modules


@pytest.mark.parametrize(("factory", "kwargs"), HOSTILE)
@pytest.mark.parametrize("command", [["export", "--format", "onnx"], ["report"]])
def test_cli_runs_no_factory_the_artifact_names(tmp_path, mlp_artifact, modules_dir, factory, kwargs, command):
    sentinel = _hostile_cases(tmp_path, mlp_artifact, factory, kwargs)
    result = runner.invoke(app, [command[0], str(mlp_artifact), *command[1:]])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not trusted" in " ".join(lines) and "--trust" in lines[0]
    assert not sentinel.exists() and not modules_dir.exists() and EVIL_MODULE not in sys.modules
    assert not (mlp_artifact / "report.html").exists()


def test_transformers_factories_get_a_clear_error(mlp_artifact):
    hostile(mlp_artifact, "transformers:AutoModel", {})
    with pytest.raises(ArtifactError, match="transformers function, which is not run.*slimkit.models.hf:from_config"):
        slimkit.load(mlp_artifact)


def test_a_trusted_user_factory_loads(tmp_path, modules_dir):
    net = torch.nn.Linear(3, 5)
    source = {"factory": f"{USER_MODULE}:build", "kwargs": {"width": 5}}
    path = slimkit.save(net, tmp_path / "user.slim", source=source)
    with pytest.raises(ArtifactError, match=rf"trust=\['{USER_MODULE}'\].*--trust {USER_MODULE}"):
        slimkit.load(path)
    assert USER_MODULE not in sys.modules  # refused before import
    with pytest.raises(ArtifactError, match="not trusted"):  # a prefix that is not a whole module name
        slimkit.load(path, trust=[USER_MODULE[:-3]])
    for trust in ([USER_MODULE], [f"{USER_MODULE}:build"], USER_MODULE):
        again = slimkit.load(path, trust=trust)
        assert torch.equal(again.weight, net.weight) and again.slimkit_source == source


def test_the_search_results_loader_passes_trust_through(tmp_path, modules_dir):
    from slimkit.tuning.saving import save_result

    net = torch.nn.Linear(3, 5)
    net.slimkit_source = {"factory": f"{USER_MODULE}:build", "kwargs": {"width": 5}}
    folder = save_result(net, tmp_path / "trial", {"metrics": {}})
    with pytest.raises(ArtifactError, match="not trusted"):
        load_model(folder)
    assert torch.equal(load_model(folder, trust=[USER_MODULE]).weight, net.weight)


def test_registered_factories_load_by_name_and_by_module_function(tmp_path, monkeypatch):
    from slimkit.models import ZOO, register

    def registered_net(width=4):
        return torch.nn.Linear(2, width)

    registered_net.__module__ = "slimkit_test_registered_mod"  # a module that does not exist: nothing is imported
    register("slimkit_test_registered", input_shape=(2,), description="a test net")(registered_net)
    try:
        model = slimkit.models.create("slimkit_test_registered", width=3)
        again = slimkit.load(slimkit.save(model, tmp_path / "a.slim"))
        assert torch.equal(again.weight, model.weight)
        by_spec = slimkit.save(
            torch.nn.Linear(2, 3),
            tmp_path / "b.slim",
            source={"factory": "slimkit_test_registered_mod:registered_net", "kwargs": {"width": 3}},
        )
        assert isinstance(slimkit.load(by_spec), torch.nn.Linear)
    finally:
        ZOO.pop("slimkit_test_registered")
    with pytest.raises(ArtifactError, match="not a slimkit zoo model nor registered"):
        slimkit.load(tmp_path / "a.slim")


def test_a_model_the_user_created_from_a_spec_reloads_in_the_same_process(tmp_path, modules_dir):
    model = slimkit.models.create(f"{CREATED_MODULE}:build", width=2)  # the user typed this spec
    again = slimkit.load(slimkit.save(model, tmp_path / "c.slim"))
    assert torch.equal(again.weight, model.weight)


# --- paths stay inside the folder ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../escaped.txt", "sub/../../escaped.txt", "/tmp/slimkit_abs_escape.txt", "", "..", "slimkit.json", "a\\..\\b"],
)
def test_names_that_leave_the_folder_are_refused(tmp_path, mlp_artifact, name):
    src = tmp_path / "payload.txt"
    src.write_text("payload")
    with pytest.raises(ArtifactError, match="file name"):
        slimkit.save(slimkit.models.create("mlp"), tmp_path / "new.slim", extra_files={name: src})
    with pytest.raises(ArtifactError, match="file name"):
        update(mlp_artifact, files={name: src})
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/slimkit_abs_escape.txt").exists()
    assert not (tmp_path / "new.slim").exists()
    slimkit.load(mlp_artifact)  # the failed update left the artifact whole


@pytest.mark.parametrize("name", ["../model.safetensors", "/etc/hostname", "x/../../y"])
def test_a_manifest_listing_outside_names_is_refused(mlp_artifact, name):
    rewrite(mlp_artifact, lambda m: m["files"].update({name: "0" * 64}))
    with pytest.raises(ArtifactError, match="leaves the artifact folder"):
        slimkit.load(mlp_artifact)


def test_symlinks_are_refused_never_followed(tmp_path, mlp_artifact):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (mlp_artifact / "link.txt").symlink_to(outside)
    with pytest.raises(ArtifactError, match=r"link.txt is a symbolic link"):
        slimkit.load(mlp_artifact)
    with pytest.raises(ArtifactError, match="symbolic link"):
        update(mlp_artifact, metrics={"a": 1})
    (mlp_artifact / "link.txt").unlink()
    (tmp_path / "outside_dir").mkdir()
    (mlp_artifact / "plots").symlink_to(tmp_path / "outside_dir", target_is_directory=True)
    with pytest.raises(ArtifactError, match="plots is a symbolic link"):
        update(mlp_artifact, metrics={"a": 1})
    (mlp_artifact / "plots").unlink()
    weights = mlp_artifact / "model.safetensors"
    (tmp_path / "w.safetensors").write_bytes(weights.read_bytes())
    weights.unlink()
    weights.symlink_to(tmp_path / "w.safetensors")  # the same bytes, behind a link: still refused
    with pytest.raises(ArtifactError, match="model.safetensors is a symbolic link"):
        slimkit.load(mlp_artifact)


def test_a_symlinked_manifest_or_source_file_is_refused(tmp_path, mlp_artifact):
    link = tmp_path / "report-link.md"
    (tmp_path / "report.md").write_text("# r")
    link.symlink_to(tmp_path / "report.md")
    with pytest.raises(ArtifactError, match="symbolic link"):
        slimkit.save(slimkit.models.create("mlp"), tmp_path / "n.slim", extra_files={"report.md": link})
    manifest = mlp_artifact / MANIFEST
    shutil.move(manifest, tmp_path / "real.json")
    manifest.symlink_to(tmp_path / "real.json")
    with pytest.raises(ArtifactError, match="slimkit.json is a symbolic link"):
        slimkit.load(mlp_artifact)


# --- the manifest's integrity and schema ---------------------------------------------------------------------


def test_editing_any_byte_of_the_manifest_is_refused(compressed, tmp_path):
    path, _ = compressed
    data = (path / MANIFEST).read_bytes()
    packing_at = data.index(b'"packing"')
    positions = sorted(
        {*range(0, len(data), max(1, len(data) // 40)), *range(packing_at, packing_at + 400, 23), len(data) - 1}
    )
    for position in positions:
        folder = fresh_copy(path, tmp_path)
        edited = bytearray(data)
        edited[position] = ord("7") if edited[position] != ord("7") else ord("8")
        (folder / MANIFEST).write_bytes(bytes(edited))
        with pytest.raises(ArtifactError, match=r"slimkit.json was modified.*\(its SHA-256 does not match"):
            slimkit.load(folder)
        with pytest.raises(ArtifactError, match="was modified"):
            read_manifest(folder, verify=False)
        shutil.rmtree(folder)


def test_a_manifest_without_its_digest_is_refused(mlp_artifact):
    (mlp_artifact / DIGEST).unlink()
    with pytest.raises(ArtifactError, match="slimkit.json.sha256 is missing"):
        slimkit.load(mlp_artifact)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.update(evil=1), "'evil'"),
        (lambda m: m.update(format_version="1"), "'format_version'"),
        (lambda m: m["source"].update(factory="os:system; rm -rf /"), "'source.factory'"),
        (lambda m: m["source"].update(kwargs=[1]), "'source.kwargs'"),
        (lambda m: m["history"].append({"kind": "prune"}), "'history.2.record'"),
        (lambda m: m["packing"]["layers"]["1"].update(width=3), "'packing.layers.1.width'"),
        (lambda m: m["packing"]["layers"]["1"].update(codes_shape=[-1, 4]), "'packing.layers.1.codes_shape.0'"),
        (lambda m: m["files"].update({"model.safetensors": "nothex"}), "'files.model.safetensors'"),
        (lambda m: m.pop("metrics"), "'metrics'"),
    ],
)
def test_every_field_is_validated_before_use(compressed, tmp_path, edit, field):
    folder = fresh_copy(compressed[0], tmp_path)
    rewrite(folder, edit)
    with pytest.raises(ArtifactError, match=f"field {field}"):
        slimkit.load(folder)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda p: p["layers"]["1"].update(offset=p["layers"]["1"]["offset"] + 1), r"packing.layers.1.offset is -126"),
        (lambda p: p["layers"]["1"].update(codes_shape=[8, 64]), r"packing.layers.1.codes_shape is \[8, 64\]"),
        (lambda p: p["layers"]["1"].update(width=4), r"packing.layers.1.width is 4"),
        (lambda p: p["layers"]["1"].update(weight_shape=[64, 16]), r"packing.layers.1.weight_shape"),
        (lambda p: p["layers"].update({"0": p["layers"]["1"]}), r"packing.layers.0 names no quantized layer"),
        (lambda p: p["layers"].update({"": p["layers"]["1"]}), r"packing.layers. names no quantized layer"),
        (
            lambda p: p["zeros"].update({"1.weight_quant.zero_point": [3, 1]}),
            r"packing.zeros.1.weight_quant.zero_point",
        ),
        (lambda p: p["zeros"].update({"1.weight": [16, 64]}), r"packing.zeros.1.weight is not a zero-point"),
        (lambda p: p.update(version=2), r"packing.version 2 is not supported"),
    ],
)
def test_packing_that_does_not_fit_the_weights_is_refused_never_garbage(compressed, tmp_path, edit, field):
    folder = fresh_copy(compressed[0], tmp_path)
    rewrite(folder, lambda m: edit(m["packing"]))
    with pytest.raises(ArtifactError, match=field):
        slimkit.load(folder)


def test_a_history_that_does_not_replay_names_the_entry(compressed, tmp_path):
    folder = fresh_copy(compressed[0], tmp_path)
    rewrite(folder, lambda m: m["history"][0]["record"].clear())
    with pytest.raises(ArtifactError, match=r"history\[0\] \(prune\) does not fit"):
        slimkit.load(folder)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("act_bits", 2.5, "act_bits=2.5: expected"),
        ("act_bits", 0, "act_bits=0 is out of range"),
        ("dynamic", "x", "dynamic='x': expected"),
        ("weight_bits", 9, "weight_bits=9 is out of range"),
        ("scheme", "binary", "scheme='binary' needs weight_bits=1"),
        ("granularity", "rows", "granularity='rows'"),
        ("group_size", -1, "group_size=-1"),
    ],
)
def test_a_quantize_record_is_validated_before_replay(compressed, tmp_path, key, value, message):
    """A changed layer spec must not load as a silently different model, nor fail only at the first forward."""
    folder = fresh_copy(compressed[0], tmp_path)
    rewrite(folder, lambda m: m["history"][1]["record"]["layers"][0].update({key: value}))
    with pytest.raises(ArtifactError, match=r"history\[1\] \(quantize\)") as caught:
        slimkit.load(folder)
    assert message in str(caught.value)


def test_the_untouched_compressed_artifact_still_loads_bit_exactly(compressed):
    path, model = compressed
    x = torch.randn(7, 64)
    assert torch.equal(slimkit.load(path)(x), model(x))


# --- signatures ------------------------------------------------------------------------------------------------


def test_signing_round_trip_and_refusals(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    model = slimkit.models.create("mlp", in_features=8, hidden=6)
    path = slimkit.save(model, tmp_path / "signed.slim", signing_key=key)
    assert (path / SIGNATURE).is_file()
    public_pem = tmp_path / "key.pub"
    public_pem.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for public in (key.public_key(), public_pem, public_pem.read_bytes()):
        assert torch.equal(slimkit.load(path, public_key=public)[1].weight, model[1].weight)
    with pytest.raises(ArtifactError, match="does not verify"):
        slimkit.load(path, public_key=stranger.public_key())
    signature = bytearray((path / SIGNATURE).read_bytes())
    signature[5] = ord("A") if signature[5] != ord("A") else ord("B")
    (path / SIGNATURE).write_bytes(bytes(signature))
    with pytest.raises(ArtifactError, match="does not verify"):
        slimkit.load(path, public_key=key.public_key())
    # a re-digested edit passes the digest but not the signature
    path = slimkit.save(model, tmp_path / "signed2.slim", signing_key=key)
    rewrite(path, lambda m: m["metrics"].update(accuracy=99.9))
    with pytest.raises(ArtifactError, match="does not verify"):
        slimkit.load(path, public_key=key.public_key())
    # update without the key drops the stale signature; with it, re-signs
    path = slimkit.save(model, tmp_path / "signed3.slim", signing_key=key)
    update(path, metrics={"a": 1.0})
    with pytest.raises(ArtifactError, match="slimkit.json.sig is missing"):
        slimkit.load(path, public_key=key.public_key())
    update(path, metrics={"b": 2.0}, signing_key=key)
    assert slimkit.load(path, public_key=key.public_key()).slimkit_metrics == {"a": 1.0, "b": 2.0}


# --- fuzzing: any manifest that passes the digest gives a model or an ArtifactError, and runs nothing --------------

HOSTILE_STRINGS = [
    "os:system",
    "builtins:eval",
    "subprocess:getoutput",
    f"{EVIL_MODULE}:build",
    "../x",
    "/etc/passwd",
    "mlp",
    "prune",
    "quantize",
    "1",
    "model.safetensors",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 300)
    | st.floats(-1e3, 1e3, allow_nan=False)
    | st.text(max_size=6)
    | st.sampled_from(HOSTILE_STRINGS),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.sampled_from(HOSTILE_STRINGS), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def _mutate(manifest, data):
    path = data.draw(st.sampled_from([p for p in _paths(manifest) if p]))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    action = data.draw(st.sampled_from(["replace", "delete", "add", "nudge"]))
    if action == "delete":
        del parent[key]
    elif action == "add" and isinstance(parent[key], dict):
        parent[key][data.draw(st.text(max_size=6) | st.sampled_from(HOSTILE_STRINGS))] = data.draw(json_values)
    elif action == "add" and isinstance(parent[key], list):
        parent[key].append(data.draw(json_values))
    elif action == "nudge" and type(parent[key]) is int:
        parent[key] += data.draw(st.integers(-2, 2))
    else:
        parent[key] = data.draw(json_values)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifests_give_a_model_or_an_artifact_error(compressed, modules_dir, data):
    path, _ = compressed
    original = json.loads((path / MANIFEST).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "f.slim"
        shutil.copytree(path, folder)
        manifest = copy.deepcopy(original)
        for _ in range(data.draw(st.integers(1, 3))):
            _mutate(manifest, data)
        rewrite(folder, lambda m: (m.clear(), m.update(manifest)))
        try:
            model = slimkit.load(folder)
        except ArtifactError as exc:
            assert "\n" not in str(exc)
            event(str(exc).split(": ", 1)[-1][:50])
        else:
            assert isinstance(model, torch.nn.Module)
            event("loaded")
    assert not modules_dir.exists() and EVIL_MODULE not in sys.modules
