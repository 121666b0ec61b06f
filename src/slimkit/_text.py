"""Small text helpers shared by tables, reports and the CLI."""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table


def human(n: float, unit: str = "") -> str:
    """``125747840 -> '125.75M'``; bytes with ``unit='B'`` use binary-free decimal prefixes (KB = 1000 B)."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.3g}{unit}"


def render(table: Table, width: int = 120) -> str:
    """A rich table as plain text (for ``__str__`` and logs)."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue().rstrip("\n")


def make_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> Table:
    """A rich table with right-aligned columns after the first."""
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    return table
