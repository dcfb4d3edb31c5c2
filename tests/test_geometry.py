"""Image geometry (model.image.mode): a crop-only model cannot see defects at the ends of long
parts, the full-image modes find them; maps lie on the original image in every mode; tiling
stitches features to exactly where a full-image pass puts them; images of one product that differ
in size each get their own grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from PIL import Image

from patchcore import PatchCore
from patchcore.config import ConfigError, PatchCoreConfig
from patchcore.data import load_mask, resolve_samples
from patchcore.evaluation import evaluate
from patchcore.geometry import ALIGN, resized_size, tile_starts, tiled_features, to_image_frame, visible_mask
from patchcore.synthetic import generate_product

MODES = {
    "center_crop": {},
    "full_frame": {"image.mode": "full_frame"},
    "tiled": {"image.mode": "tiled", "image.resize": 144, "image.tile_size": 96},
}


@pytest.fixture(scope="module")
def strip(tmp_path_factory):
    """A line-scan-like product, 2.5:1, every defect near one end of the long side."""
    root = tmp_path_factory.mktemp("strip")
    return generate_product(
        root, "strip", n_train=16, n_test_good=4, n_test_defect=4, size_px=96, width_px=240, defects_at="edges", seed=3
    )


@pytest.fixture(scope="module")
def evaluations(strip):
    return {
        mode: evaluate(PatchCore(tiny_config(**overrides)).fit(strip, progress=False), strip, progress=False)
        for mode, overrides in MODES.items()
    }


def test_the_planted_defects_lie_outside_the_centre_crop(strip):
    cfg = tiny_config().image
    for sample in resolve_samples(strip, split="test"):
        if sample.label:
            mask = load_mask(sample.mask_path, (96, 240))
            assert mask.any() and not (mask & visible_mask("center_crop", cfg.resize, cfg.crop, (96, 240))).any()


def test_a_crop_only_model_misses_edge_defects_and_the_full_image_modes_find_them(evaluations):
    crop = evaluations["center_crop"].metrics
    assert crop["image_auroc"] < 0.75 and crop["pixel_auroc"] < 0.75, crop
    for mode in ("full_frame", "tiled"):
        m = evaluations[mode].metrics
        assert m["image_auroc"] >= 0.95 and m["pixel_auroc"] >= 0.95 and m["pro"] >= 0.8, (mode, m)


def test_maps_lie_on_the_original_image_in_every_mode_and_peak_in_the_defect(evaluations, strip):
    for mode, result in evaluations.items():
        maps = result.predictions.anomaly_maps
        assert [m.shape for m in maps] == [(96, 240)] * len(result.samples), mode
        if mode == "center_crop":  # nothing outside the crop was seen: no evidence there
            seen = visible_mask("center_crop", 112, 96, (96, 240))
            assert all(np.all(m[:, :30] == 0) and np.all(m[:, -30:] == 0) and m[seen].min() > 0 for m in maps)
            continue
        defects = [(s, m) for s, m in zip(result.samples, maps) if s.label]
        hits = 0
        for sample, amap in defects:  # a few pixels of slack: maps are smoothed on an 8 px patch grid
            y, x = np.unravel_index(np.argmax(amap), amap.shape)
            hits += bool(load_mask(sample.mask_path, amap.shape)[max(0, y - 6) : y + 7, max(0, x - 6) : x + 7].any())
        assert hits >= 0.8 * len(defects), (mode, hits, len(defects))


def test_tiles_are_stitched_exactly_where_a_full_image_pass_puts_each_patch():
    image = torch.randn(3, 112, 272)

    def pooled(x: torch.Tensor) -> torch.Tensor:  # a local feature with no border effects: 8x8 means
        return F.avg_pool2d(x, 8).permute(0, 2, 3, 1)

    stitched = tiled_features(image, 64, 0.25, pooled, batch_size=3)
    torch.testing.assert_close(stitched, pooled(image[None])[0])
    for length in (64, 112, 272, 1008):
        starts = tile_starts(length, 64, 0.25)
        assert starts[0] == 0 and starts[-1] == max(0, length - 64) and all(s % ALIGN == 0 for s in starts)
        assert all(b - a <= 64 * 0.75 for a, b in zip(starts, starts[1:]))  # at least the overlap asked for


def test_center_crop_maps_go_back_to_the_crop_box_and_the_full_modes_cover_the_frame():
    ones = np.ones((96, 96), np.float32)
    framed = to_image_frame(ones, "center_crop", 112, 96, (96, 240))
    inside = visible_mask("center_crop", 112, 96, (96, 240))
    assert framed.shape == (96, 240) and np.all(framed[inside][framed[inside] > 0] <= 1.0)
    assert np.all(framed[~inside] < 0.5) and np.all(framed[inside] > 0.5)
    assert resized_size("full_frame", 112, 240, 96) == (112, 288)  # aspect kept, sides on the ALIGN grid
    assert resized_size("center_crop", 112, 240, 96) == (112, 280)  # torchvision's Resize(int)
    assert visible_mask("tiled", 112, 96, (96, 240)).all()


def test_images_of_slightly_different_sizes_each_get_their_own_grid(strip, tmp_path):
    model = PatchCore(tiny_config(**MODES["full_frame"])).fit(strip, progress=False)
    sizes = [(96, 240), (100, 236), (90, 250)]
    good = Image.open(next((strip / "test" / "good").iterdir())).convert("RGB")
    images = [np.asarray(good.resize((w, h), Image.BILINEAR)) for h, w in sizes]
    predictions = model.predict(images, progress=False)
    assert [m.shape for m in predictions.anomaly_maps] == sizes
    alone = [model.predict([image], progress=False).scores[0] for image in images]
    np.testing.assert_allclose(predictions.scores, alone, rtol=1e-5)  # batching by size changes nothing
    assert np.ptp(predictions.scores) < 0.5 * np.mean(predictions.scores)  # slightly resized: still nominal


def test_bad_geometry_settings_are_named():
    for settings, words in [
        ({"mode": "crop"}, "image.mode must be center_crop, full_frame or tiled"),
        ({"mode": "tiled", "tile_size": 100}, "image.tile_size must be a multiple of 16"),
        ({"mode": "tiled", "tile_overlap": 0.9}, "image.tile_overlap must be in [0, 0.75]"),
        ({"resize": 200, "crop": 224}, "must be >= image.crop"),
    ]:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            PatchCoreConfig.from_dict({"image": settings})
    assert PatchCoreConfig.from_dict({"image": {"mode": "full_frame", "resize": 200}}).image.resize == 200


def test_a_high_resolution_product_is_inspected_in_tiles_at_full_scale(tmp_path):
    """256 x 640 images, defects near the ends: the tiled model looks at the whole frame at 256 px in
    128 px tiles (the backbone never sees more than a tile); a centre crop at the tiny test size sees
    a 96 px square of the middle."""
    data = generate_product(
        tmp_path, "sheet", n_train=6, n_test_good=3, n_test_defect=2, size_px=256, width_px=640, defects_at="edges"
    )
    model = PatchCore(tiny_config(**{"image.mode": "tiled", "image.resize": 256, "image.tile_size": 128}))
    result = evaluate(model.fit(data, progress=False), data, progress=False)
    assert model.grid_ == (32, 80)  # the full frame's 8 px patch grid, stitched from 3 x 7 tiles
    assert result.metrics["image_auroc"] >= 0.9 and result.metrics["pixel_auroc"] >= 0.9, result.metrics
    assert all(m.shape == (256, 640) for m in result.predictions.anomaly_maps)
    crop = evaluate(PatchCore(tiny_config()).fit(data, progress=False), data, progress=False).metrics
    assert crop["pixel_auroc"] < 0.75 and crop["pro"] < 0.1, crop  # it cannot point at what it never saw
