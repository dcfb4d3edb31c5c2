"""When does new data in a product folder start a retrain? The watcher's (deploy/watcher.py)
debounce: plain functions, no Prefect, no I/O beyond stat-ing a folder and the watcher's own state
and heartbeat files, so it is testable on its own.

A *snapshot* is cheap (file count, total bytes, newest mtime; no hashing). The watcher keeps, per
product, the last snapshot, when it first looked like that, and the snapshot it last fired for.
It fires once when
  - the folder has looked the same for at least `settle_seconds` (a copy in progress keeps
    changing the snapshot, so copying 500 files fires once, after the copy ends), and
  - that settled snapshot is not the one it already fired for (or the baseline it started from).
Whether the *images* changed since the champion (the DVC md5) is decided by the retrain itself
(`pipeline.data_version.changed_since`), so a touch without a content change retrains nothing.

Must never import Prefect, MLflow or the training code.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from patchcore.paths import home


@dataclass(frozen=True)
class Snapshot:
    n_files: int
    total_bytes: int
    newest_mtime_ns: int

    @classmethod
    def of(cls, folder: str | Path) -> Snapshot:
        """File count, bytes and newest mtime of everything under `folder` (hidden files skipped)."""
        n = total = newest = 0
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith("."):
                    continue
                try:
                    st = os.stat(os.path.join(root, name))
                except FileNotFoundError:  # removed while we walked: the next look sees it
                    continue
                n, total, newest = n + 1, total + st.st_size, max(newest, st.st_mtime_ns)
        return cls(n, total, newest)


@dataclass
class WatchState:
    """What the watcher remembers about one product between looks (JSON-able)."""

    last: Snapshot | None = None  # the snapshot seen at the previous look
    stable_since: float | None = None  # when the folder started to look like `last`
    fired_for: Snapshot | None = None  # the settled snapshot that last fired (or the baseline)
    fired_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> WatchState:
        data = dict(data or {})
        for key in ("last", "fired_for"):
            if data.get(key) is not None:
                data[key] = Snapshot(**data[key])
        return cls(**data)


def observe(
    state: WatchState, snapshot: Snapshot, now: float, settle_seconds: float, fire_on_first_look: bool = False
) -> tuple[WatchState, bool]:
    """One look at a folder: the new state and whether to fire (start a retrain) now.

    The first look records a baseline and fires only with `fire_on_first_look` (the retrain
    decides with the champion's data version whether anything is new)."""
    if state.last is None:
        fired = fire_on_first_look
        return WatchState(snapshot, now, snapshot, state.fired_count + int(fired), state.extra), fired
    stable_since = state.stable_since if snapshot == state.last and state.stable_since is not None else now
    settled = now - stable_since >= settle_seconds
    fire = settled and snapshot != state.fired_for
    return WatchState(
        snapshot, stable_since, snapshot if fire else state.fired_for, state.fired_count + int(fire), state.extra
    ), fire


def state_path(product: str) -> Path:
    """Where the watcher keeps one product's WatchState between looks (and across restarts)."""
    return home() / "watch" / f"{product}.json"


def heartbeat_path() -> Path:
    """The watcher's heartbeat file: written after every look (deploy/watcher.py)."""
    return home() / "watch" / "heartbeat.json"


def heartbeat(now: float | None = None) -> dict[str, Any] | None:
    """The last heartbeat with its age in seconds (`age_seconds`), or None when no watcher ever ran here."""
    path = heartbeat_path()
    try:
        beat = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    beat["age_seconds"] = round((time.time() if now is None else now) - float(beat.get("at", 0)), 1)
    return beat


__all__ = ["Snapshot", "WatchState", "heartbeat", "heartbeat_path", "observe", "state_path"]
