"""PNG charts for the report (matplotlib, imported only here, with the headless Agg back end)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimkit._plot import pyplot, save_png


def kept_channels(rows: list[tuple[str, int, int]], path: Path) -> Path:
    """Bar chart of output channels per layer, before vs after."""
    plt = pyplot()
    names = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(rows) + 2), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="before", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, label="after", color="#1f77b4")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=7)
    ax.set_ylabel("output channels / features")
    ax.set_title("kept channels per layer")
    ax.legend()
    return save_png(fig, path)


def bit_widths(bits: dict[str, float], path: Path) -> Path:
    """Bar chart of weight bit width per layer."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(bits) + 2), 3.5))
    ax.bar(range(len(bits)), list(bits.values()), color="#2ca02c")
    ax.set_xticks(range(len(bits)), list(bits), rotation=90, fontsize=7)
    ax.set_ylabel("weight bits")
    ax.set_title("bit width per layer (32 = float)")
    return save_png(fig, path)


def sensitivity(curves: dict[str, list[tuple[float, float]]], path: Path) -> Path:
    """Accuracy versus pruning ratio, one line per group (the chart ``SensitivityResult.plot`` draws)."""
    from slimkit.pruning.sensitivity import plot_curves

    return plot_curves(curves, path)


def trade_off(points: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy versus bytes on disk after every step (and MACs as the marker size)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [p["size_bytes"] / 1e3 for p in points]
    ys = [p["accuracy"] for p in points]
    ax.plot(xs, ys, color="#999999", zorder=1)
    ax.scatter(xs, ys, zorder=2, color="#d62728")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (KB, log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs size after each step")
    return save_png(fig, path)
