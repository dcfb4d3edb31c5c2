"""What every pipeline task shares: the retry rule for transient I/O, content-hash cache keys,
artifact keys, and a fix that lets processes forked inside a Prefect run (DataLoader workers) exit
cleanly."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Retried: errors of the file system or the network that a second attempt may not meet (a busy
# NFS mount, a dropped connection). Never retried: bad data or settings (DataError, ConfigError are
# ValueErrors) and files that simply are not there.
NOT_TRANSIENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
RETRIES = 2
RETRY_DELAY_SECONDS = [2, 10]


def transient_io(task, task_run, state) -> bool:
    """retry_condition_fn: retry only OSErrors that may pass (timeouts, resets, busy files)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # a result that cannot even be read: do not guess
        return False
    return isinstance(exc, OSError) and not isinstance(exc, NOT_TRANSIENT)


def cache_key_from(key_fn: Callable[..., str | None]) -> Callable[[Any, dict[str, Any]], str | None]:
    """A Prefect cache_key_fn from a step's content-key function: the key is a hash of input
    *contents* (image sha256s, settings), never of paths or run ids. (The callers refresh the
    cache when the step's output on disk is gone, so a hit never points at deleted files.)"""

    def cache_key(context, parameters: dict[str, Any]) -> str | None:
        try:
            return key_fn(**parameters)
        except Exception:  # any doubt: run the step (it is idempotent)
            return None

    return cache_key


def cache_key(stage: str, output: Path) -> str:
    """Prefect cache key of a content-addressed step output: the stage, the output folder's name
    (a hash of the input contents and settings) and the working directory it lives in (two
    PATCHCORE_HOMEs never share cached results)."""
    return f"{stage}-{output.name}-{hashlib.sha256(str(output.parent).encode()).hexdigest()[:12]}"


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def _drop_parent_prefect_services_in_child() -> None:
    """In a process forked from a Prefect run (e.g. a torch DataLoader worker decoding images),
    forget the parent's Prefect queue services. Prefect 3.8.8 registers their drain with
    threading._register_atexit; in the child that drain fails (`assert self._done_event is not
    None`: the service's event loop lives in a parent thread), so every forked worker exits with
    status 1 and the DataLoader raises "worker exited unexpectedly"."""
    import threading

    try:
        from prefect._internal.concurrency.services import _QueueServiceBase
    except ImportError:  # another Prefect layout: nothing to do
        return
    atexits = getattr(threading, "_threading_atexits", None)
    if atexits is None:
        return

    def is_prefect_drain(callback) -> bool:
        func = getattr(callback, "func", callback)
        return isinstance(getattr(func, "__self__", None), _QueueServiceBase)

    atexits[:] = [cb for cb in atexits if not is_prefect_drain(cb)]


os.register_at_fork(after_in_child=_drop_parent_prefect_services_in_child)
