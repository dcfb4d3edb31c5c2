"""The pipeline's small shared helpers, each written once: JSON encoding of numpy values and
paths, atomic JSON writes, content keys, and the git state of a folder.

No Prefect and no MLflow here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from patchcore import atomic

SOURCE_TREE = Path(__file__).resolve().parents[1]


def to_jsonable(value: Any) -> Any:
    """json.dump's `default`: numpy scalars and arrays, paths and dataclasses as plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def plain(value: Any) -> Any:
    """`value` with every numpy scalar made a Python number and NaN made None (for JSON that
    other tools read: MLflow, DVC metrics, GX summaries)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=to_jsonable)


def write_json(path: str | Path, data: Any) -> Path:
    """Atomic: a reader sees the old file or the whole new one, never half of it."""
    return atomic.write_json(path, data, default=to_jsonable)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def content_key(*parts: Any, length: int = 16) -> str:
    """A short hex key from JSON-able parts (the name of a content-addressed output)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=to_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def git(root: str | Path, *args: str, timeout: float = 30) -> str | None:
    """`git <args>` in `root`: its stripped stdout, or None when git is missing or fails."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(root: str | Path = SOURCE_TREE) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files have uncommitted changes) of the repository at `root`
    (default: this source tree); (None, None) outside a repository."""
    commit = git(root, "rev-parse", "HEAD")
    status = git(root, "status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


def project_root() -> Path:
    """The repository a command runs in: the git top level of the working directory, else the
    working directory. Paths in tracking data are recorded relative to it."""
    top = git(Path.cwd(), "rev-parse", "--show-toplevel", timeout=10)
    return Path(top) if top else Path.cwd()


def recorded_path(path: str | Path) -> str:
    """`path` as tracking data records it (MLflow tags and params, model.json, validation summaries):
    relative to the repository (POSIX) when inside it, so no training machine's absolute layout is
    written. A folder outside the repository is recorded as it is: it is not versioned with the
    repository, and a later promotion on the same machine needs its location."""
    absolute = Path(path).absolute()
    base = project_root().absolute()
    try:
        return absolute.relative_to(base).as_posix() or "."
    except ValueError:
        pass
    try:  # the same folder reached through a symlink (e.g. /tmp vs /private/tmp)
        return absolute.resolve().relative_to(base.resolve()).as_posix() or "."
    except ValueError:
        return str(absolute)


def resolve_recorded(path: str | Path) -> Path:
    """The folder a recorded path names on this machine (relative ones: under the repository)."""
    path = Path(path)
    return path if path.is_absolute() else project_root() / path


def source_commit() -> dict[str, Any]:
    """The source tree's commit and dirty flag, as the provenance records it."""
    commit, dirty = git_state(SOURCE_TREE)
    return {"commit": commit or "unknown", "dirty": dirty}


__all__ = [
    "content_key",
    "dumps",
    "git",
    "git_state",
    "plain",
    "project_root",
    "read_json",
    "recorded_path",
    "resolve_recorded",
    "source_commit",
    "to_jsonable",
    "write_json",
]
