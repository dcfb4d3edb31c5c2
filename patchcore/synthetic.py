"""Deterministic synthetic "product" images in the MVTec AD folder layout.

Used by the demo and the tests, where the real MVTec AD data set is not
available. A product is a textured surface (two crossed sinusoidal gratings
plus smooth noise, in two tones of one colour); good images differ only in
nominal ways (grating phase, slight orientation/frequency jitter, brightness,
noise). Defective test images carry one planted defect each, with an exact
ground-truth mask:

* ``scratch``: a thin straight line, much darker or brighter than the surface;
* ``spot``: an irregular blob of a different colour;
* ``missing``: a rotated rectangular piece replaced by a flat dark hole.

Every image is drawn from its own random stream seeded by
``(seed, product name, split, kind, index)``, so files are byte-identical
across runs and changing ``n_train`` does not change the test images.

Command line::

    python -m patchcore.synthetic --out data --product tiles --seed 0
"""

from __future__ import annotations

import argparse
import colorsys
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["DEFECT_TYPES", "generate_product", "main", "render_sample"]

DEFECT_TYPES = ("scratch", "spot", "missing")

_SPLITS = ("train", "test")
_KINDS = ("good",) + DEFECT_TYPES


@dataclass(frozen=True)
class _Style:
    """Appearance shared by all images of one product."""

    angles: tuple[float, float]  # grating orientations, radians
    cycles: tuple[float, float]  # grating frequencies, cycles per image width
    weights: tuple[float, float]
    light: np.ndarray  # RGB of the texture's bright tone, in [0, 1]
    dark: np.ndarray  # RGB of the texture's dark tone
    spot: np.ndarray  # RGB of "spot" defects


def _product_key(product: str) -> int:
    # crc32 rather than hash(): Python's str hash is salted per process.
    return zlib.crc32(product.encode("utf-8"))


def _style(seed: int, product: str, color: bool) -> _Style:
    rng = np.random.default_rng([seed, _product_key(product)])
    angle = rng.uniform(0.0, math.pi)
    angles = (angle, angle + rng.uniform(math.pi / 3, 2 * math.pi / 3))
    cycles = (rng.uniform(5.0, 9.0), rng.uniform(5.0, 9.0))
    hue = rng.uniform(0.0, 1.0)
    sat = rng.uniform(0.35, 0.6)
    val = rng.uniform(0.58, 0.7)
    light = np.array(colorsys.hsv_to_rgb(hue, sat, val))
    dark = light * 0.6
    if color:
        # Complementary hue, so the spot differs from the surface in colour,
        # not just brightness.
        spot = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.7, 0.9))
    else:
        # Grey surfaces top out near 0.74; a near-white spot stays distinct.
        spot = np.full(3, 0.9)
    return _Style(angles, cycles, (0.6, 0.4), light, dark, spot)


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    return yy, xx


def _nominal(style: _Style, rng: np.random.Generator, shape: tuple[int, int], color: bool) -> np.ndarray:
    """A defect-free surface as float RGB in [0, 1], shape (height, width, 3)."""
    yy, xx = _grid(shape)
    size = shape[1]  # gratings: cycles per image width
    pattern = np.zeros(shape)
    for angle, cycles, weight in zip(style.angles, style.cycles, style.weights):
        angle = angle + rng.normal(0.0, math.radians(2.0))
        cycles = cycles * rng.normal(1.0, 0.02)
        phase = rng.uniform(0.0, 2 * math.pi)
        along = xx * math.cos(angle) + yy * math.sin(angle)
        pattern += weight * np.cos(2 * math.pi * cycles * along / size + phase)
    noise = rng.standard_normal(shape)
    smooth = ndimage.gaussian_filter(noise, sigma=size / 40, mode="wrap")
    smooth /= smooth.std() + 1e-12
    tone = np.clip(0.5 + 0.5 * pattern / sum(style.weights) + 0.08 * smooth, 0.0, 1.0)
    img = style.dark + tone[..., None] * (style.light - style.dark)
    img = img * rng.normal(1.0, 0.03)
    img = img + rng.normal(0.0, 0.012, size=img.shape)
    if not color:
        img = np.repeat(img @ np.array([0.299, 0.587, 0.114])[:, None], 3, axis=-1)
    return np.clip(img, 0.0, 1.0)


def _segment_distance(yy, xx, p0, p1) -> np.ndarray:
    d = p1 - p0
    t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / float(d @ d)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _centre(rng, shape, low: float, high: float, at_edges: bool) -> np.ndarray:
    """A defect's centre, (row, column): within [low, high] of each side, or (`at_edges`) in the
    outer 3-12 % of the longer side, at either end (where a centre crop does not reach)."""
    extent = np.array(shape, dtype=np.float64)
    center = rng.uniform(low * extent, high * extent, size=2)
    if at_edges:
        axis = int(np.argmax(extent))
        offset = rng.uniform(0.03, 0.12) * extent[axis]
        center[axis] = offset if rng.random() < 0.5 else extent[axis] - offset
    return center


def _scratch(img, rng, shape, at_edges=False):
    yy, xx = _grid(shape)
    size = min(shape)
    center = _centre(rng, shape, 0.3, 0.7, at_edges)
    angle = rng.uniform(0.0, math.pi)
    half_length = 0.5 * rng.uniform(0.3, 0.55) * (size * 0.4 if at_edges else size)
    direction = np.array([math.sin(angle), math.cos(angle)])
    half_width = max(0.75, rng.uniform(0.7, 1.2) * size / 128)
    start, end = center - half_length * direction, center + half_length * direction
    mask = _segment_distance(yy, xx, start, end) <= half_width
    shade = 0.08 if rng.random() < 0.5 else 0.95
    out = img.copy()
    out[mask] = shade + rng.normal(0.0, 0.01, size=(int(mask.sum()), 3))
    return out, mask


def _spot(img, rng, shape, style, at_edges=False):
    yy, xx = _grid(shape)
    size = min(shape)
    center = _centre(rng, shape, 0.2, 0.8, at_edges)
    radius = rng.uniform(0.05, 0.09) * size
    theta = np.arctan2(yy - center[0], xx - center[1])
    # A wobbly outline (low harmonics) looks like a stain rather than a disc.
    outline = np.ones_like(theta)
    for k in (2, 3, 5):
        outline += rng.uniform(0.05, 0.15) * np.sin(k * theta + rng.uniform(0, 2 * math.pi))
    mask = np.hypot(yy - center[0], xx - center[1]) <= radius * outline
    out = img.copy()
    # Keep a quarter of the surface so the stain is not perfectly flat.
    out[mask] = 0.25 * img[mask] + 0.75 * style.spot
    return out, mask


def _missing(img, rng, shape, at_edges=False):
    yy, xx = _grid(shape)
    size = min(shape)
    center = _centre(rng, shape, 0.25, 0.75, at_edges)
    half = 0.5 * rng.uniform(0.12, 0.22, size=2) * (size * 0.6 if at_edges else size)
    angle = rng.uniform(0.0, math.pi)
    c, s = math.cos(angle), math.sin(angle)
    u = (xx - center[1]) * c + (yy - center[0]) * s
    v = -(xx - center[1]) * s + (yy - center[0]) * c
    mask = (np.abs(u) <= half[0]) & (np.abs(v) <= half[1])
    out = img.copy()
    out[mask] = np.array([0.16, 0.15, 0.14]) + rng.normal(0.0, 0.004, size=(int(mask.sum()), 3))
    return out, mask


def _to_uint8(img: np.ndarray, color: bool) -> np.ndarray:
    arr = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return arr if color else arr[..., 0]


def render_sample(
    product: str = "tiles",
    *,
    split: str = "test",
    kind: str = "good",
    index: int = 0,
    size_px: int = 128,
    seed: int = 0,
    color: bool = True,
    width_px: int | None = None,
    defects_at: str = "anywhere",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one image exactly as :func:`generate_product` writes it.

    ``split`` is ``"train"`` or ``"test"``; ``kind`` is ``"good"`` or one of
    :data:`DEFECT_TYPES` (defects only exist in ``"test"``).

    Returns ``(image, mask, nominal)``: ``image`` and ``nominal`` are uint8,
    ``(H, W, 3)`` if ``color`` else ``(H, W)``; ``nominal`` is the same image
    before the defect was planted (equal to ``image`` for good samples);
    ``mask`` is a bool ``(H, W)`` array, all False for good samples.

    ``size_px`` is the height and ``width_px`` (default: the same) the width; ``defects_at="edges"``
    plants every defect near an end of the longer side, where a centre crop does not look.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'good' or one of {DEFECT_TYPES}, got {kind!r}")
    if split == "train" and kind != "good":
        raise ValueError("the train split only contains good images")
    shape = _shape(size_px, width_px, defects_at)
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}")

    style = _style(seed, product, color)
    rng = np.random.default_rng([seed, _product_key(product), _SPLITS.index(split), _KINDS.index(kind), index])
    nominal = _nominal(style, rng, shape, color)
    edges = defects_at == "edges"
    if kind == "scratch":
        image, mask = _scratch(nominal, rng, shape, edges)
    elif kind == "spot":
        image, mask = _spot(nominal, rng, shape, style, edges)
    elif kind == "missing":
        image, mask = _missing(nominal, rng, shape, edges)
    else:
        image, mask = nominal, np.zeros(shape, dtype=bool)
    return _to_uint8(image, color), mask, _to_uint8(nominal, color)


def _shape(size_px: int, width_px: int | None, defects_at: str) -> tuple[int, int]:
    width = size_px if width_px is None else width_px
    if min(size_px, width) < 32:
        raise ValueError(f"size_px and width_px must be at least 32, got {size_px} x {width}")
    if defects_at not in ("anywhere", "edges"):
        raise ValueError(f"defects_at must be 'anywhere' or 'edges', got {defects_at!r}")
    return size_px, width


def _save_png(array: np.ndarray, path: Path) -> None:
    # No pnginfo is passed, so PIL writes no text/time chunks and the bytes
    # depend only on the pixels.
    Image.fromarray(array).save(path, format="PNG")


def generate_product(
    root,
    product: str = "tiles",
    *,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 8,
    size_px: int = 128,
    seed: int = 0,
    color: bool = True,
    width_px: int | None = None,
    defects_at: str = "anywhere",
) -> Path:
    """Write a synthetic product in MVTec AD layout and return its folder.

    Layout under ``root/<product>/``::

        train/good/000.png ...                  n_train defect-free images
        test/good/000.png ...                   n_test_good defect-free images
        test/<defect>/000.png ...               n_test_defect per defect type
        ground_truth/<defect>/000_mask.png ...  one mask per defective image

    with ``<defect>`` in :data:`DEFECT_TYPES`. Images are ``size_px`` square
    (or ``size_px`` high and ``width_px`` wide; see :func:`render_sample` for ``defects_at``),
    RGB if ``color`` else greyscale; masks are single-channel uint8 with 255
    exactly on the planted defect and 0 elsewhere.

    Output is deterministic: the same arguments produce byte-identical files,
    and the product name is part of the seed, so two products generated with
    the same ``seed`` still look different.

    Re-running into an existing folder overwrites the files it writes. If the
    folder already holds images this call would not write (e.g. from a run
    with larger counts, or real data), ``FileExistsError`` is raised before
    anything is written; nothing is ever deleted.
    """
    if not product or Path(product).name != product or product in (".", ".."):
        raise ValueError(f"product must be a plain folder name, got {product!r}")
    counts = {"n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect}
    for name, value in counts.items():
        if int(value) < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
    if n_train < 1:
        raise ValueError("n_train must be at least 1: a model needs training images")
    _shape(size_px, width_px, defects_at)

    folder = Path(root) / product
    plan: list[tuple[str, str, int, Path, Path | None]] = []
    for i in range(n_train):
        plan.append(("train", "good", i, folder / "train" / "good" / f"{i:03d}.png", None))
    for i in range(n_test_good):
        plan.append(("test", "good", i, folder / "test" / "good" / f"{i:03d}.png", None))
    for defect in DEFECT_TYPES:
        for i in range(n_test_defect):
            plan.append(
                (
                    "test",
                    defect,
                    i,
                    folder / "test" / defect / f"{i:03d}.png",
                    folder / "ground_truth" / defect / f"{i:03d}_mask.png",
                )
            )

    planned = {p for *_, img, mask in plan for p in (img, mask) if p is not None}
    existing = [p for sub in ("train", "test", "ground_truth") for p in (folder / sub).rglob("*.png")]
    foreign = sorted(p for p in existing if p not in planned)
    if foreign:
        raise FileExistsError(
            f"{folder} already contains {len(foreign)} image(s) this call would not write "
            f"(e.g. {foreign[0]}); remove the folder or choose another root"
        )

    for split, kind, i, img_path, mask_path in plan:
        image, mask, _ = render_sample(
            product,
            split=split,
            kind=kind,
            index=i,
            size_px=size_px,
            seed=seed,
            color=color,
            width_px=width_px,
            defects_at=defects_at,
        )
        img_path.parent.mkdir(parents=True, exist_ok=True)
        _save_png(image, img_path)
        if mask_path is not None:
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            _save_png(mask.astype(np.uint8) * 255, mask_path)
    return folder


def main(argv=None) -> int:
    """Command-line entry point; see ``python -m patchcore.synthetic --help``."""
    parser = argparse.ArgumentParser(
        prog="python -m patchcore.synthetic",
        description=(
            "Generate a deterministic synthetic product in MVTec AD layout (train/good, "
            "test/good, test/<defect>, ground_truth/<defect>; "
            f"defects: {', '.join(DEFECT_TYPES)})."
        ),
    )
    add = parser.add_argument
    add("--out", default="data", help="root folder; writes OUT/PRODUCT (default: data)")
    add("--product", default="tiles", help="product folder name, also seeds the style (default: tiles)")
    add("--seed", type=int, default=0, help="random seed (default: 0)")
    add("--n-train", type=int, default=40, help="good training images (default: 40)")
    add("--n-test-good", type=int, default=10, help="good test images (default: 10)")
    add("--n-test-defect", type=int, default=8, help="test images per defect type (default: 8)")
    add("--size", type=int, default=128, help="image side (height) in pixels (default: 128)")
    add("--width", type=int, default=None, help="image width in pixels (default: --size, square)")
    add(
        "--defects-at",
        choices=("anywhere", "edges"),
        default="anywhere",
        help="edges: plant defects near the ends of the longer side, outside a centre crop",
    )
    add("--grayscale", action="store_true", help="write single-channel images instead of RGB")
    args = parser.parse_args(argv)

    try:
        folder = generate_product(
            args.out,
            args.product,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_defect=args.n_test_defect,
            size_px=args.size,
            seed=args.seed,
            color=not args.grayscale,
            width_px=args.width,
            defects_at=args.defects_at,
        )
    except (ValueError, FileExistsError) as exc:
        parser.error(str(exc))
    n_defect = args.n_test_defect * len(DEFECT_TYPES)
    total = args.n_train + args.n_test_good + n_defect
    print(
        f"wrote {total} images to {folder}: {args.n_train} train/good, "
        f"{args.n_test_good} test/good, {n_defect} defective "
        f"({args.n_test_defect} each of {', '.join(DEFECT_TYPES)}) with masks"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
