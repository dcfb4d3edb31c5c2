"""Evaluation metrics for anomaly detection and localisation.

Image level: ROC AUC of per-image anomaly scores, plus helpers to choose and
evaluate an operating threshold (F1-optimal, target recall, confusion counts).

Pixel level: ROC AUC over all pixels of all images, and the area under the
Per-Region-Overlap curve (PRO, Bergmann et al., "Uninformed Students",
CVPR 2020), the localisation metric used with MVTec AD.

Conventions shared by every function here:

* labels are 0/1 (or bool); 1 means anomalous;
* higher scores mean more anomalous, and a sample counts as anomalous when
  ``score >= threshold``;
* ground-truth masks are binarised as ``mask != 0`` (so 0/1, bool and 0/255
  masks all work); masks resized with interpolation should be binarised by
  the caller first.

All return values are plain Python ``float``/``int`` so they can be written
to JSON directly.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = [
    "confusion_at",
    "f1_optimal_threshold",
    "image_auroc",
    "pixel_auroc",
    "pro_auc",
    "pro_curve",
    "threshold_at_recall",
]


def _binary_labels(labels, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be 0/1 or bool, got dtype {arr.dtype}")
    is_zero = arr == 0
    if not np.all(is_zero | (arr == 1)):
        bad = np.unique(arr[~(is_zero | (arr == 1))])[:5]
        raise ValueError(f"{name} must contain only 0 and 1, found e.g. {bad.tolist()}")
    return ~is_zero


def _scores(scores, n: int, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but labels has {n}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = _binary_labels(labels)
    return y, _scores(scores, y.shape[0])


def _require_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        present = "anomalous (1)" if n_pos else "normal (0)"
        raise ValueError(
            f"{what} needs both normal (0) and anomalous (1) samples, "
            f"but only {present} samples were given ({y.size} in total)"
        )


def _masks_and_maps(masks, maps) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Masks and maps of N images -> (every pixel's label, every pixel's score, the masks one by one).

    Either an (N, H, W) array each (a single (H, W) image is a batch of one), or sequences of (H_i, W_i)
    arrays: images of different sizes (maps in each image's own coordinates), mask i matching map i."""
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = masks[None]
    if isinstance(maps, np.ndarray) and maps.ndim == 2:
        maps = maps[None]
    if isinstance(masks, np.ndarray) and masks.ndim != 3 or isinstance(maps, np.ndarray) and maps.ndim != 3:
        raise ValueError(f"masks and maps must have shape (N, H, W), got {np.shape(masks)} and {np.shape(maps)}")
    mask_list, map_list = [np.asarray(m) != 0 for m in masks], [np.asarray(a) for a in maps]
    if len(mask_list) != len(map_list):
        raise ValueError(f"{len(mask_list)} masks for {len(map_list)} maps")
    for i, (m, a) in enumerate(zip(mask_list, map_list)):
        if m.ndim != 2 or m.shape != a.shape:
            raise ValueError(f"mask {i} shape {m.shape} does not match its map's shape {a.shape}")
    if not mask_list or sum(m.size for m in mask_list) == 0:
        raise ValueError("masks and maps are empty")
    # float32 keeps ~600 MVTec-sized maps (30M pixels) around 120 MB per copy.
    a = np.concatenate([np.asarray(x, dtype=np.float32).ravel() for x in map_list])
    if not np.all(np.isfinite(a)):
        raise ValueError("maps contain NaN or infinite values")
    return np.concatenate([m.ravel() for m in mask_list]), a, mask_list


def image_auroc(labels, scores) -> float:
    """ROC AUC of image-level anomaly scores.

    Raises ``ValueError`` if ``labels`` contains only one class, where the
    AUROC is undefined.
    """
    y, s = _labels_and_scores(labels, scores)
    _require_both_classes(y, "image_auroc")
    return float(roc_auc_score(y, s))


def pixel_auroc(masks, maps) -> float:
    """ROC AUC over every pixel of every image (the usual "pixel AUROC").

    ``masks`` and ``maps`` have shape ``(N, H, W)`` (a single ``(H, W)``
    image is also accepted), or are sequences of ``(H_i, W_i)`` arrays for
    images of different sizes. Maps are handled as float32 to keep memory
    bounded for full test sets.
    """
    y, a, _ = _masks_and_maps(masks, maps)
    _require_both_classes(y, "pixel_auroc (pixels)")
    return float(roc_auc_score(y, a))


def _region_weights(masks) -> np.ndarray:
    """Weight per defect pixel such that summing weights of pixels above a
    threshold gives the mean per-region overlap (PRO) at that threshold."""
    # 8-connectivity, as in the reference MVTec AD evaluation code.
    structure = np.ones((3, 3), dtype=int)
    weights = []
    n_regions = 0
    for mask in masks:
        labelled, n = ndimage.label(mask, structure=structure)
        if n == 0:
            continue
        region_ids = labelled[mask]
        sizes = np.bincount(region_ids, minlength=n + 1)
        weights.append(1.0 / sizes[region_ids])
        n_regions += n
    if n_regions == 0:
        raise ValueError("pro_auc needs at least one ground-truth defect region; masks are all empty")
    return np.concatenate(weights) / n_regions


def pro_curve(masks, maps, num_thresholds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-Region-Overlap curve as ``(fpr, pro)``, both sorted by increasing FPR.

    With ``num_thresholds=None`` every distinct map value is a threshold, so
    the curve is exact; with an integer, that many thresholds are spaced
    evenly between the minimum and maximum map value (a cheaper approximation
    used by some other implementations). The point ``(0, 0)``, i.e. a
    threshold above every score, is always included.
    """
    m, a, mask_list = _masks_and_maps(masks, maps)
    defect_weights = _region_weights(mask_list)  # in the order of a[m]: image by image, row-major
    defect_scores = a[m]
    normal_scores = np.sort(a[~m], kind="stable")
    if normal_scores.size == 0:
        raise ValueError("pro_auc needs defect-free pixels to measure the false positive rate")

    order = np.argsort(defect_scores, kind="stable")
    defect_scores = defect_scores[order]
    # cumulative weight from the highest score down, so index i holds the PRO
    # of all defect pixels with score >= defect_scores[i].
    pro_from = np.cumsum(defect_weights[order][::-1])[::-1]
    pro_from = np.append(pro_from, 0.0)

    if num_thresholds is None:
        thresholds = np.unique(a)[::-1]
    else:
        if int(num_thresholds) < 2:
            raise ValueError("num_thresholds must be at least 2 (or None for the exact curve)")
        thresholds = np.linspace(float(a.max()), float(a.min()), int(num_thresholds))
        thresholds = thresholds.astype(np.float32)

    n_normal_above = normal_scores.size - np.searchsorted(normal_scores, thresholds, side="left")
    fpr = n_normal_above / normal_scores.size
    pro = pro_from[np.searchsorted(defect_scores, thresholds, side="left")]
    # The float sum of weights can land a hair above 1.
    pro = np.minimum(pro, 1.0)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) on [0, x_max]; x is non-decreasing and starts at 0."""
    inside = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:inside], y[:inside]
    if inside < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs = np.append(xs, x_max)
        ys = np.append(ys, y_at)
    return float(np.trapezoid(ys, xs))


def pro_auc(masks, maps, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the Per-Region-Overlap curve up to ``fpr_limit``.

    For a threshold ``t``, a pixel is predicted anomalous when its map value
    is ``>= t``:

    * PRO(t) is the mean, over all connected ground-truth regions of all
      images (8-connectivity), of the fraction of the region's pixels that are
      predicted anomalous; every region counts equally whatever its size;
    * FPR(t) is the fraction of all defect-free pixels (of all images) that
      are predicted anomalous.

    The PRO(FPR) curve is integrated with the trapezoid rule on
    ``[0, fpr_limit]`` (interpolating the curve at exactly ``fpr_limit``) and
    divided by ``fpr_limit``, so a perfect map scores 1.0.

    Images without defects contribute only to the FPR. ``num_thresholds``
    selects exact (``None``, default) or evenly spaced thresholds; see
    :func:`pro_curve`. Raises ``ValueError`` if the masks contain no defect
    region at all.
    """
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps, num_thresholds=num_thresholds)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def f1_optimal_threshold(labels, scores) -> tuple[float, float]:
    """Threshold that maximises F1, and that F1, as ``(threshold, f1)``.

    Candidate thresholds are the observed scores (from
    :func:`sklearn.metrics.precision_recall_curve`); a sample is anomalous
    when ``score >= threshold``. On ties, the lowest such threshold wins.
    """
    y, s = _labels_and_scores(labels, scores)
    _require_both_classes(y, "f1_optimal_threshold")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The final (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def threshold_at_recall(labels, scores, recall: float = 1.0) -> float:
    """Highest threshold whose recall (with ``score >= threshold``) is at least ``recall``.

    With the default ``recall=1.0`` this is the lowest anomalous score, i.e.
    the strictest threshold that still flags every anomalous sample.
    """
    y, s = _labels_and_scores(labels, scores)
    recall = float(recall)
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    positives = np.sort(s[y])[::-1]
    n_pos = positives.size
    if n_pos == 0:
        raise ValueError("threshold_at_recall needs at least one anomalous (1) sample")
    # Smallest k with k / n_pos >= recall; guard against ceil of e.g. 0.7 * 10
    # rounding up to 8 in floating point.
    k = min(int(math.ceil(recall * n_pos)), n_pos)
    while k > 1 and (k - 1) / n_pos >= recall:
        k -= 1
    while k < n_pos and k / n_pos < recall:
        k += 1
    return float(positives[k - 1])


def confusion_at(labels, scores, threshold) -> dict:
    """Confusion counts and derived rates at ``threshold`` (``score >= threshold`` is anomalous).

    Returns ``{"tp", "fp", "tn", "fn", "precision", "recall", "fpr", "f1",
    "errors"}`` with Python ints (counts, ``errors = fp + fn``) and floats
    (rates; 0.0 where the denominator is zero).
    """
    y, s = _labels_and_scores(labels, scores)
    predicted = s >= float(threshold)
    tp = int(np.sum(predicted & y))
    fp = int(np.sum(predicted & ~y))
    fn = int(np.sum(~predicted & y))
    tn = int(np.sum(~predicted & ~y))

    def ratio(num: int, den: int) -> float:
        return float(num / den) if den else 0.0

    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "fpr": ratio(fp, fp + tn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "errors": fp + fn,
    }
