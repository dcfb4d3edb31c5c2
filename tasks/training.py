"""The training flow's tasks: one thin wrapper per step of pipeline.steps (and the registry)."""

from __future__ import annotations

import math
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import steps
from pipeline.config import Params
from tasks.common import RETRIES, RETRY_DELAY_SECONDS, artifact_key, cache_key, cache_key_from, transient_io

IO_RETRIES = {"retries": RETRIES, "retry_delay_seconds": RETRY_DELAY_SECONDS, "retry_condition_fn": transient_io}


def _params(params: dict[str, Any]) -> Params:
    return Params.from_dict(params)


@task(name="fingerprint data", cache_policy=NO_CACHE, **IO_RETRIES)
def fingerprint(data: str, product: str) -> dict[str, Any]:
    out = steps.fingerprint_dataset(data, product)
    get_run_logger().info("%s: %d nominal training images, %d good + %d defective test images; data version %s",
                          out["data_root"], out["n_train"], out["n_test_good"], out["n_test_defect"], out["data_version"])
    return out


@task(name="validate data", cache_policy=NO_CACHE)
def validate(fingerprint: dict[str, Any], params: dict[str, Any], product: str) -> dict[str, Any]:
    logger = get_run_logger()
    try:
        out = steps.validate_dataset(fingerprint["manifest"], _params(params), product)
    except Exception as exc:
        logger.error("data validation failed; nothing will be extracted or registered:\n%s", exc)
        raise
    logger.info("data validation passed (%d files; report %s)", out["n_files"], out["summary"])
    return out


@task(name="split held-out nominal and calibration images", cache_policy=NO_CACHE)
def split(fingerprint: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    out = steps.split_dataset(fingerprint["manifest"], _params(params).pipeline)
    get_run_logger().info("split (%s): %d images for the memory bank, %d held-out nominal, %d calibration, %d report",
                          out["mode"], out["n_bank"], out["n_holdout"], out["n_calibration"], out["n_report"])
    if out["calibration_note"]:
        get_run_logger().warning(out["calibration_note"])
    return out


@task(name="extract features", cache_policy=NO_CACHE, **IO_RETRIES)
def extract(fingerprint: dict[str, Any], split: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    # Not Prefect-cached on purpose: the per-image feature cache makes a re-run cost nothing, and
    # running it keeps the reported counts (extracted vs already cached) true for this run.
    logger = get_run_logger()
    step = max(1, math.ceil(split["n_bank"] / 10))  # about ten progress lines

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            logger.info("extracted %d/%d images", done, total)

    out = steps.extract_features(fingerprint["manifest"], split["split"], _params(params).model, on_progress=progress)
    logger.info("features of %d images: %d extracted, %d from the cache (%s)", out["n_images"], out["n_extracted"],
                out["n_cached"], out["feature_dir"])
    return out


def _bank_cache_key(fingerprint: dict, split: dict, features: dict, params: dict) -> str:
    p = _params(params)
    return cache_key("bank", steps.bank_dir(fingerprint["manifest"], split["split"], p.model, p.pipeline.incremental_coreset))


@task(name="coreset memory bank", cache_key_fn=cache_key_from(_bank_cache_key), persist_result=True,
      result_serializer="json", **IO_RETRIES)
def _coreset(fingerprint: dict[str, Any], split: dict[str, Any], features: dict[str, Any],
             params: dict[str, Any]) -> dict[str, Any]:
    p = _params(params)
    out = steps.build_memory_bank(fingerprint["manifest"], split["split"], features, p.model,
                                  warm_start=p.pipeline.incremental_coreset)
    log = get_run_logger()
    log.info("memory bank: %d patches of %d (%s)", out["bank_size"], out["n_train_patches"], out["bank_dir"])
    if out["coreset_continued"]:
        c = out["coreset_continued"]
        log.info("coreset continued from bank %s: kept its %d picks, added picks for %d new image(s) in %.1f s",
                 c["from_bank"], c["prior_picks"], c["new_images"], out["coreset_seconds"] or 0.0)
    return out


def coreset(fingerprint: dict[str, Any], split: dict[str, Any], features: dict[str, Any],
            params: dict[str, Any]) -> dict[str, Any]:
    """The memory bank, Prefect-cached on the content hash of its inputs (unless its folder is gone)."""
    p = _params(params)
    folder = steps.bank_dir(fingerprint["manifest"], split["split"], p.model, p.pipeline.incremental_coreset)
    return _timed(_coreset, not (folder / "model.json").is_file(), fingerprint, split, features, params)


def _evaluation_cache_key(fingerprint: dict, split: dict, bank: dict) -> str:
    return cache_key("evaluation", steps.evaluation_dir(bank, split["split"]))


@task(name="evaluate", cache_key_fn=cache_key_from(_evaluation_cache_key), persist_result=True,
      result_serializer="json", **IO_RETRIES)
def _evaluate(fingerprint: dict[str, Any], split: dict[str, Any], bank: dict[str, Any]) -> dict[str, Any]:
    out = steps.evaluate_bank(fingerprint["manifest"], split["split"], bank)
    shown = {k: round(v, 4) for k, v in out["metrics"].items() if k in ("image_auroc", "pixel_auroc", "pro", "f1_max")}
    get_run_logger().info("evaluation (%s): %s", out["mode"], shown or "held-out nominal scores only (no labelled defects)")
    return out


def evaluate(fingerprint: dict[str, Any], split: dict[str, Any], bank: dict[str, Any]) -> dict[str, Any]:
    """Scores and metrics, Prefect-cached on the content hash of model + images (unless deleted)."""
    folder = steps.evaluation_dir(bank, split["split"])
    return _timed(_evaluate, not (folder / "evaluation.json").is_file(), fingerprint, split, bank)


def _timed(cached_task, refresh: bool, *args: Any) -> dict[str, Any]:
    """Run a Prefect-cached task; its result says whether it came from the cache, and `seconds` is
    this run's time (a cached result would otherwise carry the time of the run that computed it)."""
    start = time.perf_counter()
    state = cached_task.with_options(refresh_cache=refresh)(*args, return_state=True)
    out = dict(state.result())  # raises the task's exception when it failed, as a direct call would
    out.update(cached=state.name == "Cached", seconds=time.perf_counter() - start)
    return out


@task(name="calibrate threshold", cache_policy=NO_CACHE, **IO_RETRIES)
def calibrate(evaluation: dict[str, Any], bank: dict[str, Any], product: str, params: dict[str, Any],
              fingerprint: dict[str, Any], split: dict[str, Any], features: dict[str, Any]) -> dict[str, Any]:
    provenance = steps.provenance(product, fingerprint, split, features)
    out = steps.calibrate(evaluation, bank, product, _params(params).pipeline, provenance)
    c = out["calibration"]
    get_run_logger().info("threshold %.6g (%s); held-out FPR %.3f; figures at the threshold measured on %s",
                          c["threshold"], c["rule_detail"], c["heldout_fpr"], c["report_on"])
    return out


@task(name="report plots", cache_policy=NO_CACHE, **IO_RETRIES)
def report(evaluation: dict[str, Any], calibrated: dict[str, Any], fingerprint: dict[str, Any],
           params: dict[str, Any]) -> dict[str, Any]:
    out = steps.make_report(evaluation, calibrated, fingerprint["manifest"], _params(params).pipeline)
    get_run_logger().info("report: %s", ", ".join(p.rsplit("/", 1)[-1] for p in out["files"]))
    return out


@task(name="register model", cache_policy=NO_CACHE)
def register(product: str, params: dict[str, Any], record: dict[str, Any], validation: dict[str, Any]) -> dict[str, Any]:
    # No retries: a second attempt after a half-finished registration could create a second version.
    from pipeline.registry import Registry

    settings = _params(params)
    registered = Registry(settings.mlflow).log_training(product, settings, record)
    reference = steps.accept_validated_set(validation, {"model": registered["name"], "version": registered["version"],
                                                        "data_version": record["data_version"]})
    logger = get_run_logger()
    logger.info("registered %s version %s (alias challenger), run %s at %s; drift reference %s", registered["name"],
                registered["version"], registered["run_id"], registered["tracking_uri"], reference)
    if registered["random_weights"]:
        logger.warning("this model uses RANDOM backbone weights: promotion needs --allow-random-weights")
    return registered


@task(name="publish summary", cache_policy=NO_CACHE)
def publish(product: str, record: dict[str, Any], registered: dict[str, Any]) -> dict[str, Any]:
    summary = steps.summary_markdown(record | {"registry": registered})
    create_markdown_artifact(markdown=summary, key=artifact_key("train", product),
                             description=f"PatchCore training summary for {product}")
    create_table_artifact(table=record["per_defect_rows"], key=artifact_key("train", product, "per-defect"),
                          description=f"Per-defect-type results at the threshold for {product}")
    return {"markdown": summary}
