"""Evaluate a fitted model on labelled images (an MVTec-layout test split or explicit samples):
image AUROC, pixel AUROC, PRO, the F1-optimal threshold and per-defect-type figures.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from patchcore import metrics
from patchcore.data import GOOD, Sample, load_mask, resolve_samples
from patchcore.model import PatchCore, Predictions


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    per_defect_type: dict[str, dict[str, Any]]
    samples: list[Sample]
    predictions: Predictions
    masks: np.ndarray | None = field(repr=False, default=None)

    def summary(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "per_defect_type": self.per_defect_type}


def evaluate(model: PatchCore, test: str | Path | Sequence[Sample], progress: bool = True,
             pixel_metrics: bool = True) -> Evaluation:
    """Score labelled samples and compute the metrics that their labels and masks allow."""
    samples = resolve_samples(test, split="test") if isinstance(test, (str, Path)) else list(test)
    if any(s.label is None for s in samples):
        raise ValueError("evaluation needs labelled samples (an MVTec-layout folder with test/good and test/<defect>)")
    labels = np.array([s.label for s in samples])
    has_masks = pixel_metrics and any(s.mask_path is not None for s in samples)
    predictions = model.predict([s.path for s in samples], maps=has_masks, progress=progress)
    scores = predictions.scores
    result: dict[str, Any] = {"n_images": len(samples), "n_good": int((labels == 0).sum()),
                              "n_defect": int((labels == 1).sum())}
    per_type: dict[str, dict[str, Any]] = {}
    masks = None
    if result["n_good"] and result["n_defect"]:
        result["image_auroc"] = metrics.image_auroc(labels, scores)
        threshold, f1 = metrics.f1_optimal_threshold(labels, scores)
        result["f1_threshold"], result["f1"] = threshold, f1
        result["f1_confusion"] = metrics.confusion_at(labels, scores, threshold)
        if has_masks:
            cfg = model.config.image
            masks = np.stack([load_mask(s.mask_path, cfg.resize, cfg.crop) for s in samples])
            result["pixel_auroc"] = metrics.pixel_auroc(masks, predictions.anomaly_maps)
            result["pro"] = metrics.pro_auc(masks, predictions.anomaly_maps)
        good = labels == 0
        for defect in sorted({s.defect_type for s in samples if s.label == 1}):
            sel = np.array([s.defect_type == defect for s in samples])
            per_type[defect] = {"n_images": int(sel.sum()),
                                "image_auroc": metrics.image_auroc(labels[sel | good], scores[sel | good])}
            if masks is not None and any(samples[i].mask_path for i in np.flatnonzero(sel)):
                per_type[defect]["pro"] = metrics.pro_auc(masks[sel | good], predictions.anomaly_maps[sel | good])
    return Evaluation(result, per_type, samples, predictions, masks)


__all__ = ["evaluate", "Evaluation", "GOOD"]
