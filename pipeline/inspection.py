"""Score a folder of images with a registered model version: scores.csv, scores.json and heatmap
overlays in one output folder. What `patchcore inspect` (apps/commands.py) and the Prefect flow
`inspect-images` (flows/inspect.py) both run.

    out/scores.csv       path, score, is_anomalous, threshold (one row per image)
    out/scores.json      the same rows with the product, model, version, alias, tracking URI and
                         threshold rule
    out/heatmaps/*.png   anomaly map overlays (unless maps=False)

No Prefect here.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchcore import PatchCore
from pipeline.io import write_json
from pipeline.registry import CHAMPION, Registry

CSV_COLUMNS = ("path", "score", "is_anomalous", "threshold")


@dataclass(frozen=True)
class Inspection:
    """What an inspection scored and where it wrote it."""

    product: str
    model: str  # registered model name, e.g. patchcore-tiles
    version: str
    alias: str | None  # the alias it was asked for (None when a version number was)
    tracking_uri: str
    threshold: float
    threshold_rule: str | None
    rows: tuple[dict[str, Any], ...]  # {path, score, is_anomalous, threshold} per image, input order
    scores_csv: Path
    scores_json: Path
    heatmaps: tuple[Path, ...]  # empty with maps=False

    @property
    def n_anomalous(self) -> int:
        return sum(row["is_anomalous"] for row in self.rows)


def inspect_images(
    registry: Registry,
    product: str,
    images: str | Path,
    out: str | Path,
    *,
    alias: str | None = None,
    version: str | int | None = None,
    maps: bool = True,
    progress: bool = True,
) -> Inspection:
    """Score `images` (a folder, searched recursively, an MVTec test/ folder or a text file of
    paths) with the product's version `version`, else the one behind `alias` (default champion),
    and write the scores and heatmaps under `out`. Registry errors (unknown product, no such alias)
    and data errors propagate. progress: a tqdm bar on stderr."""
    alias = alias or (CHAMPION if version is None else None)
    found = registry.version(product, alias, version)
    model = PatchCore.load(registry.download(product, found.version))
    predictions = model.predict(images, maps=maps, progress=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threshold = model.threshold_
    rows = tuple(
        {"path": str(item), "score": float(score), "is_anomalous": bool(score >= threshold), "threshold": threshold}
        for item, score in zip(predictions.items, predictions.scores, strict=True)
    )
    scores_csv, scores_json = out / "scores.csv", out / "scores.json"
    with open(scores_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    name, rule = registry.model_name(product), model.calibration_.get("rule")
    write_json(
        scores_json,
        {
            "product": product,
            "model": name,
            "version": str(found.version),
            "alias": alias,
            "tracking_uri": registry.uri,
            "threshold": threshold,
            "threshold_rule": rule,
            "images": list(rows),
        },
    )
    heatmaps: list[Path] = []
    if maps:
        from patchcore.viz import write_overlays  # noqa: PLC0415  # lazy: matplotlib, only when heatmaps are drawn

        heatmaps = write_overlays(predictions.items, predictions.anomaly_maps, out / "heatmaps")
    return Inspection(
        product=product,
        model=name,
        version=str(found.version),
        alias=alias,
        tracking_uri=registry.uri,
        threshold=threshold,
        threshold_rule=rule,
        rows=rows,
        scores_csv=scores_csv,
        scores_json=scores_json,
        heatmaps=tuple(heatmaps),
    )
