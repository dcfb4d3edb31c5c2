"""The training flow: a product's images -> a registered, promotable MLflow model (alias
`challenger`).

    fingerprint -> validate -> split -> extract -> coreset -> evaluate -> calibrate -> report
    -> register -> publish

Validation failing stops the flow before any feature is extracted; registration comes last, so a
failure anywhere leaves the registry untouched.

    python -m flows.train --product tiles --data data/tiles
    patchcore train --product tiles               (the same flow)
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from pipeline import steps
from pipeline.config import load_settings, params_to_dict
from tasks import training as t


@flow(name="train-product-model", flow_run_name="train-{product}", log_prints=True)
def train(product: str, data: str | None = None, params_path: str | None = None,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, evaluate, calibrate and register the PatchCore model of one product.

    product: product name (registered model `patchcore-<product>`); data: its folder in MVTec
    layout (default data/<product>); params_path: params.yaml (default ./params.yaml or
    PATCHCORE_PARAMS); overrides: dotted settings, e.g. {"model.backbone.weights": "random"}."""
    params = params_to_dict(load_settings(params_path, overrides))
    fingerprint = t.fingerprint(data or f"data/{product}", product)
    validation = t.validate(fingerprint, params, product)
    split = t.split(fingerprint, params)
    features = t.extract(fingerprint, split, params)
    bank = t.coreset(fingerprint, split, features, params)
    evaluation = t.evaluate(fingerprint, split, bank)
    calibrated = t.calibrate(evaluation, bank, product, params, fingerprint, split, features)
    report = t.report(evaluation, calibrated, fingerprint, params)
    record = steps.training_record(product, fingerprint, validation, split, features, bank, evaluation, calibrated, report)
    registered = t.register(product, params, record, validation)
    t.publish(product, record, registered)
    return {"product": product, "registry": registered, "calibration": record["calibration"],
            "metrics": record["metrics"], "features": record["features"], "data_version": record["data_version"],
            "bank_size": record["bank_size"], "n_bank": record["n_bank"], "coreset_continued": record["coreset_continued"],
            "seconds": record["seconds"], "cached_stages": record["cached_stages"]}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the training flow once (the CLI's `patchcore train` does the same).")
    parser.add_argument("--product", required=True)
    parser.add_argument("--data")
    parser.add_argument("--params")
    args = parser.parse_args()
    train(args.product, args.data, args.params)
