"""Load and save model weights safely: safetensors, or torch checkpoints with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit._io import atomic_path
from slimkit.errors import UsageError


class WeightsError(UsageError):
    """A weights file that cannot be used; the message names the file and the problem."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors`` or a torch checkpoint, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a valid safetensors file ({exc})") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{path}: cannot be read as a torch checkpoint with weights_only=True ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Save a state_dict or use .safetensors."
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state_dict (name -> tensor), got {type(obj).__name__}")
    return obj


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights into ``model`` in place; names and shapes must match exactly.

    Raises:
        WeightsError: naming the file and the first missing, unexpected or mis-shaped tensor.
    """
    return load_state(model, read_state_dict(path), str(path))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> nn.Module:
    """Strictly load ``state`` into ``model``; errors name ``origin`` and the first mismatching tensor."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise WeightsError(f"{origin}: missing tensor {name!r} (model expects shape {tuple(tensor.shape)})")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{origin}: tensor {name!r} has shape {tuple(state[name].shape)} in the file but "
                f"{tuple(tensor.shape)} in the model"
            )
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise WeightsError(f"{origin}: unexpected tensors not in the model: {', '.join(unexpected[:5])}")
    model.load_state_dict(state)
    return model


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save ``model.state_dict()`` to ``path`` as safetensors, atomically; an existing folder at ``path`` is refused.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp(), "mlp.safetensors")
        >>> save_weights(nn.Linear(4, 2), path) == path, load_weights(nn.Linear(4, 2), path).weight.shape
        (True, torch.Size([2, 4]))
    """
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path, kind="file") as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)
