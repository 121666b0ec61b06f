"""The one step runner: ``slimkit.compress`` and ``slimkit.search`` both run a ``Recipe``'s steps through it.

A step (``prune``, ``finetune``, ``distill``, ``quantize``) becomes a new model through the public verbs; the
caller's model is never modified. ``compress`` runs steps under an accuracy floor: after each step the model is
evaluated, a step that broke the floor gets a bounded knowledge-distillation recovery, then is backed off
(pruning amount halved; bits raised binary -> ternary -> 4 -> 8) and finally skipped. A step that changes the
architecture or numerics (prune, quantize, a distilled student) is also judged on the runtime the model ships on:
before and after are timed side by side on their fastest deployed forms (``measure_deployed``) at the deployment
batch size, and a step that makes the deployed model slower is backed off or skipped the same way. A search
trial's plan is turned into a Recipe (``slimkit.tuning._verbs.plan_recipe``) and run without a floor: the search
scores the result itself, and a step a verb cannot apply raises (the trial is pruned as "plan not applicable").

The budget is checked on labelled accuracy (percent) on the validation data, or, when the runner is given
``evaluate=fn(model) -> float`` (higher is better), on that function: every metrics dict and ``StepOutcome`` says
which in ``metric``. The knowledge-distillation loss of recovery (and of the default ``kd``) follows the model's
output: Hinton KL for class logits ``(N, classes)`` with labelled training data, the cosine distance between the
outputs otherwise (token or embedding outputs, a ``last_hidden_state``, or data without labels).

Example:
    >>> runner = StepRunner(teacher, train, val, example_input)                        # doctest: +SKIP
    >>> model, outcomes = run_steps(model, recipe, runner, floor=97.0)                  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from torch import nn

from slimkit import _inputs
from slimkit._text import human
from slimkit.errors import UsageError
from slimkit.export.deployed import DeployedSpeed
from slimkit.recipe import Recipe, Step, StepKind
from slimkit.train import Evaluate, FitResult, LossFn, evaluate, fit, metric_name, score

__all__ = [
    "DeployedSpeed",
    "SpeedVerdict",
    "StepOutcome",
    "StepRunner",
    "back_off",
    "describe_score",
    "measure_deployed",
    "pick_output_loss",
    "run_step",
    "run_steps",
    "step_metrics",
]

EpochHook = Callable[[int, nn.Module, FitResult], None]
DEFAULT_KD = "default"  # StepRunner(kd=...): DistillConfig() (its default temperature and alpha)
# a step whose deployed model is more than 3% slower than before it, with the quartiles of the two apart (beyond
# the noise of the side-by-side run), is backed off or skipped
SLOWER_TOLERANCE = 0.03
CALIB_EXAMPLES = 128  # training examples that calibrate oneDNN's int8 form when a step is timed


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
    # the deployed speed, when the step changed the architecture or numerics and compress() judged it: the fastest
    # form (``runtime``, e.g. "onnxruntime int8") and its median ms at ``deploy_batch_size``, the same before the
    # step, and every form timed side by side ("before: onnxruntime fp32", "after: onednn int8", ...)
    runtime: str | None = None
    deployed_ms: float | None = None
    runtime_before: str | None = None
    deployed_ms_before: float | None = None
    deploy_batch_size: int | None = None
    deployed_all_ms: dict[str, float] = field(default_factory=dict)
    # what ``accuracy`` holds: "accuracy" (labelled, percent) or the name of the caller's evaluate function
    metric: str = "accuracy"


def measure_deployed(
    models: Mapping[str, nn.Module],
    example_input: torch.Tensor,
    batch_size: int,
    *,
    calib: list[torch.Tensor] | None = None,
    threads: int = 2,
    max_seconds: float = 4.0,
) -> dict[str, DeployedSpeed]:
    """Each model's fastest deployed form, all timed side by side at ``batch_size``
    (``slimkit.export.deployed.fastest_forms``). This is the one place ``compress`` times steps (tests replace it
    to inject timings)."""
    from slimkit.export.deployed import fastest_forms

    return fastest_forms(models, example_input, batch_size, calib=calib, threads=threads, max_seconds=max_seconds)


@dataclass
class SpeedVerdict:
    """The deployed model before and after a step, timed side by side at ``batch_size``."""

    before: DeployedSpeed
    after: DeployedSpeed
    batch_size: int

    @property
    def slower(self) -> bool:
        """More than ``SLOWER_TOLERANCE`` slower, and the timed calls do not overlap (beyond the noise)."""
        return self.after.ms > self.before.ms * (1 + SLOWER_TOLERANCE) and self.after.p25_ms > self.before.p75_ms

    def describe(self) -> str:
        """``"onnxruntime int8 12.9 ms vs onnxruntime fp32 11.2 ms before (batch 64)"``."""
        return (
            f"{self.after.runtime} {self.after.ms:.3g} ms vs {self.before.runtime} {self.before.ms:.3g} ms before "
            f"(batch {self.batch_size})"
        )

    def fields(self, kept: str = "after") -> dict[str, Any]:
        """The StepOutcome fields; ``kept="before"`` when the step was skipped (the model before it ships)."""
        chosen = self.after if kept == "after" else self.before
        timings = {f"before: {n}": ms for n, ms in self.before.all_ms.items()}
        timings.update({f"after: {n}": ms for n, ms in self.after.all_ms.items()})
        return {
            "runtime": chosen.runtime,
            "deployed_ms": chosen.ms,
            "runtime_before": self.before.runtime,
            "deployed_ms_before": self.before.ms,
            "deploy_batch_size": self.batch_size,
            "deployed_all_ms": timings,
        }


def _architecture(model: nn.Module) -> list[tuple[str, str, tuple]]:
    """Module names, types and tensor shapes: what decides the deployed graph (not the weights' values)."""
    return [
        (
            name,
            type(module).__name__,
            tuple(
                (key, tuple(t.shape))
                for key, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            ),
        )
        for name, module in model.named_modules()
    ]


def step_metrics(
    model: nn.Module,
    val_data: Any,
    example_input: Any,
    test_data: Any = None,
    *,
    evaluate_fn: Evaluate | None = None,
) -> dict[str, Any]:
    """What the budget is checked on (``accuracy``: labelled accuracy on the validation data, or
    ``evaluate_fn(model)``; ``metric`` says which), size and cost; test accuracy if given."""
    from slimkit.export.artifact import weights_size
    from slimkit.measure import profile

    prof = profile(model, example_input)
    metrics = {
        "accuracy": evaluate(model, val_data).accuracy if evaluate_fn is None else score(evaluate_fn, model),
        "metric": "accuracy" if evaluate_fn is None else metric_name(evaluate_fn),
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


def describe_score(value: float, metric: str) -> str:
    """``"accuracy 97.12%"`` or, for a user metric, ``"embedding_cosine 0.9712"``."""
    return f"accuracy {value:.2f}%" if metric == "accuracy" else f"{metric} {value:.4g}"


def pick_output_loss(model: nn.Module, example_input: Any, train_data: Any) -> str:
    """The distillation output loss for ``model``: ``"kl"`` when its output (first tensor) is class logits
    ``(N, classes)`` and the training data has labels, else ``"cosine"`` (token outputs ``(N, T, C)``, a
    ``last_hidden_state``, embeddings, or data without labels).

    Example:
        >>> data = [(torch.zeros(4), 1)]
        >>> pick_output_loss(nn.Linear(4, 3), torch.zeros(1, 4), data)
        'kl'
        >>> pick_output_loss(nn.Linear(4, 3), torch.zeros(1, 5, 4), data)
        'cosine'
    """
    from slimkit._inputs import call, first_tensor
    from slimkit.train import eval_mode, module_device, to_device

    with eval_mode(model), torch.no_grad():
        output = first_tensor(call(model, to_device(example_input, module_device(model))))
    labelled = _inputs.probe(train_data)[1]
    return "kl" if output.ndim == 2 and labelled else "cosine"


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
        deploy_batch_size: judge each step that changes the architecture or numerics on the runtime it ships on,
            at this batch size (``measure_deployed``; ``run_step`` backs off or skips a step that makes the
            deployed model slower); None (a search trial) times nothing.
        evaluate: ``fn(model) -> float`` (higher is better) that the budget is checked on instead of labelled
            accuracy on ``val_data``; training steps then keep no best epoch by validation accuracy.
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
        deploy_batch_size: int | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        self.teacher, self.train_data, self.val_data = teacher, train_data, val_data
        self.example_input, self.test_data = example_input, test_data
        self.kd, self.on_epoch_end = kd, on_epoch_end
        self.deploy_batch_size = deploy_batch_size
        self.evaluate = evaluate
        self._calib: list[torch.Tensor] | None = None
        self._output_loss: str | None = None

    def calib(self) -> list[torch.Tensor]:
        """Up to ``CALIB_EXAMPLES`` training inputs in batches of 32 (oneDNN int8's calibration when timing)."""
        if self._calib is None:
            count = min(CALIB_EXAMPLES, len(self.train_data))
            inputs = [self.train_data[i][0] for i in range(count)]
            self._calib = [torch.stack(inputs[i : i + 32]) for i in range(0, count, 32)]
        return self._calib

    def judge_speed(self, before: nn.Module, after: nn.Module) -> SpeedVerdict | None:
        """``before`` and ``after`` timed side by side on their fastest deployed forms, or None when there is
        nothing to judge (no ``deploy_batch_size``, a non-tensor input, or the same architecture and numerics)."""
        if self.deploy_batch_size is None or not isinstance(self.example_input, torch.Tensor):
            return None
        if _architecture(before) == _architecture(after):
            return None
        speeds = measure_deployed(
            {"before": before, "after": after}, self.example_input, self.deploy_batch_size, calib=self.calib()
        )
        return SpeedVerdict(speeds["before"], speeds["after"], self.deploy_batch_size)

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        return step_metrics(model, self.val_data, self.example_input, self.test_data, evaluate_fn=self.evaluate)

    def output_loss(self) -> str:
        """The KD output loss for this teacher and data (``pick_output_loss``), decided once."""
        if self._output_loss is None:
            self._output_loss = pick_output_loss(self.teacher, self.example_input, self.train_data)
        return self._output_loss

    def loss_fn(self) -> LossFn | None:
        if self.kd is None:
            return None
        from slimkit.distillation import DistillConfig, kd_loss_fn

        return kd_loss_fn(
            self.teacher, DistillConfig(output_loss=self.output_loss()) if self.kd == DEFAULT_KD else self.kd
        )

    def _training_pairs(self) -> Any:
        """The training data as ``fit`` reads it: ``(inputs, labels)``, or inputs with placeholder targets that only
        a KD loss (which needs no labels) may train on."""
        if _inputs.probe(self.train_data)[1]:
            return self.train_data
        if self.kd is None:
            raise UsageError("finetune: the training data has no labels; give (inputs, label) examples or a KD loss")
        return _inputs.with_targets(self.train_data, False)

    def _labelled_val(self) -> Any:
        """The validation data for a training step's best-epoch selection: none when a user metric decides."""
        return self.val_data if self.evaluate is None else None

    def run(self, step: Step, model: nn.Module) -> nn.Module:
        """The model after ``step`` (a new model; ``model`` is not modified)."""
        if step.kind is StepKind.PRUNE:
            from slimkit.pruning import prune

            return prune(
                model,
                step.config,
                self.example_input,
                train_data=self.train_data,
                val_data=self._labelled_val(),
                loss_fn=self.loss_fn(),
                evaluate=self.evaluate,
            ).model
        if step.kind is StepKind.FINETUNE:
            tuned = copy.deepcopy(model)
            fit(
                tuned,
                self._training_pairs(),
                self._labelled_val(),
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

            return quantize(
                model, step.config, self.train_data, val_data=self._labelled_val(), loss_fn=self.loss_fn()
            ).model
        raise UsageError(f"step {step.kind.value!r} does not transform the model")

    def recovery_config(self, recipe: Recipe) -> Any:
        """The ``DistillConfig`` of a bounded KD recovery: ``recipe.recovery_epochs`` of SGD at
        ``recipe.recovery_lr``, with the output loss the model's output asks for (``pick_output_loss``)."""
        from slimkit.distillation import DistillConfig

        return DistillConfig(
            epochs=recipe.recovery_epochs,
            lr=recipe.recovery_lr,
            optimizer="sgd",
            batch_size=64,
            output_loss=self.output_loss(),
        )

    def recover(self, model: nn.Module, recipe: Recipe) -> nn.Module:
        """A bounded KD run from the teacher (``recovery_config``)."""
        from slimkit.distillation import distill

        return distill(model, self.teacher, self.recovery_config(recipe), self.train_data, self.val_data).model


def run_step(
    runner: StepRunner, step: Step, model: nn.Module, floor: float, recipe: Recipe, console: Console
) -> tuple[nn.Module, StepOutcome]:
    """Run ``step`` under the accuracy ``floor`` and, when the runner has a ``deploy_batch_size``, on the deployed
    runtime: recover, back off, or skip it; returns the kept model."""
    start, notes, attempt = time.perf_counter(), [], step
    last_speed: SpeedVerdict | None = None
    for tries in range(recipe.max_backoffs + 1):
        last_speed = None  # why the last attempt was refused, when it was for speed
        try:
            candidate: nn.Module | None = runner.run(attempt, model)
        except ValueError as exc:  # e.g. an unreachable pruning target: a weaker step may still apply
            notes.append(f"{attempt.kind.value} {_brief(attempt.config)} cannot be applied: {exc}")
            candidate = None
        metrics = {"accuracy": float("-inf")} if candidate is None else runner.metrics(candidate)
        metric = str(metrics.get("metric", "accuracy"))
        status = "applied" if tries == 0 else "backed_off"
        recoverable = recipe.recovery_epochs and attempt.kind not in (StepKind.DISTILL, StepKind.FINETUNE)
        if candidate is not None and metrics["accuracy"] < floor and recoverable:
            notes.append(
                f"{describe_score(metrics['accuracy'], metric)} < budget {describe_score(floor, metric)}: KD "
                f"recovery ({recipe.recovery_epochs} epochs, output loss {runner.output_loss()})"
            )
            candidate = runner.recover(candidate, recipe)
            metrics = runner.metrics(candidate)
            status = "recovered" if tries == 0 else "backed_off"
        if candidate is not None and metrics["accuracy"] >= floor:
            try:
                speed = runner.judge_speed(model, candidate)
            except Exception as exc:  # a model that cannot be exported is judged on accuracy alone, and said so
                speed = None
                notes.append(f"deployed speed not judged ({type(exc).__name__}: {exc})")
            if speed is None or not speed.slower:
                if speed is not None:
                    notes.append(f"deployed: {speed.describe()}")
                return candidate, StepOutcome(
                    attempt.kind.value,
                    status,
                    attempt.config.to_dict(),
                    seconds=time.perf_counter() - start,
                    notes=notes,
                    **metrics,
                    **(speed.fields() if speed is not None else {}),
                )
            last_speed = speed
            what = f"{attempt.kind.value} {_brief(attempt.config)}".removesuffix(" {}")
            notes.append(f"{what} makes the deployed model slower: {speed.describe()}")
        elif candidate is not None:
            notes.append(
                f"{describe_score(metrics['accuracy'], metric)} still below budget {describe_score(floor, metric)}"
            )
        weaker = back_off(attempt)
        if weaker is not None and tries < recipe.max_backoffs:
            notes[-1] += "; backing off"
        console.print(f"[yellow]{attempt.kind.value}: {notes[-1]}[/yellow]")
        if weaker is None:
            break
        attempt = weaker
    metrics = runner.metrics(model)
    if last_speed is not None:
        notes.append(
            f"{step.kind.value} skipped: {last_speed.after.runtime} {last_speed.after.ms:.3g} ms vs "
            f"{last_speed.before.runtime} {last_speed.before.ms:.3g} ms without it (batch {last_speed.batch_size})"
        )
    return model, StepOutcome(
        step.kind.value,
        "skipped",
        step.config.to_dict(),
        seconds=time.perf_counter() - start,
        notes=[*notes, "step skipped: the model before it is kept"],
        **metrics,
        **(last_speed.fields(kept="before") if last_speed is not None else {}),
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
            f"{outcome.kind}: {outcome.status}, {describe_score(outcome.accuracy, outcome.metric)} "
            f"(budget >= {describe_score(floor, outcome.metric).split()[-1]}), {human(outcome.size_bytes, 'B')}, "
            f"{outcome.seconds:.1f}s"
            + (
                f", deployed {outcome.runtime} {outcome.deployed_ms:.3g} ms at batch {outcome.deploy_batch_size}"
                if outcome.runtime is not None and outcome.deployed_ms is not None
                else ""
            )
        )
    return model, outcomes
