"""In-memory image datasets: the ``ArrayDataset`` type, ``.npz`` files, deterministic splits, reshaping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from slimkit.errors import MissingFileError, UsageError


class ArrayDataset(TensorDataset):
    """A ``TensorDataset`` of images ``(N, C, H, W)`` float32 and labels ``(N,)`` int64, with a name."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str = "data") -> None:
        super().__init__(images, labels)
        self.images, self.labels, self.name = images, labels, name

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def subset(self, n: int) -> ArrayDataset:
        """The first ``n`` examples (already shuffled specs make this a fair sample)."""
        return ArrayDataset(self.images[:n], self.labels[:n], f"{self.name}[:{n}]")

    def __repr__(self) -> str:
        return f"ArrayDataset({self.name!r}, n={len(self)}, shape={self.input_shape}, classes={self.num_classes})"


def _as_nchw(x: np.ndarray, source: str) -> torch.Tensor:
    if x.ndim == 2:  # already flat features: (N, F) -> keep as is
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise UsageError(f"{source}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W); got shape {x.shape}")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / scale)


def arrays_to_datasets(
    x: np.ndarray, y: np.ndarray, x_test: np.ndarray | None, y_test: np.ndarray | None, *, seed: int, name: str
) -> tuple[ArrayDataset, ArrayDataset]:
    """Wrap arrays as datasets; without a test set, split 80/20 with a generator seeded by ``seed``."""
    if len(x) != len(y):
        raise UsageError(f"{name}: {len(x)} images but {len(y)} labels")
    images, labels = _as_nchw(np.asarray(x), name), torch.as_tensor(np.asarray(y), dtype=torch.int64)
    if x_test is None:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        cut = round(0.8 * len(images))
        tr, te = order[:cut], order[cut:]
        return (
            ArrayDataset(images[tr], labels[tr], f"{name}/train"),
            ArrayDataset(images[te], labels[te], f"{name}/test"),
        )
    test_images = _as_nchw(np.asarray(x_test), name)
    test_labels = torch.as_tensor(np.asarray(y_test), dtype=torch.int64)
    return ArrayDataset(images, labels, f"{name}/train"), ArrayDataset(test_images, test_labels, f"{name}/test")


def load_npz(path: Path, *, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Read ``x_train, y_train[, x_test, y_test]`` or ``x|images, y|labels`` from an ``.npz`` file."""
    if not path.is_file():
        raise MissingFileError(f"npz data file {path} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UsageError(f"{path}: not a readable .npz file ({exc})") from exc
    with npz:
        keys = set(npz.files)
        if {"x_train", "y_train"} <= keys:
            has_test = {"x_test", "y_test"} <= keys
            return arrays_to_datasets(
                npz["x_train"], npz["y_train"],
                npz["x_test"] if has_test else None, npz["y_test"] if has_test else None,
                seed=seed, name=path.name,
            )
        x_key = next((k for k in ("x", "images", "X") if k in keys), None)
        y_key = next((k for k in ("y", "labels", "Y") if k in keys), None)
        if x_key is None or y_key is None:
            raise UsageError(
                f"{path}: expected arrays x_train/y_train[/x_test/y_test] or x/y or images/labels; "
                f"found {sorted(keys)}"
            )
        return arrays_to_datasets(npz[x_key], npz[y_key], None, None, seed=seed, name=path.name)


def reshape_images(data: ArrayDataset, shape: tuple[int, int, int]) -> ArrayDataset:
    """Resize (bilinear) and repeat channels so images become ``shape`` = ``(C, H, W)``."""
    channels, height, width = shape
    x = data.images
    if x.ndim != 4:
        raise UsageError(f"{data.name}: shape= needs image data (N,C,H,W), got {tuple(x.shape)}")
    if tuple(x.shape[2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    if x.shape[1] != channels:
        if x.shape[1] != 1:
            raise UsageError(f"{data.name}: cannot turn {x.shape[1]} channels into {channels}")
        x = x.repeat(1, channels, 1, 1)
    return ArrayDataset(x.contiguous(), data.labels, f"{data.name}@{channels}x{height}x{width}")
