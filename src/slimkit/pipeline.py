"""``slimkit.compress``: run a recipe's steps in order under one accuracy budget, and keep the evidence.

After each step the model is evaluated. If the step broke the budget (baseline accuracy minus
``max_accuracy_drop``), a bounded knowledge-distillation run (teacher = the original model) tries to recover; if the
budget is still broken, the step's strength is backed off (pruning amount halved; quantization bits raised:
binary -> ternary -> 4 -> 8) up to ``max_backoffs`` times, and finally the step is skipped. The result is always
the best model found inside the budget, and every step's outcome says which of these happened.

The steps run through ``slimkit.steps`` (``StepRunner``, ``run_steps``), the same runner a search trial's plan
uses; this module adds the baseline, the export step, the deployed measurements and the result.

Example:
    >>> result = slimkit.compress(model, "fast-cpu", train, test)     # doctest: +SKIP
    >>> slimkit.save(result, "out/lenet5.slim")                         # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset

from slimkit._text import make_table, render
from slimkit.errors import UsageError
from slimkit.export.config import ExportConfig, ExportFormat
from slimkit.measure import benchmark_latency
from slimkit.recipe import Recipe, StepKind
from slimkit.steps import StepOutcome, StepRunner, run_steps
from slimkit.train import evaluate

__all__ = ["CompressResult", "StepOutcome", "compress", "export_model"]


@dataclass
class CompressResult:
    """The compressed model and its evidence; ``slimkit.save(result, folder)`` writes it as an artifact."""

    model: nn.Module
    recipe: Recipe
    baseline: dict[str, Any]
    final: dict[str, Any]
    steps: list[StepOutcome]
    latency: dict[str, dict[int, float]] = field(default_factory=dict)
    exported: Path | None = None  # in a temporary folder removed when this result is garbage-collected
    parity: dict[str, float] | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "final": self.final,
            "steps": [dataclasses.asdict(s) for s in self.steps],
            "latency_ms": {k: {str(b): v * 1e3 for b, v in d.items()} for k, d in self.latency.items()},
            "parity": self.parity,
            "recipe": self.recipe.to_dict(),
        }

    def table(self):
        from slimkit.report import summary_rows

        title = f"{self.recipe.name}: before vs after ({list(self.latency)[-1] if self.latency else 'PyTorch'})"
        return make_table(title, ["metric", "before", "after", "change"], summary_rows(self.metrics))

    def __str__(self) -> str:
        return render(self.table())


def _pick_onnx(
    model: nn.Module,
    cfg: ExportConfig,
    example_input: torch.Tensor,
    folder: Path,
    val_data: Dataset,
    floor: float,
    notes: list[str],
) -> Path:
    """``onnx-auto``: time fp32, int8 and (for nets with both) int8-fully-connected-only ONNX side by side; among
    the variants inside the budget whose latency is within ``cfg.size_slack`` of the fastest, ship the smallest."""
    from slimkit.export.onnx import export_onnx, is_int8_model
    from slimkit.export.runtime import OrtModel

    variants = {"fp32": export_onnx(model, example_input, folder / "model-fp32.onnx", int8=False)}
    if is_int8_model(model):
        variants["int8"] = export_onnx(model, example_input, folder / "model-int8.onnx", int8=True)
        kinds = {type(m).__name__ for m in model.modules()}
        if any("Conv" in k for k in kinds) and any("Linear" in k for k in kinds):
            variants["int8-fc"] = export_onnx(
                model, example_input, folder / "model-int8-fc.onnx", int8=True, int8_ops=("Gemm", "MatMul")
            )
    sessions = {name: OrtModel(path, threads=2) for name, path in variants.items()}
    timings = benchmark_latency(sessions, example_input, (cfg.auto_batch_size,), threads=2)
    accuracy = {name: evaluate(session, val_data).accuracy for name, session in sessions.items()}
    ms = {name: t[cfg.auto_batch_size].median * 1e3 for name, t in timings.items()}
    size = {name: path.stat().st_size for name, path in variants.items()}
    inside = [n for n in variants if accuracy[n] >= floor] or list(variants)
    fastest = min(ms[n] for n in inside)
    chosen = min((n for n in inside if ms[n] <= fastest * (1 + cfg.size_slack)), key=lambda n: size[n])
    notes.append(
        "onnx-auto at batch {}: {}; shipped {}".format(
            cfg.auto_batch_size,
            ", ".join(f"{n} {ms[n]:.3f} ms / {accuracy[n]:.2f}% / {size[n] / 1e3:.1f} KB" for n in variants),
            chosen,
        )
    )
    final = folder / "model.onnx"
    variants[chosen].rename(final)
    return final


def export_model(model: nn.Module, cfg: ExportConfig, example_input: torch.Tensor, folder: Path) -> Path:
    """Write ``model`` in ``cfg.format`` (onnx, onnx-int8 or torch-export) into ``folder``; returns the file."""
    if cfg.format is ExportFormat.TORCH_EXPORT:
        program = torch.export.export(model.eval(), (example_input,))
        path = folder / "model.pt2"
        torch.export.save(program, str(path))
        return path
    if cfg.format is ExportFormat.ONNX_AUTO:
        raise UsageError(
            "onnx-auto chooses between int8 and fp32 by measured speed and accuracy: use it as a recipe "
            "step (slimkit compress), or export onnx / onnx-int8 here"
        )
    from slimkit.export.onnx import export_onnx

    return export_onnx(model, example_input, folder / "model.onnx", int8=cfg.format is ExportFormat.ONNX_INT8)


def compress(
    model: nn.Module,
    recipe: Recipe | dict | str,
    train_data: Dataset,
    val_data: Dataset,
    *,
    example_input: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    test_data: Dataset | None = None,
    latency_batch_sizes: tuple[int, ...] = (1, 64),
    console: Console | None = None,
) -> CompressResult:
    """Run ``recipe`` on ``model`` (untouched) and return the best model inside the accuracy budget.

    Args:
        recipe: a ``Recipe``, a dict, a YAML path or a shipped recipe name (``fast-cpu``, ``tiny``, ``int8-only``).
        example_input: one input batch (default: the first validation example).
        teacher: for KD recovery and distill steps (default: a frozen copy of ``model``).
        test_data: held-out data only reported (``test_accuracy``), never used for a decision; keep ``val_data``
            apart from it (e.g. ``slimkit.data.split``) so that fine-tuning and the budget do not select on test.
    """
    recipe = Recipe.load(recipe)
    console = console or Console()
    if example_input is None:
        example_input = val_data[0][0].unsqueeze(0)
    original = copy.deepcopy(model).eval()
    teacher = teacher if teacher is not None else original
    runner = StepRunner(teacher, train_data, val_data, example_input, test_data=test_data)
    baseline = runner.metrics(original)
    floor = baseline["accuracy"] - recipe.max_accuracy_drop
    current = copy.deepcopy(model)
    exported: Path | None = None
    parity: dict[str, float] | None = None
    export_dir = Path(tempfile.mkdtemp(prefix="slimkit-export-"))
    try:  # the folder lives as long as the result that names its file (see CompressResult.exported)
        current, outcomes = run_steps(current, recipe, runner, floor=floor, console=console)
        step = recipe.steps[-1]
        if step.kind is StepKind.EXPORT:  # always the last step (the recipe checks the order)
            console.rule(f"step {len(recipe.steps)}/{len(recipe.steps)}: export")
            if step.config.format is ExportFormat.ONNX_AUTO:
                export_notes: list[str] = []
                exported = _pick_onnx(current, step.config, example_input, export_dir, val_data, floor, export_notes)
                console.print(export_notes[-1])
                outcomes.append(
                    StepOutcome(
                        "export",
                        "applied",
                        step.config.to_dict(),
                        notes=export_notes,
                        seconds=0.0,
                        **runner.metrics(current),
                    )
                )
            else:
                exported = export_model(current, step.config, example_input, export_dir)
            if step.config.parity and exported.suffix == ".onnx":
                from slimkit.export.runtime import OrtModel
                from slimkit.export.runtime import parity as check_parity

                parity = check_parity(current, OrtModel(exported, threads=2), val_data)
                console.print(
                    f"ONNX Runtime parity: max |diff| {parity['max_abs_diff']:.3g}, "
                    f"top-1 agreement {100 * parity['top1_agreement']:.2f}%"
                )
        final = runner.metrics(current)
        candidates: dict[str, Any] = {"PyTorch fp32 (before)": original}
        if exported is not None and exported.suffix == ".onnx":
            from slimkit.export.runtime import OrtModel

            deployed = OrtModel(exported, threads=2)
            final["deployed_accuracy"] = evaluate(deployed, val_data).accuracy
            if test_data is not None:
                final["deployed_test_accuracy"] = evaluate(deployed, test_data).accuracy
            final["deployed_bytes"] = exported.stat().st_size
            candidates["ONNX Runtime (after)"] = deployed
        elif not any(o.kind == "quantize" and o.status != "skipped" for o in outcomes):
            candidates["PyTorch (after)"] = current
        timings = benchmark_latency(candidates, example_input, latency_batch_sizes, threads=2)
        latency = {name: {bs: s.median for bs, s in per.items()} for name, per in timings.items()}
        final["latency_ms"] = {str(bs): v * 1e3 for bs, v in latency[list(latency)[-1]].items()}
        baseline["latency_ms"] = {str(bs): v * 1e3 for bs, v in latency[next(iter(latency))].items()}
    except BaseException:
        shutil.rmtree(export_dir, ignore_errors=True)
        raise
    result = CompressResult(current, recipe, baseline, final, outcomes, latency, exported, parity)
    if exported is None:
        shutil.rmtree(export_dir, ignore_errors=True)
    else:  # removed when the result is garbage-collected, or at interpreter exit
        weakref.finalize(result, shutil.rmtree, str(export_dir), True)
    return result
