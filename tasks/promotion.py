"""The promotion flow's tasks: thin wrappers around pipeline.promotion."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline import promotion
from pipeline.config import Params
from pipeline.registry import Registry
from pipeline.store import Store
from tasks.common import IO_RETRIES, PLAIN, artifact_key
from tasks.compat import install_fork_fix


@task(name="find challenger and champion", **PLAIN)
def candidates(product: str, settings: Params) -> dict[str, Any]:
    out = promotion.candidates(Registry(settings.mlflow), product)
    champion = out["champion"]
    get_run_logger().info(
        "challenger v%s, champion %s",
        out["challenger"]["version"],
        f"v{champion['version']}" if champion else "none yet",
    )
    return out


@task(name="pin evaluation set", **IO_RETRIES)
def pin_evaluation_set(store: Store, data: str) -> dict[str, Any]:
    out = promotion.pin_evaluation_set(store, data)
    get_run_logger().info(
        "evaluation set %s: %d good, %d defective images", out["eval_set_sha256"][:16], out["n_good"], out["n_defect"]
    )
    return out


@task(name="score version", task_run_name="score v{version}", **IO_RETRIES)
def score(store: Store, product: str, version: str, eval_set: dict[str, Any], settings: Params) -> dict[str, Any]:
    # Cached by the step itself per (version, evaluation-set hash): registered versions are immutable.
    install_fork_fix()  # DataLoader workers are forked from this process
    out = promotion.score_version(Registry(settings.mlflow), store, product, version, eval_set)
    shown = {k: round(out[k], 4) for k in ("image_auroc", "pixel_auroc", "pro", "f1_max") if out.get(k) is not None}
    get_run_logger().info(
        "v%s on the pinned set: %s; FPR at its threshold %s",
        version,
        shown or "no labelled defects",
        "n/a" if out.get("eval_fpr") is None else f"{out['eval_fpr']:.3f}",
    )
    return out


@task(name="decide", **PLAIN)
def decide(
    candidates: dict[str, Any],
    challenger_scores: dict[str, Any],
    champion_scores: dict[str, Any] | None,
    settings: Params,
    allow_random_weights: bool,
) -> dict[str, Any]:
    decision = promotion.decide(
        candidates["challenger"],
        candidates["champion"],
        challenger_scores,
        champion_scores,
        settings.promotion,
        allow_random_weights,
    )
    logger = get_run_logger()
    (logger.info if decision["promote"] else logger.warning)(
        "%s: %s%s",
        "PROMOTE" if decision["promote"] else "REJECT",
        decision["summary"],
        "".join(f"\n  - {r}" for r in decision["reasons"] + decision["notes"]),
    )
    return decision


@task(name="record decision", **PLAIN)
def apply(
    product: str, decision: dict[str, Any], eval_set: dict[str, Any], scores: dict[str, Any], settings: Params
) -> dict[str, Any]:
    out = promotion.apply_decision(Registry(settings.mlflow), product, decision, eval_set, scores)
    get_run_logger().info("aliases now %s (decision run %s)", out["aliases"], out["run_id"])
    return out


@task(name="publish decision", **PLAIN)
def publish(product: str, decision: dict[str, Any], eval_set: dict[str, Any]) -> None:
    create_markdown_artifact(
        markdown=promotion.decision_markdown(product, decision, eval_set),
        key=artifact_key("promote", product),
        description=f"Promotion decision for {product}",
    )
    rows = [{"check": "decision", "value": decision["outcome"]}]
    rows += [{"check": "reason", "value": r} for r in decision["reasons"]]
    rows += [{"check": "note", "value": n} for n in decision["notes"]]
    rows += [
        {"check": k, "value": decision[k]}
        for k in ("metric", "challenger_metric", "champion_metric", "challenger_heldout_fpr", "challenger_eval_fpr")
    ]
    create_table_artifact(
        table=rows, key=artifact_key("promote", product, "checks"), description=f"Promotion checks for {product}"
    )
