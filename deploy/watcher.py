"""The new-data watcher: one long-running loop that watches every product folder and emits the
Prefect event `patchcore.data.settled` once a changed folder has settled; the retrain deployments'
trigger listens for it. deploy/serve.py runs it beside the deployments (started and stopped with
them); alone: `python -m deploy.watcher` (PREFECT_API_URL set).

    file lands -> inotify (watchdog) wakes the loop at once; a rescan every
                  operations.watch_interval_seconds is the fallback (network file systems, where
                  inotify sees nothing, and anything missed)
               -> pipeline/watching.py `observe`: fires once the folder has not changed for
                  operations.settle_seconds (a copy of 500 files fires once, after the copy)
               -> emit patchcore.data.settled -> trigger -> retrain-<product> run

It is no flow run: a flow run per look flooded the Runs list (~8,600 a day) and a look left
Pending by a killed server kept the deployment's concurrency slot. Its state lives in
$PATCHCORE_HOME/watch/<product>.json, so a folder that changed while the watcher was down fires at
the first look after a restart. Heartbeat: $PATCHCORE_HOME/watch/heartbeat.json after every look
(pid, mode, time, looks, events sent; `patchcore status` shows its age) and the Prefect event
`patchcore.watcher.heartbeat` every HEARTBEAT_EVENT_SECONDS (in the UI's event feed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.events import emit_event
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from patchcore.atomic import write_json
from pipeline.config import load_settings
from pipeline.operations import EVENT_DATA_SETTLED, EVENT_WATCHER_HEARTBEAT
from pipeline.watching import Snapshot, WatchState, heartbeat_path, observe, state_path

logger = logging.getLogger("patchcore.watcher")
HEARTBEAT_EVENT_SECONDS = 60.0
TICK_SECONDS = 1.0  # how often an unsettled folder is looked at again (inotify mode)


def emit_settled(product: str, folder: Path, snapshot: Snapshot) -> None:
    emit_event(
        event=EVENT_DATA_SETTLED,
        resource={"prefect.resource.id": f"patchcore.product.{product}", "patchcore.product": product},
        payload={
            "product": product,
            "data": str(folder.resolve()),
            "n_files": snapshot.n_files,
            "total_bytes": snapshot.total_bytes,
        },
    )


def emit_heartbeat(beat: dict[str, Any]) -> None:
    emit_event(
        event=EVENT_WATCHER_HEARTBEAT,
        resource={"prefect.resource.id": f"patchcore.watcher.{beat['host']}"},
        payload=beat,
    )


class _Wake(FileSystemEventHandler):
    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("opened", "closed_no_write"):  # reading a file (the training does) is no change
            self.wake.set()


@dataclass
class Watcher:
    """Watches `products` under `data_root`; `emit` is called once per settled change."""

    products: list[str]
    data_root: Path
    settle_seconds: float
    interval_seconds: float
    mode: str = "auto"  # auto (inotify, else polling) | inotify | poll
    emit: Callable[[str, Path, Snapshot], None] = emit_settled
    heartbeat: Callable[[dict[str, Any]], None] | None = emit_heartbeat
    states: dict[str, WatchState] = field(default_factory=dict)
    looks: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        self.data_root = Path(self.data_root)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._observer = None
        self.active_mode = "poll"
        self._last_heartbeat_event = 0.0

    # -- one look -----------------------------------------------------------------------------------
    def look(self, now: float | None = None) -> list[str]:
        """Look at every product folder once; emit for the ones that settled after a change."""
        now = time.time() if now is None else now
        fired = []
        for product in self.products:
            try:
                if self._look_at(product, now):
                    fired.append(product)
            except Exception as exc:  # one product's problem never stops the watching of the others
                logger.error("%s: look failed (%s: %s); next look in a moment", product, type(exc).__name__, exc)
        self.looks += 1
        self.fired += len(fired)
        try:
            self._beat(now)
        except OSError as exc:
            logger.error("heartbeat not written: %s", exc)
        return fired

    def _look_at(self, product: str, now: float) -> bool:
        """One product's look: whether it fired."""
        folder = self.data_root / product
        if not folder.is_dir():
            return False
        state = self.states.get(product)
        if state is None:
            path = state_path(product)
            try:
                state = WatchState.from_dict(json.loads(path.read_text()) if path.is_file() else None)
            except (ValueError, TypeError) as exc:  # a damaged state file: start a new baseline
                logger.warning("%s: %s unreadable (%s); starting a new baseline", product, path, exc)
                state = WatchState()
        snapshot = Snapshot.of(folder)
        new, fire = observe(state, snapshot, now, self.settle_seconds, fire_on_first_look=True)
        if fire:
            self.emit(product, folder, snapshot)
            logger.info(
                "%s: %d files settled for %.0f s -> %s",
                product,
                snapshot.n_files,
                self.settle_seconds,
                EVENT_DATA_SETTLED,
            )
        if new != state:
            write_json(state_path(product), new.to_dict())
        self.states[product] = new
        return fire

    def unsettled(self) -> bool:
        return any(s.last is not None and s.last != s.fired_for for s in self.states.values())

    def _beat(self, now: float) -> None:
        beat = {
            "pid": os.getpid(),
            "host": os.uname().nodename,
            "mode": self.active_mode,
            "at": now,
            "looks": self.looks,
            "events_sent": self.fired,
            "products": self.products,
            "data_root": str(self.data_root.resolve()),
            "settle_seconds": self.settle_seconds,
            "interval_seconds": self.interval_seconds,
        }
        write_json(heartbeat_path(), beat)
        if self.heartbeat is not None and now - self._last_heartbeat_event >= HEARTBEAT_EVENT_SECONDS:
            self._last_heartbeat_event = now
            try:
                self.heartbeat(beat)
            except Exception as exc:  # a heartbeat that cannot be sent never stops the watching
                logger.warning("heartbeat event not sent: %s", exc)

    # -- the loop ---------------------------------------------------------------------------------------
    def start_observer(self) -> str:
        """inotify through watchdog where it works (mode auto/inotify); polling otherwise."""
        if self.mode == "poll":
            self.active_mode = "poll"
            return self.active_mode
        folders = [self.data_root / p for p in self.products if (self.data_root / p).is_dir()]
        observer = Observer(timeout=1.0)
        try:
            for folder in folders:
                observer.schedule(_Wake(self._wake), str(folder), recursive=True)
            observer.start()
        except OSError as exc:  # inotify watch limit reached, unsupported file system, ...
            if self.mode == "inotify":
                raise
            logger.warning("inotify unavailable (%s): polling every %.0f s", exc, self.interval_seconds)
            self.active_mode = "poll"
            return self.active_mode
        if isinstance(observer, PollingObserver):  # watchdog found no native backend
            self.active_mode = "poll"
        else:
            self.active_mode = "inotify"
        self._observer = observer
        return self.active_mode

    def run(self, max_seconds: float | None = None) -> None:
        """Look, then wait for a file event (inotify) or the next tick, until stop() or max_seconds."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self.start_observer()
        logger.info(
            "watching %s under %s (%s; settle %.0f s, rescan every %.0f s)",
            ", ".join(self.products),
            self.data_root,
            self.active_mode,
            self.settle_seconds,
            self.interval_seconds,
        )
        try:
            while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
                self._wake.clear()
                self.look()
                # An unsettled folder is looked at every tick (its settle time may be up); a quiet one
                # at the rescan interval, or at once when inotify reports a change (stop() wakes too).
                timeout = min(TICK_SECONDS, self.interval_seconds) if self.unsettled() else self.interval_seconds
                if deadline is not None:
                    timeout = max(0.0, min(timeout, deadline - time.monotonic()))
                (self._wake if self.active_mode == "inotify" else self._stop).wait(timeout)
        finally:
            if self._observer is not None:
                self._observer.stop()
                self._observer.join(timeout=5)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="patchcore-watcher", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


def from_settings(settings, data_root: str | Path = "data", products: list[str] | None = None) -> Watcher:
    ops = settings.operations
    return Watcher(
        products=list(products or settings.data.products),
        data_root=Path(data_root),
        settle_seconds=ops.settle_seconds,
        interval_seconds=ops.watch_interval_seconds,
        mode=ops.watch_mode,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", help="params.yaml (default ./params.yaml)")
    parser.add_argument("--data-root", default="data", help="folder holding data/<product>")
    parser.add_argument("--max-seconds", type=float, help="stop after this long (tests)")
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        sys.exit("PREFECT_API_URL is not set: the watcher sends its events to a Prefect server (`make serve`)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    watcher = from_settings(load_settings(args.params), args.data_root)
    try:
        watcher.run(max_seconds=args.max_seconds)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["HEARTBEAT_EVENT_SECONDS", "Watcher", "emit_heartbeat", "emit_settled", "from_settings", "main"]
