"""In-memory image datasets: the ``ArrayDataset`` type, ``.npz`` files, deterministic splits, reshaping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from slimkit.errors import MissingFileError, UsageError


class DataError(UsageError):
    """A data spec that cannot be loaded; the message says what exists or how to get the data."""


def check_labels(y: np.ndarray, source: str, num_classes: int | None = None) -> torch.Tensor:
    """Labels as int64 ``(N,)`` class indices; ``DataError`` naming ``source`` and the first bad row unless every
    label is an integer in ``[0, num_classes)`` (``num_classes=None``: only ``>= 0``)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"{source}: labels must be one class index per image, shape (N,); got shape {y.shape} "
            "(one-hot labels: take argmax(axis=1))"
        )
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            raise DataError(f"{source}: row {bad[0]}: label {y[bad[0]].item()!r} is not an integer class index")
    elif y.dtype.kind not in "iub":
        raise DataError(f"{source}: labels must be integer class indices, got dtype {y.dtype}")
    outside = y < 0 if num_classes is None else (y < 0) | (y >= num_classes)
    bad = np.flatnonzero(outside)
    if len(bad):
        allowed = ">= 0" if num_classes is None else f"in [0, {num_classes})"
        raise DataError(f"{source}: row {bad[0]}: label {y[bad[0]].item()!r} is not a class index {allowed}")
    return torch.from_numpy(y.astype(np.int64))


def check_finite(x: np.ndarray, source: str) -> None:
    """``DataError`` naming ``source`` and the first row holding NaN or infinity (only float arrays can)."""
    if x.dtype.kind not in "fc" or np.isfinite(x).all():
        return
    row = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
    raise DataError(f"{source}: row {row}: the image holds NaN or infinity; clean or drop it")


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
    if x.ndim < 2 or x.dtype.kind not in "biuf":
        raise DataError(
            f"{source}: images must be a numeric array (N,H,W), (N,H,W,C), (N,C,H,W) or (N,F); got "
            f"shape {x.shape}, dtype {x.dtype}"
        )
    check_finite(x, source)
    if x.ndim == 2:  # already flat features: (N, F) -> keep as is
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DataError(f"{source}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W); got shape {x.shape}")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / scale)


def arrays_to_datasets(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    *,
    seed: int,
    name: str,
    keys: tuple[str, str, str, str] = ("x_train", "y_train", "x_test", "y_test"),
    num_classes: int | None = None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Wrap arrays as datasets; without a test set, split 80/20 with a generator seeded by ``seed``.

    Images must be finite and labels integers in ``[0, num_classes)`` (test labels: among the training classes);
    errors name ``name``, the array (``keys``) and the first bad row.
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} images but {len(y)} labels")
    images, labels = _as_nchw(x, f"{name} {keys[0]}"), check_labels(y, f"{name} {keys[1]}", num_classes)
    if x_test is None:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        cut = round(0.8 * len(images))
        tr, te = order[:cut], order[cut:]
        return (
            ArrayDataset(images[tr], labels[tr], f"{name}/train"),
            ArrayDataset(images[te], labels[te], f"{name}/test"),
        )
    x_test, y_test = np.asarray(x_test), np.asarray(y_test)
    if len(x_test) != len(y_test):
        raise DataError(f"{name}: {len(x_test)} test images but {len(y_test)} test labels")
    classes = num_classes if num_classes is not None else (int(labels.max()) + 1 if len(labels) else None)
    test_images = _as_nchw(x_test, f"{name} {keys[2]}")
    test_labels = check_labels(y_test, f"{name} {keys[3]}", classes)
    return ArrayDataset(images, labels, f"{name}/train"), ArrayDataset(test_images, test_labels, f"{name}/test")


def load_npz(path: Path, *, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Read ``x_train, y_train[, x_test, y_test]`` or ``x|images, y|labels`` from an ``.npz`` file."""
    if not path.is_file():
        raise MissingFileError(f"npz data file {path} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single array, not an .npz archive; save it with np.savez(path, x=..., y=...)")
    with npz:
        keys = set(npz.files)
        if {"x_train", "y_train"} <= keys:
            x, y = _read(npz, "x_train", path), _read(npz, "y_train", path)
            has_test = {"x_test", "y_test"} <= keys  # a test split needs both images and labels
            x_test = _read(npz, "x_test", path) if has_test else None
            y_test = _read(npz, "y_test", path) if has_test else None
            return arrays_to_datasets(x, y, x_test, y_test, seed=seed, name=path.name)
        x_key = next((k for k in ("x", "images", "X") if k in keys), None)
        y_key = next((k for k in ("y", "labels", "Y") if k in keys), None)
        if x_key is None or y_key is None:
            raise DataError(
                f"{path}: expected arrays x_train/y_train[/x_test/y_test] or x/y or images/labels; found {sorted(keys)}"
            )
        return arrays_to_datasets(
            _read(npz, x_key, path),
            _read(npz, y_key, path),
            None,
            None,
            seed=seed,
            name=path.name,
            keys=(x_key, y_key, "", ""),
        )


def _read(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except Exception as exc:  # object arrays (pickles are refused), a damaged member
        raise DataError(
            f"{path}: array {key!r} cannot be read ({' '.join(str(exc).split())}); store plain numeric arrays"
        ) from exc


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
