"""Step 7, calibrate: the decision threshold and its honest figures, saved into the model that
gets registered (models/<product>/<model_key>/)."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from patchcore import PatchCore, metrics
from patchcore.data import GOOD
from pipeline.config import PipelineConfig
from pipeline.io import content_key
from pipeline.results import Bank, Calibration, Evaluation
from pipeline.steps.split import CALIBRATION, HOLDOUT, REPORT, TEST
from pipeline.store import Store


def choose_threshold(evaluation: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
    """The decision threshold and its honest figures.

    Labelled defects: the F1-optimal threshold on the calibration images (the paper's working point),
    and the threshold at 100% recall on the same images; precision, recall, FPR and errors of both
    on the report images, which picked nothing. Nominal only (cold start): the lowest threshold that
    flags at most target_fpr of the held-out nominal images; its FPR on unseen nominal images where
    there are any (test/good), otherwise the report says it cannot be measured."""
    records = evaluation["records"]
    held = np.array([r["score"] for r in records if r["role"] == HOLDOUT])
    test = [r for r in records if r["split"] == TEST]
    out: dict[str, Any] = {"mode": evaluation["mode"]}
    if evaluation["mode"] == "labelled":
        calib = [r for r in test if r["role"] == CALIBRATION]
        report = [r for r in test if r["role"] == REPORT]
        y, s = np.array([r["label"] for r in calib]), np.array([r["score"] for r in calib])
        threshold, f1 = metrics.f1_optimal_threshold(y, s)
        recall100 = metrics.threshold_at_recall(y, s, 1.0)
        out.update(
            rule="f1_optimal",
            threshold=threshold,
            rule_detail=(
                f"F1-optimal threshold on {len(calib)} labelled calibration images "
                f"({int(y.sum())} defective); F1 there {f1:.3f}"
            ),
            calibration_f1=f1,
            threshold_recall100=recall100,
            n_calibration=len(calib),
        )
        if report:
            out["report_on"] = f"{len(report)} labelled test images not used to pick the threshold"
            evaluated = report
        else:
            out["report_on"] = (
                "the calibration images themselves: too few labelled images to hold any out, "
                "so these figures are optimistic"
            )
            evaluated = calib
        ry, rs = np.array([r["label"] for r in evaluated]), np.array([r["score"] for r in evaluated])
        out["at_threshold"] = metrics.confusion_at(ry, rs, threshold)
        out["at_recall100"] = metrics.confusion_at(ry, rs, recall100)
        out["n_report"] = len(evaluated)
        out["report_independent"] = bool(report)
        out["heldout_fpr_independent"] = True
    else:
        # The lowest threshold that flags at most floor(target_fpr * n) held-out nominal images: just
        # above the (k+1)-th highest score. With n held-out images the resolution is 1/n, and new good
        # parts will exceed the highest of n nominal scores about 1/(n+1) of the time.
        n = len(held)
        allowed = int(math.floor(cfg.target_fpr * n + 1e-9))
        ordered = np.sort(held)[::-1]
        threshold = float(np.nextafter(ordered[allowed], np.inf))
        out.update(
            rule="nominal_quantile",
            threshold=threshold,
            target_fpr=cfg.target_fpr,
            rule_detail=(
                f"cold start (no labelled defects): just above the {_ordinal(allowed + 1)} highest of {n} held-out "
                f"nominal scores, flagging at most {allowed} of them (target false-positive rate {cfg.target_fpr:g}); "
                f"with {n} held-out images expect a false-positive rate of about {1 / (n + 1):.1%} or more on new "
                "good parts"
            ),
            expected_fpr_floor=1.0 / (n + 1),
        )
        unseen_good = np.array([r["score"] for r in test if r["label"] == 0])
        defects = np.array([r["score"] for r in test if r["label"] == 1])
        if len(unseen_good):
            fp = int((unseen_good >= threshold).sum())
            out["at_threshold"] = {"fp": fp, "tn": len(unseen_good) - fp, "fpr": fp / len(unseen_good)}
            out["report_on"] = f"{len(unseen_good)} nominal test images (test/good) not used to pick the threshold"
            out["report_independent"] = True
        else:
            out["at_threshold"] = {}
            out["report_on"] = (
                "impossible: no nominal images besides the held-out split that picked the "
                "threshold; add test/good images to measure the false-positive rate"
            )
            out["report_independent"] = False
        if len(defects):
            tp = int((defects >= threshold).sum())
            out["at_threshold"].update({"tp": tp, "fn": len(defects) - tp, "recall": tp / len(defects)})
        out["n_report"] = len(unseen_good) + len(defects)
        out["heldout_fpr_independent"] = False  # the held-out scores picked this threshold
    out["heldout_fpr"] = float((held >= out["threshold"]).mean())
    out["heldout_false_alarms"] = int((held >= out["threshold"]).sum())
    out["n_heldout"] = len(held)
    return out


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def calibrate(
    store: Store, evaluation: Evaluation, bank: Bank, product: str, cfg: PipelineConfig, provenance: dict[str, Any]
) -> Calibration:
    """Choose the threshold, then save the calibrated model (bank + threshold + provenance) under
    models/<product>/<model_key>/, with the per-type figures at that threshold."""
    start = time.perf_counter()
    data = store.read_json("evaluations", evaluation.json_path.parent.name, "evaluation.json")
    calibration = choose_threshold(data, cfg)
    key = content_key(
        "model",
        bank.bank_key,
        evaluation.json_path.parent.name,
        calibration["threshold"],
        calibration["rule"],
        provenance,
    )
    if not store.has("models", product, key, "model.json"):
        model = PatchCore.load(store.fetch("banks", bank.bank_key))
        details = {k: calibration[k] for k in ("rule_detail", "report_on", "heldout_fpr") if k in calibration}
        if "threshold_recall100" in calibration:
            details["threshold_recall100"] = calibration["threshold_recall100"]
        model.set_threshold(calibration["threshold"], calibration["rule"], **details)
        model.provenance_.update(provenance)
        with store.directory("models", product, key) as folder:
            model.save(folder)
    calibration_file = store.write_json("models", product, f"{key}-calibration.json", data=calibration)
    return Calibration(
        model_dir=str(store.fetch("models", product, key)),
        model_key=key,
        calibration=calibration,
        calibration_file=str(calibration_file),
        per_defect_rows=per_defect_rows(data, calibration["threshold"]),
        seconds=time.perf_counter() - start,
    )


def per_defect_rows(data: dict[str, Any], threshold: float) -> list[dict[str, Any]]:
    """One row per test image type (good and each defect) plus one for the held-out nominal split:
    counts, AUROC and PRO (all test images), share flagged at the threshold (all images of the row,
    and only the report images, which did not pick the threshold)."""
    groups: dict[str, list[dict]] = {}
    for r in data["records"]:
        groups.setdefault(r["defect_type"] if r["split"] == TEST else "held-out nominal", []).append(r)
    rows = []
    for name in sorted(groups, key=lambda n: (n == "held-out nominal", n != GOOD, n)):
        group = groups[name]
        flagged = sum(r["score"] >= threshold for r in group)
        report = [r for r in group if r.get("role") == REPORT]
        figures = data["per_defect_type"].get(name, {})
        rows.append(
            {
                "type": name,
                "label": "good" if group[0]["label"] == 0 else "defect",
                "images": len(group),
                "image_auroc": _round(figures.get("image_auroc")),
                "pro": _round(figures.get("pro")),
                "flagged_at_threshold": flagged,
                "flagged_share": round(flagged / len(group), 4),
                "flagged_share_report_images": round(sum(r["score"] >= threshold for r in report) / len(report), 4)
                if report
                else None,
                "mean_score": round(float(np.mean([r["score"] for r in group])), 6),
            }
        )
    return rows


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


__all__ = ["calibrate", "choose_threshold", "per_defect_rows"]
