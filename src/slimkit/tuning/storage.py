"""Open an Optuna storage from a URL, with errors that say what to fix.

- ``sqlite:///path/study.db`` (default; the folder is created) and any RDB URL Optuna accepts
  (``postgresql://user@host/db``, ``mysql+pymysql://...``) — RDB storages get a heartbeat, so trials of a killed
  worker are marked failed instead of staying "running" forever;
- ``journal:PATH`` (or a path ending in ``.log``/``.journal``) — Optuna's journal file, shared by processes on
  one machine or a shared file system;
- ``redis://host:port`` — Optuna's journal on Redis (needs the ``redis`` package).

Several workers share one trial budget: ``trial_over_budget`` decides, right after a trial was created, whether
the study's ``n_trials`` is already taken by other trials, so racing workers never finish more than ``n_trials``;
``reap_dead_trials`` marks trials of killed workers failed and queues a retry of their parameters.
"""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slimkit.errors import UsageError

__all__ = [
    "budget_state",
    "has_heartbeat",
    "heartbeat_seconds",
    "open_storage",
    "reap_dead_trials",
    "redact",
    "retry_trial",
    "trial_over_budget",
]

HEARTBEAT_ENV = "SLIMKIT_SEARCH_HEARTBEAT"  # seconds between heartbeats (default 10); a trial is dead after 3x
HEARTBEAT_S = 10
MAX_RETRY = 2  # a trial whose worker died is run again at most this many times
WORKER_ATTR, HOST_ATTR = "worker", "host"  # user attributes naming the process that runs a trial


def heartbeat_seconds() -> tuple[int, int]:
    """``(interval, grace)``: heartbeats every ``interval`` s; silent for ``grace`` s means the worker died."""
    raw = os.environ.get(HEARTBEAT_ENV, "")
    try:
        interval = int(raw) if raw else HEARTBEAT_S
    except ValueError:
        raise UsageError(f"{HEARTBEAT_ENV}={raw!r} must be a whole number of seconds >= 1") from None
    if interval < 1:
        raise UsageError(f"{HEARTBEAT_ENV}={raw!r} must be a whole number of seconds >= 1")
    return interval, 3 * interval


def redact(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal:"):
        rest = url[len("journal:") :]
        return Path(rest[2:] if rest.startswith("//") else rest)
    if "://" not in url and url.endswith((".log", ".journal")):
        return Path(url)
    return None


def open_storage(url: str) -> Any:
    """An Optuna storage object for ``url``; ``ValueError`` naming the URL when it cannot be opened."""
    import optuna

    shown = redact(url)
    journal = _journal_path(url)
    if journal is not None:
        try:
            journal.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
        except OSError as exc:
            raise UsageError(f"cannot open journal storage {shown}: {exc}") from exc
    if url.startswith("redis://"):
        try:
            from optuna.storages.journal import JournalRedisBackend

            storage = optuna.storages.JournalStorage(JournalRedisBackend(url))
        except ImportError as exc:
            raise UsageError(f"storage {shown} needs the 'redis' package: pip install redis") from exc
        except Exception as exc:
            raise UsageError(f"cannot reach storage {shown}: {type(exc).__name__}: {exc}") from exc
        return storage
    if "://" not in url:
        raise UsageError(
            f"storage {shown!r} is not a URL; use sqlite:///PATH.db, postgresql://USER@HOST/DB, "
            "journal:PATH or redis://HOST:PORT"
        )
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        path = url.split("sqlite:///", 1)[-1] if url.startswith("sqlite:///") else ""
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create the folder of storage {shown}: {exc}") from exc
        engine_kwargs["connect_args"] = {"timeout": 60}  # workers wait for each other's writes
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        return _rdb(url, engine_kwargs)
    except ImportError as exc:
        hint = " (PostgreSQL: pip install 'psycopg[binary]')" if url.startswith("postgresql") else ""
        raise UsageError(f"storage {shown} needs a database driver that is not installed{hint}: {exc}") from exc
    except Exception as exc:  # sqlalchemy's OperationalError, ArgumentError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"cannot reach storage {shown}: {first}. Check the URL, the server and the "
            "credentials, or use the default SQLite file (omit --storage)"
        ) from exc


def _rdb(url: str, engine_kwargs: dict[str, Any], attempts: int = 6) -> Any:
    """``RDBStorage``, retried while another worker is creating the same fresh database (its tables)."""
    import inspect

    import optuna

    interval, grace = heartbeat_seconds()
    # optuna >= 4.9 renamed failed_trial_callback
    parameters = inspect.signature(optuna.storages.RDBStorage).parameters
    callback = (
        "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in parameters else "failed_trial_callback"
    )
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                callbacks: dict[str, Any] = {callback: retry_trial}  # the keyword's name depends on Optuna's version
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=interval, grace_period=grace, **callbacks
                )
        except Exception as exc:
            # SQLite: a table or the version row exists, the file is locked; PostgreSQL: a catalog row exists
            racing = any(
                sign in str(exc)
                for sign in ("already exists", "database is locked", "UNIQUE constraint", "duplicate key")
            )
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def retry_trial(study: Any, trial: Any) -> None:
    """Queue a trial whose worker died: a WAITING copy of its parameters, which the next ``ask`` runs.

    Optuna's ``RetryHeartbeatStaleTrialCallback`` convention (``failed_trial``, ``retry_history`` system attributes)
    without the dead trial's user attributes, which name the dead worker."""
    import optuna

    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        return
    system_attrs = {**trial.system_attrs, "failed_trial": history[0], "retry_history": history}
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            system_attrs=system_attrs,
        )
    )


def has_heartbeat(url: str) -> bool:
    """SQL storages record a heartbeat per running trial; the journal storages do not."""
    return _journal_path(url) is None and not url.startswith("redis://")


def _pid_dead(trial: Any) -> bool:
    """The trial's worker ran on this machine and its process is gone."""
    if trial.user_attrs.get(HOST_ATTR) != socket.gethostname():
        return False
    try:
        pid = int(str(trial.user_attrs.get(WORKER_ATTR, "")).split(":")[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's process
        return False
    return False


def _age_s(trial: Any) -> float:
    start = trial.datetime_start
    if start is None:
        return 0.0
    now = datetime.now(timezone.utc) if start.tzinfo else datetime.now()
    return (now - start).total_seconds()


def reap_dead_trials(study: Any) -> list[int]:
    """Mark RUNNING trials of dead workers FAIL and queue a retry of each; returns their numbers.

    Dead: no heartbeat for the grace period (SQL storages); the worker's process is gone (on this machine);
    or no worker ever claimed the trial within the grace period (killed between creating and starting it)."""
    import optuna

    TrialState = optuna.trial.TrialState
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return []
    with warnings.catch_warnings():  # SQL storages: no heartbeat for the grace period (runs retry_trial)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    reaped = [t.number for t in trials if t.number in running and t.state == TrialState.FAIL]
    _, grace = heartbeat_seconds()
    for trial in trials:
        if trial.state != TrialState.RUNNING:
            continue
        unclaimed = WORKER_ATTR not in trial.user_attrs and _age_s(trial) > grace
        if not (unclaimed or _pid_dead(trial)):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker reaped it first
        retry_trial(study, next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number))
        reaped.append(trial.number)
    return reaped


def budget_state(study: Any) -> tuple[int, int, int]:
    """``(finished, running, waiting)``: COMPLETE + PRUNED trials (what ``n_trials`` counts), RUNNING, WAITING."""
    import optuna

    TrialState = optuna.trial.TrialState
    states = [t.state for t in study.get_trials(deepcopy=False)]
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    return finished, states.count(TrialState.RUNNING), states.count(TrialState.WAITING)


def trial_over_budget(study: Any, number: int, n_trials: int) -> bool:
    """Whether trial ``number`` (just created) must not run because ``n_trials`` is taken by other trials.

    A trial may run when the finished trials plus the unfinished ones numbered before it (RUNNING, or WAITING to
    be retried) leave a slot. Trial numbers are handed out in the order trials are created and every storage
    shows a trial to whoever created a later one, so of two racing trials the later one always sees the earlier:
    the trials that finish are never more than ``n_trials``. A trial turned away may leave a slot unused for a
    moment (the earlier trial was turned away too, or failed); the worker asks again."""
    import optuna

    TrialState = optuna.trial.TrialState
    finished, unfinished = (TrialState.COMPLETE, TrialState.PRUNED), (TrialState.RUNNING, TrialState.WAITING)
    taken = sum(
        t.state in finished or (t.state in unfinished and t.number < number) for t in study.get_trials(deepcopy=False)
    )
    return taken >= n_trials
