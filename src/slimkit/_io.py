"""Atomic writes: a file or folder appears whole under its final name, or not at all, and nothing else is lost.

How a save works (``atomic_path``):

1. Each writer gets its own uniquely named work folder ``.NAME.XXXXXXXX.tmp`` beside the target and holds an
   exclusive ``flock`` on it while it lives, so anyone can tell a live writer's temporary from a dead one's.
2. The caller writes the new file or folder inside it, under the final name.
3. Under an exclusive ``flock`` on the parent folder (concurrent writers to one path serialize; the last one wins),
   a file takes its place with ``os.replace``; a folder is exchanged with the old one in one step by Linux
   ``renameat2(RENAME_EXCHANGE)``, so a complete folder is at the path at every instant, even under SIGKILL. The
   old one, now inside the work folder, is removed with it. Where renameat2 is unavailable (not Linux, an old
   kernel or libc, a filesystem without it) two renames are used instead: the old folder moves into the work
   folder, then the new one moves in; a process killed between the two leaves the path empty (the old folder
   survives in the work folder).
4. Still under the lock, work folders of writers that died (SIGKILL, power loss) are removed.

The work folder is removed on every exit path: success, an exception, Ctrl-C, and SIGTERM in the CLI (which turns
it into a clean exit). An existing path is replaced only by the same kind of output (``check_replaceable``): a
file by a file, an artifact folder (``slimkit.json``) by an artifact, a search result (``result.json``) by a
result; a folder of the user's own files is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slimkit.errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking (single writer assumed)
    fcntl = None  # type: ignore[assignment]

__all__ = ["FOLDER_MARKERS", "atomic_path", "check_replaceable", "kind_of", "write_text"]

# a folder slimkit may replace holds its kind's marker file
FOLDER_MARKERS = {"artifact": "slimkit.json", "result": "result.json", "prune": "record.json"}
_DESCRIPTION = {"artifact": "slimkit artifact", "result": "saved search result", "prune": "prune output"}

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def kind_of(path: str | os.PathLike) -> str | None:
    """What is at ``path``: ``None`` (nothing), ``"file"``, ``"empty"`` (an empty folder), a kind of
    ``FOLDER_MARKERS`` (a folder holding its marker) or ``"folder"`` (any other folder).

    Example:
        >>> kind_of("/nonexistent/slimkit") is None
        True
    """
    p = Path(path)
    if not os.path.lexists(p):
        return None
    if not p.is_dir():
        return "file"
    for kind, marker in FOLDER_MARKERS.items():
        if (p / marker).is_file():
            return kind
    try:
        return "folder" if any(p.iterdir()) else "empty"
    except OSError:
        return "folder"


def check_replaceable(path: str | os.PathLike, kind: str) -> None:
    """Raise ``UsageError`` unless writing a ``kind`` output (``"file"`` or a ``FOLDER_MARKERS`` kind) at ``path``
    replaces nothing but an older output of that kind (or an empty folder, when a folder is written).

    Example:
        >>> check_replaceable("/nonexistent/model.safetensors", "file")   # nothing there: fine
    """
    existing = kind_of(path)
    if existing is None:
        return
    if kind == "file":
        if existing != "file":
            raise UsageError(
                f"{path} is a folder, but a file is written there; give a file path (e.g. a new name "
                "inside it); nothing was changed"
            )
        return
    want = _DESCRIPTION.get(kind, "output")
    if existing == "file":
        raise UsageError(
            f"{path} is a file, but a {want} folder is written there; give a new folder path or "
            "remove the file; nothing was changed"
        )
    if existing not in ("empty", kind):
        what = f"a {_DESCRIPTION[existing]}" if existing in _DESCRIPTION else "a folder of other files"
        marker = FOLDER_MARKERS.get(kind)
        why = f" (it has no {marker})" if marker and existing == "folder" else ""
        raise UsageError(
            f"{path} is {what}{why}, not a {want}: refusing to replace it; give a new path or remove "
            "it yourself; nothing was changed"
        )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary path (not yet existing) to write a file or a folder to; on success it replaces ``path``.

    On error, Ctrl-C or SIGTERM (in the CLI) the temporary is removed and ``path`` keeps its old content.
    ``kind`` (``"file"``, ``"artifact"``, ``"result"``, ``"prune"``) says what is written, and is checked before
    anything is (``check_replaceable``); without it, a folder of other files is refused at once and the kind is
    read from what was written.

    Example:
        >>> with atomic_path("weights.safetensors", kind="file") as tmp:   # doctest: +SKIP
        ...     save_file(tensors, tmp)
    """
    final = Path(path)
    if kind is not None:
        check_replaceable(final, kind)
    elif kind_of(final) == "folder":
        check_replaceable(final, "artifact")  # raises: not ours, whatever is written
    final.parent.mkdir(parents=True, exist_ok=True)
    work: Path | None = None
    guard: tuple[int, tuple[int, int]] | None = None
    try:
        # a cleaner holds the parent's lock: it never sees our folder before we lock it
        with _locked(final.parent), _signals_deferred():
            work, guard = _new_work_folder(final)
        tmp = work / final.name
        yield tmp
        with _locked(final.parent):
            check_replaceable(final, kind or ("file" if not tmp.is_dir() else _written_kind(tmp)))
            _commit(tmp, final, work)
            _remove_stale(final, keep=work)
    finally:
        _discard(work, guard)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path.

    Example:
        >>> write_text("notes.txt", "hello\\n")   # doctest: +SKIP
    """
    with atomic_path(path, kind="file") as tmp:
        tmp.write_text(text)
    return Path(path)


def _new_work_folder(final: Path) -> tuple[Path, tuple[int, tuple[int, int]] | None]:
    """Create and lock ``.NAME.XXXXXXXX.tmp`` beside ``final``."""
    while True:
        work = final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp"
        try:
            work.mkdir(mode=0o700)
        except FileExistsError:
            continue
        try:
            return work, _hold(work)
        except BaseException:
            work.rmdir()
            raise


def _discard(work: Path | None, guard: tuple[int, tuple[int, int]] | None) -> None:
    """Remove our work folder and drop its lock, even when Ctrl-C or SIGTERM arrives meanwhile (its exception is
    raised once the folder is gone)."""
    pending: BaseException | None = None
    while True:
        try:
            with _signals_deferred():
                if work is not None:
                    shutil.rmtree(work, ignore_errors=True)
                if guard is not None:
                    fd, key = guard
                    _release(key)
                    os.close(fd)
                    guard = None
            break
        except (KeyboardInterrupt, SystemExit) as exc:  # raised before the deferral began or as it ended
            pending = pending or exc
    if pending is not None:
        raise pending


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold back SIGINT / SIGTERM while a temporary is created or removed, then deliver them.

    Python raises a signal's exception (KeyboardInterrupt, the CLI's SystemExit) between any two bytecodes: one
    raised right after ``mkdir`` returns, or inside ``shutil.rmtree``, would leave a temporary behind. Handlers run
    only in the main thread, so other threads need nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []  # signal numbers, delivered again once the block is done
    saved: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if handler is not None and handler is not signal.SIG_IGN:  # None: set outside Python, leave it alone
                saved[sig] = handler
                signal.signal(sig, lambda signum, frame: caught.append(signum))
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for signum in caught:
            os.kill(os.getpid(), signum)  # the original handler (or the default action) takes it from here


def _written_kind(folder: Path) -> str:
    kind = kind_of(folder)
    return kind if kind in FOLDER_MARKERS else "folder"


def _commit(tmp: Path, final: Path, work: Path) -> None:
    """Move ``tmp`` onto ``final``; a replaced folder ends up inside ``work`` (removed with it)."""
    if not tmp.is_dir() or not os.path.lexists(final):
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):
        return
    old = work / ".old"  # fallback: two renames (a window where the path is empty)
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step; ``False`` where the system cannot (then nothing was changed)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's ``renameat2`` (glibc >= 2.28, musl >= 1.2.3), or ``None``."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


# Locks this process holds, by (device, inode) of the folder: ``flock`` locks taken through two descriptors of one
# folder exclude each other even inside one process, so a write nested in another write to the same folder
# (``slimkit quantize --onnx`` exports into the work folder of the ONNX file it is writing) would wait for itself.
# A per-folder RLock keeps threads apart and lets the thread that holds the folder enter again.
_GUARD = threading.Lock()
_THREAD_LOCKS: dict[tuple[int, int], threading.RLock] = {}
_DEPTH: dict[tuple[int, int], int] = {}


def _acquire(fd: int) -> tuple[int, int]:
    """Lock the folder open as ``fd`` for this thread (re-entrant); returns the key for ``_release``."""
    stat = os.fstat(fd)
    key = (stat.st_dev, stat.st_ino)
    with _GUARD:
        rlock = _THREAD_LOCKS.setdefault(key, threading.RLock())
    rlock.acquire()
    with _GUARD:
        depth = _DEPTH.get(key, 0)
        _DEPTH[key] = depth + 1
    if depth == 0:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            _release(key)
            raise
    return key


def _release(key: tuple[int, int]) -> None:
    with _GUARD:
        _DEPTH[key] -= 1
        if not _DEPTH[key]:
            del _DEPTH[key]
        rlock = _THREAD_LOCKS[key]
    rlock.release()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (advisory: only slimkit's writers take it); re-entrant."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        key = _acquire(fd)
        try:
            yield
        finally:
            _release(key)
    finally:
        os.close(fd)  # releases the flock when this descriptor took it (the outermost holder closes last)


def _hold(work: Path) -> tuple[int, tuple[int, int]] | None:
    """Lock our work folder for as long as we live (the kernel drops the lock when the process dies)."""
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return fd, _acquire(fd)
    except BaseException:
        os.close(fd)
        raise


def _remove_stale(final: Path, keep: Path) -> None:
    """Remove ``.NAME.XXXXXXXX.tmp`` beside ``final`` left by writers that are gone (their lock is free)."""
    pattern = re.compile(re.escape(f".{final.name}.") + r"[A-Za-z0-9_]{8}\.tmp")
    with os.scandir(final.parent) as entries:
        stale = [Path(e.path) for e in entries if pattern.fullmatch(e.name) and e.name != keep.name]
    for path in stale:
        if fcntl is None:  # pragma: no cover - no way to tell a live writer's temporary from a dead one's
            break
        if path.is_symlink() or not path.is_dir():  # a temporary file of an older slimkit: nobody holds it
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its writer is alive
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)
