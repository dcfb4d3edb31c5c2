"""Image decoding done once, right (patchcore.data.to_rgb, used by training, evaluation, inspection,
serving and validation): 16-bit grey and RGB scaled by the full range of the type, never clipped;
EXIF orientation applied; palette, CMYK, alpha and float images with defined results; a 16-bit
product and its 8-bit conversion scored the same. And small images: validation accepts what the
backbone can use, with a note when the model upsamples them, and refuses only what it cannot."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from patchcore import PatchCore
from patchcore.data import load_rgb, to_rgb
from patchcore.errors import DataError
from patchcore.synthetic import generate_product


def _png16_rgb(path: Path, rgb: np.ndarray) -> Path:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one): what cameras and tools produce."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def _grey16(source: Path, target: Path) -> Path:
    """The 8-bit grey image as 16 bits over the full range (v * 257: 0 -> 0, 255 -> 65535)."""
    grey = np.asarray(Image.open(source).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(target)
    return target


def test_16_bit_grey_decodes_by_the_full_range_of_the_type_never_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16)) * 257
    for suffix in (".png", ".tif"):
        path = tmp_path / f"ramp{suffix}"
        Image.fromarray(ramp).save(path)
        assert Image.open(path).mode.startswith("I;16")
        decoded = np.asarray(load_rgb(path))
        assert decoded.dtype == np.uint8 and decoded.shape == (16, 16, 3)
        np.testing.assert_array_equal(decoded[..., 0], np.arange(256).reshape(16, 16))  # not all 255
    # 32-bit integer grey holding 16-bit values, and one beyond 16 bits (refused, not wrapped or clipped)
    np.testing.assert_array_equal(
        np.asarray(to_rgb(Image.fromarray(ramp.astype(np.int32), mode="I")))[..., 1], ramp // 257
    )
    with pytest.raises(DataError, match="expected 0..65535"):
        to_rgb(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32), mode="I"))


def test_a_48_bit_rgb_png_decodes_to_its_8_bit_values(tmp_path):
    rng = np.random.default_rng(0)
    rgb8 = rng.integers(0, 256, (12, 20, 3), dtype=np.uint16)
    decoded = np.asarray(load_rgb(_png16_rgb(tmp_path / "rgb48.png", rgb8 * 257)))
    np.testing.assert_array_equal(decoded, rgb8)


def test_exif_orientation_palette_cmyk_alpha_and_float_have_defined_results(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (10, 30, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored sideways
    image.save(tmp_path / "sideways.jpg", exif=exif, quality=100)
    upright = load_rgb(tmp_path / "sideways.jpg")
    assert upright.size == (10, 30)  # width and height swapped: seen upright

    rgba = np.dstack([rgb, np.zeros((10, 30), np.uint8)])  # fully transparent: the colours are kept
    np.testing.assert_array_equal(np.asarray(load_rgb(rgba)), rgb)
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    np.testing.assert_array_equal(np.asarray(to_rgb(palette)), np.asarray(palette.convert("RGB")))
    cmyk = image.convert("CMYK")
    np.testing.assert_array_equal(np.asarray(to_rgb(cmyk)), np.asarray(cmyk.convert("RGB")))
    floats = np.linspace(-0.5, 1.5, 40, dtype=np.float32).reshape(4, 10)
    Image.fromarray(floats, mode="F").save(tmp_path / "float.tif")
    grey = np.asarray(load_rgb(tmp_path / "float.tif"))[..., 0]
    np.testing.assert_array_equal(grey, np.rint(np.clip(floats.astype(np.float64), 0, 1) * 255).astype(np.uint8))


def test_a_16_bit_product_and_its_8_bit_conversion_train_and_score_the_same(tmp_path):
    """Before the fix a 16-bit set trained on flat white images (convert("RGB") clipped every value)."""
    product = generate_product(
        tmp_path / "data", "tiles", n_train=10, n_test_good=3, n_test_defect=3, size_px=112, seed=2
    )
    sets = {}
    for depth in (8, 16):
        out = tmp_path / f"grey{depth}"
        out.mkdir()
        for path in sorted(product.glob("train/good/*.png")) + sorted(product.glob("test/*/*.png")):
            target = out / f"{path.parent.name}-{path.name}"
            if depth == 8:
                Image.open(path).convert("L").save(target)
            else:
                _grey16(path, target)
        sets[depth] = out
    scores = {}
    for depth, folder in sets.items():
        model = PatchCore(tiny_config()).fit(sorted(folder.glob("good-*.png")))
        tests = sorted(p for p in folder.glob("*.png") if not p.name.startswith("good-"))
        scores[depth] = model.predict(tests, maps=False, progress=False).scores
    assert np.std(scores[8]) > 0
    np.testing.assert_allclose(scores[16], scores[8], rtol=1e-5)


def _texture_product(root: Path, side: int, n: int = 6) -> Path:
    good = root / "train" / "good"
    good.mkdir(parents=True)
    rng = np.random.default_rng(side)
    for i in range(n):
        Image.fromarray(rng.integers(60, 200, (side, side + 7, 3), dtype=np.uint8)).save(good / f"{i:03d}.png")
    return root


def test_small_images_pass_validation_with_a_note_and_only_unusable_ones_fail(tmp_path):
    """Default settings (resize 256, crop 224): 100 px tiles pass (the model upsamples them: a note
    says so); 24 px images, below the documented floor, fail naming the file and the size."""
    from pipeline.config import Params
    from pipeline.validation import MIN_USABLE_SIDE_PX, validate_image_set

    params = Params.from_dict({"validation": {"min_images": 5}})
    small = validate_image_set(_texture_product(tmp_path / "small", 100), params, reference=None, docs=False)
    assert small.passed, small.report()
    notes = small.summary["notes"]
    assert len(notes) == 1 and "upsamples" in notes[0] and "100 px" in notes[0]
    assert "upsamples" in small.report()
    tiny = validate_image_set(
        _texture_product(tmp_path / "tiny", MIN_USABLE_SIDE_PX - 8), params, reference=None, docs=False
    )
    assert not tiny.passed and f"observed {MIN_USABLE_SIDE_PX - 8}" in tiny.report()


@pytest.mark.mtd
def test_mtd_nominal_images_pass_validation_with_default_settings(tmp_path):
    from conftest import MTD

    from pipeline.config import load_settings
    from pipeline.validation import validate_image_set

    if not (MTD / "MT_Free" / "Imgs").is_dir():
        pytest.skip(f"MTD not found at {MTD}")
    good = tmp_path / "mtd" / "train" / "good"
    good.mkdir(parents=True)
    for path in sorted((MTD / "MT_Free" / "Imgs").glob("*.jpg")):
        (good / path.name).symlink_to(path)
    result = validate_image_set(tmp_path / "mtd", load_settings(None), reference=None, docs=False)
    assert result.passed, result.report(limit=5)
