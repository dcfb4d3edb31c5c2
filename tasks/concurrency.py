"""The product's training slot: a Prefect global concurrency limit `train-<product>` (named by
pipeline.operations.training_limit_name), so one product trains `limit` times at once at most and
further triggers queue. flows/retrain.py holds it around the check-version-train-promote sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from pipeline.operations import training_limit_name

logger = logging.getLogger(__name__)


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


__all__ = ["ensure_training_limit", "training_slot"]
