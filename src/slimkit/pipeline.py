"""``slimkit.compress``: run a recipe's steps in order under one accuracy budget, and keep the evidence.

After each step the model is evaluated. If the step broke the budget (baseline accuracy minus
``max_accuracy_drop``), a bounded knowledge-distillation run (teacher = the original model) tries to recover; if the
budget is still broken, the step's strength is backed off (pruning amount halved; quantization bits raised:
binary -> ternary -> 4 -> 8) up to ``max_backoffs`` times, and finally the step is skipped. The result is always
the best model found inside the budget, and every step's outcome says which of these happened.

Every step that changes the architecture or numerics (prune, quantize, a distilled student) is also judged on the
runtime the model ships on: before and after are timed side by side on their fastest deployed forms at the
deployment batch size (``deploy_batch_size``: the export step's ``auto_batch_size``, 64 by default), and a step that
makes the deployed model slower is backed off or skipped like one that breaks the budget.

The final report compares the file that ships (the exported ONNX, else the weights) with the original on its fastest
fp32 runtime (ONNX Runtime fp32 or BN-folded channels-last eager, whichever is faster at that batch size) and with
the original in PyTorch eager, at each of ``latency_batch_sizes``, all timed side by side in one run.

The steps run through ``slimkit.steps`` (``StepRunner``, ``run_steps``), the same runner a search trial's plan
uses; this module adds the baseline, the export step, the deployed measurements and the result.

Your metric: ``compress(..., evaluate=fn)`` with ``fn(model) -> float`` (higher is better: a mean embedding cosine
to the original, a negative perplexity) checks the budget on ``fn`` instead of labelled accuracy, as Intel Neural
Compressor's ``eval_func`` and NNCF's ``validate_fn`` do: ``max_accuracy_drop`` is then in ``fn``'s units, the
data need no labels, and ``baseline`` / ``final`` / every step record ``metric`` (the function's name) beside the
value in ``accuracy``. The KD recovery's loss follows the model's output (``slimkit.steps.pick_output_loss``).

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

from slimkit._inputs import first_example
from slimkit._text import human, make_table, render
from slimkit.errors import UsageError
from slimkit.export.config import ExportConfig, ExportFormat
from slimkit.export.deployed import is_quantized
from slimkit.measure import benchmark_latency
from slimkit.recipe import Recipe, StepKind
from slimkit.steps import StepOutcome, StepRunner, run_steps
from slimkit.train import Evaluate, check_evaluate, score
from slimkit.train import evaluate as labelled_accuracy

__all__ = ["CompressResult", "StepOutcome", "compress", "export_model"]

DEFAULT_DEPLOY_BATCH_SIZE = 64
FINAL_MAX_SECONDS = 6.0  # per batch size, for the final side-by-side timing of every form


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
        """JSON-ready evidence: baseline and final metrics (``runtime`` per batch size says where each latency was
        measured), every step's outcome (with its deployed runtime), every timed form and the ONNX parity."""
        return {
            "baseline": self.baseline,
            "final": self.final,
            "steps": [dataclasses.asdict(s) for s in self.steps],
            "runtime": {
                "deploy_batch_size": self.final.get("deploy_batch_size"),
                "steps": [
                    {"kind": s.kind, "status": s.status, "runtime": s.runtime, "ms": s.deployed_ms}
                    for s in self.steps
                    if s.runtime is not None
                ],
                "baseline": self.baseline.get("runtime"),
                "shipped": self.final.get("runtime"),
                "fastest": self.final.get("fastest"),
            },
            "latency_ms": {k: {str(b): v * 1e3 for b, v in d.items()} for k, d in self.latency.items()},
            "parity": self.parity,
            "recipe": self.recipe.to_dict(),
        }

    def table(self):
        """Before/after: accuracy, params, MACs, weights, the shipped file's size, and its latency against the
        original on its fastest fp32 runtime and in PyTorch eager."""
        from slimkit.report import summary_rows

        b, f = self.baseline, self.final
        plain = {**self.metrics, "baseline": {k: v for k, v in b.items() if k != "latency_ms"}}
        rows = []
        for row in summary_rows(plain):
            if row[0] == "deployed ONNX file":
                continue  # the shipped file's row below compares it with the original's fp32 ONNX
            rows.append(["weights (model.safetensors)", *row[1:]] if row[0] == "bytes on disk" else row)
        shipped = f.get("shipped_file")
        if shipped and f.get("shipped_bytes") and b.get("deployed_bytes"):
            rows.append(
                [
                    f"{shipped} vs fp32 ONNX",
                    human(b["deployed_bytes"], "B"),
                    human(f["shipped_bytes"], "B"),
                    f"{b['deployed_bytes'] / f['shipped_bytes']:.2f}x smaller",
                ]
            )
        for bs, after_ms in f.get("latency_ms", {}).items():
            for label, before in (
                (b.get("runtime", {}).get(bs, "fastest fp32"), b.get("latency_ms", {})),
                ("PyTorch eager", b.get("eager_latency_ms", {})),
            ):
                if bs in before:
                    rows.append(
                        [
                            f"ms b{bs} vs {label}",
                            f"{before[bs]:.3g}",
                            f"{after_ms:.3g}",
                            _ratio(before[bs] / after_ms),
                        ]
                    )
        title = f"{self.recipe.name}: before vs after ({f.get('shipped_file') or 'PyTorch'})"
        table = make_table(title, ["metric", "before", "after", "change"], rows)
        table.caption = "\n".join(self.speed_notes()) or None
        return table

    def speed_notes(self) -> list[str]:
        """Where each latency was measured, and the faster form when the shipped file is not the fastest."""
        b, f = self.baseline, self.final
        notes = []
        if f.get("runtime"):
            sizes = ", ".join(
                f"b{bs}: {b['runtime'][bs]}" for bs in b.get("runtime", {}) if bs in f.get("latency_ms", {})
            )
            notes.append(f"after = {f['runtime']}; before = the original on its fastest fp32 form ({sizes})")
        for bs, best in f.get("fastest", {}).items():
            if best["runtime"] != f.get("runtime") and bs in f.get("latency_ms", {}):
                notes.append(
                    f"b{bs}: fastest on {best['runtime']} {best['ms']:.3g} ms; "
                    f"{f.get('shipped_file', 'the shipped file')} gives {f['latency_ms'][bs]:.3g} ms"
                )
        return notes

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
    evaluate_fn: Evaluate | None = None,
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
    accuracy = {
        name: labelled_accuracy(session, val_data).accuracy if evaluate_fn is None else score(evaluate_fn, session)
        for name, session in sessions.items()
    }
    ms = {name: t[cfg.auto_batch_size].median * 1e3 for name, t in timings.items()}
    size = {name: path.stat().st_size for name, path in variants.items()}
    inside = [n for n in variants if accuracy[n] >= floor] or list(variants)
    fastest = min(ms[n] for n in inside)
    chosen = min((n for n in inside if ms[n] <= fastest * (1 + cfg.size_slack)), key=lambda n: size[n])
    notes.append(
        "onnx-auto at batch {}: {}; shipped {}".format(
            cfg.auto_batch_size,
            ", ".join(
                f"{n} {ms[n]:.3f} ms / "
                + (f"{accuracy[n]:.2f}%" if evaluate_fn is None else f"score {accuracy[n]:.4g}")
                + f" / {size[n] / 1e3:.1f} KB"
                for n in variants
            ),
            chosen,
        )
    )
    final = folder / "model.onnx"
    variants[chosen].rename(final)
    return final


def _ratio(speedup: float) -> str:
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{speedup:.2f}x (slower)"


def _forms(model: nn.Module, example_input: torch.Tensor, folder: Path, notes: list[str], **kwargs: Any) -> dict:
    """``deployed_forms`` of ``model``; a model that cannot be exported is timed in folded eager (and said so)."""
    from slimkit.export.deployed import deployed_forms, eager_fp32

    folder.mkdir()
    try:
        return deployed_forms(model, example_input[:1], folder, **kwargs)
    except Exception as exc:  # export is optional without an export step: time what runs, say why
        notes.append(f"deployed forms not built ({type(exc).__name__}: {exc}); timed in PyTorch eager only")
        return {"eager fp32": eager_fp32(model)}


def _final_latency(
    original: nn.Module,
    current: nn.Module,
    exported: Path | None,
    example_input: torch.Tensor,
    batch_sizes: tuple[int, ...],
    runner: StepRunner,
    baseline: dict[str, Any],
    final: dict[str, Any],
) -> dict[str, dict[int, float]]:
    """Time, side by side in one run: the original in PyTorch eager and in its fp32 deployed forms, the shipped
    ONNX file on ONNX Runtime (or, with no ONNX export, the compressed model's deployed forms) and the compressed
    model's other forms (oneDNN int8, folded eager). Fills ``baseline`` / ``final`` (ms per batch size, keyed by
    str) and returns every candidate's median seconds per batch size."""
    shipped = exported if exported is not None and exported.suffix == ".onnx" else None
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="slimkit-final-") as tmp:
        folder = Path(tmp)
        candidates: dict[str, Any] = {"original: PyTorch eager": original}
        before = _forms(original, example_input, folder / "original", notes)
        candidates.update({f"original: {name}": form for name, form in before.items()})
        onnx_fp32 = folder / "original" / "model-fp32.onnx"
        if onnx_fp32.is_file():
            baseline["deployed_bytes"] = onnx_fp32.stat().st_size
        after = _forms(
            current, example_input, folder / "compressed", notes, calib=runner.calib(), batch_size=max(batch_sizes)
        )
        if shipped is not None:
            from slimkit.export.runtime import OrtModel

            candidates[f"shipped: {shipped.name} on onnxruntime"] = OrtModel(shipped, threads=2)
            # the compressed model's ONNX Runtime forms are the shipped file, or the variant onnx-auto rejected
            after = {name: form for name, form in after.items() if not name.startswith("onnxruntime")}
        candidates.update({f"compressed: {name}": form for name, form in after.items()})
        timings = benchmark_latency(
            candidates, example_input[:1], batch_sizes, threads=2, max_seconds=FINAL_MAX_SECONDS
        )
    latency = {name: {bs: s.median for bs, s in per.items()} for name, per in timings.items()}
    original_fp32 = {bs: _fastest_of(latency, [f"original: {name}" for name in before], bs) for bs in batch_sizes}
    baseline["runtime"] = {str(bs): name for bs, (name, _) in original_fp32.items()}
    baseline["latency_ms"] = {str(bs): ms for bs, (_, ms) in original_fp32.items()}
    baseline["eager_latency_ms"] = {str(bs): latency["original: PyTorch eager"][bs] * 1e3 for bs in batch_sizes}
    after_names = [name for name in latency if name.startswith(("shipped: ", "compressed: "))]
    fastest = {bs: _fastest_of(latency, after_names, bs) for bs in batch_sizes}
    final["fastest"] = {str(bs): {"runtime": name, "ms": ms} for bs, (name, ms) in fastest.items()}
    if shipped is not None:
        final["runtime"] = f"{shipped.name} on onnxruntime"
        final["latency_ms"] = {str(bs): latency[f"shipped: {final['runtime']}"][bs] * 1e3 for bs in batch_sizes}
    else:  # the weights (and a torch.export program, which runs the same graph) ship: the model's fastest form
        final["runtime"] = fastest[max(batch_sizes)][0]
        final["latency_ms"] = {str(bs): ms for bs, (_, ms) in fastest.items()}
    final["shipped_file"] = exported.name if exported is not None else "model.safetensors"
    final["shipped_bytes"] = exported.stat().st_size if exported is not None else final["size_bytes"]
    if notes:
        final["latency_notes"] = notes
    return latency


def _fastest_of(latency: dict[str, dict[int, float]], names: Any, bs: int) -> tuple[str, float]:
    """The fastest of ``names`` at ``bs``: its name without the ``"original: "``-style prefix, and its ms."""
    best = min(names, key=lambda n: latency[n][bs])
    return best.split(": ", 1)[1], latency[best][bs] * 1e3


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
    evaluate: Evaluate | None = None,
    example_input: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    test_data: Dataset | None = None,
    latency_batch_sizes: tuple[int, ...] = (1, 64),
    deploy_batch_size: int | None = None,
    judge_speed: bool = True,
    console: Console | None = None,
) -> CompressResult:
    """Run ``recipe`` on ``model`` (untouched) and return the best model inside the accuracy budget.

    Args:
        recipe: a ``Recipe``, a dict, a YAML path or a shipped recipe name (``fast-cpu``, ``tiny``, ``int8-only``).
        evaluate: ``fn(model) -> float``, higher is better, that the budget (``max_accuracy_drop``, in ``fn``'s
            units) is checked on instead of labelled accuracy on ``val_data`` (INC's ``eval_func``, NNCF's
            ``validate_fn``); it is called in eval mode under ``no_grad``, and with ``onnx-auto`` also on each ONNX
            Runtime variant. The data may then be inputs only (tensor, tuple or dict examples).
        example_input: one input batch: a tensor, a tuple or a dict of tensors (default: the first validation
            example).
        teacher: for KD recovery and distill steps (default: a frozen copy of ``model``).
        test_data: held-out data only reported (``test_accuracy``), never used for a decision; keep ``val_data``
            apart from it (e.g. ``slimkit.data.split``) so that fine-tuning and the budget do not select on test.
        latency_batch_sizes: the batch sizes of the final before/after latency table.
        deploy_batch_size: the batch size each step is timed at on the deployed runtime (default: the recipe's
            export ``auto_batch_size``, else 64; 1 for a latency-bound service).
        judge_speed: time each step that changes the architecture or numerics on the deployed runtime and back
            off or skip one that makes the deployed model slower (False: the accuracy budget alone decides).
    """
    recipe = Recipe.load(recipe)
    console = console or Console()
    check_evaluate(evaluate, "compress")
    evaluate_fn = evaluate  # the name ``evaluate`` is the caller's metric inside this function
    if example_input is None:
        example_input = first_example(val_data)
    original = copy.deepcopy(model).eval()
    teacher = teacher if teacher is not None else original
    if deploy_batch_size is None:
        last = recipe.steps[-1]
        deploy_batch_size = last.config.auto_batch_size if last.kind is StepKind.EXPORT else DEFAULT_DEPLOY_BATCH_SIZE
    if deploy_batch_size < 1:
        raise UsageError(f"deploy_batch_size={deploy_batch_size}: give the batch size the model serves, >= 1")
    runner = StepRunner(
        teacher,
        train_data,
        val_data,
        example_input,
        test_data=test_data,
        deploy_batch_size=deploy_batch_size if judge_speed else None,
        evaluate=evaluate,
    )
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
                exported = _pick_onnx(
                    current, step.config, example_input, export_dir, val_data, floor, export_notes, evaluate
                )
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
                export_cfg = step.config
                skipped = [o for o in outcomes if o.kind == "quantize" and o.status == "skipped"]
                if export_cfg.format is ExportFormat.ONNX_INT8 and skipped and not is_quantized(current):
                    # the quantize step was skipped (slower or outside the budget): ship what was kept, say so
                    export_cfg = dataclasses.replace(export_cfg, format=ExportFormat.ONNX)
                    note = "export: onnx-int8 asked, but the quantize step was skipped, so model.onnx is fp32"
                    console.print(note)
                    skipped[-1].notes.append(note)
                exported = export_model(current, export_cfg, example_input, export_dir)
            if step.config.parity and exported.suffix == ".onnx":
                from slimkit.export.runtime import OrtModel
                from slimkit.export.runtime import parity as check_parity

                parity = check_parity(current, OrtModel(exported, threads=2), val_data)
                console.print(
                    f"ONNX Runtime parity: max |diff| {parity['max_abs_diff']:.3g}, "
                    f"top-1 agreement {100 * parity['top1_agreement']:.2f}%"
                )
        final = runner.metrics(current)
        final["deploy_batch_size"] = deploy_batch_size
        if exported is not None and exported.suffix == ".onnx":
            from slimkit.export.runtime import OrtModel

            deployed = OrtModel(exported, threads=2)
            final["deployed_accuracy"] = (
                labelled_accuracy(deployed, val_data).accuracy if evaluate_fn is None else score(evaluate_fn, deployed)
            )
            if test_data is not None:
                final["deployed_test_accuracy"] = labelled_accuracy(deployed, test_data).accuracy
            final["deployed_bytes"] = exported.stat().st_size
        latency = _final_latency(
            original, current, exported, example_input, latency_batch_sizes, runner, baseline, final
        )
    except BaseException:
        shutil.rmtree(export_dir, ignore_errors=True)
        raise
    result = CompressResult(current, recipe, baseline, final, outcomes, latency, exported, parity)
    if exported is None:
        shutil.rmtree(export_dir, ignore_errors=True)
    else:  # removed when the result is garbage-collected, or at interpreter exit
        weakref.finalize(result, shutil.rmtree, str(export_dir), True)
    return result
