"""The slimkit artifact: a folder that rebuilds a compressed model anywhere, without pickle.

Layout (written atomically: a temporary folder, then one rename)::

    model.safetensors   weights; quantized layers as packed integer codes + scales (really smaller files)
    slimkit.json        format version, the factory that builds the architecture (+ kwargs), the ordered history of
                        structural edits (pruning's kept channels, quantization's per-layer spec), packing metadata,
                        metrics, and the SHA-256 of every other file
    model.onnx          optional: fp32 or QDQ int8 (``slimkit export``)
    report.md/.html     optional: the before/after report with PNG plots

``load`` verifies every hash first (a tampered file is refused), calls the factory, replays the history, then loads
the weights strictly, so outputs are bit-identical to the saved model.

Example:
    >>> result = slimkit.prune(model, slimkit.PruneConfig(amount=0.5), x)   # doctest: +SKIP
    >>> slimkit.save(result, "out/lenet5.slim")                              # doctest: +SKIP
    >>> model = slimkit.load("out/lenet5.slim")                              # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit import __version__
from slimkit._io import atomic_path
from slimkit.errors import InputTypeError, UsageError
from slimkit.history import history_of, replay, source_of

FORMAT = "slimkit-artifact"
FORMAT_VERSION = 1
MANIFEST = "slimkit.json"
WEIGHTS = "model.safetensors"

__all__ = ["ArtifactError", "load", "read_manifest", "save", "update", "weights_size"]


class ArtifactError(UsageError):
    """An artifact folder that cannot be written or trusted; the message names the file."""


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
    if any(step["kind"] == "quantize" for step in history):
        from slimkit.quantization import pack_state_dict

        return pack_state_dict(model)
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, None


def _write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": FORMAT})


def weights_size(model: nn.Module) -> int:
    """Bytes of the ``model.safetensors`` that ``save`` would write (quantized layers as packed codes)."""
    import tempfile

    tensors, _ = _packed_state(model, history_of(model))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS
        _write_weights(tensors, path)
        return path.stat().st_size


def save(
    result: Any,
    path: str | os.PathLike,
    *,
    metrics: dict[str, Any] | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write the artifact folder for a model or a slimkit result (anything with ``.model``).

    Args:
        metrics: stored in ``slimkit.json`` (a result's own ``.metrics`` is used when not given).
        extra_files: ``{name_in_folder: existing_path}`` copied in and hashed (ONNX file, report, plots).
        source: ``{"factory": "pkg.mod:fn", "kwargs": {...}}`` for models not built by ``slimkit.models.create``.
    """
    model = _model_of(result)
    source = source or source_of(model)
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
        for name, src in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "slimkit_version": __version__,
            "torch_version": torch.__version__,
            "source": source,
            "history": history,
            "packing": packing,
            "metrics": metrics or {},
        }
        _write_manifest(tmp, manifest)
    return final


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest["files"] = {str(p.relative_to(folder)): sha256(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")


def read_manifest(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Read ``slimkit.json`` of an artifact folder, checking format and (by default) every file's SHA-256."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not an artifact folder (it does not exist or is not a directory)")
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path} is missing: {folder} is not a slimkit artifact")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: not a slimkit artifact (format={manifest.get('format')!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path}: format version {manifest['format_version']} is newer than this "
                            f"slimkit reads ({FORMAT_VERSION}); upgrade slimkit")
    if verify:
        for name, expected in manifest.get("files", {}).items():
            file = folder / name
            if not file.is_file():
                raise ArtifactError(f"{file} is listed in {MANIFEST} but missing")
            if sha256(file) != expected:
                raise ArtifactError(f"{file} was modified after the artifact was written (SHA-256 mismatch); "
                                    "refusing to load it. Re-export the artifact from its source.")
        if WEIGHTS not in manifest.get("files", {}):
            raise ArtifactError(f"{manifest_path} lists no {WEIGHTS}")
    return manifest


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model of an artifact folder: verify hashes, build, replay the history, load the weights."""
    from slimkit.models import create
    from slimkit.models.weights import load_state

    folder = Path(path)
    manifest = read_manifest(folder)
    source = manifest["source"]
    model = create(source["factory"], **source.get("kwargs", {}))
    model = replay(model, manifest.get("history", []))
    tensors = load_file(str(folder / WEIGHTS))
    if manifest.get("packing") is not None:
        from slimkit.quantization import unpack_state_dict

        tensors = unpack_state_dict(tensors, manifest["packing"])
    load_state(model, tensors, str(folder / WEIGHTS))
    model.slimkit_source = source
    model.slimkit_metrics = manifest.get("metrics", {})
    return model.eval()


def update(path: str | os.PathLike, *, files: dict[str, str | os.PathLike] | None = None,
           metrics: dict[str, Any] | None = None) -> Path:
    """Add files (e.g. ``model.onnx``, a report) or metrics to an existing artifact, atomically, re-hashing all."""
    folder = Path(path)
    manifest = read_manifest(folder)
    with atomic_path(folder) as tmp:
        shutil.copytree(folder, tmp)
        for name, src in (files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        if metrics:
            manifest["metrics"] = {**manifest.get("metrics", {}), **metrics}
        _write_manifest(tmp, manifest)
    return folder
