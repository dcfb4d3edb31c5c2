"""Workarounds for the Prefect release we pin (3.8.8), each explicit and tested.

`install_fork_fix()`: a process forked inside a Prefect run (a torch DataLoader worker decoding
images) inherits the parent's Prefect queue services, whose drain Prefect registers with
`threading._register_atexit`. In the child that drain fails (`assert self._done_event is not
None`: the service's event loop lives in a parent thread), so every forked worker exits with
status 1 and the DataLoader raises "worker exited unexpectedly". The fix drops those drains in
the child right after the fork. The tasks that run the backbone call it before they start
(tests/test_pipeline.py::test_dataloader_worker_processes_work_inside_prefect_tasks).
"""

from __future__ import annotations

import os
import threading

from prefect._internal.concurrency.services import _QueueServiceBase

_installed = False


def _drop_parent_prefect_services_in_child() -> None:
    atexits = getattr(threading, "_threading_atexits", None)
    if atexits is None:  # another Python: nothing to do
        return

    def is_prefect_drain(callback) -> bool:
        func = getattr(callback, "func", callback)
        return isinstance(getattr(func, "__self__", None), _QueueServiceBase)

    atexits[:] = [cb for cb in atexits if not is_prefect_drain(cb)]


def install_fork_fix() -> None:
    """Register the after-fork hook once per process (idempotent)."""
    global _installed
    if not _installed:
        os.register_at_fork(after_in_child=_drop_parent_prefect_services_in_child)
        _installed = True


__all__ = ["install_fork_fix"]
