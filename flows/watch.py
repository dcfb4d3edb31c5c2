"""The new-data watcher: one look at each product folder; when a folder has settled after changing,
emit the Prefect event `patchcore.data.settled` that the retrain deployment's trigger listens for.
Deployed on an interval (deploy/serve.py); the debounce is pipeline/watching.py's `observe`. Its state
lives in $PATCHCORE_HOME/watch/<product>.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.events import emit_event

from patchcore.paths import home
from pipeline.config import load_settings
from pipeline.operations import EVENT_DATA_SETTLED
from pipeline.watching import Snapshot, WatchState, observe


def state_path(product: str) -> Path:
    return home() / "watch" / f"{product}.json"


@flow(name="watch-product-data", log_prints=True)
def watch(
    products: list[str] | None = None,
    data_root: str = "data",
    params_path: str | None = None,
    settle_seconds: float | None = None,
) -> dict[str, Any]:
    settings = load_settings(params_path)
    settle = settings.operations.settle_seconds if settle_seconds is None else settle_seconds
    fired: dict[str, Any] = {}
    for product in products or settings.data.products:
        folder = Path(data_root) / product
        if not folder.is_dir():
            print(f"{folder}: no such folder; skipped")
            continue
        path = state_path(product)
        state = WatchState.from_dict(json.loads(path.read_text()) if path.exists() else None)
        snapshot = Snapshot.of(folder)
        state, fire = observe(state, snapshot, time.time(), settle, fire_on_first_look=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state.to_dict()))
        if fire:
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
            print(f"{product}: {snapshot.n_files} files settled for {settle:.0f} s -> {EVENT_DATA_SETTLED}")
        fired[product] = fire
    return fired
