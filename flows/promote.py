"""The promotion flow: re-score `challenger` and `champion` on the same pinned evaluation set and
move `champion` only when the gate passes (pipeline/promotion.py states the gate). The old
champion keeps alias `previous`; the decision goes to both versions' tags, an MLflow run and a
Prefect artifact.

    python -m flows.promote --product tiles [--allow-random-weights]
    patchcore promote --product tiles       (the same flow)
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from pipeline.config import load_settings, params_to_dict
from tasks import promotion as t


@flow(name="promote-product-model", flow_run_name="promote-{product}", log_prints=True)
def promote(product: str, data: str | None = None, params_path: str | None = None,
            overrides: dict[str, Any] | None = None, allow_random_weights: bool = False) -> dict[str, Any]:
    """data: the product folder whose test/ split is the evaluation set (default: the folder the
    challenger was trained from). allow_random_weights: let a random-weights model become champion."""
    params = params_to_dict(load_settings(params_path, overrides))
    found = t.candidates(product, params)
    challenger, champion = found["challenger"], found["champion"]
    if champion is not None and champion["version"] == challenger["version"]:
        return {"outcome": "unchanged", "promote": False, "summary": f"v{challenger['version']} is already champion",
                "challenger_version": challenger["version"], "champion_version": champion["version"]}
    eval_set = t.pin_evaluation_set(data or challenger["data_root"] or f"data/{product}")
    challenger_scores = t.score(product, challenger["version"], eval_set, params)
    champion_scores = t.score(product, champion["version"], eval_set, params) if champion else None
    decision = t.decide(found, challenger_scores, champion_scores, params, allow_random_weights)
    applied = t.apply(product, decision, eval_set, {"challenger": challenger_scores, "champion": champion_scores}, params)
    t.publish(product, applied, eval_set)
    return applied


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the promotion flow once (`patchcore promote` does the same).")
    parser.add_argument("--product", required=True)
    parser.add_argument("--data")
    parser.add_argument("--params")
    parser.add_argument("--allow-random-weights", action="store_true")
    args = parser.parse_args()
    promote(args.product, args.data, args.params, allow_random_weights=args.allow_random_weights)
