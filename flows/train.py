"""The training flow: a product's images -> a registered, promotable MLflow model (alias
`challenger`).

    fingerprint -> validate -> split -> extract (here, or on a Dask cluster) -> coreset -> evaluate
    -> calibrate -> report -> register -> publish

Validation failing stops the flow before any feature is extracted; registration comes last, so a
failure anywhere leaves the registry untouched.

    patchcore train --product tiles [--data data/tiles]
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from flows.extract import extract_on_cluster
from pipeline import steps
from pipeline.config import load_settings
from pipeline.locks import product_lock
from pipeline.store import Store
from tasks import training as t


@flow(name="train-product-model", flow_run_name="train-{product}", log_prints=True)
def train(
    product: str, data: str | None = None, params_path: str | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train, evaluate, calibrate and register the PatchCore model of one product.

    product: product name (registered model `patchcore-<product>`); data: its folder in MVTec
    layout (default data/<product>); params_path: params.yaml (default ./params.yaml or
    PATCHCORE_PARAMS); overrides: dotted settings, e.g. {"model.backbone.weights": "random"}."""
    settings = load_settings(params_path, overrides)
    store = Store.from_settings(settings)
    # One training of a product at a time on this machine, in every mode (with or without a Prefect
    # server): a second waits, then finds the first's outputs in the store and its registered version.
    with product_lock(product, "train"):
        started_at = time.time()
        manifest = t.fingerprint(store, data or f"data/{product}", product)
        validation = t.validate(store, manifest, settings, product)
        division = t.split(store, manifest, settings)
        plan = t.plan_extract(store, manifest, division, settings)
        if plan.shards and settings.cluster.uses_dask():
            features = extract_on_cluster(store, plan, settings)  # the shards mapped over a Dask cluster
        else:
            features = t.extract(store, plan, settings)
        bank = t.coreset(store, manifest, division, features, settings)
        evaluation = t.evaluate(store, manifest, division, bank)
        calibrated = t.calibrate(store, evaluation, bank, product, settings, manifest, division, features)
        report = t.report(store, evaluation, calibrated, manifest, settings)
        record = steps.training_record(
            product, manifest, validation, division, features, bank, evaluation, calibrated, report, started_at
        )
        registered = t.register(store, product, settings, record, validation)
        t.publish(product, record, registered)
    return {
        "product": product,
        "registry": registered,
        "calibration": record.calibration,
        "metrics": record.metrics,
        "features": record.features,
        "data_version": record.data_version,
        "bank_size": record.bank_size,
        "n_bank": record.n_bank,
        "coreset_continued": record.coreset_continued,
        "seconds": record.seconds,
        "cached_stages": record.cached_stages,
    }
