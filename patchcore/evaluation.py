"""Evaluate a fitted model on labelled images: image AUROC, pixel AUROC, PRO, the F1-optimal
threshold and per-defect-type figures.

`labelled_metrics` is the one place these figures are computed: `evaluate` (the library and
`patchcore evaluate --model`), the training pipeline's evaluate step and the promotion gate all
call it, so every one of them reports the same numbers under the same names:

    n_good, n_defect, image_auroc, f1_max, f1_max_threshold, f1_max_confusion,
    pixel_auroc, pro              (the last two only when some defect has a ground-truth mask)
    per_defect_type[<defect>] = {n_images, image_auroc, pro}

Pixel metrics cover the images whose ground truth is known: every good image (all pixels
normal) and every defect that has a mask; a defect without a mask counts for the image metrics only.

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

METRIC_NAMES = ("image_auroc", "pixel_auroc", "pro", "f1_max")


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    per_defect_type: dict[str, dict[str, Any]]
    samples: list[Sample]
    predictions: Predictions
    masks: list[np.ndarray] | None = field(repr=False, default=None)

    def summary(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "per_defect_type": self.per_defect_type}


def labelled_metrics(
    samples: Sequence[Sample], scores: np.ndarray, maps: Sequence[np.ndarray] | None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[np.ndarray] | None]:
    """Threshold-free figures of labelled samples (good and defective both present) from their
    image scores and, when given, anomaly maps in image coordinates (Predictions.anomaly_maps):
    (metrics, per_defect_type, masks or None). Masks are read at each image's full resolution, so
    pixel AUROC and PRO cover the whole frame whatever part of it the model's mode looks at."""
    labels = np.array([s.label for s in samples])
    scores = np.asarray(scores, dtype=np.float64)
    if not ((labels == 0).any() and (labels == 1).any()):
        raise ValueError("labelled metrics need both good and defective images")
    out: dict[str, Any] = {
        "n_good": int((labels == 0).sum()),
        "n_defect": int((labels == 1).sum()),
        "image_auroc": metrics.image_auroc(labels, scores),
    }
    threshold, f1 = metrics.f1_optimal_threshold(labels, scores)
    out["f1_max_threshold"], out["f1_max"] = threshold, f1
    out["f1_max_confusion"] = metrics.confusion_at(labels, scores, threshold)
    known = np.array([s.label == 0 or s.mask_path is not None for s in samples])
    masks = None
    if maps is not None and any(s.label == 1 and s.mask_path is not None for s in samples):
        masks = [load_mask(s.mask_path, np.shape(m)) for s, m in zip(samples, maps)]

        def chosen(rows: np.ndarray) -> tuple[list, list]:
            return [masks[i] for i in np.flatnonzero(rows)], [maps[i] for i in np.flatnonzero(rows)]

        out["pixel_auroc"] = metrics.pixel_auroc(*chosen(known))
        out["pro"] = metrics.pro_auc(*chosen(known))
    good = labels == 0
    per_type: dict[str, dict[str, Any]] = {}
    for defect in sorted({s.defect_type for s in samples if s.label == 1}):
        sel = np.array([s.defect_type == defect for s in samples])
        row: dict[str, Any] = {
            "n_images": int(sel.sum()),
            "image_auroc": metrics.image_auroc(labels[sel | good], scores[sel | good]),
        }
        if masks is not None and any(masks[i].any() for i in np.flatnonzero(sel & known)):
            row["pro"] = metrics.pro_auc(*chosen((sel & known) | good))
        per_type[defect] = row
    return out, per_type, masks


def evaluate(
    model: PatchCore, test: str | Path | Sequence[Sample], progress: bool = True, pixel_metrics: bool = True
) -> Evaluation:
    """Score labelled samples and compute the metrics that their labels and masks allow."""
    samples = resolve_samples(test, split="test") if isinstance(test, (str, Path)) else list(test)
    if any(s.label is None for s in samples):
        raise ValueError("evaluation needs labelled samples (an MVTec-layout folder with test/good and test/<defect>)")
    labels = np.array([s.label for s in samples])
    want_maps = pixel_metrics and any(s.mask_path is not None for s in samples)
    predictions = model.predict([s.path for s in samples], maps=want_maps, progress=progress)
    result: dict[str, Any] = {
        "n_images": len(samples),
        "n_good": int((labels == 0).sum()),
        "n_defect": int((labels == 1).sum()),
    }
    per_type: dict[str, dict[str, Any]] = {}
    masks = None
    if result["n_good"] and result["n_defect"]:
        figures, per_type, masks = labelled_metrics(
            samples, predictions.scores, predictions.anomaly_maps if want_maps else None
        )
        result.update(figures)
    return Evaluation(result, per_type, samples, predictions, masks)


__all__ = ["GOOD", "METRIC_NAMES", "Evaluation", "evaluate", "labelled_metrics"]
