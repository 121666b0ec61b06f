"""``folder:PATH`` — ImageFolder trees through torchvision."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from slimkit.errors import MissingFileError, UsageError


def load_folder(path: Path, *, seed: int) -> tuple[Dataset, Dataset]:
    """``PATH/train`` + ``PATH/test`` (or ``PATH/val``) when present, else one class-per-folder tree split 80/20."""
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise UsageError("folder: data specs need torchvision: pip install 'slimkit[vision]'") from exc
    if not path.is_dir():
        raise MissingFileError(f"image folder {path} does not exist")
    transform = transforms.ToTensor()
    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        return (
            datasets.ImageFolder(str(path / "train"), transform=transform),
            datasets.ImageFolder(str(test_dir), transform=transform),
        )
    full = datasets.ImageFolder(str(path), transform=transform)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = round(0.8 * len(full))
    return Subset(full, order[:cut]), Subset(full, order[cut:])
