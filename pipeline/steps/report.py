"""Step 8, report: ROC and PR curves, the score histogram with the threshold, a grid of heatmap
overlays (worst misses and false alarms first) and a per-image score table, under
reports/<model_key>/."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import precision_recall_curve, roc_curve

from pipeline.config import PipelineConfig
from pipeline.io import write_json
from pipeline.results import Calibration, Evaluation, Manifest, Report
from pipeline.steps.evaluate import MAPS_FILE, load_maps
from pipeline.steps.fingerprint import image_path, load_manifest
from pipeline.steps.split import HOLDOUT, TEST
from pipeline.store import Store


def make_report(
    store: Store, evaluation: Evaluation, calibrated: Calibration, manifest: Manifest, cfg: PipelineConfig
) -> Report:
    """ROC and PR curves, the score histogram with the threshold, a grid of heatmap overlays (worst
    misses and false alarms first) and a per-image score table, under reports/<model_key>/."""
    import matplotlib  # noqa: PLC0415  lazy: matplotlib takes ~1 s to import and only this step plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  lazy: as above

    start = time.perf_counter()
    key = evaluation.json_path.parent.name
    data = store.read_json("evaluations", key, "evaluation.json")
    maps_file = store.fetch("evaluations", key, MAPS_FILE)
    threshold = calibrated.threshold
    with store.directory("reports", calibrated.model_key) as out:
        files = _plots(plt, out, data, threshold, calibrated.calibration["rule"])
        if cfg.heatmap_grid_size > 0:
            grid = _heatmap_grid(
                data["records"],
                load_maps(maps_file),
                threshold,
                load_manifest(manifest),
                cfg.heatmap_grid_size,
            )
            if grid is not None:
                grid.save(out / "heatmaps.png")
                files.append("heatmaps.png")
        table = [
            {k: r.get(k) for k in ("path", "split", "role", "label", "defect_type", "score")}
            | {"is_anomalous": r["score"] >= threshold}
            for r in data["records"]
        ]
        write_json(out / "scores.json", table)
        files.append("scores.json")
    folder = store.path("reports", calibrated.model_key)
    return Report(
        report_dir=str(folder), files=[str(folder / name) for name in files], seconds=time.perf_counter() - start
    )


def _plots(plt, out: Path, data: dict[str, Any], threshold: float, rule: str) -> list[str]:
    """ROC and PR (labelled test images) and the score histogram; the file names written."""
    records = data["records"]
    test = [r for r in records if r["split"] == TEST]
    files: list[str] = []
    if data["mode"] == "labelled":
        y, s = np.array([r["label"] for r in test]), np.array([r["score"] for r in test])
        fpr, tpr, _ = roc_curve(y, s)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr, tpr, lw=2, label=f"image AUROC {data['metrics']['image_auroc']:.3f}")
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (test images)")
        ax.legend(loc="lower right")
        files.append(_savefig(fig, out / "roc.png"))
        precision, recall, _ = precision_recall_curve(y, s)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(recall, precision, lw=2, label=f"F1 max {data['metrics']['f1_max']:.3f}")
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test images)", ylim=(0, 1.05))
        ax.legend(loc="lower left")
        files.append(_savefig(fig, out / "pr.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = {
        "held-out nominal": [r["score"] for r in records if r["split"] == HOLDOUT],
        "test good": [r["score"] for r in test if r["label"] == 0],
        "test defect": [r["score"] for r in test if r["label"] == 1],
    }
    all_scores = [v for vs in groups.values() for v in vs] + [threshold]
    low, high = min(all_scores), max(all_scores)
    if low > 0 and high / low > 50:  # scores spanning orders of magnitude: a log axis keeps the good ones visible
        bins = np.geomspace(low, high, 40)
        ax.set_xscale("log")
    else:
        bins = np.linspace(low, high, 30)
    for (name, values), colour in zip(groups.items(), ("tab:blue", "tab:green", "tab:red")):
        if values:
            ax.hist(
                values,
                bins=bins,
                alpha=0.5,
                color=colour,
                edgecolor=colour,
                histtype="stepfilled",
                label=f"{name} ({len(values)})",
            )
    ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.4g} ({rule})")
    ax.set(xlabel="image anomaly score", ylabel="images", title="Scores: good vs defect")
    ax.legend(fontsize=8)
    files.append(_savefig(fig, out / "score_histogram.png"))
    return files


def _savefig(fig, path: Path) -> str:
    import matplotlib.pyplot as plt  # noqa: PLC0415  lazy: see make_report

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _heatmap_grid(records: list[dict], maps: list[np.ndarray], threshold: float, manifest: dict, size: int):
    """Overlays in order of what a reviewer should see first: missed defects (lowest score first),
    false alarms (highest first), then the remaining images closest to the threshold."""
    from patchcore.viz import overlay  # noqa: PLC0415  lazy: matplotlib (colour maps) takes ~1 s to import

    indexed = list(enumerate(records))
    misses = sorted(
        (x for x in indexed if x[1]["label"] == 1 and x[1]["score"] < threshold), key=lambda x: x[1]["score"]
    )
    alarms = sorted(
        (x for x in indexed if x[1]["label"] == 0 and x[1]["score"] >= threshold), key=lambda x: -x[1]["score"]
    )
    shown = {i for i, _ in misses + alarms}
    rest = sorted((x for x in indexed if x[0] not in shown), key=lambda x: abs(x[1]["score"] - threshold))
    chosen = (misses + alarms + rest)[:size]
    if not chosen:
        return None
    vmin, vmax = heatmap_scale(records, maps, threshold)
    columns = min(4, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    side = TILE_PX  # every image fitted into the same square (aspect kept), so the captions fit and stay legible
    label_px, legend_px = 44, 44
    font, small = _font(15), _font(13)
    sheet = Image.new("RGB", (columns * side, legend_px + rows * (side + label_px)), "white")
    draw = ImageDraw.Draw(sheet)
    _legend(sheet, draw, vmin, vmax, threshold, columns * side, small)
    for n, (i, record) in enumerate(chosen):
        tile = overlay(image_path(manifest, record["path"]), maps[i].astype(np.float32), vmin, vmax)
        scale = side / max(tile.size)
        tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))), Image.BILINEAR)
        x, y = (n % columns) * side, legend_px + (n // columns) * (side + label_px)
        sheet.paste(tile, (x + (side - tile.width) // 2, y + label_px + (side - tile.height) // 2))
        flagged = record["score"] >= threshold
        verdict = (
            "MISS"
            if record["label"] == 1 and not flagged
            else "FALSE ALARM"
            if record["label"] == 0 and flagged
            else "ok"
        )
        colour = (200, 0, 0) if verdict != "ok" else "black"
        draw.text((x + 4, y + 3), f"{record['defect_type']} ({record['split']})", fill="black", font=font)
        draw.text((x + 4, y + 22), f"score {record['score']:.4g}  {verdict}", fill=colour, font=font)
    return sheet


TILE_PX = 256


def heatmap_scale(records: list[dict], maps: list[np.ndarray], threshold: float) -> tuple[float, float]:
    """One absolute colour scale for every tile, anchored at the threshold: the bottom is the typical
    held-out nominal pixel (the median of their maps), the threshold sits in the middle (green-yellow
    in 'jet'), and twice the threshold's distance from the bottom is full red. So a tile's colour says
    how far from the decision it is, not how it compares with the worst defect of the set."""
    from patchcore.viz import pixel_sample  # noqa: PLC0415  lazy: see make_report

    held = [maps[i] for i, r in enumerate(records) if r["split"] == HOLDOUT]
    low = float(np.median(pixel_sample(held or maps)))
    if not threshold > low:  # a threshold below the typical nominal pixel: fall back to the maps' spread
        return tuple(float(v) for v in np.percentile(pixel_sample(maps), [1.0, 99.9]))  # type: ignore[return-value]
    return low, threshold + (threshold - low)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _legend(sheet, draw, vmin: float, vmax: float, threshold: float, width: int, font) -> None:
    """A colour bar across the top with the scale's bottom, the threshold and the top labelled."""
    from matplotlib import colormaps  # noqa: PLC0415  lazy: see make_report

    bar = (colormaps["jet"](np.linspace(0.0, 1.0, width))[:, :3] * 255).astype(np.uint8)
    sheet.paste(Image.fromarray(np.repeat(bar[None], 12, axis=0)), (0, 24))
    mid = int(width * (threshold - vmin) / max(vmax - vmin, 1e-12))
    draw.line([(mid, 20), (mid, 40)], fill="black", width=3)
    text = f"colour: {vmin:.3g} typical good pixel | threshold {threshold:.4g} (black mark) | {vmax:.3g}+"
    draw.text((4, 3), text, fill="black", font=font)


__all__ = ["make_report"]
