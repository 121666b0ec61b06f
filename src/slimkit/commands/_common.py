"""Options and helpers shared by every CLI command (so each command stays a thin call into the API)."""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape

from slimkit.errors import SlimkitError, UsageError

console = Console(stderr=False)
err_console = Console(stderr=True)

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Zoo name (see `slimkit models`) or 'pkg.module:function'.")
]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", "-w", help="Weights: .safetensors or a torch state_dict (weights_only).")
]
DataOpt = Annotated[
    str, typer.Option("--data", "-d", help="Data spec: mnist10k, digits, cifar10, npz:PATH, folder:PATH.")
]
ShapeOpt = Annotated[
    str | None, typer.Option("--shape", help="Input shape CxHxW, e.g. 3x32x32 (default: the zoo model's own).")
]
ArgsOpt = Annotated[
    str | None,
    typer.Option("--model-args", help="JSON keyword arguments for the model factory, e.g. '{\"num_classes\": 100}'."),
]


TRACEBACK = {"on": False}  # set by the global ``--traceback`` option (slimkit/cli.py)


def fail_cleanly(fn: Callable) -> Callable:
    """Turn slimkit's user-facing errors into one red line and exit code 2 (no traceback).

    Caught: ``SlimkitError`` (bad input, a failed check), ``OSError`` (a missing or unwritable path, a full disk)
    and Ctrl-C. Anything else is a bug and keeps its traceback; ``slimkit --traceback CMD`` shows it for all.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SlimkitError, OSError, KeyboardInterrupt) as exc:
            if TRACEBACK["on"]:
                raise
            if isinstance(exc, KeyboardInterrupt):  # exiting already: a second Ctrl-C must not break the clean-up
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            # soft_wrap: never break a path or a name in two; escape: messages may contain [brackets]
            err_console.print(f"[red]error:[/red] {escape(one_line(exc))}", soft_wrap=True)
            sys.exit(2)

    return wrapper


def one_line(exc: BaseException) -> str:
    """The message the CLI prints for ``exc``."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C); outputs are written atomically, so nothing half-written was left behind"
    if isinstance(exc, OSError) and not isinstance(exc, SlimkitError):
        if exc.errno == errno.ENOSPC:
            where = f" writing {exc.filename}" if exc.filename else ""
            return f"the disk is full{where}; free some space and run the command again"
        if exc.filename and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def model_kwargs(model_args: str | None) -> dict[str, Any]:
    if not model_args:
        return {}
    try:
        value = json.loads(model_args)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--model-args is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageError("--model-args must be a JSON object")
    return value


def build_model(model: str, weights: Path | None, model_args: str | None):
    from slimkit.models import create

    return create(model, weights=weights, **model_kwargs(model_args))


def input_shape(model: str, shape: str | None, model_args: str | None = None) -> tuple[int, ...]:
    from slimkit.data import parse_shape
    from slimkit.models import input_shape as zoo_shape

    return parse_shape(shape) if shape else zoo_shape(model, **model_kwargs(model_args))


def example(model: str, shape: str | None, model_args: str | None = None, batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, *input_shape(model, shape, model_args))


def load_data(data: str, shape: str | None):
    from slimkit.data import load, parse_shape

    return load(data, shape=parse_shape(shape) if shape else None)


# what a folder written by `slimkit search` holds (any one marks it as a search folder that may be continued)
SEARCH_OUTPUTS = ("study.db", "results.json", "report.md", "pareto", "best", "latency_cache.json")


def check_out(path: Path, kind: str, option: str = "--out") -> Path:
    """Refuse an output path before any work starts: one ``UsageError`` line, nothing touched.

    ``kind``: ``"file"`` (a weights file), ``"artifact"`` / ``"prune"`` (a folder replaced whole, only over an older
    one of its kind or an empty folder), ``"folder"`` (a folder written into) or ``"search"`` (a folder written
    into: new, empty, or an earlier search's). Its nearest existing folder must be writable.

    Example:
        >>> check_out(Path("runs/lenet5.safetensors"), "file")   # doctest: +SKIP
    """
    from slimkit._io import check_replaceable, kind_of

    existing = kind_of(path)
    container = kind in ("folder", "search")
    try:
        if not container:
            check_replaceable(path, kind)
        elif existing == "file":
            raise UsageError(f"{path} is a file, but a folder is needed; give a folder path; nothing was changed")
        elif (
            kind == "search"
            and existing not in (None, "empty")
            and not any(os.path.lexists(path / name) for name in SEARCH_OUTPUTS)
        ):
            raise UsageError(
                f"{path} is a folder of other files, not a slimkit search folder (no study.db, best/ "
                "or results.json); give a new or empty folder; nothing was changed"
            )
    except UsageError as exc:
        raise UsageError(f"{option} {exc}") from None
    anchor = path if container and existing else path.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise UsageError(f"{option} {path}: {anchor} is a file, so no folder can be made there; give another path")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the folder {anchor} is not writable (permission denied); give another path")
    return path
