"""Tests for patchcore.metrics against hand-computed values and a brute-force PRO reference."""

import json

import numpy as np
import pytest
from scipy import ndimage

from patchcore import metrics
from patchcore.metrics import (
    confusion_at,
    f1_optimal_threshold,
    image_auroc,
    pixel_auroc,
    pro_auc,
    pro_curve,
    threshold_at_recall,
)

# --------------------------------------------------------------------------- fixtures


def two_region_case():
    """One 4x4 image, two regions of different size and 10 defect-free pixels.

    Region A (4 px, top-left 2x2): two pixels score 0.9, two score 0.0.
    Region B (2 px, bottom row, cols 2-3): both score 0.6.
    Defect-free pixels: one at 0.8, one at 0.5, the other eight at 0.0.

    threshold  FPR   PRO = mean(overlap A, overlap B)
    0.9        0.0   (0.5 + 0) / 2 = 0.25
    0.8        0.1   0.25
    0.6        0.1   (0.5 + 1) / 2 = 0.75
    0.5        0.2   0.75
    0.0        1.0   1.0

    Area on [0, 0.3]: 0.1 * 0.25 + 0.1 * 0.75 + trapezoid on [0.2, 0.3]
    between 0.75 and the interpolated PRO(0.3) = 0.75 + 0.25 * 0.1 / 0.8
    = 0.78125, i.e. 0.1 * (0.75 + 0.78125) / 2 = 0.0765625.
    Total 0.1765625, normalised by 0.3: 0.58854166...
    """
    mask = np.zeros((4, 4), dtype=bool)
    mask[0:2, 0:2] = True
    mask[3, 2:4] = True
    amap = np.zeros((4, 4), dtype=np.float32)
    amap[0, 0:2] = 0.9
    amap[3, 2:4] = 0.6
    amap[2, 3] = 0.8
    amap[1, 3] = 0.5
    return mask[None], amap[None]


def random_case(seed=0, n=4, h=24, w=24):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n - 1):  # the last image stays defect-free
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
            dy, dx = rng.integers(1, 6, size=2)
            masks[i, y : y + dy, x : x + dx] = True
    maps = rng.random((n, h, w)).astype(np.float32) + 0.7 * masks
    # Quantise so that ties between pixels occur, as in real upsampled maps.
    maps = np.round(maps, 2)
    return masks, maps


def brute_force_pro_auc(masks, maps, fpr_limit):
    """Straightforward PRO: loop over every distinct threshold and region."""
    labelled = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    regions = [(i, r) for i, lab in enumerate(labelled) for r in range(1, lab.max() + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([pred[i][labelled[i] == r].mean() for i, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    y_at = np.interp(fpr_limit, fprs, pros)  # fprs is non-decreasing
    keep = fprs <= fpr_limit
    xs = np.append(fprs[keep], fpr_limit)
    ys = np.append(pros[keep], y_at)
    return np.trapezoid(ys, xs) / fpr_limit


# --------------------------------------------------------------------------- image AUROC


def test_image_auroc_perfect_and_inverted():
    labels = [0, 0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert image_auroc(labels, [0.9, 0.8, 0.7, 0.2, 0.1]) == 0.0


def test_image_auroc_hand_computed_with_tie():
    # Pairs (pos, neg): (0.4 vs 0.1, 0.4, 0.35) -> 1 + 0.5 + 1; (0.8 vs all) -> 3.
    # AUROC = 5.5 / 6.
    auc = image_auroc(np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.4, 0.8]))
    assert auc == pytest.approx(5.5 / 6)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0], np.zeros(4, dtype=bool)])
def test_image_auroc_single_class_raises(labels):
    with pytest.raises(ValueError, match="both normal"):
        image_auroc(labels, np.linspace(0, 1, len(labels)))


def test_labels_must_be_binary_and_lengths_match():
    with pytest.raises(ValueError, match="only 0 and 1"):
        image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="entries"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])


def test_image_auroc_returns_python_float():
    value = image_auroc([0, 1], [0.0, 1.0])
    assert type(value) is float


# --------------------------------------------------------------------------- pixel AUROC


def test_pixel_auroc_perfect_and_anticorrelated():
    masks, _ = two_region_case()
    perfect = masks.astype(np.float32)
    assert pixel_auroc(masks, perfect) == 1.0
    assert pixel_auroc(masks, 1.0 - perfect) == 0.0


def test_pixel_auroc_hand_computed():
    # Defect pixels score 0.9, 0.9, 0.0, 0.0, 0.6, 0.6; of the 10 normal pixels
    # one scores 0.8, one 0.5 and eight 0.0.  Pairs won per defect pixel:
    # 0.9 -> 10 (x2), 0.6 -> 9 (x2), 0.0 -> 8 ties * 0.5 = 4 (x2): 46 / 60.
    masks, maps = two_region_case()
    assert pixel_auroc(masks, maps) == pytest.approx(46 / 60)


def test_pixel_auroc_accepts_lists_and_0_255_masks():
    masks, maps = two_region_case()
    as_255 = (masks * 255).astype(np.uint8)
    expected = pixel_auroc(masks, maps)
    assert pixel_auroc(as_255.tolist(), maps.tolist()) == pytest.approx(expected)
    # A single (H, W) image is treated as a batch of one.
    assert pixel_auroc(masks[0], maps[0]) == pytest.approx(expected)


def test_pixel_auroc_errors():
    masks, maps = two_region_case()
    with pytest.raises(ValueError, match="both normal"):
        pixel_auroc(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="does not match"):
        pixel_auroc(masks, maps[:, :3])


# --------------------------------------------------------------------------- PRO


def test_pro_auc_perfect_map_is_one():
    masks, _ = two_region_case()
    assert pro_auc(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert pro_auc(masks, masks.astype(np.float32), num_thresholds=200) == pytest.approx(1.0)


def test_pro_auc_anticorrelated_map_is_zero():
    masks, _ = two_region_case()
    assert pro_auc(masks, 1.0 - masks.astype(np.float32)) == pytest.approx(0.0)


def test_pro_curve_hand_computed_points():
    fpr, pro = pro_curve(*two_region_case())
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.1, 0.1, 0.2, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.25, 0.25, 0.75, 0.75, 1.0])


def test_pro_auc_hand_computed_two_regions():
    masks, maps = two_region_case()
    assert pro_auc(masks, maps, fpr_limit=0.3) == pytest.approx(0.1765625 / 0.3)
    # Limit on a curve vertex needs no interpolation: 0.1*0.25 + 0.1*0.75 over 0.2.
    assert pro_auc(masks, maps, fpr_limit=0.2) == pytest.approx(0.5)
    # Whole curve: 0.025 + 0.075 + trapezoid on [0.2, 1.0] of 0.8 * (0.75 + 1) / 2.
    assert pro_auc(masks, maps, fpr_limit=1.0) == pytest.approx(0.025 + 0.075 + 0.7)


def test_pro_regions_weigh_equally_regardless_of_size():
    # Detecting only the small region gives the same PRO as detecting only the big one.
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 0:5, 0:5] = True  # 25 px
    mask[0, 8, 8] = True  # 1 px
    only_small = np.zeros((1, 10, 10), dtype=np.float32)
    only_small[0, 8, 8] = 1.0
    only_big = np.zeros_like(only_small)
    only_big[0, 0:5, 0:5] = 1.0
    fpr_s, pro_s = pro_curve(mask, only_small)
    fpr_b, pro_b = pro_curve(mask, only_big)
    assert pro_s[1] == pytest.approx(0.5) and fpr_s[1] == 0.0
    assert pro_b[1] == pytest.approx(0.5) and fpr_b[1] == 0.0


def test_pro_regions_use_8_connectivity():
    # Diagonal pixels (1,1)-(2,2) form one region, (5,5) another. Detecting only
    # (1,1) gives (0.5 + 0) / 2 = 0.25; with 4-connectivity it would be 1/3.
    mask = np.zeros((1, 7, 7), dtype=bool)
    mask[0, 1, 1] = mask[0, 2, 2] = mask[0, 5, 5] = True
    amap = np.zeros((1, 7, 7), dtype=np.float32)
    amap[0, 1, 1] = 1.0
    _, pro = pro_curve(mask, amap)
    assert pro[1] == pytest.approx(0.25)


def test_pro_defect_free_images_only_add_to_fpr():
    masks, maps = two_region_case()
    # A defect-free image scoring 0.0 everywhere adds 16 normal pixels below
    # every positive threshold: FPR at 0.8 becomes 1/26 and PRO is unchanged.
    masks2 = np.concatenate([masks, np.zeros_like(masks)])
    maps2 = np.concatenate([maps, np.zeros_like(maps)])
    fpr, pro = pro_curve(masks2, maps2)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1 / 26, 1 / 26, 2 / 26, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.25, 0.25, 0.75, 0.75, 1.0])


def test_pro_auc_matches_brute_force_reference():
    for seed in range(3):
        masks, maps = random_case(seed)
        for limit in (0.05, 0.3, 1.0):
            expected = brute_force_pro_auc(masks, maps, limit)
            assert pro_auc(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


def test_pro_auc_with_fixed_thresholds_approximates_exact():
    masks, maps = random_case(1)
    exact = pro_auc(masks, maps)
    approx = pro_auc(masks, maps, num_thresholds=200)
    assert approx == pytest.approx(exact, abs=0.02)
    assert approx != exact  # the two modes really differ


def test_pro_auc_accepts_lists():
    masks, maps = two_region_case()
    assert pro_auc(masks.astype(int).tolist(), maps.tolist()) == pytest.approx(0.1765625 / 0.3)


def test_pro_auc_errors():
    masks, maps = two_region_case()
    with pytest.raises(ValueError, match="no defect region|at least one"):
        pro_auc(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_auc(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_auc(masks, maps, fpr_limit=1.5)
    with pytest.raises(ValueError, match="num_thresholds"):
        pro_auc(masks, maps, num_thresholds=1)
    with pytest.raises(ValueError, match="NaN"):
        pro_auc(masks, np.full(maps.shape, np.nan, dtype=np.float32))


# --------------------------------------------------------------------------- thresholds


def test_f1_optimal_threshold_toy():
    # threshold 0.6 -> tp=3, fp=1: F1 = 6/7; beats 0.3 (tp=3, fp=2: 0.75),
    # 0.7 (tp=2, fp=1: 2/3) and 0.9 (tp=1, fp=0: 0.5).
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.3, 0.75, 0.6, 0.7, 0.9]
    threshold, f1 = f1_optimal_threshold(labels, scores)
    assert threshold == pytest.approx(0.6)
    assert f1 == pytest.approx(6 / 7)
    assert type(threshold) is float and type(f1) is float


def test_f1_optimal_threshold_separable_is_lowest_anomalous_score():
    threshold, f1 = f1_optimal_threshold(np.array([1, 0, 1, 0]), np.array([0.8, 0.2, 0.5, 0.4]))
    assert threshold == pytest.approx(0.5)
    assert f1 == pytest.approx(1.0)


def test_f1_optimal_threshold_prefers_lowest_threshold_on_ties():
    # Descending: pos 0.9, neg 0.8, neg 0.7, pos 0.6. F1 at 0.9 is 2/(2+0+1) = 2/3
    # and at 0.6 is 4/(4+2+0) = 2/3; the lower one (full recall) is returned.
    threshold, f1 = f1_optimal_threshold([1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6])
    assert threshold == pytest.approx(0.6)
    assert f1 == pytest.approx(2 / 3)


def test_f1_optimal_threshold_consistent_with_confusion_at():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 50)
    scores = rng.random(50) + 0.3 * labels
    threshold, f1 = f1_optimal_threshold(labels, scores)
    assert confusion_at(labels, scores, threshold)["f1"] == pytest.approx(f1)
    # No observed score gives a better F1.
    assert all(confusion_at(labels, scores, t)["f1"] <= f1 + 1e-12 for t in scores)


def test_f1_optimal_threshold_single_class_raises():
    with pytest.raises(ValueError, match="both normal"):
        f1_optimal_threshold([1, 1], [0.2, 0.3])


def test_threshold_at_recall():
    labels = [0, 1, 1, 0, 1, 1, 0]
    scores = [0.5, 0.2, 0.9, 0.1, 0.7, 0.4, 0.95]
    # Anomalous scores, descending: 0.9, 0.7, 0.4, 0.2.
    assert threshold_at_recall(labels, scores) == pytest.approx(0.2)
    assert threshold_at_recall(labels, scores, recall=0.75) == pytest.approx(0.4)
    assert threshold_at_recall(labels, scores, recall=0.5) == pytest.approx(0.7)
    assert threshold_at_recall(labels, scores, recall=0.51) == pytest.approx(0.4)
    assert threshold_at_recall(labels, scores, recall=0.01) == pytest.approx(0.9)


def test_threshold_at_recall_float_rounding():
    # 0.28 * 25 == 7.000000000000001 in floating point; the 7th score must be chosen.
    labels = np.ones(25, dtype=int)
    scores = np.arange(25, 0, -1) / 25  # 1.0, 0.96, ..., 0.04
    assert threshold_at_recall(labels, scores, recall=0.28) == pytest.approx(19 / 25)
    # Just above 1/3 with three anomalies: 3 * r rounds to exactly 1.0, yet one
    # detection (recall 1/3) is not enough.
    just_above = float(np.nextafter(1 / 3, 1.0))
    assert threshold_at_recall([1, 1, 1], [0.9, 0.5, 0.1], recall=just_above) == pytest.approx(0.5)
    for r in np.linspace(0.02, 1.0, 50):
        t = threshold_at_recall(labels, scores, recall=r)
        assert confusion_at(labels, scores, t)["recall"] >= r
        # Half a step stricter would miss the target.
        assert confusion_at(labels, scores, t + 0.02)["recall"] < r


def test_threshold_at_recall_errors():
    with pytest.raises(ValueError, match="recall"):
        threshold_at_recall([0, 1], [0.1, 0.2], recall=0.0)
    with pytest.raises(ValueError, match="recall"):
        threshold_at_recall([0, 1], [0.1, 0.2], recall=1.2)
    with pytest.raises(ValueError, match="anomalous"):
        threshold_at_recall([0, 0], [0.1, 0.2])


def test_confusion_at_counts():
    labels = [0, 0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.5, 0.6, 0.2, 0.5, 0.9, 0.3]
    # >= 0.5: predicted anomalous at indices 1, 2, 4, 5.
    result = confusion_at(labels, scores, 0.5)
    assert result == {
        "tp": 2,
        "fp": 2,
        "tn": 2,
        "fn": 1,
        "precision": 0.5,
        "recall": pytest.approx(2 / 3),
        "fpr": 0.5,
        "f1": pytest.approx(4 / 7),
        "errors": 3,
    }


def test_confusion_at_types_are_json_serialisable():
    result = confusion_at(np.array([0, 1, 1]), np.array([0.2, 0.4, 0.9], dtype=np.float32), np.float32(0.3))
    for key in ("tp", "fp", "tn", "fn", "errors"):
        assert type(result[key]) is int
    for key in ("precision", "recall", "fpr", "f1"):
        assert type(result[key]) is float
    json.dumps(result)


def test_confusion_at_zero_division_gives_zero():
    # Nothing predicted anomalous and no negatives: precision and fpr undefined.
    result = confusion_at([1, 1], [0.1, 0.2], 0.5)
    assert result["precision"] == 0.0 and result["fpr"] == 0.0
    assert result["recall"] == 0.0 and result["f1"] == 0.0
    assert result["fn"] == 2 and result["errors"] == 2


def test_public_names():
    for name in metrics.__all__:
        assert callable(getattr(metrics, name))
