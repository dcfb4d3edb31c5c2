"""The promotion flow's tasks: thin wrappers around pipeline.promotion."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import promotion
from pipeline.config import Params
from pipeline.registry import Registry
from tasks.common import RETRIES, RETRY_DELAY_SECONDS, artifact_key, transient_io

IO_RETRIES = {"retries": RETRIES, "retry_delay_seconds": RETRY_DELAY_SECONDS, "retry_condition_fn": transient_io}


def _registry(params: dict[str, Any]) -> Registry:
    return Registry(Params.from_dict(params).mlflow)


@task(name="find challenger and champion", cache_policy=NO_CACHE)
def candidates(product: str, params: dict[str, Any]) -> dict[str, Any]:
    out = promotion.candidates(_registry(params), product)
    champion = out["champion"]
    get_run_logger().info("challenger v%s, champion %s", out["challenger"]["version"],
                          f"v{champion['version']}" if champion else "none yet")
    return out


@task(name="pin evaluation set", cache_policy=NO_CACHE, **IO_RETRIES)
def pin_evaluation_set(data: str) -> dict[str, Any]:
    out = promotion.pin_evaluation_set(data)
    get_run_logger().info("evaluation set %s: %d good, %d defective images", out["eval_set_sha256"][:16], out["n_good"],
                          out["n_defect"])
    return out


@task(name="score version", task_run_name="score v{version}", cache_policy=NO_CACHE, **IO_RETRIES)
def score(product: str, version: str, eval_set: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    # Cached by the step itself per (version, evaluation-set hash): registered versions are immutable.
    out = promotion.score_version(_registry(params), product, version, eval_set)
    shown = {k: round(out[k], 4) for k in ("image_auroc", "pixel_auroc", "pro", "f1_max") if out.get(k) is not None}
    get_run_logger().info("v%s on the pinned set: %s; FPR at its threshold %s", version, shown or "no labelled defects",
                          "n/a" if out.get("eval_fpr") is None else f"{out['eval_fpr']:.3f}")
    return out


@task(name="decide", cache_policy=NO_CACHE)
def decide(candidates: dict[str, Any], challenger_scores: dict[str, Any], champion_scores: dict[str, Any] | None,
           params: dict[str, Any], allow_random_weights: bool) -> dict[str, Any]:
    decision = promotion.decide(candidates["challenger"], candidates["champion"], challenger_scores, champion_scores,
                                Params.from_dict(params).promotion, allow_random_weights)
    logger = get_run_logger()
    (logger.info if decision["promote"] else logger.warning)(
        "%s: %s%s", "PROMOTE" if decision["promote"] else "REJECT", decision["summary"],
        "".join(f"\n  - {r}" for r in decision["reasons"] + decision["notes"]))
    return decision


@task(name="record decision", cache_policy=NO_CACHE)
def apply(product: str, decision: dict[str, Any], eval_set: dict[str, Any], scores: dict[str, Any],
          params: dict[str, Any]) -> dict[str, Any]:
    out = promotion.apply_decision(_registry(params), product, decision, eval_set, scores)
    get_run_logger().info("aliases now %s (decision run %s)", out["aliases"], out["run_id"])
    return out


@task(name="publish decision", cache_policy=NO_CACHE)
def publish(product: str, decision: dict[str, Any], eval_set: dict[str, Any]) -> None:
    create_markdown_artifact(markdown=promotion.decision_markdown(product, decision, eval_set),
                             key=artifact_key("promote", product), description=f"Promotion decision for {product}")
    rows = [{"check": "decision", "value": decision["outcome"]}]
    rows += [{"check": "reason", "value": r} for r in decision["reasons"]]
    rows += [{"check": "note", "value": n} for n in decision["notes"]]
    rows += [{"check": k, "value": decision[k]} for k in ("metric", "challenger_metric", "champion_metric",
                                                          "challenger_heldout_fpr", "challenger_eval_fpr")]
    create_table_artifact(table=rows, key=artifact_key("promote", product, "checks"),
                          description=f"Promotion checks for {product}")
