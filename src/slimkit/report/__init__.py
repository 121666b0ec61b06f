"""Reports: markdown + self-contained HTML with PNG plots, built from an artifact folder alone.

``write_report(folder)`` reads ``slimkit.json`` (metrics of the baseline, every step and the final model), rebuilds
the model to compare per-layer widths against the untouched architecture, draws the charts, and adds
``report.md``, ``report.html`` and the PNGs to the artifact (re-hashed, atomically).

Example:
    >>> write_report("out/lenet5.slim")          # doctest: +SKIP
    PosixPath('out/lenet5.slim/report.html')
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from slimkit._text import human
from slimkit.errors import UsageError
from slimkit.report import plots

__all__ = ["summary_rows", "write_report"]


def _widths(model: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and weight is not None:
            out[name] = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    return out


def _kept_rows(before: nn.Module, after: nn.Module) -> list[tuple[str, int, int]]:
    after_widths = _widths(after)
    rows = []
    for name, width in _widths(before).items():
        match = after_widths.get(name)
        if match is None:  # wrapped by quantization: look for the same layer one level down
            match = next((w for n, w in after_widths.items() if n.startswith(name + ".")), None)
        if match is not None:
            rows.append((name or "model", width, match))
    return rows


def _bit_widths(history: list[dict[str, Any]]) -> dict[str, float]:
    for step in reversed(history):
        if step["kind"] == "quantize":
            layers = step["record"].get("layers", {})
            items = layers.items() if isinstance(layers, dict) else ((lay.get("name"), lay) for lay in layers)
            return {name: float(info.get("weight_bits", info.get("bits", 32)) or 32) for name, info in items}
    return {}


def _sensitivity(history: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    for step in history:
        curves = step["record"].get("sensitivity") if step["kind"] == "prune" else None
        if curves:
            return {name: [tuple(p) for p in points] for name, points in curves.items()}
    return {}


def summary_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Before/after rows: accuracy, params, MACs, bytes on disk, latency at each batch size, speed-up."""
    b, f = metrics["baseline"], metrics["final"]

    def ratio(key):
        return f"{b[key] / max(f[key], 1):.2f}x smaller"

    rows = [
        [
            "validation accuracy (%)",
            f"{b['accuracy']:.2f}",
            f"{f['accuracy']:.2f}",
            f"{f['accuracy'] - b['accuracy']:+.2f} pt",
        ],
        ["params", human(b["params"]), human(f["params"]), ratio("params")],
        ["MACs", human(b["macs"]), human(f["macs"]), ratio("macs")],
        ["bytes on disk", human(b["size_bytes"], "B"), human(f["size_bytes"], "B"), ratio("size_bytes")],
    ]
    if "test_accuracy" in b and "test_accuracy" in f:
        after = f.get("deployed_test_accuracy", f["test_accuracy"])
        rows.insert(
            1,
            [
                "test accuracy, deployed (%)",
                f"{b['test_accuracy']:.2f}",
                f"{after:.2f}",
                f"{after - b['test_accuracy']:+.2f} pt",
            ],
        )
    if "deployed_accuracy" in f:
        rows.append(
            [
                "validation accuracy, deployed ONNX (%)",
                f"{b['accuracy']:.2f}",
                f"{f['deployed_accuracy']:.2f}",
                f"{f['deployed_accuracy'] - b['accuracy']:+.2f} pt",
            ]
        )
        rows.append(
            [
                "deployed ONNX file",
                human(b["size_bytes"], "B"),
                human(f["deployed_bytes"], "B"),
                f"{b['size_bytes'] / max(f['deployed_bytes'], 1):.2f}x smaller",
            ]
        )
    for bs, before_ms in b.get("latency_ms", {}).items():
        after_ms = f.get("latency_ms", {}).get(bs)
        if after_ms:
            rows.append(
                [
                    f"latency batch {bs} (ms)",
                    f"{before_ms:.3f}",
                    f"{after_ms:.3f}",
                    f"{before_ms / after_ms:.2f}x faster",
                ]
            )
    return rows


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee;margin:.5em 0}"
)


def write_report(path: str | os.PathLike, *, trust: Iterable[str] = ()) -> Path:
    """Add ``report.md``, ``report.html`` and PNG charts to an artifact folder; returns the HTML path.

    ``trust``: as in ``slimkit.load`` (modules whose factories the artifact may name besides slimkit's zoo).
    """
    from slimkit.export.artifact import MANIFEST, build_source, load, read_manifest, update

    folder = Path(path)
    manifest = read_manifest(folder)
    metrics = manifest.get("metrics") or {}
    if "baseline" not in metrics or "final" not in metrics:
        raise UsageError(f"{folder}: the artifact has no before/after metrics; write it from slimkit.compress(...)")
    model = load(folder, trust=trust)
    fresh = build_source(manifest, folder / MANIFEST, trust)
    steps = metrics.get("steps", [])
    header = ["metric", "before", "after", "change"]
    summary = summary_rows(metrics)
    step_rows = [
        [
            s["kind"],
            s["status"],
            f"{s['accuracy']:.2f}",
            human(s["params"]),
            human(s["macs"]),
            human(s["size_bytes"], "B"),
            "; ".join(s.get("notes", [])),
        ]
        for s in steps
    ]
    step_header = ["step", "outcome", "accuracy (%)", "params", "MACs", "on disk", "notes"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        charts: list[tuple[str, Path]] = []
        points = [{"label": "before", **metrics["baseline"]}] + [{"label": s["kind"], **s} for s in steps]
        charts.append(("Accuracy vs size after each step", plots.trade_off(points, tmp / "tradeoff.png")))
        kept = _kept_rows(fresh, model)
        if any(before != after for _, before, after in kept):
            charts.append(("Kept channels per layer", plots.kept_channels(kept, tmp / "kept_channels.png")))
        bits = _bit_widths(manifest.get("history", []))
        if bits:
            charts.append(("Weight bit width per layer", plots.bit_widths(bits, tmp / "bit_widths.png")))
        curves = _sensitivity(manifest.get("history", []))
        if curves:
            charts.append(("Pruning sensitivity", plots.sensitivity(curves, tmp / "sensitivity.png")))
        title = f"slimkit report: {manifest['source']['factory']} ({metrics.get('recipe', {}).get('name', 'custom')})"
        parity = metrics.get("parity")
        parity_line = (
            f"ONNX Runtime parity: max |diff| {parity['max_abs_diff']:.3g}, top-1 agreement "
            f"{100 * parity['top1_agreement']:.2f}% of {parity['count']} inputs"
            if parity
            else ""
        )
        md = [
            f"# {title}",
            "",
            _md_table(header, summary),
            "",
            "## Steps",
            "",
            _md_table(step_header, step_rows),
            "",
            parity_line,
            "",
        ]
        md += [f"## {caption}\n\n![{caption}]({png.name})\n" for caption, png in charts]
        (tmp / "report.md").write_text("\n".join(md))
        images = "".join(
            f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' "
            f"src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'>"
            for caption, png in charts
        )
        page = (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{_html_table(header, summary)}"
            f"<h2>Steps</h2>{_html_table(step_header, step_rows)}<p>{html.escape(parity_line)}</p>{images}"
            "</body></html>"
        )
        (tmp / "report.html").write_text(page)
        files: dict[str, str | os.PathLike] = {p.name: p for p in tmp.iterdir()}
        update(folder, files=files)
    return folder / "report.html"
