"""Score a folder with a registered model (default: the champion) from a Prefect deployment: the
same as `patchcore inspect` (scores.csv, scores.json, heatmap overlays), plus a Prefect artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact


@flow(name="inspect-images", flow_run_name="inspect-{product}", log_prints=True)
def inspect(product: str, images: str, out: str, alias: str = "champion", no_maps: bool = False,
            params_path: str | None = None) -> dict[str, Any]:
    from pipeline.cli import main

    argv = ["inspect", "--product", product, "--images", images, "--out", out, "--alias", alias]
    argv += (["--no-maps"] if no_maps else []) + (["--params", params_path] if params_path else [])
    status = main(argv)
    if status != 0:
        raise RuntimeError(f"patchcore {' '.join(argv)} exited with status {status}")
    result = json.loads((Path(out) / "scores.json").read_text())
    create_table_artifact(result["images"], key=f"inspect-{product}".lower(),
                          description=f"{result['model']} v{result['version']} scores")
    return {k: result[k] for k in ("product", "model", "version", "threshold")} | {"n_images": len(result["images"]),
                                                                                  "out": out}
