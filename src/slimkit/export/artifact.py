"""The slimkit artifact: a folder that rebuilds a compressed model anywhere, without pickle.

Layout (written atomically: a temporary folder, then one rename)::

    model.safetensors   weights; quantized layers as packed integer codes + scales (really smaller files)
    slimkit.json        format version, the factory that builds the architecture (+ kwargs), the ordered history of
                        structural edits (pruning's kept channels, quantization's per-layer spec), packing metadata,
                        metrics, and the SHA-256 of every other file
    slimkit.json.sha256 the SHA-256 of slimkit.json itself (an edited manifest is refused)
    slimkit.json.sig    optional: an Ed25519 signature of slimkit.json (``save(..., signing_key=...)``)
    model.onnx          optional: fp32 or QDQ int8 (``slimkit export``)
    report.md/.html     optional: the before/after report with PNG plots

Trust: an artifact may come from a stranger, so ``load`` runs no code it names. It checks the manifest's digest
(and signature, given ``public_key``), validates every field against a schema, refuses symbolic links and names that
leave the folder, verifies every file's hash, and only then builds the model, from a factory that is a zoo name,
registered or created in this process, or allowed by ``trust=[...]``. It replays the history, checks the packing
against the rebuilt model and the weights file, and loads the weights strictly, so outputs are bit-identical to the
saved model.

Example:
    >>> result = slimkit.prune(model, slimkit.PruneConfig(amount=0.5), x)   # doctest: +SKIP
    >>> slimkit.save(result, "out/lenet5.slim")                              # doctest: +SKIP
    >>> model = slimkit.load("out/lenet5.slim")                              # doctest: +SKIP
    >>> model = slimkit.load("their.slim", trust=["theirpkg.models"])        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit import __version__
from slimkit._io import atomic_path
from slimkit.errors import InputTypeError, SlimkitError
from slimkit.export.manifest import (
    DIGEST,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    RESERVED,
    SIGNATURE,
    ArtifactError,
    digest_line,
    read_small,
    safe_name,
    sign,
    validate,
)
from slimkit.export.manifest import verify as verify_digest
from slimkit.history import HISTORY_ATTR, history_of, replay_step, set_source, source_of
from slimkit.models.hf import FACTORY as HF_FACTORY
from slimkit.models.hf import source as hf_source

WEIGHTS = "model.safetensors"

__all__ = [
    "ArtifactError",
    "build_source",
    "load",
    "read_manifest",
    "save",
    "trusted_manifest",
    "update",
    "weights_size",
]

# what malformed but digest-valid manifest data can make torch / safetensors / a replay raise
_BAD_DATA = (
    SlimkitError,
    LookupError,
    TypeError,
    ValueError,
    AttributeError,
    RuntimeError,
    ArithmeticError,
    SafetensorError,
)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_of(obj: Any) -> nn.Module:
    model = getattr(obj, "model", obj)
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"save: expected an nn.Module or a slimkit result with .model, got {type(obj).__name__}")
    return model


def _packed_state(model: nn.Module, history: list[dict]) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors to write and their packing: the packing the model's layers registered (``export.registry``; a
    quantized model's packed codes), the same one ``slimkit.measure.size_on_disk`` counts. ``history`` is not
    consulted: the layers decide."""
    from slimkit.export.registry import packed_state

    return packed_state(model)


def _write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": FORMAT})


def weights_size(model: nn.Module) -> int:
    """Bytes of the ``model.safetensors`` that ``save`` would write: ``slimkit.measure.size_on_disk`` with the
    artifact's header metadata (quantized layers as packed codes, for any model however it was built)."""
    from slimkit.measure import size_on_disk

    return size_on_disk(model, metadata={"format": FORMAT})


def save(
    result: Any,
    path: str | os.PathLike,
    *,
    metrics: dict[str, Any] | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
    source: dict[str, Any] | None = None,
    signing_key: Any = None,
) -> Path:
    """Write the artifact folder for a model or a slimkit result (anything with ``.model``).

    Args:
        metrics: stored in ``slimkit.json`` (a result's own ``.metrics`` is used when not given).
        extra_files: ``{name_in_folder: existing_path}`` copied in and hashed (ONNX file, report, plots); names are
            relative paths inside the folder, and a symbolic link is refused.
        source: ``{"factory": "pkg.mod:fn", "kwargs": {...}}`` for models not built by ``slimkit.models.create``
            (loading it then needs ``trust=["pkg.mod"]`` or a registered factory).
        signing_key: an Ed25519 private key (object, PEM bytes or PEM file) that signs ``slimkit.json``.

    Example:
        >>> slimkit.save(result, "out/m.slim", metrics={"accuracy": 91.2})   # doctest: +SKIP
    """
    model = _model_of(result)
    source = source or source_of(model) or hf_source(model)
    if source is None:
        raise ArtifactError(
            "save: the model does not say how to rebuild its architecture; build it with slimkit.models.create(...) "
            "or pass source={'factory': 'package.module:function', 'kwargs': {...}}"
        )
    history = history_of(model)
    tensors, packing = _packed_state(model, history)
    if metrics is None:
        metrics = getattr(result, "metrics", None)
    exported = getattr(result, "exported", None)  # a CompressResult's ONNX / torch.export file
    if exported is not None:
        extra_files = {Path(exported).name: exported, **(extra_files or {})}
    final = Path(path)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        _write_weights(tensors, tmp / WEIGHTS)
        _copy_in(tmp, extra_files, "save(extra_files=...)")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "slimkit_version": __version__,
            "torch_version": torch.__version__,
            "source": {"factory": source.get("factory"), "kwargs": source.get("kwargs") or {}},
            "history": history,
            "packing": packing,
            "metrics": metrics or {},
        }
        _write_manifest(tmp, manifest, signing_key)
    return final


def _copy_in(folder: Path, files: dict[str, str | os.PathLike] | None, where: str) -> None:
    """Copy ``{name: source_path}`` into ``folder``; names stay inside it and symbolic links are refused."""
    for name, src in (files or {}).items():
        relative = safe_name(name, where)
        if Path(src).is_symlink():
            raise ArtifactError(f"{where}: {src} (for {name!r}) is a symbolic link; pass the file it points to")
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.parent.resolve().is_relative_to(folder.resolve()) or target.is_symlink():
            raise ArtifactError(f"{where}: {name!r} would be written outside {folder.name} (through a link)")
        shutil.copyfile(src, target)


def _regular_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a relative POSIX name; any symbolic link is refused (never followed)."""
    names = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        for entry in sorted(dirs + files):
            path = Path(root) / entry
            if path.is_symlink():
                raise ArtifactError(
                    f"{path} is a symbolic link; an artifact holds only regular files and links are "
                    "never followed. Replace it with the file itself or remove it."
                )
            if entry in files:
                names.append(path.relative_to(folder).as_posix())
    return sorted(names)


def _write_manifest(folder: Path, manifest: dict[str, Any], signing_key: Any = None) -> None:
    manifest["files"] = {name: sha256(folder / name) for name in _regular_files(folder) if name not in RESERVED}
    data = (json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n").encode()
    validate(json.loads(data), f"{folder.name}/{MANIFEST}")  # never write what load would refuse
    (folder / MANIFEST).write_bytes(data)
    (folder / DIGEST).write_text(digest_line(data))
    if signing_key is not None:
        (folder / SIGNATURE).write_text(sign(data, signing_key))
    elif (folder / SIGNATURE).exists():
        (folder / SIGNATURE).unlink()  # the old signature covers the old bytes; keep no stale one


def read_manifest(path: str | os.PathLike, *, verify: bool = True, public_key: Any = None) -> dict[str, Any]:
    """Read and check ``slimkit.json`` of an artifact folder: digest (and signature), schema, names, file hashes.

    Args:
        verify: check every listed file's SHA-256 (the manifest's own digest and schema are always checked).
        public_key: an Ed25519 public key (object, PEM bytes or PEM file); the folder must then carry a valid
            ``slimkit.json.sig`` by its private key.

    Example:
        >>> read_manifest("out/lenet5.slim")["metrics"]     # doctest: +SKIP
    """
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not an artifact folder (it does not exist or is not a directory)")
    data = read_small(manifest_path)
    if data is None:
        raise ArtifactError(f"{manifest_path} is missing: {folder} is not a slimkit artifact")
    verify_digest(folder, data, public_key)
    try:
        manifest = json.loads(data, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc})") from None
    validate(manifest, str(manifest_path))
    if verify:
        present = set(_regular_files(folder))
        for name, expected in manifest["files"].items():
            file = folder / safe_name(name, f"{manifest_path}: files")
            if name not in present or not file.is_file():
                raise ArtifactError(f"{file} is listed in {MANIFEST} but missing")
            if sha256(file) != expected:
                raise ArtifactError(
                    f"{file} was modified after the artifact was written (SHA-256 mismatch); "
                    "refusing to load it. Re-export the artifact from its source."
                )
        if WEIGHTS not in manifest["files"]:
            raise ArtifactError(f"{manifest_path} lists no {WEIGHTS}")
    return manifest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def build_source(manifest: dict[str, Any], origin: Path, trust: Iterable[str] = ()) -> nn.Module:
    """The original (uncompressed) architecture a checked manifest names, built only from a trusted factory.

    Example:
        >>> folder = Path("out/lenet5.slim")
        >>> fresh = build_source(read_manifest(folder), folder / MANIFEST)   # doctest: +SKIP
    """
    factory = _trusted_factory(manifest, origin, _as_trust(trust))
    source = manifest["source"]
    with _field(origin, f"source (factory {source['factory']!r} with its kwargs)"):
        model = factory(**source["kwargs"])
    if not isinstance(model, nn.Module):
        raise ArtifactError(
            f"{origin}: source.factory {source['factory']!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _trusted_factory(manifest: dict[str, Any], manifest_path: Path, trust: Iterable[str]):
    """The factory the manifest names, if trusted; raises naming it and how to allow it. Imports nothing untrusted."""
    from slimkit.models import trusted_factory

    spec = manifest["source"]["factory"]
    try:
        factory = trusted_factory(spec, trust)
    except SlimkitError as exc:
        raise ArtifactError(f"{manifest_path}: source.factory {spec!r}: {exc}") from None
    if factory is not None:
        return factory
    module = spec.partition(":")[0]
    if ":" not in spec:
        raise ArtifactError(
            f"{manifest_path}: source.factory {spec!r} is not a slimkit zoo model nor registered in "
            "this process; import the package that registers it (slimkit.models.register) first"
        )
    if module.split(".")[0] == "transformers":
        raise ArtifactError(
            f"{manifest_path}: source.factory {spec!r} is a transformers function, which is not run; slimkit "
            f"saves transformers models as {HF_FACTORY!r} (a class transformers exports, built from its config). "
            f"If you trust this artifact's author, pass trust=[{spec!r}] (CLI: --trust {spec})"
        )
    raise ArtifactError(
        f"{manifest_path}: source.factory {spec!r} is not trusted, so it was not imported or run "
        "(an artifact may come from a stranger). If you trust its author, allow it with "
        f"trust=[{module!r}] (CLI: --trust {module}), or register the factory with "
        "slimkit.models.register before loading"
    )


def _as_trust(trust: Iterable[str] | str | None) -> list[str]:
    if trust is None:
        return []
    if isinstance(trust, str):
        return [trust]
    return [str(entry) for entry in trust]


def trusted_manifest(path: str | os.PathLike, *, trust: Iterable[str] = (), public_key: Any = None) -> dict[str, Any]:
    """``read_manifest`` plus the check that ``load`` may build its factory; builds and runs nothing.

    Example:
        >>> trusted_manifest("their.slim", trust=["theirpkg"])["source"]     # doctest: +SKIP
    """
    manifest = read_manifest(path, public_key=public_key)
    _trusted_factory(manifest, Path(path) / MANIFEST, _as_trust(trust))
    return manifest


@contextlib.contextmanager
def _field(origin: Path, field: str) -> Iterator[None]:
    """Turn an error that manifest data caused in torch / safetensors / a replay into an ArtifactError naming it."""
    try:
        yield
    except ArtifactError:
        raise
    except _BAD_DATA as exc:
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ArtifactError(
            f"{origin}: {field} does not fit the model it builds ({message}); the artifact is "
            "inconsistent, re-export it from its source"
        ) from exc


def load(path: str | os.PathLike, *, trust: Iterable[str] = (), public_key: Any = None) -> nn.Module:
    """Rebuild the model of an artifact folder: check the manifest and hashes, build, replay, load the weights.

    Args:
        trust: modules (``"mypkg.models"``, prefixes) or exact factories (``"mypkg.models:build"``) the artifact's
            ``source.factory`` may name besides slimkit's zoo and factories registered in this process.
        public_key: require ``slimkit.json.sig`` and verify it with this Ed25519 public key.

    Example:
        >>> model = slimkit.load("out/lenet5.slim")                           # doctest: +SKIP
        >>> model = slimkit.load("their.slim", trust=["theirpkg.models"])     # doctest: +SKIP
    """
    from slimkit.models.weights import load_state

    folder = Path(path)
    origin = folder / MANIFEST
    manifest = read_manifest(folder, public_key=public_key)
    source = manifest["source"]
    model = build_source(manifest, origin, trust)
    for index, step in enumerate(manifest["history"]):
        with _field(origin, f"history[{index}] ({step['kind']})"):
            model = replay_step(model, step)
    setattr(model, HISTORY_ATTR, manifest["history"])
    with _field(folder / WEIGHTS, "the file"):
        tensors = load_file(str(folder / WEIGHTS))
    if manifest["packing"] is not None:
        from slimkit.quantization import unpack_state_dict

        _check_packing(model, tensors, manifest["packing"], origin)
        saved_dtype = _float_dtype(tensors)
        with _field(origin, "packing"):
            unpacked = unpack_state_dict(tensors, manifest["packing"])
        if saved_dtype is not None:  # codes dequantize in float32: give the weights the model's own float dtype
            unpacked = {
                k: v.to(saved_dtype) if k not in tensors and _is_weight(k, v) else v for k, v in unpacked.items()
            }
        tensors = unpacked
    with _field(origin, f"the tensors of {WEIGHTS}"):
        _match_float_dtypes(model, tensors)
        load_state(model, tensors, str(folder / WEIGHTS))
    set_source(model, source["factory"], source["kwargs"])
    model.slimkit_metrics = manifest["metrics"]
    return model.eval()


def _is_weight(key: str, tensor: torch.Tensor) -> bool:
    """A float tensor of the model itself, not a quantizer's scale or zero point (those stay float32)."""
    return tensor.is_floating_point() and not key.endswith(("scale", "zero_point"))


def _float_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The one float dtype of the saved weights and biases, if they agree."""
    dtypes = {t.dtype for k, t in tensors.items() if _is_weight(k, t)}
    return dtypes.pop() if len(dtypes) == 1 else None


def _match_float_dtypes(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give each float parameter and buffer the dtype it was saved in (a float64 model comes back float64).

    The factory builds float32; the file says what the saved model held. Parameters are converted in place, so
    weights shared by several layers stay one tensor.
    """
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for slots in (module._parameters, module._buffers):
            for name, value in slots.items():
                stored = tensors.get(prefix + name)
                if value is None or stored is None or not (value.is_floating_point() and stored.is_floating_point()):
                    continue
                if value.dtype != stored.dtype:
                    value.data = value.data.to(stored.dtype)


def _check_packing(model: nn.Module, tensors: dict[str, torch.Tensor], packing: dict[str, Any], origin: Path) -> None:
    """Refuse packing metadata that does not match the rebuilt model and the weights file (never unpack garbage)."""
    from slimkit.quantization.fake import QuantConv2d, QuantLinear
    from slimkit.quantization.pack import PACK_VERSION, code_layout

    if packing["version"] != PACK_VERSION:
        raise ArtifactError(
            f"{origin}: packing.version {packing['version']!r} is not supported (expected "
            f"{PACK_VERSION}); upgrade slimkit or re-export the artifact"
        )
    own = model.state_dict()
    for key, tensor in tensors.items():
        if key in own and tuple(tensor.shape) != tuple(own[key].shape):
            raise ArtifactError(
                f"{origin}: {WEIGHTS} tensor {key!r} has shape {tuple(tensor.shape)} but the model "
                f"rebuilt from source and history expects {tuple(own[key].shape)}"
            )
    for key, shape in packing["zeros"].items():
        field = f"packing.zeros.{key}"
        if not key.endswith("zero_point") or key not in own or key in tensors:
            raise ArtifactError(f"{origin}: {field} is not a zero-point buffer of the model missing from {WEIGHTS}")
        if shape != list(own[key].shape):
            raise ArtifactError(f"{origin}: {field} has shape {shape} but the model's is {list(own[key].shape)}")
    for name, info in packing["layers"].items():
        field = f"packing.layers.{name}"
        try:
            layer = model.get_submodule(name) if name else None
        except AttributeError:
            layer = None
        if not isinstance(layer, QuantLinear | QuantConv2d) or f"{name}.weight" not in own:
            raise ArtifactError(f"{origin}: {field} names no quantized layer of the rebuilt model")
        with _field(origin, field), torch.no_grad():
            expected = code_layout(layer)
        for key, value in expected.items():
            if info[key] != value:
                raise ArtifactError(f"{origin}: {field}.{key} is {info[key]!r} but the rebuilt layer stores {value!r}")
        codes = tensors.get(f"{name}.weight.codes")
        needed = math.ceil(math.prod(info["codes_shape"]) / (8 // info["width"]))
        if codes is None or codes.dtype != torch.uint8 or codes.ndim != 1 or codes.numel() != needed:
            raise ArtifactError(
                f"{origin}: {field} needs a 1-D uint8 tensor {name}.weight.codes of {needed} bytes in "
                f"{WEIGHTS}; the file does not hold one"
            )
        for part in ("scale", "zero_point"):
            key = f"{name}.weight_quant.{part}"
            if key not in tensors and key not in packing["zeros"]:
                raise ArtifactError(f"{origin}: {field}: {WEIGHTS} has no {key!r} (nor packing.zeros)")


def update(
    path: str | os.PathLike,
    *,
    files: dict[str, str | os.PathLike] | None = None,
    metrics: dict[str, Any] | None = None,
    signing_key: Any = None,
) -> Path:
    """Add files (e.g. ``model.onnx``, a report) or metrics to an existing artifact, atomically, re-hashing all.

    A signature is kept valid only by passing ``signing_key`` again; otherwise the stale one is removed.

    Example:
        >>> update("out/m.slim", files={"model.onnx": "tmp/model.onnx"})   # doctest: +SKIP
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    with atomic_path(folder) as tmp:
        shutil.copytree(folder, tmp, symlinks=True)  # links are copied as links (never followed), then refused
        _copy_in(tmp, files, "update(files=...)")
        if metrics:
            manifest["metrics"] = {**manifest["metrics"], **metrics}
        _write_manifest(tmp, manifest, signing_key)
    return folder
