"""Datasets by spec string: the same names in the API and the CLI.

Specs:

- ``mnist10k`` — 10,000 real MNIST digits bundled with slimkit (8,000 train / 2,000 test), no network.
- ``digits`` — scikit-learn's 8x8 digits (1,797 images; 80/20 split by seed), no network.
- ``mnist``, ``fashion-mnist``, ``cifar10`` — the full torchvision datasets (needs the ``vision`` extra and a
  network the first time, or the files already in ``root``).
- ``npz:PATH`` — your own arrays; ``folder:PATH`` — an ImageFolder tree (``train/`` and ``test/`` or ``val/``
  subfolders, or one tree split by seed).
- ``text:stdlib`` — about 3,200 English sentences from the docstrings of Python's standard library
  (``slimkit.data.text.stdlib_sentences``, PSF licence, on every machine); ``text:PATH`` — a UTF-8 file with one
  sentence per line. Both need ``tokenizer=`` (a tokenizer object, or the path of a local folder holding one,
  read with ``transformers.AutoTokenizer`` without any download) and give ``TextDataset``s of dict examples
  (``input_ids``, ``attention_mask``, ...) padded to ``max_length``, without labels; the split is 80/20 by seed.

Example:
    >>> train, test = load("mnist10k")
    >>> len(train), len(test), tuple(train[0][0].shape)
    (8000, 2000, (1, 28, 28))
    >>> train32, _ = load("mnist10k", shape=(3, 32, 32))   # CIFAR-shaped, for AlexNet/ResNet offline
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from slimkit.config import nearest
from slimkit.data.arrays import ArrayDataset, DataError, arrays_to_datasets, check_labels, load_npz, reshape_images
from slimkit.errors import UsageError

__all__ = ["SPECS", "ArrayDataset", "DataError", "default_root", "load", "split"]

TEXT_TEST_FRACTION = 0.2

BUNDLED = Path(__file__).with_name("mnist10k.npz")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def default_root() -> Path:
    """Where torchvision datasets are looked for: ``$SLIMKIT_DATA`` or ``~/.cache/slimkit/data``."""
    return Path(os.environ.get("SLIMKIT_DATA", Path.home() / ".cache" / "slimkit" / "data"))


def _mnist10k(seed: int, **_: object) -> tuple[ArrayDataset, ArrayDataset]:
    with np.load(BUNDLED) as npz:
        images, labels = npz["images"], npz["labels"]
    x = (images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    x = torch.from_numpy(x).unsqueeze(1)
    y = check_labels(labels, f"{BUNDLED.name} labels", 10)
    return ArrayDataset(x[:8000], y[:8000], "mnist10k/train"), ArrayDataset(x[8000:], y[8000:], "mnist10k/test")


def _digits(seed: int, **_: object) -> tuple[ArrayDataset, ArrayDataset]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32) / 16.0
    x = (x - x.mean()) / x.std()
    return arrays_to_datasets(
        x, bunch.target, None, None, seed=seed, name="digits", keys=("images", "target", "", ""), num_classes=10
    )


def _torchvision(name: str) -> Callable[..., tuple[Dataset, Dataset]]:
    def loader(seed: int, root: str | os.PathLike | None = None, download: bool = True, **_: object):
        try:
            from torchvision import datasets, transforms
        except ImportError as exc:
            raise DataError(f"data spec {name!r} needs torchvision: pip install 'slimkit[vision]'") from exc
        cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
        stats = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}.get(
            name, ((MNIST_MEAN,), (MNIST_STD,))
        )
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*stats)])
        folder = Path(root) if root is not None else default_root()
        try:
            train = cls(str(folder), train=True, download=download, transform=transform)
            test = cls(str(folder), train=False, download=download, transform=transform)
        except Exception as exc:  # torchvision raises RuntimeError or URLError subclasses
            raise DataError(
                f"could not load {name!r} from {folder} ({exc}). With a network, rerun to download it there "
                f"(or set $SLIMKIT_DATA); offline, copy the torchvision {cls.__name__} files into {folder}, or use "
                "the bundled spec 'mnist10k' (add shape=(3, 32, 32) / --shape 3x32x32 for CIFAR-shaped models)."
            ) from exc
        return train, test

    return loader


def _npz(path: str, seed: int, **_: object) -> tuple[ArrayDataset, ArrayDataset]:
    return load_npz(Path(path), seed=seed)


def _folder(path: str, seed: int, **_: object) -> tuple[Dataset, Dataset]:
    from slimkit.data.folder import load_folder

    return load_folder(Path(path), seed=seed)


SPECS: dict[str, Callable[..., tuple[Dataset, Dataset]]] = {
    "mnist10k": _mnist10k,
    "digits": _digits,
    "mnist": _torchvision("mnist"),
    "fashion-mnist": _torchvision("fashion-mnist"),
    "cifar10": _torchvision("cifar10"),
}
PATH_SPECS = {"npz": _npz, "folder": _folder}


def _tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as given, or one read from a local folder (never downloaded)."""
    if tokenizer is None:
        raise DataError(
            "text data specs need tokenizer=: a tokenizer (e.g. transformers.AutoTokenizer.from_pretrained(folder)) "
            "or the path of a local folder holding one"
        )
    if not isinstance(tokenizer, (str, os.PathLike)):
        if not callable(tokenizer):
            raise DataError(f"tokenizer must be callable like a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        return tokenizer
    folder = Path(tokenizer)
    if not folder.is_dir():
        raise DataError(
            f"tokenizer={str(tokenizer)!r} is not a local folder; give a folder holding tokenizer files "
            "(slimkit never downloads at run time) or a tokenizer object"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise DataError(f"reading the tokenizer in {folder} needs transformers: pip install transformers") from exc
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)  # nosec B615: a local folder, no hub
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"no tokenizer could be read from {folder}: {first}") from exc


def _text(source: str, seed: int, tokenizer: Any = None, max_length: int = 128, **_: object) -> tuple[Dataset, Dataset]:
    from slimkit.data.text import TextDataset, read_sentences, stdlib_sentences

    tok = _tokenizer(tokenizer)
    sentences = stdlib_sentences() if source == "stdlib" else read_sentences(source)
    if len(sentences) < 2:
        raise DataError(f"text:{source} has {len(sentences)} sentence; a train/test split needs at least 2")
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = len(sentences) - max(1, round(TEXT_TEST_FRACTION * len(sentences)))
    train = TextDataset([sentences[i] for i in order[:cut]], tok, max_length=max_length)
    test = TextDataset([sentences[i] for i in order[cut:]], tok, max_length=max_length)
    return train, test


def load(
    spec: str,
    *,
    shape: tuple[int, int, int] | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    download: bool = True,
    tokenizer: Any = None,
    max_length: int = 128,
) -> tuple[Dataset, Dataset]:
    """Load ``(train, test)`` torch Datasets for a data spec.

    Args:
        spec: ``mnist10k``, ``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``, ``npz:PATH``, ``folder:PATH``,
            ``text:stdlib`` or ``text:PATH``.
        shape: present images as ``(C, H, W)`` (bilinear resize, channels repeated), e.g. ``(3, 32, 32)`` to
            train CIFAR-shaped models on MNIST offline. Only for in-memory specs.
        seed: fixes the train/test split where the spec has none of its own.
        root, download: where torchvision datasets live, and whether they may be downloaded.
        tokenizer, max_length: for ``text:`` specs, the tokenizer (an object, or a local folder read with
            ``AutoTokenizer``, offline) and the padded length of each example.

    Example:
        >>> train, test = load("text:stdlib", tokenizer="path/to/tokenizer-folder")  # doctest: +SKIP
        >>> sorted(train[0])                                                         # doctest: +SKIP
        ['attention_mask', 'input_ids', 'token_type_ids']
    """
    prefix, _, rest = spec.partition(":")
    if prefix != "text" and (tokenizer is not None or max_length != 128):
        raise DataError(f"tokenizer= and max_length= are for text: specs, not {spec!r}")
    if rest and prefix == "text":
        train, test = _text(rest, seed=seed, tokenizer=tokenizer, max_length=max_length)
    elif rest and prefix in PATH_SPECS:
        train, test = PATH_SPECS[prefix](rest, seed=seed)
    elif spec in SPECS:
        train, test = SPECS[spec](seed=seed, root=root, download=download)
    else:
        valid = [*SPECS, *(f"{p}:PATH" for p in PATH_SPECS), "text:stdlib", "text:PATH"]
        raise DataError(f"unknown data spec {spec!r}; {nearest(spec, valid)}")
    if shape is not None:
        if not isinstance(train, ArrayDataset) or not isinstance(test, ArrayDataset):
            raise DataError(f"shape= works on in-memory specs (mnist10k, digits, npz:), not {spec!r}")
        train, test = reshape_images(train, shape), reshape_images(test, shape)
    return train, test


def split(data: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split off ``fraction`` of ``data`` (seeded) as a validation set: ``(rest, held_out)``.

    Use the held-out part for model selection and accuracy budgets, and keep the test split for reporting only.

    Example:
        >>> train, test = load("mnist10k")
        >>> train, val = split(train, 0.125)          # 7,000 / 1,000
        >>> len(train), len(val)
        (7000, 1000)
    """
    if not 0 < fraction < 1:
        raise UsageError(f"fraction={fraction} must be in (0, 1)")
    if not isinstance(data, Sized):
        raise UsageError(f"split needs a dataset with a length (map-style), got {type(data).__name__}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    cut = len(data) - max(1, round(fraction * len(data)))
    rest, held = order[:cut], order[cut:]
    if isinstance(data, ArrayDataset):
        return (
            ArrayDataset(data.images[rest], data.labels[rest], f"{data.name}/fit"),
            ArrayDataset(data.images[held], data.labels[held], f"{data.name}/val"),
        )
    from torch.utils.data import Subset

    return Subset(data, rest.tolist()), Subset(data, held.tolist())


def parse_shape(text: str) -> tuple[int, int, int]:
    """Parse ``'3x32x32'`` into ``(3, 32, 32)`` (for CLI options)."""
    try:
        dims = tuple(int(t) for t in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) <= 0:
        raise DataError(f"shape {text!r} is not of the form CxHxW, e.g. 3x32x32")
    channels, height, width = dims
    return channels, height, width
