"""Save and reload search results: ``<folder>/model/`` (the pickle-free slimkit artifact) + ``result.json``
(trial number, plan, metrics, objectives, feasibility), written atomically as one folder."""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from slimkit._io import atomic_path
from slimkit.errors import MissingFileError, UsageError

__all__ = ["RESULT_FILE", "load_model", "read_result", "save_result"]

RESULT_FILE = "result.json"


def save_result(model: nn.Module, folder: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Write ``model`` and ``info`` (JSON-safe) to ``folder`` atomically; an older result folder is replaced whole,
    any other existing folder is refused (``UsageError``)."""
    from slimkit.export.artifact import ArtifactError, save

    final = Path(folder)
    with atomic_path(final, kind="result") as tmp:
        tmp.mkdir()
        try:
            save(model, tmp / "model", metrics=info.get("metrics"))
            kind = "artifact"
        except ArtifactError:
            # a model slimkit cannot rebuild by itself (no factory): keep its weights; reload needs a template
            from slimkit.models.weights import save_weights

            (tmp / "model").mkdir()
            save_weights(model, tmp / "model" / "model.safetensors")
            kind = "weights"
        (tmp / RESULT_FILE).write_text(json.dumps({**info, "model_format": kind}, indent=1, default=str) + "\n")
    return final


def copy_result(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a saved result folder atomically (replacing an older result at ``dst``, never another folder)."""
    with atomic_path(dst, kind="result") as tmp:
        shutil.copytree(src, tmp)
    return Path(dst)


def read_result(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / RESULT_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist: {folder} is not a saved search result")
    return json.loads(path.read_text())


def load_model(folder: str | os.PathLike, template: nn.Module | None = None, *, trust: Iterable[str] = ()) -> nn.Module:
    """Rebuild the saved model (``template``: the input model, needed only for models without a factory).

    ``trust``: modules (or ``module:function``) the artifact's factory may come from besides the zoo and factories
    registered or created in this process, as for ``slimkit.load``.

    Example:
        >>> model = load_model("runs/search/best", trust=["mypkg.models"])   # doctest: +SKIP
    """
    folder = Path(folder)
    info = read_result(folder)
    if info.get("model_format") == "artifact":
        from slimkit.export.artifact import load

        return load(folder / "model", trust=trust)
    if template is None:
        raise UsageError(
            f"{folder}: the model was saved as weights only (it has no slimkit factory); pass the "
            "original model as template to load it"
        )
    from slimkit.models.weights import load_weights

    model = copy.deepcopy(template)
    return load_weights(model, folder / "model" / "model.safetensors").eval()
