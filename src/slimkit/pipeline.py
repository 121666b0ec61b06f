"""``slimkit.compress``: run a recipe's steps in order under one accuracy budget, and keep the evidence.

After each step the model is evaluated. If the step broke the budget (baseline accuracy minus
``max_accuracy_drop``), a bounded knowledge-distillation run (teacher = the original model) tries to recover; if the
budget is still broken, the step's strength is backed off (pruning amount halved; quantization bits raised:
binary -> ternary -> 4 -> 8) up to ``max_backoffs`` times, and finally the step is skipped. The result is always
the best model found inside the budget, and every step's outcome says which of these happened.

Example:
    >>> result = slimkit.compress(model, "fast-cpu", train, test)     # doctest: +SKIP
    >>> slimkit.save(result, "out/lenet5.slim")                         # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset

from slimkit._text import human, make_table, render
from slimkit.errors import UsageError
from slimkit.export.artifact import weights_size
from slimkit.measure import benchmark_latency, profile
from slimkit.recipe import ExportConfig, ExportFormat, Recipe, Step, StepKind
from slimkit.train import evaluate

__all__ = ["CompressResult", "StepOutcome", "compress", "export_model"]



@dataclass
class StepOutcome:
    """What one recipe step did: ``status`` is applied, recovered, backed_off, skipped or failed."""

    kind: str
    status: str
    config: dict[str, Any]
    accuracy: float
    params: int
    macs: int
    size_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    test_accuracy: float | None = None  # reported only, when compress() was given test_data


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
        return {"baseline": self.baseline, "final": self.final, "steps": [dataclasses.asdict(s) for s in self.steps],
                "latency_ms": {k: {str(b): v * 1e3 for b, v in d.items()} for k, d in self.latency.items()},
                "parity": self.parity, "recipe": self.recipe.to_dict()}

    def table(self):
        from slimkit.report import summary_rows

        title = f"{self.recipe.name}: before vs after ({list(self.latency)[-1] if self.latency else 'PyTorch'})"
        return make_table(title, ["metric", "before", "after", "change"], summary_rows(self.metrics))

    def __str__(self) -> str:
        return render(self.table())


def _metrics(model: nn.Module, val_data: Dataset, example_input: torch.Tensor,
             test_data: Dataset | None = None) -> dict[str, Any]:
    """Accuracy on the validation data (what the budget is checked on), size and cost; test accuracy if given."""
    prof = profile(model, example_input)
    metrics = {"accuracy": evaluate(model, val_data).accuracy, "params": prof.params, "macs": prof.macs,
               "size_bytes": weights_size(model)}
    if test_data is not None:
        metrics["test_accuracy"] = evaluate(model, test_data).accuracy
    return metrics


def _back_off(step: Step) -> Step | None:
    """A weaker version of the step, or None when it cannot be weakened further."""
    cfg = step.config
    if step.kind is StepKind.PRUNE:
        amount = cfg.amount / 2
        return None if amount < 0.05 else Step(step.kind, dataclasses.replace(cfg, amount=amount))
    if step.kind is StepKind.QUANTIZE:
        ladder = [1, 2, 4, 8]
        bits = cfg.weight_bits
        higher = [b for b in ladder if b > bits]
        if not higher:
            return None
        changes: dict[str, Any] = {"weight_bits": higher[0]}
        scheme = getattr(cfg, "scheme", None)
        if scheme is not None and getattr(scheme, "value", scheme) in ("ternary", "binary"):
            changes["scheme"] = "ternary" if higher[0] == 2 else "symmetric"
        return Step(step.kind, dataclasses.replace(cfg, **changes))
    return None


class _Runner:
    """Runs steps on a model with the shared context: data, teacher, example input."""

    def __init__(self, teacher: nn.Module, train_data: Dataset, val_data: Dataset, example_input: torch.Tensor,
                 recipe: Recipe, test_data: Dataset | None = None) -> None:
        self.teacher, self.train_data, self.val_data = teacher, train_data, val_data
        self.example_input, self.recipe, self.test_data = example_input, recipe, test_data

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        return _metrics(model, self.val_data, self.example_input, self.test_data)

    def kd_loss(self):
        from slimkit.distillation import DistillConfig, kd_loss_fn

        return kd_loss_fn(self.teacher, DistillConfig())

    def run(self, step: Step, model: nn.Module) -> nn.Module:
        import slimkit

        if step.kind is StepKind.PRUNE:
            return slimkit.prune(model, step.config, self.example_input, train_data=self.train_data,
                                 val_data=self.val_data, loss_fn=self.kd_loss()).model
        if step.kind is StepKind.DISTILL:
            return slimkit.distill(model, self.teacher, step.config, self.train_data, self.val_data).model
        if step.kind is StepKind.QUANTIZE:
            return slimkit.quantize(model, step.config, self.train_data, val_data=self.val_data,
                                    loss_fn=self.kd_loss()).model
        raise UsageError(f"step {step.kind.value!r} does not transform the model")

    def recover(self, model: nn.Module) -> nn.Module:
        import slimkit
        from slimkit.distillation import DistillConfig

        cfg = DistillConfig(epochs=self.recipe.recovery_epochs, lr=self.recipe.recovery_lr, optimizer="sgd",
                            batch_size=64)
        return slimkit.distill(model, self.teacher, cfg, self.train_data, self.val_data).model


def _run_step(runner: _Runner, step: Step, model: nn.Module, floor: float, recipe: Recipe,
              console: Console) -> tuple[nn.Module, StepOutcome]:
    start, notes, attempt = time.perf_counter(), [], step
    for tries in range(recipe.max_backoffs + 1):
        try:
            candidate = runner.run(attempt, model)
        except ValueError as exc:  # e.g. an unreachable pruning target: a weaker step may still apply
            notes.append(f"{attempt.kind.value} {attempt.config.to_dict()} cannot be applied: {exc}")
            candidate = None
        metrics = {"accuracy": float("-inf")} if candidate is None else runner.metrics(candidate)
        status = "applied" if tries == 0 else "backed_off"
        recoverable = recipe.recovery_epochs and attempt.kind is not StepKind.DISTILL
        if candidate is not None and metrics["accuracy"] < floor and recoverable:
            notes.append(f"accuracy {metrics['accuracy']:.2f}% < budget {floor:.2f}%: KD recovery "
                         f"({recipe.recovery_epochs} epochs)")
            candidate = runner.recover(candidate)
            metrics = runner.metrics(candidate)
            status = "recovered" if tries == 0 else "backed_off"
        if metrics["accuracy"] >= floor:
            return candidate, StepOutcome(attempt.kind.value, status, attempt.config.to_dict(),
                                          seconds=time.perf_counter() - start, notes=notes, **metrics)
        weaker = _back_off(attempt)
        if candidate is not None:
            notes.append(f"accuracy {metrics['accuracy']:.2f}% still below budget {floor:.2f}%")
        if weaker is not None and tries < recipe.max_backoffs:
            notes[-1] += "; backing off"
        console.print(f"[yellow]{attempt.kind.value}: {notes[-1]}[/yellow]")
        if weaker is None:
            break
        attempt = weaker
    metrics = runner.metrics(model)
    return model, StepOutcome(step.kind.value, "skipped", step.config.to_dict(), seconds=time.perf_counter() - start,
                              notes=[*notes, "step skipped: the model before it is kept"], **metrics)


def _pick_onnx(model: nn.Module, cfg: ExportConfig, example_input: torch.Tensor, folder: Path, val_data: Dataset,
               floor: float, notes: list[str]) -> Path:
    """``onnx-auto``: time fp32, int8 and (for nets with both) int8-fully-connected-only ONNX side by side; among
    the variants inside the budget whose latency is within ``cfg.size_slack`` of the fastest, ship the smallest."""
    from slimkit.export.onnx import export_onnx, is_int8_model
    from slimkit.export.runtime import OrtModel

    variants = {"fp32": export_onnx(model, example_input, folder / "model-fp32.onnx", int8=False)}
    if is_int8_model(model):
        variants["int8"] = export_onnx(model, example_input, folder / "model-int8.onnx", int8=True)
        kinds = {type(m).__name__ for m in model.modules()}
        if any("Conv" in k for k in kinds) and any("Linear" in k for k in kinds):
            variants["int8-fc"] = export_onnx(model, example_input, folder / "model-int8-fc.onnx", int8=True,
                                              int8_ops=("Gemm",))
    sessions = {name: OrtModel(path, threads=2) for name, path in variants.items()}
    timings = benchmark_latency(sessions, example_input, (cfg.auto_batch_size,), threads=2)
    accuracy = {name: evaluate(session, val_data).accuracy for name, session in sessions.items()}
    ms = {name: t[cfg.auto_batch_size].median * 1e3 for name, t in timings.items()}
    size = {name: path.stat().st_size for name, path in variants.items()}
    inside = [n for n in variants if accuracy[n] >= floor] or list(variants)
    fastest = min(ms[n] for n in inside)
    chosen = min((n for n in inside if ms[n] <= fastest * (1 + cfg.size_slack)), key=lambda n: size[n])
    notes.append("onnx-auto at batch {}: {}; shipped {}".format(cfg.auto_batch_size, ", ".join(
        f"{n} {ms[n]:.3f} ms / {accuracy[n]:.2f}% / {size[n] / 1e3:.1f} KB" for n in variants), chosen))
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
        raise UsageError("onnx-auto chooses between int8 and fp32 by measured speed and accuracy: use it as a recipe "
                         "step (slimkit compress), or export onnx / onnx-int8 here")
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
    runner = _Runner(teacher, train_data, val_data, example_input, recipe, test_data)
    baseline = runner.metrics(original)
    floor = baseline["accuracy"] - recipe.max_accuracy_drop
    current, outcomes, exported, parity = copy.deepcopy(model), [], None, None
    export_dir = Path(tempfile.mkdtemp(prefix="slimkit-export-"))
    try:  # the folder lives as long as the result that names its file (see CompressResult.exported)
        for i, step in enumerate(recipe.steps):
            console.rule(f"step {i + 1}/{len(recipe.steps)}: {step.kind.value}")
            if step.kind is StepKind.EXPORT:
                if step.config.format is ExportFormat.ONNX_AUTO:
                    export_notes: list[str] = []
                    exported = _pick_onnx(current, step.config, example_input, export_dir, val_data, floor,
                                          export_notes)
                    console.print(export_notes[-1])
                    outcomes.append(StepOutcome("export", "applied", step.config.to_dict(), notes=export_notes,
                                                seconds=0.0, **runner.metrics(current)))
                else:
                    exported = export_model(current, step.config, example_input, export_dir)
                if step.config.parity and exported.suffix == ".onnx":
                    from slimkit.export.runtime import OrtModel
                    from slimkit.export.runtime import parity as check_parity

                    parity = check_parity(current, OrtModel(exported, threads=2), val_data)
                    console.print(f"ONNX Runtime parity: max |diff| {parity['max_abs_diff']:.3g}, "
                                  f"top-1 agreement {100 * parity['top1_agreement']:.2f}%")
                continue
            current, outcome = _run_step(runner, step, current, floor, recipe, console)
            outcomes.append(outcome)
            console.print(f"{outcome.kind}: {outcome.status}, accuracy {outcome.accuracy:.2f}% "
                          f"(budget >= {floor:.2f}%), {human(outcome.size_bytes, 'B')}, {outcome.seconds:.1f}s")
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
