"""``slimkit.search``: an Optuna study over training hyperparameters or compression plans, stored so that a killed
run continues where it stopped, shared by any number of workers, and leaving the best model on disk at all times.

Example:
    >>> cfg = SearchConfig(objectives=("accuracy", "latency"), max_accuracy_drop=0.5, n_trials=30,
    ...                    space="compression", out="runs/lenet5")                   # doctest: +SKIP
    >>> study = slimkit.search(model, cfg, train, test)                              # doctest: +SKIP
    >>> study.best.metrics, study.best.plan, study.best.path                         # doctest: +SKIP
"""

from __future__ import annotations

import _thread
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit._inputs import first_example
from slimkit.errors import InputTypeError, UsageError
from slimkit.train import Evaluate, check_evaluate, metric_name
from slimkit.tuning import spaces
from slimkit.tuning.config import Pruner, Sampler, SearchConfig
from slimkit.tuning.objectives import OBJECTIVES, LatencyCache, Measurer, accuracy_threshold
from slimkit.tuning.pareto import Candidate, best_index, feasible_front
from slimkit.tuning.plans import TrialContext, run_params
from slimkit.tuning.results import SearchResult, SearchStudy, candidate_of, format_metrics
from slimkit.tuning.saving import copy_result, read_result, save_result
from slimkit.tuning.storage import HOST_ATTR, WORKER_ATTR

__all__ = ["search"]

ATTR = "slimkit"  # study user attribute: the settings the study was created with, and the baseline
SKIPPED = "skipped"  # trial user attribute: the trial never ran, n_trials was taken by other workers' trials
BEST_LOCK = ".best.lock"  # in <out>: held while deciding whether a trial replaces <out>/best, and replacing it


def resolve_space(config: SearchConfig, model: nn.Module, teacher: nn.Module | None) -> dict[str, spaces.ParamSpec]:
    space = config.space
    if isinstance(space, str):
        space = spaces.preset(
            space,
            model,
            epochs=config.epochs,
            teacher=teacher is not None,
            distill_available=spaces.available("distillation"),
        )
    parsed = spaces.parse_space(space)
    needs = {
        "prune_": "pruning",
        "bits": "quantization",
        "distill": "distillation",
        "temperature": "distillation",
        "alpha": "distillation",
    }
    for name in parsed:
        for prefix, package in needs.items():
            if name.startswith(prefix) and not spaces.available(package):
                raise UsageError(f"search space parameter {name!r} needs slimkit.{package}, which is not installed")
    if (
        teacher is None
        and not any(spaces.is_plan_param(n) for n in parsed)
        and ("temperature" in parsed or "alpha" in parsed)
    ):
        raise UsageError(
            "search space has 'temperature'/'alpha' (distillation) but no teacher was given: pass "
            "teacher=... or drop them"
        )
    return parsed


def example_from(data: Any) -> Any:
    """One input example (batch of 1: a tensor, tuple or dict) from a Dataset or DataLoader of inputs or of
    ``(inputs, labels)``."""
    if not isinstance(data, torch.utils.data.DataLoader) and len(data) == 0:
        raise UsageError("val_data is empty")
    return first_example(data)


def _sampler(config: SearchConfig, worker: int, n_startup: int) -> Any:
    import optuna

    seed = config.seed + 1000 * worker  # workers must not propose the same points
    kind = config.sampler
    if kind is Sampler.AUTO:
        kind = Sampler.TPE if len(config.objectives) == 1 else Sampler.NSGA2
    if kind is Sampler.TPE:
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup)
    if kind is Sampler.NSGA2:
        population = max(4, min(50, config.n_trials // 3))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(config: SearchConfig, epochs: int) -> Any:
    import optuna

    p = config.pruner
    if p is Pruner.NONE or len(config.objectives) > 1:  # Optuna's pruners are single-objective
        return optuna.pruners.NopPruner()
    if p is Pruner.MEDIAN:
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if p is Pruner.PERCENTILE:
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=3)
    if p is Pruner.HYPERBAND:
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, epochs))
    return optuna.pruners.SuccessiveHalvingPruner()


def _open_study(config: SearchConfig, worker: int) -> Any:
    import optuna

    from slimkit.tuning.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(config.storage_url)
    n_startup = min(10, max(3, config.n_trials // 4))
    try:
        directions = [optuna.study.StudyDirection[d.upper()] for d in config.directions]
        return optuna.create_study(
            storage=storage,
            study_name=config.study_name,
            directions=directions,
            sampler=_sampler(config, worker, n_startup),
            pruner=_pruner(config, config.epochs),
            load_if_exists=True,
        )
    except ValueError as exc:
        raise UsageError(f"study {config.study_name!r} in {config.storage_url}: {exc}") from exc


def _measurer(
    model: nn.Module,
    val_data: Any,
    example: Any,
    config: SearchConfig,
    space: dict,
    evaluate: Evaluate | None = None,
    **extra,
) -> Measurer:
    """The ``Measurer`` of ``config`` (objectives, latency batch, threads, runtime; MACs when the space prunes;
    the caller's ``evaluate`` as the accuracy objective when given)."""
    return Measurer(
        model,
        val_data,
        example,
        config.objectives,
        latency_batch=config.latency_batch,
        threads=config.threads,
        macs=any(spaces.is_plan_param(n) for n in space),
        runtime=config.runtime,
        evaluate=evaluate,
        **extra,
    )


def _check_same_settings(study: Any, settings: dict[str, Any], config: SearchConfig) -> dict[str, Any]:
    stored = study.user_attrs.get(ATTR)
    if stored is None:
        study.set_user_attr(ATTR, settings)
        return settings
    for key in ("objectives", "space", "max_accuracy_drop", "relative", "runtime", "metric"):
        if key == "runtime" and key not in stored:  # a study from before runtimes were recorded: timed eager
            continue
        if key == "metric" and stored.get(key, "accuracy") == settings.get(key, "accuracy"):
            continue  # studies from before user metrics were recorded scored labelled accuracy
        if stored.get(key) != settings.get(key):
            raise UsageError(
                f"study {config.study_name!r} in {config.storage_url} was created with {key}="
                f"{stored.get(key)!r}, not {settings.get(key)!r}: rerun with the same settings to "
                "continue it, or pick a new study_name (--study-name)"
            )
    return stored


class _Worker:
    """Runs trials of one study in this process; saves every trial that improves the best or the Pareto set."""

    def __init__(
        self,
        model: nn.Module,
        config: SearchConfig,
        train_data: Any,
        val_data: Any,
        teacher: nn.Module | None,
        worker: int,
        evaluate: Evaluate | None = None,
    ) -> None:
        self.config, self.worker = config, worker
        self.user_metric = evaluate is not None
        self.out = Path(config.out)
        self.space = resolve_space(config, model, teacher)
        example = example_from(val_data)
        self.study = _open_study(config, worker)
        self.settings = self.study.user_attrs.get(ATTR, {})
        self.threshold = self.settings.get("threshold")
        # with the caller's metric, training keeps no best epoch by labelled accuracy (the data may have no labels)
        trial_val = None if evaluate is not None else val_data
        self.ctx = TrialContext(
            model, train_data, trial_val, example, config.epochs, config.seed, config.max_batches, teacher
        )
        self.measure = _measurer(
            model,
            val_data,
            example,
            config,
            self.space,
            evaluate,
            cache=LatencyCache(self.out / "latency_cache.json"),
            baseline_ms=self.settings.get("baseline", {}).get("latency_ms"),
        )
        self.progress: Any = None
        self.quiet = _QuietFailures()
        # Ctrl-C interrupts training and measuring at once; during a storage call it waits for the call to end
        # (an interrupted database call can leave the trial RUNNING and Optuna in an inconsistent state)
        self._interruptible = self._interrupted = False
        self._redelivery: threading.Timer | None = None

    def objective(self, trial: Any) -> tuple[float, ...] | float:
        from slimkit.tuning.storage import trial_over_budget

        trial.set_user_attr(WORKER_ATTR, f"{self.worker}:{os.getpid()}")  # first: this trial is alive, and whose
        trial.set_user_attr(HOST_ATTR, socket.gethostname())
        if trial_over_budget(self.study, trial.number, self.config.n_trials):
            trial.set_user_attr(SKIPPED, f"n_trials={self.config.n_trials} was taken by other workers' trials")
            self.quiet.numbers.add(trial.number)
            raise _BudgetTaken(trial.number)
        try:
            self._check_interrupt()
            return self._evaluate(trial)
        except KeyboardInterrupt:  # Optuna marks the trial failed; its traceback is not news to whoever pressed it
            self.quiet.numbers.add(trial.number)
            raise

    def _evaluate(self, trial: Any) -> tuple[float, ...] | float:
        import optuna

        params = spaces.suggest(trial, self.space)
        trial.set_user_attr("plan", params)
        single = len(self.config.objectives) == 1

        def report(epoch: int, model: nn.Module, history: Any) -> None:
            if single and history.val_accuracy and self.config.objectives[0] == "accuracy":
                trial.report(history.val_accuracy[-1], epoch)
                if trial.should_prune():
                    reason = f"accuracy {history.val_accuracy[-1]:.2f}% at epoch {epoch + 1}: stopped by the pruner"
                    trial.set_user_attr("pruned_reason", reason)
                    raise optuna.TrialPruned(reason)

        plan = any(spaces.is_plan_param(n) for n in params)
        try:
            with self._interruptible_section():
                model = run_params(params, self.ctx, report)
        except FloatingPointError as exc:  # diverged (learning rate too high): hopeless, not a bug
            trial.set_user_attr("pruned_reason", str(exc))
            raise optuna.TrialPruned(str(exc)) from exc
        except ValueError as exc:
            if not plan:
                raise
            # a verb cannot realize this plan (e.g. a pruning amount the channel groups cannot reach): the plan
            # is out of reach, the search goes on; the summary counts and quotes these
            trial.set_user_attr("pruned_reason", f"plan not applicable: {exc}")
            raise optuna.TrialPruned(str(exc)) from exc
        with self._interruptible_section():
            metrics = self.measure(model)
        violation = 0.0 if self.threshold is None else self.threshold - metrics["accuracy"]
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("violation", violation)
        if self.threshold is not None:  # samplers steer towards feasible plans (<= 0 is feasible)
            trial.set_constraint("accuracy_budget", violation)
        values = tuple(metrics[OBJECTIVES[o].metric] for o in self.config.objectives)
        self._save_if_improving(trial.number, params, metrics, values, violation, model)
        return values[0] if single else values

    def _save_if_improving(
        self, number: int, params: dict, metrics: dict, values: tuple, violation: float, model: nn.Module
    ) -> None:
        import optuna

        trials = self.study.get_trials(deepcopy=False)
        done = [candidate_of(t) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        current = Candidate(number, values, violation)
        pool = [*done, current]
        is_best = best_index(pool, self.config.objectives, self.config.directions) == len(pool) - 1
        in_front = len(pool) - 1 in feasible_front(pool, self.config.directions)
        if not (is_best or in_front):
            return
        info = {
            "trial": number,
            "plan": params,
            "metrics": metrics,
            "objectives": list(self.config.objectives),
            "values": list(values),
            "violation": violation,
            "feasible": violation <= 0,
            "threshold": self.threshold,
            "study": self.config.study_name,
        }
        folder = save_result(model, self.out / "pareto" / f"trial-{number:04d}", info)
        if is_best:  # other workers may have saved a better one meanwhile: decided again under the lock
            failed = {t.number for t in trials if t.state == optuna.trial.TrialState.FAIL}
            promote_best(folder, current, self.config, replaceable=failed)

    def run(self) -> None:
        """Run trials until the study holds ``n_trials`` finished (complete or pruned) trials, or the timeout.

        Before each trial, trials of dead workers are failed and queued again. When the trials of other workers
        fill the budget, an SQL storage's worker waits for them (it retries theirs if they die); a journal's stops.
        """
        from slimkit.tuning.storage import budget_state, has_heartbeat, heartbeat_seconds, reap_dead_trials

        n_trials, timeout = self.config.n_trials, self.config.timeout
        wait_for_others = has_heartbeat(self.config.storage_url)
        poll = min(1.0, heartbeat_seconds()[0] / 2)
        start = time.monotonic()
        optuna_log = logging.getLogger("optuna.study._optimize")
        optuna_log.addFilter(self.quiet)
        restore = self._catch_sigint()
        try:
            while timeout is None or time.monotonic() - start < timeout:
                self._check_interrupt()
                for number in reap_dead_trials(self.study):
                    self._say(f"trial {number}: its worker stopped responding; marked failed and queued again")
                finished, running, _ = budget_state(self.study)
                if finished >= n_trials:
                    return
                if finished + running >= n_trials:  # others hold every slot (a queued retry is run by the next ask)
                    if not wait_for_others:
                        return
                    time.sleep(poll)
                    continue
                self.study.optimize(self.objective, n_trials=1, catch=(_BudgetTaken,), callbacks=[self._after_trial])
        finally:
            optuna_log.removeFilter(self.quiet)
            restore()

    def _catch_sigint(self) -> Callable[[], None]:
        """Route Ctrl-C through ``_on_sigint`` (main thread only); returns what puts the previous handlers back."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous, previous_hook = signal.signal(signal.SIGINT, self._on_sigint), sys.unraisablehook

        def dropped(info: Any) -> None:
            # the interrupt was raised in a finalizer the frame test cannot see (a raw weakref or GC callback, as
            # SQLAlchemy's): Python drops it here (the default hook prints "Exception ignored ... Traceback");
            # deliver it again once that code has returned
            if info.exc_type is KeyboardInterrupt and self._interrupted:
                self._redeliver_soon()
            else:
                previous_hook(info)

        sys.unraisablehook = dropped

        def restore() -> None:
            if self._redelivery is not None:  # no redelivered interrupt may reach the handler put back below
                self._redelivery.cancel()
                self._redelivery.join()
            if previous is not None:  # None: the handler was not set from Python
                signal.signal(signal.SIGINT, previous)
            sys.unraisablehook = previous_hook

        return restore

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._interrupted = True
        if self._interruptible:
            self._interruptible = False
            if _in_finalizer(frame):  # let the finalizer finish: Python would drop an exception raised in it
                self._redeliver_soon()
            else:
                raise KeyboardInterrupt

    def _redeliver_soon(self) -> None:
        """Interrupt the current section again in 10 ms, from a thread: a signal raised from a finalizer, or from the
        hook that reports one, is handled (and dropped) right there."""
        self._redelivery = threading.Timer(0.01, self._redeliver)
        self._redelivery.daemon = True
        self._redelivery.start()
        self._interruptible = True  # last: a second Ctrl-C while the timer starts only sets the flag

    def _redeliver(self) -> None:
        if not self._interruptible:  # the section it was meant for has ended: the flag stops the study
            return
        main = threading.main_thread().ident
        if main is not None and hasattr(signal, "pthread_kill"):
            signal.pthread_kill(main, signal.SIGINT)  # a real signal wakes a blocked wait; interrupt_main does not
        else:
            _thread.interrupt_main()

    def _check_interrupt(self) -> None:
        if self._interrupted:
            raise KeyboardInterrupt

    @contextmanager
    def _interruptible_section(self) -> Iterator[None]:
        self._check_interrupt()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def _after_trial(self, study: Any, trial: Any) -> None:
        if self.progress is not None and SKIPPED not in trial.user_attrs:
            self.progress(study, trial)

    def _say(self, text: str) -> None:
        if self.progress is not None and self.progress.enabled:
            self.progress.bar.console.print(text, highlight=False)


class _BudgetTaken(Exception):
    """The trial was created after other workers' trials took the study's n_trials: it does not run."""


class _QuietFailures(logging.Filter):
    """Drops Optuna's "Trial N failed" warnings (with a traceback) for trials slimkit ends on purpose: turned away
    by the budget, or interrupted by Ctrl-C."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(f"Trial {n} failed") for n in self.numbers)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created), shared by every process, local or over NFS."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; workers there should not share one out folder
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _saved_candidate(folder: Path, config: SearchConfig) -> Candidate | None:
    """The result saved in ``folder`` as a candidate of this study; None when absent or from another study."""
    try:
        info = read_result(folder)
        if info.get("study") != config.study_name or info.get("objectives") != list(config.objectives):
            return None
        return Candidate(int(info["trial"]), tuple(info["values"]), float(info["violation"]))
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None


def promote_best(
    folder: Path, candidate: Candidate, config: SearchConfig, replaceable: set[int] | frozenset[int] = frozenset()
) -> bool:
    """Copy the saved result ``folder`` to ``<out>/best`` unless what is there is at least as good.

    The comparison and the copy happen under one lock, so of two workers finishing at once the worse never
    overwrites the better. ``replaceable``: trials whose saved copy is replaced regardless (they failed)."""
    best = Path(config.out) / "best"
    with _locked(Path(config.out) / BEST_LOCK):
        saved = _saved_candidate(best, config)
        if saved is not None and saved.number == candidate.number:
            return False
        if (
            saved is not None
            and saved.number not in replaceable
            and best_index([saved, candidate], config.objectives, config.directions) == 0
        ):
            return False
        copy_result(folder, best)
        return True


def _interrupt_once(signum: int, frame: Any) -> None:  # pragma: no cover - subprocess
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
    raise KeyboardInterrupt


def _worker_main(  # pragma: no cover - subprocess
    model, config_dict, train_data, val_data, teacher, worker, evaluate=None
) -> None:
    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        torch.set_num_threads(1)
        os.environ["SLIMKIT_NO_PROGRESS"] = "1"
        config = SearchConfig.from_dict(config_dict)
        _Worker(model, config, train_data, val_data, teacher, worker, evaluate).run()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it, once
        # the parent's own SIGINT to this worker (_stop_workers) may land while exiting: it must not interrupt the
        # atexit clean-up (a traceback "Exception ignored in atexit callback" appeared then)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(130)


def _count_finished(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def search(
    model: nn.Module,
    config: SearchConfig | None = None,
    train_data: Any = None,
    val_data: Any = None,
    *,
    teacher: nn.Module | None = None,
    evaluate: Evaluate | None = None,
) -> SearchStudy:
    """Search training hyperparameters or compression plans for ``model`` with Optuna.

    Every trial starts from ``model`` (never modified). The study lives in ``config.storage`` (SQLite under
    ``config.out`` by default): rerunning the same call continues it. After each trial that improves the best
    feasible result or the Pareto set, its model is saved (``<out>/best``, ``<out>/pareto/trial-N``).

    Args:
        teacher: a trained model to distill from in a training search (adds ``temperature``/``alpha`` to the
            ``training`` preset). Compression plans with ``distill`` use ``model`` itself as the teacher.
        evaluate: ``fn(model) -> float``, higher is better (an embedding cosine, a negative perplexity): the
            ``accuracy`` objective and the ``max_accuracy_drop`` budget (in ``fn``'s units) are measured on it
            instead of labelled accuracy on ``val_data`` (INC's ``eval_func``, NNCF's ``validate_fn``). The study
            records its name (``metric``); trials then train without per-epoch validation, so the pruner stops
            none early. With ``workers > 1`` it must be picklable (a module-level function).

    Returns:
        ``SearchStudy`` with ``.best``, ``.pareto``, ``.study``, ``.message`` and the report path.

    Example:
        >>> study = slimkit.search(model, SearchConfig(n_trials=20, out="runs/hpo"), train, test)  # doctest: +SKIP
        >>> study.best.plan, study.best.metrics["accuracy"]                                        # doctest: +SKIP
    """
    config = config or SearchConfig()
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"search: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, SearchConfig):
        raise InputTypeError(f"search: config must be a SearchConfig, got {type(config).__name__}")
    if train_data is None or val_data is None:
        raise UsageError("search needs train_data and val_data (Datasets or DataLoaders of (inputs, labels))")
    check_evaluate(evaluate, "search")
    if evaluate is not None and config.workers > 1:
        import pickle  # nosec B403: dumps only, to check the function can reach worker processes (never loads)

        try:
            pickle.dumps(evaluate)
        except Exception as exc:
            raise UsageError(
                f"search: evaluate={metric_name(evaluate)} cannot be sent to worker processes ({exc}); with "
                "workers > 1 give a module-level function"
            ) from None
    space = resolve_space(config, model, teacher)  # bad spaces fail before anything is written
    Path(config.out).mkdir(parents=True, exist_ok=True)
    study = _open_study(config, 0)
    settings: dict[str, Any] = {
        "objectives": list(config.objectives),
        "space": {k: p.to_dict() for k, p in space.items()},
        "max_accuracy_drop": config.max_accuracy_drop,
        "relative": config.relative,
    }
    if evaluate is not None:  # what "accuracy" and the budget were measured on
        settings["metric"] = metric_name(evaluate)
    if "latency" in config.objectives:  # the stored baseline was timed on this runtime
        settings["runtime"] = config.runtime.value
    if ATTR not in study.user_attrs:
        example = example_from(val_data)
        measurer = _measurer(model, val_data, example, config, space, evaluate)
        baseline = measurer(model, latency=False)
        if "latency" in config.objectives:
            baseline["latency_ms"], baseline["speedup"] = measurer.baseline_ms(), 1.0
            baseline["runtime"] = measurer.baseline_runtime
        settings["baseline"] = baseline
        settings["threshold"] = accuracy_threshold(baseline["accuracy"], config.max_accuracy_drop, config.relative)
    settings = _check_same_settings(study, settings, config)
    worker = _Worker(model, config, train_data, val_data, teacher, 0, evaluate)
    finished = _count_finished(study)
    procs = _start_workers(model, config, train_data, val_data, teacher, evaluate) if finished < config.n_trials else []
    from slimkit.tuning.report import SearchProgress

    with SearchProgress(config, finished, settings.get("threshold")) as progress:
        worker.progress = progress
        try:
            worker.run()
        except BaseException:  # Ctrl-C or an error: stop the helpers too (finished trials stay in storage)
            _stop_workers(procs)
            raise
        finally:
            for p in procs:
                p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    result = summarize(study, config, model, settings)
    if failed:
        result.message += f"\n{len(failed)} worker process(es) failed (exit codes {failed}); see their output."
    return result


def _stop_workers(procs: list, wait_s: float = 10.0) -> None:
    """Interrupt the helper processes (their running trials are marked failed), then end any that linger."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # a second Ctrl-C waits too
    try:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                try:
                    os.kill(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _start_workers(model, config, train_data, val_data, teacher, evaluate=None) -> list:
    if config.workers <= 1:
        return []
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(model, config.to_dict(), train_data, val_data, teacher, i, evaluate),
            daemon=False,
        )
        for i in range(1, config.workers)
    ]
    for p in procs:
        p.start()
    return procs


def summarize(
    study: Any, config: SearchConfig, template: nn.Module | None, settings: dict | None = None
) -> SearchStudy:
    """Build the ``SearchStudy`` from the trials in storage, tidy ``<out>/pareto`` and write the report."""
    import optuna

    settings = settings or study.user_attrs.get(ATTR, {})
    out = Path(config.out)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "metrics" in t.user_attrs]
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    failed_numbers = {t.number for t in trials if t.state == optuna.trial.TrialState.FAIL}
    failed = sum(SKIPPED not in t.user_attrs for t in trials if t.number in failed_numbers)
    cands = [candidate_of(t) for t in done]
    directions = config.directions

    def result(i: int, path: Path | None) -> SearchResult:
        c = cands[i]
        return SearchResult(
            c.number,
            c.extra["plan"],
            c.extra["metrics"],
            c.values,
            c.feasible,
            c.violation,
            path if path is not None and path.is_dir() else None,
            template,
        )

    front = sorted(feasible_front(cands, directions), key=lambda i: cands[i].values)
    bi = best_index(cands, config.objectives, directions)
    keep = {f"trial-{cands[i].number:04d}" for i in front} | (
        {f"trial-{cands[bi].number:04d}"} if bi is not None else set()
    )
    pareto_dir = out / "pareto"
    if pareto_dir.is_dir():
        for folder in pareto_dir.iterdir():
            if folder.name.startswith("trial-") and folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)
    pareto = [result(i, pareto_dir / f"trial-{cands[i].number:04d}") for i in front]
    best = None
    if bi is not None:
        best_dir = out / "best"
        src = pareto_dir / f"trial-{cands[bi].number:04d}"
        if src.is_dir():  # a better saved model can only come from a trial still running elsewhere, or a failed one
            promote_best(src, cands[bi], config, replaceable=failed_numbers)
        best = result(bi, best_dir if _saved_trial(best_dir) == cands[bi].number else None)
    threshold = settings.get("threshold")
    message = _message(best, threshold, config, len(done))
    skipped = [
        t.user_attrs["pruned_reason"]
        for t in trials
        if t.state == optuna.trial.TrialState.PRUNED
        and str(t.user_attrs.get("pruned_reason", "")).startswith("plan not applicable")
    ]
    if skipped:
        message += (
            f"\n{len(skipped)} trial(s) were pruned because a verb could not apply their plan; first: {skipped[0]}"
        )
    summary = SearchStudy(
        best,
        pareto,
        study,
        config.objectives,
        settings.get("baseline", {}),
        threshold,
        out,
        len(done),
        pruned,
        failed,
        message,
    )
    from slimkit.tuning.report import write_report

    write_report(summary, config)
    return summary


def _saved_trial(folder: Path) -> int | None:
    from slimkit.tuning.saving import read_result

    try:
        return int(read_result(folder)["trial"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _message(best: SearchResult | None, threshold: float | None, config: SearchConfig, n_done: int) -> str:
    if best is None:
        return (
            "no trial finished: nothing to report (all were pruned or failed, or n_trials was reached by "
            "pruned trials); rerun with more n_trials"
        )
    if not best.feasible:
        budget = f"{config.max_accuracy_drop} {'% of the input accuracy' if config.relative else 'points'}"
        return (
            f"no trial satisfied max_accuracy_drop={budget} (accuracy >= {threshold:.2f}%) in {n_done} finished "
            f"trials; kept the closest result: trial {best.trial}, {format_metrics(best.metrics)}, "
            f"{best.violation:.2f} points short. Loosen the budget or search longer."
        )
    if math.isfinite(best.violation):
        return f"best: trial {best.trial}, {format_metrics(best.metrics)}, saved in {best.path}"
    return ""


def _in_finalizer(frame: Any) -> bool:
    """Whether the signal arrived inside ``__del__`` or a ``weakref.finalize`` / ``WeakValueDictionary`` callback (the
    others are caught by the unraisable hook of ``_catch_sigint``)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__" or frame.f_code.co_filename.endswith("weakref.py"):
            return True
        frame = frame.f_back
    return False
