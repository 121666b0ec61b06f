"""The one step runner: ``slimkit.compress`` and ``slimkit.search`` both run a ``Recipe``'s steps through it.

A step (``prune``, ``finetune``, ``distill``, ``quantize``) becomes a new model through the public verbs; the
caller's model is never modified. ``compress`` runs steps under an accuracy floor: after each step the model is
evaluated, a step that broke the floor gets a bounded knowledge-distillation recovery, then is backed off
(pruning amount halved; bits raised binary -> ternary -> 4 -> 8) and finally skipped. A search trial's plan is
turned into a Recipe (``slimkit.tuning._verbs.plan_recipe``) and run without a floor: the search scores the
result itself, and a step a verb cannot apply raises (the trial is pruned as "plan not applicable").

Example:
    >>> runner = StepRunner(teacher, train, val, example_input)                        # doctest: +SKIP
    >>> model, outcomes = run_steps(model, recipe, runner, floor=97.0)                  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from torch import nn

from slimkit._text import human
from slimkit.errors import UsageError
from slimkit.recipe import Recipe, Step, StepKind
from slimkit.train import FitResult, LossFn, evaluate, fit

__all__ = ["StepOutcome", "StepRunner", "back_off", "run_step", "run_steps", "step_metrics"]

EpochHook = Callable[[int, nn.Module, FitResult], None]
DEFAULT_KD = "default"  # StepRunner(kd=...): DistillConfig() (temperature 4, alpha 0.9)


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


def step_metrics(model: nn.Module, val_data: Any, example_input: torch.Tensor, test_data: Any = None) -> dict[str, Any]:
    """Accuracy on the validation data (what the budget is checked on), size and cost; test accuracy if given."""
    from slimkit.export.artifact import weights_size
    from slimkit.measure import profile

    prof = profile(model, example_input)
    metrics = {
        "accuracy": evaluate(model, val_data).accuracy,
        "params": prof.params,
        "macs": prof.macs,
        "size_bytes": weights_size(model),
    }
    if test_data is not None:
        metrics["test_accuracy"] = evaluate(model, test_data).accuracy
    return metrics


def back_off(step: Step) -> Step | None:
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


def _brief(config: Any) -> str:
    """The settings that differ from the config's defaults, floats to 4 significant digits (for notes)."""
    try:
        defaults = type(config)().to_dict()
    except (TypeError, ValueError):
        defaults = {}
    changed = {k: v for k, v in config.to_dict().items() if defaults.get(k, object()) != v}
    return "{" + ", ".join(f"{k}: {f'{v:.4g}' if isinstance(v, float) else v}" for k, v in changed.items()) + "}"


class StepRunner:
    """Runs steps on a model with the shared context: teacher, data, example input, recovery loss.

    Args:
        kd: the knowledge-distillation settings of the loss that pruning, fine-tuning and QAT train with (teacher =
            ``teacher``): a ``DistillConfig``, ``"default"`` for ``DistillConfig()``, or None for plain labels.
        on_epoch_end: called after each epoch of a ``finetune`` step (a search reports to its pruner here).
    """

    def __init__(
        self,
        teacher: nn.Module,
        train_data: Any,
        val_data: Any,
        example_input: torch.Tensor,
        *,
        test_data: Any = None,
        kd: Any = DEFAULT_KD,
        on_epoch_end: EpochHook | None = None,
    ) -> None:
        self.teacher, self.train_data, self.val_data = teacher, train_data, val_data
        self.example_input, self.test_data = example_input, test_data
        self.kd, self.on_epoch_end = kd, on_epoch_end

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        return step_metrics(model, self.val_data, self.example_input, self.test_data)

    def loss_fn(self) -> LossFn | None:
        if self.kd is None:
            return None
        from slimkit.distillation import DistillConfig, kd_loss_fn

        return kd_loss_fn(self.teacher, DistillConfig() if self.kd == DEFAULT_KD else self.kd)

    def run(self, step: Step, model: nn.Module) -> nn.Module:
        """The model after ``step`` (a new model; ``model`` is not modified)."""
        if step.kind is StepKind.PRUNE:
            from slimkit.pruning import prune

            return prune(
                model,
                step.config,
                self.example_input,
                train_data=self.train_data,
                val_data=self.val_data,
                loss_fn=self.loss_fn(),
            ).model
        if step.kind is StepKind.FINETUNE:
            tuned = copy.deepcopy(model)
            fit(
                tuned,
                self.train_data,
                self.val_data,
                step.config,
                loss_fn=self.loss_fn(),
                on_epoch_end=self.on_epoch_end,
            )
            return tuned
        if step.kind is StepKind.DISTILL:
            from slimkit.distillation import distill

            return distill(model, self.teacher, step.config, self.train_data, self.val_data).model
        if step.kind is StepKind.QUANTIZE:
            from slimkit.quantization import quantize

            return quantize(model, step.config, self.train_data, val_data=self.val_data, loss_fn=self.loss_fn()).model
        raise UsageError(f"step {step.kind.value!r} does not transform the model")

    def recover(self, model: nn.Module, recipe: Recipe) -> nn.Module:
        """A bounded KD run from the teacher (``recipe.recovery_epochs`` of SGD at ``recipe.recovery_lr``)."""
        from slimkit.distillation import DistillConfig, distill

        cfg = DistillConfig(epochs=recipe.recovery_epochs, lr=recipe.recovery_lr, optimizer="sgd", batch_size=64)
        return distill(model, self.teacher, cfg, self.train_data, self.val_data).model


def run_step(
    runner: StepRunner, step: Step, model: nn.Module, floor: float, recipe: Recipe, console: Console
) -> tuple[nn.Module, StepOutcome]:
    """Run ``step`` under the accuracy ``floor``: recover, back off, or skip it; returns the kept model."""
    start, notes, attempt = time.perf_counter(), [], step
    for tries in range(recipe.max_backoffs + 1):
        try:
            candidate: nn.Module | None = runner.run(attempt, model)
        except ValueError as exc:  # e.g. an unreachable pruning target: a weaker step may still apply
            notes.append(f"{attempt.kind.value} {_brief(attempt.config)} cannot be applied: {exc}")
            candidate = None
        metrics = {"accuracy": float("-inf")} if candidate is None else runner.metrics(candidate)
        status = "applied" if tries == 0 else "backed_off"
        recoverable = recipe.recovery_epochs and attempt.kind not in (StepKind.DISTILL, StepKind.FINETUNE)
        if candidate is not None and metrics["accuracy"] < floor and recoverable:
            notes.append(
                f"accuracy {metrics['accuracy']:.2f}% < budget {floor:.2f}%: KD recovery "
                f"({recipe.recovery_epochs} epochs)"
            )
            candidate = runner.recover(candidate, recipe)
            metrics = runner.metrics(candidate)
            status = "recovered" if tries == 0 else "backed_off"
        if candidate is not None and metrics["accuracy"] >= floor:
            return candidate, StepOutcome(
                attempt.kind.value,
                status,
                attempt.config.to_dict(),
                seconds=time.perf_counter() - start,
                notes=notes,
                **metrics,
            )
        weaker = back_off(attempt)
        if candidate is not None:
            notes.append(f"accuracy {metrics['accuracy']:.2f}% still below budget {floor:.2f}%")
        if weaker is not None and tries < recipe.max_backoffs:
            notes[-1] += "; backing off"
        console.print(f"[yellow]{attempt.kind.value}: {notes[-1]}[/yellow]")
        if weaker is None:
            break
        attempt = weaker
    metrics = runner.metrics(model)
    return model, StepOutcome(
        step.kind.value,
        "skipped",
        step.config.to_dict(),
        seconds=time.perf_counter() - start,
        notes=[*notes, "step skipped: the model before it is kept"],
        **metrics,
    )


def run_steps(
    model: nn.Module, recipe: Recipe, runner: StepRunner, *, floor: float | None = None, console: Console | None = None
) -> tuple[nn.Module, list[StepOutcome]]:
    """Run the recipe's transform steps in order (an ``export`` step, always last, is the caller's).

    With ``floor`` (``compress``): each step is checked, recovered, backed off or skipped by ``run_step`` and its
    outcome returned. Without (a search trial): each step is applied as it is, errors propagate, no outcomes.
    ``model`` is never modified; the result is a new model when any step ran.
    """
    outcomes: list[StepOutcome] = []
    total = len(recipe.steps)
    for i, step in enumerate(recipe.steps):
        if step.kind is StepKind.EXPORT:
            continue
        if floor is None:
            model = runner.run(step, model)
            continue
        console = console or Console()
        console.rule(f"step {i + 1}/{total}: {step.kind.value}")
        model, outcome = run_step(runner, step, model, floor, recipe, console)
        outcomes.append(outcome)
        console.print(
            f"{outcome.kind}: {outcome.status}, accuracy {outcome.accuracy:.2f}% "
            f"(budget >= {floor:.2f}%), {human(outcome.size_bytes, 'B')}, {outcome.seconds:.1f}s"
        )
    return model, outcomes
