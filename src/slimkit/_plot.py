"""The one matplotlib set-up: headless Agg back end, imported only when a chart is drawn, PNGs written atomically.

Example:
    >>> plt = pyplot()                                  # doctest: +SKIP
    >>> fig, ax = plt.subplots()                        # doctest: +SKIP
    >>> save_png(fig, "chart.png")                      # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from slimkit._io import atomic_path
from slimkit.errors import DependencyError

__all__ = ["pyplot", "save_png"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless Agg back end; ``DependencyError`` with the pip command if missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise DependencyError("charts need matplotlib: pip install 'slimkit[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG atomically, and close it."""
    plt = pyplot()
    try:
        fig.tight_layout()
        with atomic_path(path, kind="file") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path)
