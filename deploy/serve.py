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

Work-pool mode (`make stack`; README "Scaling out"): the same deployments, schedules and triggers
registered for a Prefect work pool, whose `prefect worker`s (on this machine or others) run them;
training in queue `gpu`, promotion and inspection in queue `cpu`. It registers and exits; the watcher
then runs on its own (`python -m deploy.watcher`):

    python -m deploy.serve --work-pool patchcore [--source <folder or git URL>] [--clear-stale]

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
from pathlib import Path
from typing import Any

from prefect import deploy, serve
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
from tasks.concurrency import clear_stale, ensure_work_pool


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


# Work-pool mode: the queue each deployment's runs wait in. Training (extraction, coreset, kNN) wants
# a GPU machine's worker; promotion and inspection score a few images and run anywhere.
WORK_QUEUES = {"train": "gpu", "retrain": "gpu", "promote": "cpu", "inspect": "cpu"}
FLOW_FILES = {
    "train": "flows/train.py:train",
    "retrain": "flows/retrain.py:retrain",
    "promote": "flows/promote.py:promote",
    "inspect": "flows/inspect.py:inspect",
}


def build_deployments(
    settings: Params,
    params_path: str | None = None,
    data_root: str = "data",
    allow_random_weights: bool = False,
    work_pool: str | None = None,
    source: str | None = None,
) -> list[Any]:
    """The pipeline's deployments, for `serve` (work_pool None: this process runs them) or for a
    Prefect work pool (its workers fetch the code from `source`, a folder or a git URL, and run
    the flows there; runs wait in the queue WORK_QUEUES names)."""
    ops = settings.operations
    common = {"params_path": params_path} if params_path else {}
    flows = {"train": train, "retrain": retrain, "promote": promote, "inspect": inspect}
    pool: dict[str, dict[str, Any]] = {name: {} for name in flows}
    if work_pool:
        flows = {name: f.from_source(source=source or ".", entrypoint=FLOW_FILES[name]) for name, f in flows.items()}
        pool = {name: {"work_pool_name": work_pool, "work_queue_name": WORK_QUEUES[name]} for name in flows}
    train_flow, retrain_flow, promote_flow, inspect_flow = (
        flows[n] for n in ("train", "retrain", "promote", "inspect")
    )
    deployments = [
        train_flow.to_deployment(
            name="train",
            **pool["train"],
            parameters=common,
            tags=["patchcore"],
            description="Train, evaluate, calibrate and register a product's model (alias challenger). Run by hand.",
        ),
        promote_flow.to_deployment(
            name="promote",
            **pool["promote"],
            parameters=common,
            tags=["patchcore"],
            description="Re-score challenger and champion on a pinned evaluation set; move champion if the gate "
            "passes. Run by hand (retrains run it themselves).",
        ),
        inspect_flow.to_deployment(
            name="inspect",
            **pool["inspect"],
            parameters=common,
            tags=["patchcore"],
            description="Score a folder of images with a registered model (default: the champion): CSV, JSON, "
            "heatmaps and a table artifact.",
        ),
    ]
    for product in settings.data.products:
        deployments.append(
            retrain_flow.to_deployment(
                name=f"retrain-{product}",
                **pool["retrain"],
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


def deploy_to_pool(settings: Params, args: argparse.Namespace) -> int:
    """Create the work pool and its queues (once), register the deployments for it, and exit."""
    source = args.source or str(Path.cwd())
    ensure_work_pool(args.work_pool, sorted(set(WORK_QUEUES.values())))
    deployments = build_deployments(
        settings, args.params, args.data_root, args.allow_random_weights, args.work_pool, source
    )
    ids = deploy(*deployments, work_pool_name=args.work_pool, build=False, push=False, print_next_steps_message=False)
    if args.clear_stale:  # the one machine whose workers run these deployments is starting: nothing runs yet
        cleared = clear_stale(ids, list(settings.data.products))
        if cleared["runs"] or cleared["slots"]:
            print(f"cleared: {cleared['runs']} run(s) marked Crashed, {cleared['slots']} training slot(s) released")
    print(
        f"registered {len(ids)} deployments for work pool {args.work_pool!r} (queues "
        f"{', '.join(sorted(set(WORK_QUEUES.values())))}; code from {source}); start workers with "
        f"`prefect worker start --pool {args.work_pool} --work-queue <queue>`",
        flush=True,
    )
    return 0


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
    parser.add_argument(
        "--work-pool",
        help="register the deployments for this Prefect work pool (its `prefect worker`s run them) and exit, "
        "instead of serving them from this process",
    )
    parser.add_argument(
        "--source", help="with --work-pool: where workers get the code, a folder or a git URL (default: this folder)"
    )
    parser.add_argument(
        "--clear-stale",
        action="store_true",
        help="with --work-pool: mark runs of these deployments left Running as Crashed and free the training "
        "slots (only when no worker of the pool is running, e.g. `make stack` after a crash)",
    )
    args = parser.parse_args(argv)
    url = check_api_url()
    settings = load_settings(args.params)
    if args.work_pool:
        return deploy_to_pool(settings, args)
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
