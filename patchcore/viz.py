"""Heatmap overlays: an anomaly map (image coordinates) blended over the image itself, as PNG.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

from patchcore.data import load_rgb


def overlay(item, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.45) -> Image.Image:
    """The whole image with its map (Predictions.anomaly_maps: the image's own size) in the 'jet'
    colour map. vmin/vmax fix the colour scale so overlays of different images are comparable."""
    base = load_rgb(item)
    scaled = np.clip((np.asarray(anomaly_map, dtype=np.float32) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = Image.fromarray((colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8))
    if heat.size != base.size:  # a map of another size (e.g. read back from a list of maps): stretch it
        heat = heat.resize(base.size, Image.BILINEAR)
    return Image.blend(base, heat, alpha)


def pixel_sample(maps, limit: int = 2_000_000) -> np.ndarray:
    """Up to `limit` pixel values drawn evenly from maps of any sizes (for colour-scale percentiles)."""
    flat = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    return flat[:: max(1, len(flat) // limit)]


def write_overlays(items, maps, out_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """One PNG per input into out_dir, colour scale shared across the batch (1st–99.9th percentile)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vmin, vmax = (float(v) for v in np.percentile(pixel_sample(maps), [1.0, 99.9]))
    written = []
    for i, (item, amap) in enumerate(zip(items, maps)):
        # parent folder in the name: MVTec test images of different types share file names
        name = (
            names[i]
            if names
            else (
                f"{Path(item).parent.name}_{Path(item).stem}.png" if isinstance(item, (str, Path)) else f"{i:05d}.png"
            )
        )
        path = out / name
        overlay(item, amap, vmin, vmax).save(path)
        written.append(path)
    return written
