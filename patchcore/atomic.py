"""Atomic writes, in one place: a reader sees the old file (or folder) or the whole new one, never
half of it, and a failed write leaves no temporary file behind.

Every writer of the project (the model's save, the pipeline's store, the registry cache) goes
through these three functions. Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from patchcore.errors import StorageFull

# errno values of a write that failed for want of room: the disk, a quota, a file-size limit
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _full(exc: BaseException, path: Path) -> StorageFull | None:
    """A StorageFull for a write that failed for want of room. numpy's tofile reports a short write
    as "N requested and M written" without an errno, so a failed write on a file system with (almost)
    no free space left counts as well."""
    if not isinstance(exc, OSError) or isinstance(exc, StorageFull):
        return None
    code = exc.errno
    if code not in FULL:
        try:
            stats = os.statvfs(path.parent)
        except OSError:
            return None
        if stats.f_bavail * stats.f_frsize >= 1 << 20:
            return None
        code = errno.ENOSPC
    return StorageFull(
        code,
        f"{path}: no room left on its file system ({os.strerror(code)}: {exc}); nothing half-written was "
        "left behind: free space there (or write elsewhere) and run again",
    )


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path` (flushed and fsynced
    first), on any exception it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600: keep the replaced file's mode, else the usual one (0666 - umask)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        full = _full(exc, path)
        if full is not None:
            raise full from exc
        raise


def write_json(path: str | Path, data: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """`data` as indented, key-sorted JSON, atomically."""
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=default)
        handle.write("\n")
    return Path(path)


def save_npy(path: str | Path, array: np.ndarray, dtype: Any = np.float32) -> Path:
    """A C-contiguous .npy of `array` as `dtype` (no pickle), atomically."""
    with atomic_file(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `directory`; on a clean exit it becomes `directory`
    (an existing one is swapped out and deleted), on any exception it is deleted."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
    try:
        yield tmp
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _full(exc, directory)
        if full is not None:
            raise full from exc
        raise


__all__ = ["atomic_directory", "atomic_file", "save_npy", "write_json"]
