"""Serve the pipeline's Prefect deployments from one process, against a Prefect server:

    train-product-model/train        manual runs (parameters in the UI)
    promote-product-model/promote    manual runs
    inspect-images/inspect           manual runs
    retrain-product-model/retrain-<product>
                                     cron (operations.schedule) -> "no new data" unless images changed,
                                     and the new-data trigger (event patchcore.data.settled)
    watch-product-data/watch         every operations.watch_interval_seconds

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deploy.serve     (`make serve` does all of it)

Refuses to start without PREFECT_API_URL: schedules and triggers need a real server, and Prefect
would otherwise start a temporary one that forgets everything on exit.
Only schedules, triggers and serves: the work is in flows/.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL

from flows.inspect import inspect
from flows.promote import promote
from flows.retrain import retrain
from flows.train import train
from flows.watch import watch
from pipeline.config import Params, load_settings
from pipeline.operations import EVENT_DATA_SETTLED


def new_data_trigger(product: str):
    """The retrain-<product> deployment runs when the watcher says the product's folder settled."""
    return DeploymentEventTrigger(
        name=f"new data for {product}",
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
        train.to_deployment(name="train", parameters=common, tags=["patchcore"]),
        promote.to_deployment(name="promote", parameters=common, tags=["patchcore"]),
        inspect.to_deployment(name="inspect", parameters=common, tags=["patchcore"]),
        # One look at a time: a look still running when the next is due makes the next one cancel itself.
        watch.to_deployment(
            name="watch",
            interval=timedelta(seconds=ops.watch_interval_seconds),
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy="CANCEL_NEW"),
            parameters={"products": list(settings.data.products), "data_root": data_root, **common},
            tags=["patchcore"],
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
                triggers=[new_data_trigger(product)],
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
    deployments = build_deployments(load_settings(args.params), args.params, args.data_root, args.allow_random_weights)
    print(f"serving {len(deployments)} deployments against {url}")
    serve(*deployments, limit=4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
