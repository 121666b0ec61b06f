"""``prune``: one shot, or the iterative loop prune a step -> fine-tune -> evaluate -> repeat.

The loop reaches ``amount`` in ``steps`` equal steps of the *original* model's MACs/params (step ``i`` targets
``amount * i / steps``), fine-tunes after each (through ``loss_fn``, the hook distillation uses), and stops when the
accuracy drop from the unpruned model would exceed ``max_accuracy_drop``; the most pruned model inside the budget
is returned. With ``evaluate=fn(model) -> float`` (higher is better: an embedding cosine, a negative perplexity)
the drop is measured on that function, in its units, instead of labelled accuracy on ``val_data``; the record's
``metric`` names which. Each step is checkpointed (record + weights) in ``checkpoint_dir``: rerunning resumes
after the last finished step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit._io import write_text
from slimkit.errors import InputTypeError, UsageError
from slimkit.history import record_step
from slimkit.pruning.config import PruneConfig
from slimkit.pruning.core import PruneResult, apply_record_, compose_records, prune_once
from slimkit.train import Evaluate, check_evaluate, metric_name

__all__ = ["prune", "step_amounts"]


def step_amounts(amount: float, steps: int) -> list[float]:
    """Cumulative reduction after each step (of the original model): a linear schedule."""
    return [amount * (i + 1) / steps for i in range(steps)]


def _check_input(model: nn.Module, config: PruneConfig, example_input) -> None:
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"prune: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, PruneConfig):
        raise InputTypeError(f"prune: config must be a slimkit.PruneConfig, got {type(config).__name__}")
    from slimkit._inputs import as_args, tensors_of

    ok = isinstance(example_input, (torch.Tensor, tuple, dict))
    if ok:
        args, kwargs = as_args(example_input)
        ok = bool(tensors_of(example_input)) and all(
            v is None or isinstance(v, (torch.Tensor, int, float, bool)) for v in [*args, *kwargs.values()]
        )
    if not ok:
        raise InputTypeError(
            "prune: example_input must be a tensor batch (e.g. torch.zeros(1, 3, 32, 32)), a tuple of them "
            f"(positional arguments) or a dict (keyword arguments, e.g. input_ids), got {type(example_input).__name__}"
        )


def prune(
    model: nn.Module,
    config: PruneConfig,
    example_input: torch.Tensor,
    train_data=None,
    val_data=None,
    *,
    loss_fn=None,
    evaluate: Evaluate | None = None,
) -> PruneResult:
    """Structured pruning of a copy of ``model``; the caller's model is untouched.

    Args:
        example_input: a batch the model accepts (shapes are traced from it).
        train_data, val_data: enable fine-tuning and evaluation between steps (and Taylor importance).
        loss_fn: ``(outputs, targets, inputs) -> loss`` used for fine-tuning (distillation plugs in here).
        evaluate: ``fn(model) -> float``, higher is better: what the iterative loop's ``max_accuracy_drop`` is
            checked on instead of labelled accuracy on ``val_data`` (fine-tuning then keeps no best epoch by
            validation accuracy).

    Example:
        >>> import slimkit, torch
        >>> model = slimkit.models.create("lenet5")
        >>> cfg = slimkit.PruneConfig(amount=0.5, target="macs", importance="l2")
        >>> result = slimkit.prune(model, cfg, torch.zeros(1, 1, 28, 28))
        >>> round(result.record["reduction"]["macs"], 2)
        0.5
    """
    _check_input(model, config, example_input)
    check_evaluate(evaluate, "prune")
    if config.allocation.value == "sensitivity" and not config.sensitivity and val_data is not None:
        from slimkit.pruning.sensitivity import sensitivity

        table = sensitivity(
            model,
            example_input,
            val_data,
            importance=config.importance,
            ignore=config.ignore,
            leaf_modules=config.leaf_modules,
            train_data=train_data,
        )
        config = dataclasses.replace(config, sensitivity=table.curves)
    iterative = config.steps > 1 or (config.finetune is not None and train_data is not None)
    if not iterative:
        pruned, record = prune_once(model, config, example_input, train_data=train_data, loss_fn=loss_fn)
        return PruneResult(record_step(pruned, model, "prune", record), record)
    return _loop(model, config, example_input, train_data, val_data, loss_fn, evaluate)


def _loop(model, cfg: PruneConfig, example_input, train_data, val_data, loss_fn, evaluate_fn) -> PruneResult:
    from slimkit.models.weights import load_weights, save_weights
    from slimkit.train import TrainConfig, evaluate, fit, progress_bar, score

    def measure(candidate: nn.Module) -> float | None:
        if evaluate_fn is not None:
            return score(evaluate_fn, candidate)
        return evaluate(candidate, val_data).accuracy if val_data is not None else None

    finetune = cfg.finetune or TrainConfig(epochs=1)
    folder = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    state: dict[str, Any] = {"done": 0, "record": None, "log": [], "best": 0, "baseline": None}
    baseline = measure(model)
    state["baseline"] = baseline
    current, best_model = model, model
    if folder is not None and (folder / "state.json").exists():
        state = json.loads((folder / "state.json").read_text())
        if state.get("config") != _fingerprint(cfg):
            raise UsageError(
                f"checkpoint folder {folder} belongs to a different PruneConfig; use another "
                "checkpoint_dir or delete it"
            )
        if state["record"] is not None:
            current = apply_record_(copy.deepcopy(model), state["record"])
            load_weights(current, folder / "current.safetensors")
            best_model = current
    targets = step_amounts(cfg.amount, cfg.steps)
    best_record = state["record"] if state["best"] == state["done"] else None
    stopped = False
    with progress_bar(finetune.progress) as bar:
        task = bar.add_task("prune", total=cfg.steps, info="", completed=state["done"])
        for index in range(state["done"], cfg.steps):
            done = (
                0.0
                if not state["record"]
                else (
                    targets[index - 1] if cfg.target.value == "channels" else state["record"]["reduction"][_metric(cfg)]
                )
            )
            relative = 1 - (1 - targets[index]) / (1 - done)
            step_cfg = dataclasses.replace(
                cfg, amount=min(max(relative, 0.0), 0.999), steps=1, finetune=None, tolerance=cfg.tolerance / (1 - done)
            )
            pruned, record = prune_once(current, step_cfg, example_input, train_data=train_data, loss_fn=loss_fn)
            if train_data is not None and finetune.epochs > 0:
                fit(pruned, train_data, val_data if evaluate_fn is None else None, finetune, loss_fn=loss_fn)
            combined = compose_records(state["record"], record)
            accuracy = measure(pruned)
            entry = {
                "step": index + 1,
                "target": targets[index],
                "macs_reduction": combined["reduction"]["macs"],
                "params_reduction": combined["reduction"]["params"],
                "accuracy": accuracy,
                "drop": None if accuracy is None or baseline is None else baseline - accuracy,
            }
            state["log"].append(entry)
            bar.update(
                task,
                advance=1,
                description=f"prune step {index + 1}/{cfg.steps}",
                info=f"-{entry['macs_reduction']:.0%} MACs acc {accuracy}",
            )
            limit = cfg.max_accuracy_drop
            if limit is not None and entry["drop"] is not None and entry["drop"] > limit:
                entry["stopped"] = f"drop {entry['drop']:.2f} > max_accuracy_drop {cfg.max_accuracy_drop}"
                stopped = True
                break
            current, best_model, best_record = pruned, pruned, combined
            state.update(done=index + 1, record=combined, best=index + 1, config=_fingerprint(cfg))
            if folder is not None:
                save_weights(current, folder / "current.safetensors")
                write_text(folder / "state.json", json.dumps(state, indent=1))
    if best_model is model:
        best_model, best_record = (
            copy.deepcopy(model),
            prune_once(model, dataclasses.replace(cfg, amount=0.0, steps=1, finetune=None), example_input)[1],
        )
    if best_record is None:  # a checkpoint whose best step is not its last finished one (slimkit writes none)
        raise UsageError(f"checkpoint folder {folder} records no pruned model for its best step; delete it")
    record = dict(
        best_record,
        steps=state["log"],
        baseline_accuracy=baseline,
        metric="accuracy" if evaluate_fn is None else metric_name(evaluate_fn),
        stopped_early=stopped,
        config=cfg.to_dict(strict=False),
    )
    return PruneResult(record_step(best_model, model, "prune", record), record, state["log"])


def _metric(cfg: PruneConfig) -> str:
    return cfg.target.value if cfg.target.value in ("params", "latency") else "macs"


def _fingerprint(cfg: PruneConfig) -> dict:
    data = cfg.to_dict(strict=False)
    data.pop("checkpoint_dir", None)
    return json.loads(json.dumps(data))
