"""Serve the pipeline's Prefect deployments from one process, against a Prefect server, with the
new-data watcher (deploy/watcher.py) running beside them:

    train-product-model/train        manual runs (parameters in the UI)
    promote-product-model/promote    manual runs
    inspect-images/inspect           manual runs
    retrain-product-model/retrain-<product>
                                     cron (operations.schedule) -> "no new data" unless images changed,
                                     and the new-data trigger (event patchcore.data.settled)
    the watcher                      emits patchcore.data.settled when a product folder settled

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deploy.serve     (`make serve` does all of it)

At start it clears what a killed predecessor left behind (tasks/concurrency.clear_stale: runs of
these deployments still Pending/Running are marked Crashed, training slots freed), so a restart
after `kill -9` or a reboot never wedges the retrain loop.

Refuses to start without PREFECT_API_URL: schedules and triggers need a real server, and Prefect
would otherwise start a temporary one that forgets everything on exit.
Only schedules, triggers and serves: the work is in flows/.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from prefect import serve
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL

from deploy.watcher import from_settings
from flows.inspect import inspect
from flows.promote import promote
from flows.retrain import retrain
from flows.train import train
from pipeline.config import Params, load_settings
from pipeline.operations import EVENT_DATA_SETTLED
from pipeline.watching import heartbeat_path
from tasks.concurrency import clear_stale


def new_data_trigger(product: str, settle_seconds: float):
    """The retrain-<product> deployment runs when the watcher says the product's folder settled."""
    return DeploymentEventTrigger(
        name=f"new data for {product}",
        description=(
            f"Starts retrain-{product} when the new-data watcher reports that data/{product} changed and then "
            f"stayed unchanged for {settle_seconds:g} s (event {EVENT_DATA_SETTLED}, resource "
            f"patchcore.product.{product}). The retrain itself checks whether the images differ from the "
            "champion's data version."
        ),
        expect={EVENT_DATA_SETTLED},
        match={"prefect.resource.id": f"patchcore.product.{product}"},
        parameters={"product": product, "data": "{{ event.payload.data }}", "reason": "new-data"},
    )


def build_deployments(
    settings: Params, params_path: str | None = None, data_root: str = "data", allow_random_weights: bool = False
) -> list[Any]:
    ops = settings.operations
    common = {"params_path": params_path} if params_path else {}
    deployments = [
        train.to_deployment(
            name="train",
            parameters=common,
            tags=["patchcore"],
            description="Train, evaluate, calibrate and register a product's model (alias challenger). Run by hand.",
        ),
        promote.to_deployment(
            name="promote",
            parameters=common,
            tags=["patchcore"],
            description="Re-score challenger and champion on a pinned evaluation set; move champion if the gate "
            "passes. Run by hand (retrains run it themselves).",
        ),
        inspect.to_deployment(
            name="inspect",
            parameters=common,
            tags=["patchcore"],
            description="Score a folder of images with a registered model (default: the champion): CSV, JSON, "
            "heatmaps and a table artifact.",
        ),
    ]
    for product in settings.data.products:
        deployments.append(
            retrain.to_deployment(
                name=f"retrain-{product}",
                schedules=[
                    Cron(
                        ops.cron_for(product),
                        timezone=ops.schedule_timezone,
                        parameters={"product": product, "data": f"{data_root}/{product}", "reason": "schedule"},
                    )
                ],
                triggers=[new_data_trigger(product, ops.settle_seconds)],
                parameters={
                    "product": product,
                    "data": f"{data_root}/{product}",
                    "allow_random_weights": allow_random_weights,
                    **common,
                },
                tags=["patchcore", product],
                description=f"Retrain {product} when its images changed (cron {ops.cron_for(product)}, or new data).",
            )
        )
    return deployments


def check_api_url() -> str:
    url = os.environ.get("PREFECT_API_URL") or ""
    if not url:
        url = PREFECT_API_URL.value() or ""
    if not url:
        sys.exit(
            "PREFECT_API_URL is not set: start a server (`prefect server start --host 127.0.0.1`) and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api, or run `make serve`"
        )
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", help="params.yaml (default ./params.yaml)")
    parser.add_argument("--data-root", default="data", help="folder holding data/<product>")
    parser.add_argument(
        "--allow-random-weights", action="store_true", help="let retrains promote random-weights models (demo only)"
    )
    args = parser.parse_args(argv)
    url = check_api_url()
    settings = load_settings(args.params)
    deployments = build_deployments(settings, args.params, args.data_root, args.allow_random_weights)
    ids = [deployment.apply() for deployment in deployments]
    cleared = clear_stale(ids, list(settings.data.products))
    if cleared["runs"] or cleared["slots"]:
        print(
            f"cleared after the previous server stopped: {cleared['runs']} run(s) marked Crashed, "
            f"{cleared['slots']} training slot(s) released"
        )
    watcher = from_settings(settings, args.data_root)
    watcher.start()
    print(
        f"serving {len(deployments)} deployments against {url}; new-data watcher on {args.data_root} "
        f"({watcher.mode}); heartbeat {heartbeat_path()}",
        flush=True,
    )
    try:
        # Poll for runs every 2 s (Prefect's default is 10 s): the new-data latency users see.
        serve(*deployments, limit=4, query_seconds=2)
    finally:
        watcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
