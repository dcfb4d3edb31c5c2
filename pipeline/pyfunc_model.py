"""The serving code of a registered PatchCore model: an `mlflow.pyfunc` model whose only artifact
is a saved PatchCore directory (`patchcore_model`: memory_bank.npy, index.faiss, model.json with
the threshold and provenance).

It is logged as "models from code": MLflow stores this file's source and runs it when the model is
loaded; the PatchCore directory is read by `PatchCore.load` (numpy with allow_pickle=False, a faiss
index, JSON), so loading a registered model never unpickles anything. The `patchcore` package is
bundled with the model (`code/patchcore`), so a serving machine needs only the pip requirements
recorded beside it.

Input: a pandas DataFrame, one row per image, with one of two columns filled per row:
  - `image`: encoded image bytes (PNG, JPEG, BMP, TIFF, WebP: anything Pillow decodes);
  - `path`:  the path of an image file readable by the serving process.
uint8 arrays (H×W, H×W×1, H×W×3 or H×W×4) go through `to_model_input(...)`, which encodes them as
PNG bytes; it also accepts paths and bytes.
Params: `return_maps` (bool, default false) adds the anomaly map of each image.
Output: a DataFrame with `score` (float), `is_anomalous` (score >= threshold), `threshold`, and with
return_maps an `anomaly_map` column (crop×crop float32 arrays).

Backbone weights are rebuilt on load from the identity in model.json: `random` from its seed,
`imagenet` from the torchvision/timm cache of the serving machine, a weights file from
PATCHCORE_WEIGHTS (its sha256 must equal the recorded one).

Imports only mlflow, numpy, pandas, Pillow and patchcore: never the pipeline, Prefect or DVC.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

ARTIFACT_KEY = "patchcore_model"


class PatchCorePyfunc(mlflow.pyfunc.PythonModel):
    """Scores images with the PatchCore directory given as the `patchcore_model` artifact."""

    def load_context(self, context) -> None:
        # Imported here, not at the top: MLflow puts the bundled `patchcore` package (code_paths) on
        # sys.path only when it loads this model.
        from patchcore import PatchCore  # noqa: PLC0415
        from patchcore.config import env_weights  # noqa: PLC0415

        self.model = PatchCore.load(context.artifacts[ARTIFACT_KEY], weights=env_weights())
        if self.model.threshold_ is None:
            raise ValueError(
                f"{context.artifacts[ARTIFACT_KEY]}: the saved model has no threshold; register only calibrated models"
            )

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return_maps = bool((params or {}).get("return_maps", False))
        images = _decode(model_input)
        predictions = self.model.predict(images, maps=return_maps, progress=False)
        out = pd.DataFrame(
            {
                "score": predictions.scores.astype(np.float64),
                "is_anomalous": predictions.scores >= self.model.threshold_,
                "threshold": np.full(len(images), self.model.threshold_, dtype=np.float64),
            }
        )
        if return_maps:
            out["anomaly_map"] = list(predictions.anomaly_maps)
        return out


def _decode(model_input: Any) -> list:
    """Rows of `image` bytes / `path` strings -> decoded RGB images and paths for PatchCore.predict."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise TypeError(
            "model input must be a DataFrame with an `image` (encoded bytes) or `path` column; "
            "use pipeline.pyfunc_model.to_model_input(...) to build one from arrays"
        )
    if len(model_input) == 0:
        raise ValueError("model input has no rows")
    images: list = []
    for i, row in enumerate(model_input.to_dict("records")):
        data, path = row.get("image"), row.get("path")
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data):
            try:
                with Image.open(io.BytesIO(bytes(data))) as image:
                    image.load()
                    images.append(image.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as exc:
                raise ValueError(f"row {i}: `image` bytes are not a decodable image ({exc})") from None
        elif isinstance(path, str) and path:
            images.append(Path(path))
        else:
            raise ValueError(f"row {i}: give encoded bytes in `image` or a file path in `path`")
    return images


def to_model_input(images) -> pd.DataFrame:
    """uint8 arrays, encoded bytes or paths -> the DataFrame the model takes (arrays become PNG)."""
    rows = []
    for item in images:
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8:
                raise ValueError(f"arrays must be uint8, got {item.dtype}")
            buffer = io.BytesIO()
            Image.fromarray(item.squeeze(-1) if item.ndim == 3 and item.shape[2] == 1 else item).save(
                buffer, format="PNG"
            )
            rows.append({"image": buffer.getvalue(), "path": None})
        elif isinstance(item, (bytes, bytearray)):
            rows.append({"image": bytes(item), "path": None})
        elif isinstance(item, (str, os.PathLike)):
            rows.append({"image": None, "path": str(item)})
        else:
            raise TypeError(f"cannot send {type(item).__name__} to the model: use uint8 arrays, bytes or paths")
    return pd.DataFrame(rows, columns=["image", "path"])


mlflow.models.set_model(PatchCorePyfunc())
