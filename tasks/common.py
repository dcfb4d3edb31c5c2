"""What every pipeline task shares: the retry rule for transient I/O and artifact keys.

Caching lives in one place, the pipeline's content-addressed store (pipeline/store.py): a step
whose inputs did not change finds its output there. Tasks therefore use Prefect's states and
retries but no Prefect result caching (NO_CACHE)."""

from __future__ import annotations

import re
from typing import Any

from prefect.cache_policies import NO_CACHE

from patchcore.errors import StorageFull

# Retried: errors of the file system or the network that a second attempt may not meet (a busy
# NFS mount, a dropped connection). Never retried: bad data or settings (DataError, ConfigError are
# ValueErrors), files that simply are not there, and a full disk (it stays full: say so at once).
NOT_TRANSIENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, StorageFull)
RETRIES = 2
RETRY_DELAY_SECONDS = [2, 10]


def transient_io(task, task_run, state) -> bool:
    """retry_condition_fn: retry only OSErrors that may pass (timeouts, resets, busy files)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # a result that cannot even be read: do not guess
        return False
    return isinstance(exc, OSError) and not isinstance(exc, NOT_TRANSIENT)


# Keyword arguments of every pipeline task: no Prefect caching (see above).
PLAIN: dict[str, Any] = {"cache_policy": NO_CACHE}
# ... and of the tasks whose I/O may fail transiently.
IO_RETRIES: dict[str, Any] = PLAIN | {
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAY_SECONDS,
    "retry_condition_fn": transient_io,
}


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


__all__ = ["IO_RETRIES", "NOT_TRANSIENT", "PLAIN", "RETRIES", "RETRY_DELAY_SECONDS", "artifact_key", "transient_io"]
