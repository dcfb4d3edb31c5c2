"""Per-product locks that hold in every mode (a Prefect server or none, several CLI processes):
an exclusive `fcntl` lock on a file under $PATCHCORE_HOME/locks/. Registry changes of one product
(training's registration, promotion, rollback) run one at a time, and each re-reads the registry
inside the lock, so two `patchcore promote` at once cannot both promote, and two `patchcore train`
of one product at once register one version (the second finds the first's identical training).

On one machine. Across machines, the retrain deployments add the Prefect concurrency limit
`train-<product>` (tasks/concurrency.py). No Prefect here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

from patchcore.paths import home

DEFAULT_TIMEOUT_S = 1800.0


class LockTimeout(TimeoutError):
    """Another process held the product's lock for longer than the timeout."""


@contextlib.contextmanager
def product_lock(product: str, what: str = "registry", timeout_s: float | None = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Hold the product's `what` lock (waiting up to `timeout_s`, None: as long as it takes);
    released on exit, and by the kernel when the process dies, so a killed holder never leaves it taken."""
    folder = home() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{what}-{product}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"{path}: held by another process for more than {timeout_s:.0f} s (a {what} of {product!r} "
                        "is running; wait for it, or check for a hung process)"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


__all__ = ["LockTimeout", "product_lock"]
