"""Text data offline: sentences from a file or a list, tokenized into dict batches, and a corpus of real English
sentences every machine has: the docstrings of Python's standard library.

``stdlib_sentences()`` reads the docstrings (modules, classes, functions) of a fixed list of pure-Python standard
library modules that import without side effects, splits them into sentences and keeps the ones that read as prose
(5-40 words, starting with a capital letter, ending with a full stop, no doctest prompts or code).
``stdlib_sentences(source="files")`` reads every docstring of every ``.py`` file in the standard library's folder
instead (parsed with ``ast``, never imported; test suites and IDLE left out): about 8,700 sentences, a superset of
most of the first corpus, for training text that must not run out (distillation on unlabelled text). Nothing is
downloaded. The text is the Python Software Foundation's, under the PSF License Agreement (the licence of Python
itself); the sentences differ slightly between Python versions, so record the version beside results.
``docstring_sentences(["numpy", "scipy", "sklearn"])`` reads installed packages' docstrings the same way (parsed,
never imported), each under its own licence, when even more distinct text helps.

``TextDataset`` tokenizes sentences with any Hugging Face-style tokenizer (``tokenizer(texts, padding=...,
truncation=..., max_length=..., return_tensors="pt")``) and yields dicts such as ``{"input_ids", "attention_mask"}``,
the form slimkit's example inputs and data sets take for transformers models.

Example:
    >>> sentences = stdlib_sentences()
    >>> len(sentences) > 2000, sentences == stdlib_sentences()
    (True, True)
    >>> data = TextDataset(sentences[:64], tokenizer, max_length=128)     # doctest: +SKIP
    >>> sorted(data[0])                                                    # doctest: +SKIP
    ['attention_mask', 'input_ids', 'token_type_ids']
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import os
import re
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from slimkit.data.arrays import DataError
from slimkit.errors import MissingFileError, UsageError

__all__ = ["STDLIB_MODULES", "TextDataset", "docstring_sentences", "read_sentences", "stdlib_sentences"]

_SKIP_FOLDERS = frozenset({"test", "tests", "idlelib", "idle_test", "lib2to3", "turtledemo", "site-packages"})

STDLIB_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "filecmp",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "ipaddress", "json", "locale",
    "logging", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
    "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
)  # fmt: skip

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE = re.compile(r">>>|\.\.\.|::|[{}\[\]<>=_`|\\]|\w\(|\)\w|\bdef\b|\bNone\b|https?:|\w/\w")


def _prose(sentence: str, min_words: int, max_words: int) -> bool:
    words = sentence.split()
    return (
        min_words <= len(words) <= max_words
        and sentence[0].isupper()
        and sentence.endswith(".")
        and not _CODE.search(sentence)
        and sum(c.isalpha() or c.isspace() for c in sentence) >= 0.9 * len(sentence)
    )


def _docstrings(module: Any) -> list[str]:
    """The module's docstring, then its own classes' and functions' (and the classes' methods'), by name."""
    docs = [inspect.getdoc(module) or ""]
    for _, member in sorted(vars(module).items()):
        if not (inspect.isclass(member) or inspect.isfunction(member)):
            continue
        if getattr(member, "__module__", None) != module.__name__:
            continue
        docs.append(inspect.getdoc(member) or "")
        if inspect.isclass(member):
            for _, method in sorted(vars(member).items()):
                if inspect.isfunction(method) and method.__doc__:
                    docs.append(inspect.cleandoc(method.__doc__))
    return docs


def _sentences(docs, min_words: int, max_words: int, seen: dict[str, None]) -> None:
    for doc in docs:
        for paragraph in re.split(r"\n\s*\n", doc):
            text = " ".join(paragraph.split())
            for sentence in _SPLIT.split(text):
                if _prose(sentence, min_words, max_words):
                    seen.setdefault(sentence)


def _file_docstrings(path: Path) -> list[str]:
    """Every module, class and function docstring of one source file, in file order (parsed, never imported)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):  # a file this Python cannot parse: skip it
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [ast.get_docstring(node) or "" for node in ast.walk(tree) if isinstance(node, kinds)]


def _tree_sentences(root: Path, min_words: int, max_words: int, seen: dict[str, None]) -> None:
    """The prose sentences of every ``.py`` file under ``root`` (or of ``root`` itself, one file), by path; test
    suites and the other ``_SKIP_FOLDERS`` left out."""
    if root.is_file():
        paths = [root]
    else:
        paths = [
            p for p in sorted(root.rglob("*.py")) if not _SKIP_FOLDERS.intersection(p.relative_to(root).parts[:-1])
        ]
    for path in paths:
        _sentences(_file_docstrings(path), min_words, max_words, seen)


@functools.lru_cache(maxsize=4)
def _corpus(min_words: int, max_words: int, source: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    if source == "files":
        _tree_sentences(Path(sysconfig.get_paths()["stdlib"]), min_words, max_words, seen)
        return tuple(seen)
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module this Python build lacks (e.g. ssl, sqlite3): the corpus is a little smaller
            continue
        _sentences(_docstrings(module), min_words, max_words, seen)
    return tuple(seen)


def stdlib_sentences(
    limit: int | None = None, *, min_words: int = 5, max_words: int = 40, source: str = "modules"
) -> list[str]:
    """Distinct English sentences from the standard library's docstrings, in a fixed order; ``limit`` keeps the
    first ones. ``source="modules"``: the imported ``STDLIB_MODULES`` (module list order, then member name; about
    3,200 on Python 3.11); ``"files"``: every ``.py`` file of the standard library's folder by path, parsed with
    ``ast`` (about 8,700)."""
    if source not in ("modules", "files"):
        raise UsageError(f"stdlib_sentences: source={source!r}; choose 'modules' or 'files'")
    sentences = list(_corpus(min_words, max_words, source))
    if limit is not None and limit > len(sentences):
        raise UsageError(f"stdlib_sentences: only {len(sentences)} sentences on this Python, {limit} asked")
    return sentences[:limit]


def _package_root(name: str) -> Path:
    """The source folder (or single file) of an installed top-level package, found without importing it."""
    if not name.isidentifier():
        raise UsageError(f"docstring_sentences: {name!r} is not a top-level package name (e.g. 'numpy')")
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise UsageError(f"docstring_sentences: package {name!r} is not installed; pip install it or drop it")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin and spec.origin.endswith(".py"):
        return Path(spec.origin)
    raise UsageError(f"docstring_sentences: {name!r} has no Python source to read ({spec.origin}); drop it")


@functools.lru_cache(maxsize=4)
def _package_corpus(packages: tuple[str, ...], min_words: int, max_words: int) -> tuple[str, ...]:
    roots = [_package_root(name) for name in packages]
    seen: dict[str, None] = {}
    for root in roots:
        _tree_sentences(root, min_words, max_words, seen)
    return tuple(seen)


def docstring_sentences(packages: Sequence[str], *, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Distinct English sentences from the docstrings of installed Python packages, in a fixed order (package order,
    then file path): more real text for distillation on unlabelled data when the standard library's runs short.

    Every ``.py`` file of each package's folder is parsed with ``ast``, never imported (its ``tests`` folders left
    out), and split into prose sentences as ``stdlib_sentences`` does. The text is each package's own, under its
    licence: record which packages and versions you used beside results (numpy, scipy and scikit-learn are
    BSD-3-Clause; scikit-learn 1.9, numpy and scipy give about 14,000 sentences together).

    Example:
        >>> sentences = docstring_sentences(["sklearn"])
        >>> len(sentences) > 1000, sentences == docstring_sentences(["sklearn"])
        (True, True)
    """
    if isinstance(packages, str) or not packages:
        raise UsageError(f"docstring_sentences: packages={packages!r}; pass a list of names, e.g. ['numpy']")
    return list(_package_corpus(tuple(packages), min_words, max_words))


def read_sentences(path: str | os.PathLike) -> list[str]:
    """One sentence (or text) per non-empty line of a UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"text file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); convert it or pass a list of sentences") from exc
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise DataError(f"{path} has no non-empty line: one sentence per line is expected")
    return sentences


class TextDataset(Dataset):
    """Sentences tokenized once, padded to ``max_length``: item ``i`` is a dict of 1-D tensors (the tokenizer's
    fields), or ``(dict, label)`` when ``labels`` are given.

    Args:
        texts: a list of strings or the path of a UTF-8 file with one per line.
        tokenizer: a callable like a Hugging Face tokenizer (``tokenizer(list, padding="max_length",
            truncation=True, max_length=n, return_tensors="pt")`` -> mapping of ``(N, n)`` tensors).
    """

    def __init__(
        self,
        texts: Sequence[str] | str | os.PathLike,
        tokenizer: Callable[..., Any],
        *,
        max_length: int = 128,
        labels: Sequence[int] | None = None,
    ) -> None:
        sentences = read_sentences(texts) if isinstance(texts, (str, os.PathLike)) else list(texts)
        if not sentences or not all(isinstance(s, str) for s in sentences):
            raise DataError("TextDataset: texts must be a non-empty list of strings or a text file path")
        if labels is not None and len(labels) != len(sentences):
            raise DataError(f"TextDataset: {len(labels)} labels for {len(sentences)} texts")
        if max_length < 1:
            raise UsageError(f"TextDataset: max_length={max_length} must be >= 1")
        encoded = tokenizer(
            sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        self.fields = {k: torch.as_tensor(v) for k, v in dict(encoded).items()}
        if "input_ids" not in self.fields or self.fields["input_ids"].shape[0] != len(sentences):
            raise DataError("TextDataset: the tokenizer must return input_ids with one row per text")
        self.texts = sentences
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
        item = {k: v[index] for k, v in self.fields.items()}
        return item if self.labels is None else (item, self.labels[index])
