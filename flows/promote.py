"""The promotion flow: re-score `challenger` and `champion` on the same pinned evaluation set and
move `champion` only when the gate passes (pipeline/promotion.py states the gate). The old
champion keeps alias `previous`; the decision goes to both versions' tags, an MLflow run and a
Prefect artifact.

    patchcore promote --product tiles [--allow-random-weights]
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from pipeline.config import load_settings
from pipeline.locks import product_lock
from pipeline.store import Store
from tasks import promotion as t


@flow(name="promote-product-model", flow_run_name="promote-{product}", log_prints=True)
def promote(
    product: str,
    data: str | None = None,
    params_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    allow_random_weights: bool = False,
) -> dict[str, Any]:
    """data: the product folder whose test/ split is the evaluation set (default: the folder the
    challenger was trained from). allow_random_weights: let a random-weights model become champion
    (as `promotion.allow_random_weights: true`, which the demo profile sets)."""
    settings = load_settings(params_path, overrides)
    store = Store.from_settings(settings)
    # One promotion (or rollback) of a product at a time, in every mode; the candidates are read
    # inside the lock, so a second promotion at once finds the first's result ("already champion").
    with product_lock(product):
        found = t.candidates(product, settings)
        challenger, champion = found["challenger"], found["champion"]
        if champion is not None and champion["version"] == challenger["version"]:
            return {
                "outcome": "unchanged",
                "promote": False,
                "summary": f"v{challenger['version']} is already champion",
                "challenger_version": challenger["version"],
                "champion_version": champion["version"],
            }
        eval_set = t.pin_evaluation_set(store, data or challenger["data_root"] or f"data/{product}")
        challenger_scores = t.score(store, product, challenger["version"], eval_set, settings)
        champion_scores = t.score(store, product, champion["version"], eval_set, settings) if champion else None
        allow_random = allow_random_weights or settings.promotion.allow_random_weights
        decision = t.decide(found, challenger_scores, champion_scores, settings, allow_random)
        scores = {"challenger": challenger_scores, "champion": champion_scores}
        applied = t.apply(product, decision, eval_set, scores, settings)
        t.publish(product, applied, eval_set)
        return applied
