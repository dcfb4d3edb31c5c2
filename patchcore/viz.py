"""Heatmap overlays: an anomaly map blended over the (resized, cropped) input image, as PNG.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image
from torchvision import transforms

from patchcore.data import load_rgb


def overlay(
    item, anomaly_map: np.ndarray, resize: int, crop: int, vmin: float, vmax: float, alpha: float = 0.45
) -> Image.Image:
    """The input as the model saw it (resize + centre crop) with the map in the 'jet' colour map.
    vmin/vmax fix the colour scale so overlays of different images are comparable."""
    base = transforms.CenterCrop(crop)(transforms.Resize(resize)(load_rgb(item)))
    scaled = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)
    return Image.blend(base, Image.fromarray(heat), alpha)


def write_overlays(
    items, maps: np.ndarray, out_dir: str | Path, resize: int, crop: int, names: list[str] | None = None
) -> list[Path]:
    """One PNG per input into out_dir, colour scale shared across the batch (1st–99.9th percentile)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vmin, vmax = (float(v) for v in np.percentile(maps, [1.0, 99.9]))
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
        overlay(item, amap, resize, crop, vmin, vmax).save(path)
        written.append(path)
    return written
