"""The training flow's tasks: one thin wrapper per step of pipeline.steps (and the registry). They
take the typed settings and the typed results of earlier steps, add retries and run logging,
and return typed results (paths and hashes, never arrays)."""

from __future__ import annotations

import math
import socket
import time

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline import steps
from pipeline.config import Params
from pipeline.locks import product_lock
from pipeline.registry import Registry
from pipeline.results import (
    Bank,
    Calibration,
    Evaluation,
    ExtractionPlan,
    FeatureSet,
    Manifest,
    Report,
    Split,
    TrainingRecord,
    Validation,
)
from pipeline.store import Store
from pipeline.summary import summary_markdown
from tasks.cluster import describe_cluster
from tasks.common import IO_RETRIES, PLAIN, artifact_key
from tasks.compat import install_fork_fix


@task(name="fingerprint data", **IO_RETRIES)
def fingerprint(store: Store, data: str, product: str) -> Manifest:
    out = steps.fingerprint_dataset(store, data, product)
    get_run_logger().info(
        "%s: %d nominal training images, %d good + %d defective test images; data version %s",
        out.data_root,
        out.n_train,
        out.n_test_good,
        out.n_test_defect,
        out.data_version,
    )
    return out


@task(name="validate data", **PLAIN)
def validate(store: Store, manifest: Manifest, settings: Params, product: str) -> Validation:
    logger = get_run_logger()
    reference = steps.current_reference(store, product, Registry(settings.mlflow).drift_reference(product))
    try:
        out = steps.validate_dataset(store, manifest, settings, product, reference=reference)
    except Exception as exc:
        logger.error("data validation failed; nothing will be extracted or registered:\n%s", exc)
        raise
    logger.info("data validation passed (%d files; report %s)", out.n_files, out.summary)
    return out


@task(name="split held-out nominal and calibration images", **PLAIN)
def split(store: Store, manifest: Manifest, settings: Params) -> Split:
    out = steps.split_dataset(store, manifest, settings.pipeline)
    logger = get_run_logger()
    logger.info(
        "split (%s): %d images for the memory bank, %d held-out nominal, %d calibration, %d report",
        out.mode,
        out.n_bank,
        out.n_holdout,
        out.n_calibration,
        out.n_report,
    )
    if out.calibration_note:
        logger.warning(out.calibration_note)
    return out


@task(name="plan feature extraction", **IO_RETRIES)
def plan_extract(store: Store, manifest: Manifest, division: Split, settings: Params) -> ExtractionPlan:
    c = settings.cluster
    out = steps.plan_extraction(store, manifest, division, settings.model, c.shard_images, c.extract_threads)
    on_dask = out.shards and settings.cluster.uses_dask()
    get_run_logger().info(
        "features: %d of %d images in the cache, %d to extract in %d shard(s)%s",
        out.n_cached,
        out.n_images,
        out.n_missing,
        len(out.shards),
        f" on the Dask cluster ({describe_cluster(settings.cluster)})" if on_dask else "",
    )
    return out


@task(name="extract features", **IO_RETRIES)
def extract(store: Store, plan: ExtractionPlan, settings: Params) -> FeatureSet:
    """Every shard of the plan, one after the other, in this process."""
    install_fork_fix()  # DataLoader workers are forked from this process
    logger = get_run_logger()
    every = max(1, math.ceil(plan.n_missing / 10))  # about ten progress lines

    def progress(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            logger.info("extracted %d/%d images", done, total)

    out = steps.extract_planned(store, plan, settings.model, on_progress=progress)
    logger.info(
        "features of %d images: %d extracted, %d from the cache (%s)",
        out.n_images,
        out.n_extracted,
        out.n_cached,
        out.feature_dir,
    )
    return out


@task(name="extract shard", **IO_RETRIES, task_run_name="extract shard of {shard_name}")
def extract_shard(
    store: Store, identity: str, shard: list[list[str]], shard_name: str, threads: int, settings: Params
) -> int:
    """One shard, on whichever Dask worker the scheduler picks (a killed worker's shard is run again
    elsewhere; images it had already written are skipped)."""
    install_fork_fix()
    start = time.perf_counter()
    written = steps.extract_shard(store, identity, shard, settings.model, threads=threads)
    get_run_logger().info(
        "%d image(s) extracted on %s in %.1f s", written, socket.gethostname(), time.perf_counter() - start
    )
    return written


@task(name="coreset memory bank", **IO_RETRIES)
def coreset(store: Store, manifest: Manifest, division: Split, features: FeatureSet, settings: Params) -> Bank:
    out = steps.build_memory_bank(
        store, manifest, division, features, settings.model, warm_start=settings.pipeline.incremental_coreset
    )
    log = get_run_logger()
    log.info(
        "memory bank: %d patches of %d (%s%s)",
        out.bank_size,
        out.n_train_patches,
        out.bank_dir,
        "; found in the store" if out.cached else "",
    )
    if out.coreset_continued and not out.cached:
        c = out.coreset_continued
        log.info(
            "coreset continued from bank %s: kept its %d picks, added picks for %d new image(s) in %.1f s",
            c["from_bank"],
            c["prior_picks"],
            c["new_images"],
            out.coreset_seconds or 0.0,
        )
    return out


@task(name="evaluate", **IO_RETRIES)
def evaluate(store: Store, manifest: Manifest, division: Split, bank: Bank) -> Evaluation:
    install_fork_fix()
    out = steps.evaluate_bank(store, manifest, division, bank)
    shown = {k: round(v, 4) for k, v in out.metrics.items() if k in ("image_auroc", "pixel_auroc", "pro", "f1_max")}
    get_run_logger().info(
        "evaluation (%s%s): %s",
        out.mode,
        ", found in the store" if out.cached else "",
        shown or "held-out nominal scores only (no labelled defects)",
    )
    return out


@task(name="calibrate threshold", **IO_RETRIES)
def calibrate(
    store: Store,
    evaluation: Evaluation,
    bank: Bank,
    product: str,
    settings: Params,
    manifest: Manifest,
    division: Split,
    features: FeatureSet,
) -> Calibration:
    provenance = steps.provenance(product, manifest, division.split_key, features.identity)
    out = steps.calibrate(store, evaluation, bank, product, settings.pipeline, provenance)
    c = out.calibration
    get_run_logger().info(
        "threshold %.6g (%s); held-out FPR %.3f; figures at the threshold measured on %s",
        c["threshold"],
        c["rule_detail"],
        c["heldout_fpr"],
        c["report_on"],
    )
    return out


@task(name="report plots", **IO_RETRIES)
def report(
    store: Store, evaluation: Evaluation, calibrated: Calibration, manifest: Manifest, settings: Params
) -> Report:
    out = steps.make_report(store, evaluation, calibrated, manifest, settings.pipeline)
    get_run_logger().info("report: %s", ", ".join(p.rsplit("/", 1)[-1] for p in out.files))
    return out


@task(name="register model", **PLAIN)
def register(store: Store, product: str, settings: Params, record: TrainingRecord, validation: Validation) -> dict:
    # No retries: a second attempt after a half-finished registration could create a second version.
    registry = Registry(settings.mlflow)
    # the validated set becomes the next drift baseline, kept with the version in the registry
    reference = steps.drift_reference(
        validation, {"model": registry.model_name(product), "data_version": record.data_version}
    )
    with product_lock(product, timeout_s=None):  # no promotion or rollback in between; never give up a training
        registered = registry.log_training(product, settings, record, drift_reference=reference)
    logger = get_run_logger()
    if registered.get("unchanged"):
        logger.info(
            "unchanged: %s version %s was trained on exactly these images and settings; nothing registered",
            registered["name"],
            registered["version"],
        )
        return registered
    logger.info(
        "registered %s version %s (alias challenger), run %s at %s, with its drift baseline",
        registered["name"],
        registered["version"],
        registered["run_id"],
        registered["tracking_uri"],
    )
    if registered["random_weights"]:
        logger.warning("this model uses RANDOM backbone weights: promotion needs --allow-random-weights")
    return registered


@task(name="publish summary", **PLAIN)
def publish(product: str, record: TrainingRecord, registered: dict) -> str:
    summary = summary_markdown(record, registered)
    create_markdown_artifact(
        markdown=summary, key=artifact_key("train", product), description=f"PatchCore training summary for {product}"
    )
    create_table_artifact(
        table=record.per_defect_rows,
        key=artifact_key("train", product, "per-defect"),
        description=f"Per-defect-type results at the threshold for {product}",
    )
    return summary
