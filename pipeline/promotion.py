"""The promotion gate as plain functions (the Prefect flow flows/promote.py and the CLI call these):
pin an evaluation set, re-score `challenger` and `champion` on it, decide, then move the aliases
and record the decision on both versions and in an MLflow run. Also rollback and status.

The gate (params.yaml `promotion:`), in order:
  1. a challenger built on random backbone weights is refused unless allow_random_weights;
  2. its FPR at its own threshold on its held-out nominal split must be <= max_heldout_fpr;
  3. its `metric` on the pinned evaluation set must be >= min_metric;
  4. with a champion, it must be >= the champion's metric (same images) - tolerance.
When the evaluation set has no labelled defects, 3 and 4 cannot be measured: the decision says so
and rests on 1 and 2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from patchcore import PatchCore, metrics
from pipeline.config import PromotionConfig
from pipeline.data_version import dir_md5
from pipeline.io import content_key, read_json, recorded_path, resolve_recorded
from pipeline.registry import (
    CHALLENGER,
    CHAMPION,
    SOURCE_TAGS,
    NoSuchAlias,
    Registry,
    RegistryError,
    now_iso,
    tracking_call,
)
from pipeline.steps.evaluate import score_records
from pipeline.steps.fingerprint import manifest_entries, product_folder
from pipeline.steps.split import TEST
from pipeline.store import Store

LOST_DURING_PROMOTION = (
    "start it again and rerun the promotion: scores already computed are in the store, and a half-done "
    "alias move is finished or undone first"
)


@tracking_call("the promotion", LOST_DURING_PROMOTION)
def candidates(registry: Registry, product: str) -> dict[str, Any]:
    """The challenger and champion versions (champion None for a product's first model), after
    cleaning up registrations that died half-way (the promotion flow holds the product's lock)."""
    registry.reconcile(product)
    challenger = registry.version(product, CHALLENGER)
    try:
        champion = registry.version(product, CHAMPION)
    except NoSuchAlias:
        champion = None
    return {"challenger": describe(challenger), "champion": describe(champion) if champion else None}


def describe(version) -> dict[str, Any]:
    tags = dict(version.tags)
    return {
        "version": str(version.version),
        "run_id": version.run_id,
        "tags": tags,
        "random_weights": tags.get("random_weights") == "true",
        "heldout_fpr": float(tags["heldout_fpr"]) if "heldout_fpr" in tags else None,
        "threshold": float(tags["threshold"]) if "threshold" in tags else None,
        "data_root": str(resolve_recorded(tags["data_root"])) if tags.get("data_root") else None,
    }


def pin_evaluation_set(store: Store, data_root: str | Path) -> dict[str, Any]:
    """The labelled test split of a product folder, pinned by content: every image's sha256 is in
    eval_sets/<eval_set_sha256>.json and the hash goes into the decision. A product without test/
    images (cold start) gives an empty set: the metric comparison is then impossible and the
    decision says so."""
    root = product_folder(data_root)
    test = [e for e in manifest_entries(root) if e["split"] == "test"]  # may be empty: a cold-start product
    key = content_key([(e["path"], e["sha256"], e["label"], e["mask_sha256"]) for e in test], length=64)
    pinned = {"root": recorded_path(root), "eval_set_sha256": key, "data_version": dir_md5(root), "images": test}
    path = store.write_json("eval_sets", f"{key}.json", data=pinned)
    return {
        "eval_set": str(path),
        "eval_set_sha256": key,
        "n_good": sum(e["label"] == 0 for e in test),
        "n_defect": sum(e["label"] == 1 for e in test),
    }


@tracking_call("the promotion's scoring", LOST_DURING_PROMOTION)
def score_version(
    registry: Registry, store: Store, product: str, version: str, eval_set: dict[str, Any]
) -> dict[str, Any]:
    """Metrics of one registered version on the pinned evaluation set (cached per version + set:
    registered versions are immutable). The figures are the library's (one evaluation function)."""
    name = f"{registry.model_name(product)}-{registry.version_key(product, version)}-{eval_set['eval_set_sha256'][:16]}"
    if store.has("eval_sets", "scores", f"{name}.json"):
        return store.read_json("eval_sets", "scores", f"{name}.json")
    start = time.perf_counter()
    pinned = read_json(eval_set["eval_set"])
    model = PatchCore.load(registry.download(product, version))
    out: dict[str, Any] = {"version": str(version), "threshold": model.threshold_}
    if not pinned["images"]:
        return out | {
            "at_threshold": {},
            "eval_fpr": None,
            "per_defect_type": {},
            "seconds": time.perf_counter() - start,
        }
    records = [
        {"path": e["path"], "split": TEST, "label": e["label"], "defect_type": e["defect_type"], "mask": e["mask"]}
        for e in sorted(pinned["images"], key=lambda e: e["path"])
    ]
    figures, per_type, _ = score_records(model, resolve_recorded(pinned["root"]), records)
    labels = np.array([r["label"] for r in records])
    scores = np.array([r["score"] for r in records])
    out |= figures | {"per_defect_type": per_type}
    out["at_threshold"] = metrics.confusion_at(labels, scores, model.threshold_) if model.threshold_ is not None else {}
    out["eval_fpr"] = out["at_threshold"].get("fpr") if (labels == 0).any() else None
    out["seconds"] = time.perf_counter() - start
    store.write_json("eval_sets", "scores", f"{name}.json", data=out)
    return out


def decide(
    challenger: dict[str, Any],
    champion: dict[str, Any] | None,
    challenger_scores: dict[str, Any],
    champion_scores: dict[str, Any] | None,
    cfg: PromotionConfig,
    allow_random_weights: bool = False,
) -> dict[str, Any]:
    """Promote or not, with every number and reason (pure: no registry access)."""
    reasons: list[str] = []
    notes: list[str] = []
    name = cfg.metric
    value = challenger_scores.get(name)
    reference = champion_scores.get(name) if champion_scores else None
    if challenger["random_weights"] and not allow_random_weights:
        reasons.append(
            "built on RANDOM backbone weights (pass --allow-random-weights to promote it anyway, e.g. for a demo)"
        )
    elif challenger["random_weights"]:
        notes.append("built on RANDOM backbone weights: promoted only because --allow-random-weights was given")
    fpr = challenger.get("heldout_fpr")
    if fpr is None:
        reasons.append("no held-out FPR recorded for the challenger")
    elif fpr > cfg.max_heldout_fpr:
        reasons.append(f"held-out FPR at its threshold {fpr:.3f} > max_heldout_fpr {cfg.max_heldout_fpr:.3f}")
    if value is None:
        notes.append(
            f"{name} cannot be measured on the evaluation set (no labelled defects): decided on the "
            "weights and held-out FPR checks only"
        )
    else:
        if value < cfg.min_metric:
            reasons.append(f"{name} {value:.4f} < min_metric {cfg.min_metric:.4f}")
        if champion is not None and reference is not None and value < reference - cfg.tolerance:
            reasons.append(
                f"{name} {value:.4f} is worse than the champion's {reference:.4f} by more than the "
                f"tolerance {cfg.tolerance:.4f}"
            )
    promote = not reasons
    if champion is None:
        summary = "first model: becomes champion" if promote else "first model: not promoted"
    else:
        delta = "" if value is None or reference is None else f" ({name} {value:.4f} vs {reference:.4f})"
        summary = (
            f"v{challenger['version']} replaces v{champion['version']}{delta}"
            if promote
            else f"v{champion['version']} stays champion{delta}"
        )
    return {
        "promote": promote,
        "summary": summary,
        "reasons": reasons,
        "notes": notes,
        "metric": name,
        "challenger_version": challenger["version"],
        "champion_version": champion["version"] if champion else None,
        "challenger_metric": value,
        "champion_metric": reference,
        "challenger_heldout_fpr": fpr,
        "champion_heldout_fpr": champion.get("heldout_fpr") if champion else None,
        "challenger_eval_fpr": challenger_scores.get("eval_fpr"),
        "champion_eval_fpr": champion_scores.get("eval_fpr") if champion_scores else None,
        "settings": {
            "metric": name,
            "tolerance": cfg.tolerance,
            "min_metric": cfg.min_metric,
            "max_heldout_fpr": cfg.max_heldout_fpr,
            "allow_random_weights": allow_random_weights,
        },
    }


@tracking_call("the promotion's alias moves", LOST_DURING_PROMOTION)
def apply_decision(
    registry: Registry, product: str, decision: dict[str, Any], eval_set: dict[str, Any], scores: dict[str, Any]
) -> dict[str, Any]:
    """Move the aliases when promoted (old champion -> `previous`), tag both versions and log the
    decision as an MLflow run in the product's experiment."""
    challenger, champion = decision["challenger_version"], decision["champion_version"]
    outcome = "promoted" if decision["promote"] else "rejected"
    stamp = now_iso()
    current = registry.aliases(product).get(CHAMPION)
    if current != champion:  # decided against a champion that is no longer the champion
        raise RegistryError(
            f"{product}: the champion changed while this promotion was deciding (v{champion or '-'} -> "
            f"v{current}); nothing was changed: run the promotion again"
        )
    if decision["promote"]:
        history = registry.history(product) or ([champion] if champion else [])
        registry.move_champion(product, challenger, champion, history + [challenger])
    registry.tag_version(
        product,
        challenger,
        # Three tags: the decision's numbers, reasons and evaluation set are in its MLflow run.
        {"promotion": outcome, "promotion_at": stamp, "promotion_summary": decision["summary"]},
    )
    if champion:
        registry.tag_version(
            product,
            champion,
            {"challenged_by": f"v{challenger} ({outcome}, {stamp})"},
        )
    with mlflow.start_run(
        experiment_id=registry.experiment_id(product),
        run_name=f"promote-v{challenger}" + (f"-vs-v{champion}" if champion else ""),
        tags=SOURCE_TAGS,
    ) as run:
        mlflow.log_params({f"promotion.{k}": v for k, v in decision["settings"].items()})
        mlflow.log_metrics(
            {
                k: float(v)
                for k, v in {
                    "challenger_metric": decision["challenger_metric"],
                    "champion_metric": decision["champion_metric"],
                    "challenger_heldout_fpr": decision["challenger_heldout_fpr"],
                    "challenger_eval_fpr": decision["challenger_eval_fpr"],
                    "champion_eval_fpr": decision["champion_eval_fpr"],
                    "promoted": float(decision["promote"]),
                }.items()
                if v is not None
            }
        )
        mlflow.set_tags(
            {
                "kind": "promotion",
                "decision": outcome,
                "challenger_version": challenger,
                "champion_version": champion or "none",
                "eval_set_sha256": eval_set["eval_set_sha256"],
                "mlflow.note.content": decision_markdown(product, decision, eval_set),
            }
        )
        # the evaluation set by its content hash and its name in the store, not this machine's path
        logged_set = {k: v for k, v in eval_set.items() if k != "eval_set"}
        logged_set["eval_set_file"] = f"eval_sets/{eval_set['eval_set_sha256']}.json"
        mlflow.log_dict({"decision": decision, "eval_set": logged_set, "scores": scores}, "decision.json")
        mlflow.log_artifact(eval_set["eval_set"], artifact_path="eval_set")
    return {
        **decision,
        "outcome": outcome,
        "run_id": run.info.run_id,
        "at": stamp,
        "aliases": registry.aliases(product),
    }


def decision_markdown(product: str, decision: dict[str, Any], eval_set: dict[str, Any]) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    champion = f"v{decision['champion_version']}" if decision["champion_version"] else "-"
    lines = [
        f"# Promotion for `{product}`: **{'PROMOTED' if decision['promote'] else 'REJECTED'}**",
        "",
        decision["summary"],
        "",
        "| | challenger | champion |",
        "|---|---|---|",
        f"| version | v{decision['challenger_version']} | {champion} |",
        f"| {decision['metric']} (pinned set) | {fmt(decision['challenger_metric'])} "
        f"| {fmt(decision['champion_metric'])} |",
        f"| FPR at own threshold, pinned set | {fmt(decision['challenger_eval_fpr'])} "
        f"| {fmt(decision['champion_eval_fpr'])} |",
        f"| held-out FPR (training) | {fmt(decision['challenger_heldout_fpr'])} "
        f"| {fmt(decision.get('champion_heldout_fpr'))} |",
        "",
        f"Evaluation set `{eval_set['eval_set_sha256'][:16]}`: {eval_set['n_good']} good, "
        f"{eval_set['n_defect']} defective images.",
        f"Settings: {json.dumps(decision['settings'])}",
    ]
    if decision["reasons"]:
        lines += ["", "Rejected because:"] + [f"- {r}" for r in decision["reasons"]]
    if decision["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in decision["notes"]]
    return "\n".join(lines) + "\n"


__all__ = [
    "candidates",
    "pin_evaluation_set",
    "score_version",
    "decide",
    "apply_decision",
    "RegistryError",
]
