"""Score a folder with a registered model (default: the champion) from a Prefect deployment: the
same as `patchcore inspect` (scores.csv, scores.json, heatmap overlays; pipeline/inspection.py),
plus a Prefect table artifact of the scores."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from pipeline.config import load_settings
from pipeline.inspection import inspect_images
from pipeline.registry import Registry


@flow(name="inspect-images", flow_run_name="inspect-{product}", log_prints=True)
def inspect(
    product: str, images: str, out: str, alias: str = "champion", no_maps: bool = False, params_path: str | None = None
) -> dict[str, Any]:
    registry = Registry(load_settings(params_path).mlflow)
    result = inspect_images(registry, product, images, out, alias=alias, maps=not no_maps)
    print(
        f"{len(result.rows)} images scored with {result.model} v{result.version}: {result.n_anomalous} anomalous "
        f"(threshold {result.threshold:.6g}); {result.scores_csv}, {result.scores_json}"
    )
    create_table_artifact(
        list(result.rows), key=f"inspect-{product}".lower(), description=f"{result.model} v{result.version} scores"
    )
    return {
        "product": result.product,
        "model": result.model,
        "version": result.version,
        "threshold": result.threshold,
        "n_images": len(result.rows),
        "out": out,
    }
