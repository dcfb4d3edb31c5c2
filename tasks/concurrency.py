"""The product's training slot: a Prefect global concurrency limit `train-<product>` (named by
pipeline.operations.training_limit_name), so one product trains `limit` times at once at most and
further triggers queue. flows/retrain.py holds it around the check-version-train-promote sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate, WorkPoolCreate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.states import Crashed

from pipeline.operations import training_limit_name

logger = logging.getLogger(__name__)
ACTIVE_STATES = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]


def ensure_training_limit(product: str, limit: int) -> str:
    """Create (or resize) the Prefect global concurrency limit `train-<product>`."""
    name = training_limit_name(product)
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            existing = None
        if existing is None:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except Exception:  # created by a concurrent caller meanwhile
                client.read_global_concurrency_limit_by_name(name)
        elif existing.limit != limit or not existing.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))
    return name


@contextmanager
def training_slot(product: str, limit: int = 1) -> Iterator[None]:
    """Hold one of the product's `limit` training slots; other trainings of the product wait (queue)."""
    name = ensure_training_limit(product, limit)
    logger.info("waiting for training slot %s", name)
    with concurrency(name, occupy=1, strict=True, lease_duration=300):
        yield


def ensure_work_pool(name: str, queues: list[str]) -> None:
    """A Prefect work pool of type `process` (workers run flow runs as subprocesses) with these queues."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            except ObjectAlreadyExists:  # created by a concurrent caller meanwhile
                pass
        existing = {q.name for q in client.read_work_queues(work_pool_name=name)}
        for queue in queues:
            if queue not in existing:
                try:
                    client.create_work_queue(name=queue, work_pool_name=name)
                except ObjectAlreadyExists:
                    pass


def clear_stale(deployment_ids: list, products: list[str]) -> dict[str, int]:
    """At the start of the one process that serves these deployments: nothing of theirs can still be
    running, so every run of them left Pending/Running/Cancelling by a killed process is marked
    Crashed (which frees the deployment concurrency slot it held), and the products' training slots
    are reset to free. Without this, a `kill -9` (or a reboot) during a run left slots taken for
    good and every later trigger queued or was cancelled. Returns what it cleared."""
    cleared = {"runs": 0, "slots": 0}
    with get_client(sync_client=True) as client:
        if deployment_ids:
            stale = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(deployment_ids))),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES))
                ),
            )
            for run in stale:
                client.set_flow_run_state(
                    run.id,
                    Crashed(message="the process serving this deployment stopped (cleared at restart)"),
                    force=True,
                )
                logger.warning(
                    "flow run %s (%s) was left %s by a stopped server: marked Crashed",
                    run.name,
                    run.id,
                    run.state.name if run.state else "?",
                )
            cleared["runs"] = len(stale)
        for product in products:
            name = training_limit_name(product)
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                continue
            if limit.active_slots:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
                logger.warning("training slot %s: %d slot(s) held by a stopped run released", name, limit.active_slots)
                cleared["slots"] += limit.active_slots
    return cleared


__all__ = ["clear_stale", "ensure_training_limit", "training_slot"]
