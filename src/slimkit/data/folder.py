"""``folder:PATH`` — ImageFolder trees through torchvision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from slimkit.data.arrays import DataError
from slimkit.errors import MissingFileError


def load_folder(path: Path, *, seed: int) -> tuple[Dataset, Dataset]:
    """``PATH/train`` + ``PATH/test`` (or ``PATH/val``) when present, else one class-per-folder tree split 80/20.

    An image file that does not decode raises ``DataError`` naming it when it is first read; test class folders
    must be training classes (the test labels are mapped to the training indices).
    """
    try:
        from torchvision import transforms
    except ImportError as exc:
        raise DataError("folder: data specs need torchvision: pip install 'slimkit[vision]'") from exc
    if not path.is_dir():
        raise MissingFileError(f"image folder {path} does not exist")
    transform = transforms.ToTensor()
    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        train = _image_folder(path / "train", transform)
        return train, _align_classes(_image_folder(test_dir, transform), train, test_dir)
    full = _image_folder(path, transform)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = round(0.8 * len(full))
    return Subset(full, order[:cut]), Subset(full, order[cut:])


def read_image(path: str) -> Any:
    """torchvision's image loader; a file that does not decode raises ``DataError`` naming it."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for damaged or non-image files
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path}: not a readable image ({reason}); replace or delete the file") from exc


def _image_folder(root: Path, transform: Any) -> Any:
    from torchvision import datasets

    try:
        return datasets.ImageFolder(str(root), transform=transform, loader=read_image)
    except FileNotFoundError as exc:  # no class folders, or a class folder without images
        raise DataError(f"{root}: not an image tree of one folder per class ({' '.join(str(exc).split())})") from exc


def _align_classes(test: Any, train: Any, test_dir: Path) -> Any:
    """Give ``test`` the training class indices (a test tree may lack a class; it may not add one)."""
    if test.classes == train.classes:
        return test
    extra = sorted(set(test.classes) - set(train.classes))
    if extra:
        raise DataError(
            f"{test_dir / extra[0]}: class {extra[0]!r} has no folder in the training tree; "
            f"training classes: {', '.join(train.classes)}"
        )
    index = {test.class_to_idx[c]: train.class_to_idx[c] for c in test.classes}
    test.samples = [(file, index[target]) for file, target in test.samples]
    test.imgs, test.targets = test.samples, [target for _, target in test.samples]
    test.classes, test.class_to_idx = train.classes, train.class_to_idx
    return test
