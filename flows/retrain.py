"""The retrain a schedule or new data starts: new data? -> version it (DVC) -> train -> gate.

    check new data --no--> "no new data" (finishes in seconds)
          | yes
    [training slot train-<product>: one training per product, others queue]
    version data (dvc add) -> train-product-model -> commit data.dvc -> dvc push -> promote-product-model
                                    | fails: data.dvc put back, nothing committed

The check runs inside the product's training slot, so a trigger queued behind a running retrain
of the same images finds them already trained and stops.

    python -m flows.retrain --product tiles [--force]
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.promote import promote
from flows.train import train
from pipeline.config import load_settings
from pipeline.locks import product_lock
from tasks import operations as t
from tasks.concurrency import training_slot


@flow(name="retrain-product-model", flow_run_name="retrain-{product}-{reason}", log_prints=True)
def retrain(
    product: str,
    data: str | None = None,
    reason: str = "manual",
    force: bool = False,
    params_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    allow_random_weights: bool = False,
) -> dict[str, Any]:
    """reason: what started it (schedule, new-data, manual); force: train even without new data."""
    settings = load_settings(params_path, overrides)
    ops, data = settings.operations, data or f"data/{product}"
    with training_slot(product, ops.max_concurrent_trainings):
        check = t.check_new_data(product, data, settings.mlflow)
        if not check["changed"] and not force:
            create_markdown_artifact(
                f"**{check['message']}** ({reason}); nothing trained.",
                key=f"retrain-{product}".lower(),
                description="retrain decision",
            )
            return {
                "product": product,
                "outcome": "no new data",
                "reason": reason,
                "message": check["message"],
                "md5": check["md5"],
            }
        # One .dvc file (data.dvc) holds every product's data: versioning, training and the commit or
        # revert run under one repository-wide lock, so two products' retrains cannot commit or put
        # back each other's data versions (they queue here; each product's own slot is above).
        with product_lock("data", "dvc", timeout_s=None):
            versioned = t.version_data(data, product)
            try:
                trained = train(product, data, params_path, overrides)
            except BaseException:
                t.revert_data_version(versioned)  # a failed run leaves no changed .dvc file and no commit
                raise
            commit = t.commit_data_version(versioned, product) if ops.git_commit_data else None
            pushed = t.push_data_version(versioned) if ops.dvc_push else None
        decision = (
            promote(product, data, params_path, overrides, allow_random_weights=allow_random_weights)
            if ops.promote_after_training
            else None
        )
    features = trained["features"]
    lines = [
        f"# Retrain {product} ({reason})",
        "",
        f"- {check['message']}",
        f"- data version `{versioned['md5']}`"
        + (f", committed {commit[:12]}" if commit else "")
        + (f", pushed to DVC remote {pushed}" if pushed else ""),
        f"- challenger v{trained['registry']['version']}; features {features['n_extracted']} extracted, "
        f"{features['n_cached']} reused of {features['n_images']}",
        "- coreset: "
        + (
            f"continued the bank of {c['prior_images']} images ({c['prior_picks']} picks kept)"
            if (c := trained.get("coreset_continued"))
            else "built from scratch"
        ),
        f"- promotion: {decision['summary'] if decision else 'not run (operations.promote_after_training: false)'}",
    ]
    create_markdown_artifact("\n".join(lines), key=f"retrain-{product}".lower(), description="retrain decision")
    return {
        "product": product,
        "outcome": "trained",
        "reason": reason,
        "message": check["message"],
        "md5": versioned["md5"],
        "data_version": versioned | {"git_commit": commit, "dvc_remote": pushed},
        "registry": trained["registry"],
        "features": features,
        "coreset_continued": trained.get("coreset_continued"),
        "bank_size": trained["bank_size"],
        "n_bank": trained["n_bank"],
        "promotion": decision,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Retrain a product if its images changed since the champion.")
    parser.add_argument("--product", required=True)
    parser.add_argument("--data")
    parser.add_argument("--params")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--allow-random-weights", action="store_true")
    args = parser.parse_args()
    print(
        retrain(
            args.product, args.data, "manual", args.force, args.params, allow_random_weights=args.allow_random_weights
        )
    )
