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

COMMAND_MODULES = ["slimkit.commands.core", "slimkit.commands.pipeline", "slimkit.commands.distill",
                   "slimkit.commands.prune", "slimkit.commands.quantize", "slimkit.commands.search"]


@app.callback()
def main(traceback: bool = typer.Option(False, "--traceback", help="Show the full traceback of an error.")) -> None:
    """Make trained PyTorch models smaller and faster, and measure it."""
    from slimkit.commands._common import TRACEBACK

    TRACEBACK["on"] = traceback


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)

if __name__ == "__main__":  # pragma: no cover
    app()
