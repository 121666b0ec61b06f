"""Open an Optuna storage from a URL, with errors that say what to fix.

- ``sqlite:///path/study.db`` (default; the folder is created) and any RDB URL Optuna accepts
  (``postgresql://user@host/db``, ``mysql+pymysql://...``) — RDB storages get a heartbeat, so trials of a killed
  worker are marked failed instead of staying "running" forever;
- ``journal:PATH`` (or a path ending in ``.log``/``.journal``) — Optuna's journal file, shared by processes on
  one machine or a shared file system;
- ``redis://host:port`` — Optuna's journal on Redis (needs the ``redis`` package).
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path
from typing import Any

from slimkit.errors import UsageError

__all__ = ["open_storage", "redact"]

HEARTBEAT_S = 10
GRACE_S = 30


def redact(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal:"):
        rest = url[len("journal:"):]
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
        raise UsageError(f"storage {shown!r} is not a URL; use sqlite:///PATH.db, postgresql://USER@HOST/DB, "
                         "journal:PATH or redis://HOST:PORT")
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
        raise UsageError(f"storage {shown} needs a database driver that is not installed: {exc}") from exc
    except Exception as exc:  # sqlalchemy's OperationalError, ArgumentError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot reach storage {shown}: {first}. Check the URL, the server and the "
                         "credentials, or use the default SQLite file (omit --storage)") from exc


def _rdb(url: str, engine_kwargs: dict[str, Any], attempts: int = 6) -> Any:
    """``RDBStorage``, retried while another worker is creating the same fresh database (its tables)."""
    import optuna

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=GRACE_S)
        except Exception as exc:
            racing = "already exists" in str(exc) or "database is locked" in str(exc)
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")
