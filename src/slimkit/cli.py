"""The ``slimkit`` command: a thin typer app over the Python API.

Each capability's commands live in ``slimkit/commands/<name>.py`` and register themselves on ``app``; this file
only assembles them. Run ``slimkit --help``.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="slimkit",
    help="Make trained PyTorch models smaller and faster, and measure it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMAND_MODULES = [
    "slimkit.commands.core",
    "slimkit.commands.pipeline",
    "slimkit.commands.distill",
    "slimkit.commands.prune",
    "slimkit.commands.quantize",
    "slimkit.commands.search",
]


@app.callback()
def main(traceback: bool = typer.Option(False, "--traceback", help="Show the full traceback of an error.")) -> None:
    """Make trained PyTorch models smaller and faster, and measure it."""
    from slimkit.commands._common import TRACEBACK

    TRACEBACK["on"] = traceback
    exit_cleanly_on_sigterm()


def exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM (``kill``, a scheduler's stop) end this process as ``SystemExit(143)``, so that every
    finally-block runs first: temporaries are removed and no save is left half-done.

    Example:
        >>> exit_cleanly_on_sigterm()   # doctest: +SKIP
    """
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    owner = os.getpid()

    def on_sigterm(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        if os.getpid() != owner:  # a forked child (e.g. a data loader worker): the default action
            os.kill(os.getpid(), signal.SIGTERM)
            return
        os.write(2, b"error: terminated (SIGTERM); cleaning up, nothing half-written is left behind\n")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)

if __name__ == "__main__":  # pragma: no cover
    app()
