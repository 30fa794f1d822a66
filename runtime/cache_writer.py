"""Writes a model's load cache entry in a detached, low-priority process, so a first load costs a plain load.

Why a process and not a thread: it runs at a lower priority (nice) without touching the threads of the
session the user is running, it outlives a short command (``edgelm generate`` exits while it writes),
and the second copy of the model it holds while writing is returned to the OS the moment it exits.

One writer per entry: a lock file in the cache root (``.writing-<entry>``, holding the writer's pid) is
created exclusively before the writer starts and removed by it when done; a lock whose process is gone, or
older than an hour, is taken for one a kill left behind. A writer that fails leaves ``.failed-<entry>``
with the reason: loads in the next hour then load plainly with a warning instead of retrying each time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import onnxruntime as ort

from edgelm.runtime import load_cache

LOCK_PREFIX = ".writing-"
FAILED_PREFIX = ".failed-"
NICE = 10
"""The writer's niceness: on a 2-core device it takes what the user's generation leaves, not half of it."""
STALE_SECONDS = load_cache.STALE_TMP_SECONDS
STARTING_SECONDS = 10.0
"""A lock without a pid is a writer being started (microseconds); one older than this lost its starter."""

_children: dict[Path, subprocess.Popen] = {}
"""Writers this process started, by their lock: polled (and so reaped) instead of signalled, since a finished child
that is not reaped yet still answers a signal."""


def _reap() -> None:
    for lock, proc in list(_children.items()):
        if proc.poll() is not None:
            del _children[lock]


def _marker(prefix: str, model: Path, optimization: str) -> Path:
    """The lock (LOCK_PREFIX) or failure record (FAILED_PREFIX) of ``model``'s entry, beside the entries."""
    return load_cache.root() / (prefix + load_cache.entry_path(model, optimization).name)


def _alive(lock: Path) -> bool:
    """Whether the writer named in ``lock`` is still at work (an unreadable or half-written lock is young)."""
    try:
        age = time.time() - lock.stat().st_mtime
        text = lock.read_text().strip()
    except OSError:
        return False
    if age > STALE_SECONDS:
        return False
    if not text:  # the starting process has not written the pid yet, or was killed before it could
        return age < STARTING_SECONDS
    pid = int(text) if text.isdigit() else -1
    own = _children.get(lock)
    if own is not None and own.pid == pid:
        return own.poll() is None
    if os.name == "nt":  # os.kill there terminates the process whatever the signal: trust the lock's age
        return pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError, OverflowError):
        return pid > 0  # another user's process, or a platform without signals: trust the lock's age
    return True


def start(model: Path, optimization: str, entries: dict[str, str]) -> str | None:
    """Start the writer of ``model``'s entry unless one is at work already; None, or why the cache cannot be written.

    ``entries``: session config entries the load set beyond edgelm's own (the writer's graph must be the one
    the load would have saved)."""
    model = Path(model)
    _reap()
    try:
        load_cache.root().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot write the load cache in {load_cache.root()} ({exc})"
    failed = _marker(FAILED_PREFIX, model, optimization)
    if failed.is_file():
        try:
            if time.time() - failed.stat().st_mtime < STALE_SECONDS:
                return f"the load cache's writer failed on this model within the hour ({failed.read_text().strip()})"
            failed.unlink()
        except OSError:
            pass
    lock = _marker(LOCK_PREFIX, model, optimization)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if _alive(lock):
                return None  # another load started it: one writer is enough
            lock.unlink(missing_ok=True)
        except OSError as exc:
            return f"cannot write the load cache in {load_cache.root()} ({exc})"
    else:
        return None  # a third process took the stale lock between our two tries: it writes
    command = [sys.executable, "-m", "edgelm.runtime.cache_writer", str(model), optimization, str(lock),
               json.dumps(entries)]
    try:
        if not sys.executable:
            raise OSError("this Python does not know its own executable")
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    except OSError as exc:
        os.close(fd)
        lock.unlink(missing_ok=True)
        return f"cannot start the load cache's writer ({exc})"
    _children[lock] = proc
    os.write(fd, f"{proc.pid}\n".encode())
    os.close(fd)
    return None


def writing(model: Path, optimization: str = "all") -> bool:
    """Whether a writer of ``model``'s entry is at work now."""
    return _alive(_marker(LOCK_PREFIX, Path(model), optimization))


def wait(model: Path, optimization: str = "all", timeout: float = 600.0) -> bool:
    """Block until no writer of ``model``'s entry is at work (at most ``timeout`` seconds); whether the entry exists.

    For measurements and tests: a benchmark must not time a generation while the writer takes CPU beside it."""
    model = Path(model)
    deadline = time.monotonic() + timeout
    while writing(model, optimization) and time.monotonic() < deadline:
        time.sleep(0.02)
    own = _children.get(_marker(LOCK_PREFIX, model, optimization))
    if own is not None:  # a writer of ours removes its lock just before it exits
        try:
            own.wait(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pass
    _reap()
    return (load_cache.entry_path(model, optimization) / load_cache.MODEL_NAME).is_file()


def settle(session: ort.InferenceSession, timeout: float = 600.0) -> None:
    """Wait for the writer ``session``'s load started, if it did (a no-op for any other session)."""
    source = getattr(session, load_cache.SOURCE, None)  # set on "writing" sessions only
    if source is not None:
        wait(source[0], source[1], timeout)


def _record_failure(failed: Path, why: str) -> None:
    try:
        tmp = failed.with_name(failed.name + f".{os.getpid()}")
        tmp.write_text(why + "\n")
        tmp.replace(failed)
    except OSError:
        pass  # nowhere to say it: the next load tries again


def main(argv: list[str]) -> int:
    """The writer: ``python -m edgelm.runtime.cache_writer MODEL OPTIMIZATION LOCK ENTRIES_JSON`` (started by ``start``)."""
    model, optimization, lock, entries = Path(argv[0]), argv[1], Path(argv[2]), json.loads(argv[3])
    from edgelm.runtime.session import options_factory  # it imports load_cache, which needs nothing from here

    make_options = options_factory(1, optimization, entries)  # one thread: the user's session runs beside it

    failed = lock.with_name(FAILED_PREFIX + lock.name[len(LOCK_PREFIX):])
    try:
        if hasattr(os, "nice"):
            os.nice(NICE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sess = load_cache.write(model, make_options, optimization, ["CPUExecutionProvider"], fallback=False)
        if sess is None or load_cache.status(sess) != "written":
            _record_failure(failed, "; ".join(str(w.message) for w in caught) or "no entry was written")
            return 1
        return 0
    except Exception as exc:  # the lock must go whatever happened; the reason stays for the next loads
        _record_failure(failed, f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        lock.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
