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
  - `path`:  the path of an image file on the serving machine: off unless PATCHCORE_SERVE_PATH_ROOTS
             names the folders it may come from (regular files inside them only).
Limits (DEFAULT_LIMITS; the registered model carries the project's validation limits): rows per
request, encoded bytes per image, pixels and side length checked from the header before decoding,
a smallest side. A row that breaks one is refused with a message naming the row (HTTP 400).
uint8 arrays (H×W, H×W×1, H×W×3 or H×W×4) go through `to_model_input(...)`, which encodes them as
PNG bytes; it also accepts paths and bytes.
Params: `return_maps` (bool, default false) adds the anomaly map of each image.
Output: a DataFrame with `score` (float), `is_anomalous` (score >= threshold), `threshold`, and with
return_maps an `anomaly_map` column (float32 arrays of each image's own height x width: image coordinates).

Backbone weights are rebuilt on load from the identity in model.json: `random` from its seed,
`imagenet` from the torchvision/timm cache of the serving machine, a weights file from
PATCHCORE_WEIGHTS (its sha256 must equal the recorded one).

Imports only mlflow, numpy, pandas, Pillow and patchcore: never the pipeline, Prefect or DVC.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

ARTIFACT_KEY = "patchcore_model"


# What one request may hold (the same image limits as training's validation, params.yaml
# `validation:`; recorded in the logged model's config at registration, defaults here). Images are
# decoded one at a time and scored in batches of the model's batch size, so a request never holds
# more than one batch of decoded images.
DEFAULT_LIMITS = {
    "max_rows": 64,  # rows per request
    "max_image_bytes": 20_000_000,  # encoded bytes per image
    "max_pixels": 40_000_000,  # width x height, checked from the header before decoding
    "max_side_px": 10_000,
    "min_side_px": 16,  # smaller images carry no patch the backbone can use; refused, not called anomalous
}
# On a model server, `path` inputs are off unless the serving machine names the folders they may come
# from (os.pathsep-separated); then only regular files inside them, after resolving `..` and links.
# A Python caller that loads the model in its own process (mlflow.pyfunc.load_model) reads its own
# files, so there any path goes unless the variable restricts it.
PATH_ROOTS_ENV = "PATCHCORE_SERVE_PATH_ROOTS"
SERVING_ENVS = ("PATCHCORE_SERVING", "_MLFLOW_IS_IN_SERVING_ENVIRONMENT")  # ours (deploy/model_server.py), MLflow's


class RequestError(ValueError):
    """A row of the request that cannot be scored; the message names the row and the problem."""


class PatchCorePyfunc(mlflow.pyfunc.PythonModel):
    """Scores images with the PatchCore directory given as the `patchcore_model` artifact."""

    def load_context(self, context) -> None:
        # Imported here, not at the top: MLflow puts the bundled `patchcore` package (code_paths) on
        # sys.path only when it loads this model.
        from patchcore import PatchCore  # noqa: PLC0415
        from patchcore.config import env_weights  # noqa: PLC0415

        config = context.model_config or {}
        # The digest recorded at registration: a model.json edited since (a threshold of 1e9 ...) is refused.
        self.model = PatchCore.load(
            context.artifacts[ARTIFACT_KEY], weights=env_weights(), digest=config.get("model_sha256")
        )
        if self.model.threshold_ is None:
            raise ValueError(
                f"{context.artifacts[ARTIFACT_KEY]}: the saved model has no threshold; register only calibrated models"
            )
        self.limits = DEFAULT_LIMITS | {k: v for k, v in config.items() if k in DEFAULT_LIMITS}

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return self._predict(model_input, bool((params or {}).get("return_maps", False)))
        except RequestError as exc:  # a 400 with our one-line message (deploy/model_server.py keeps only it)
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    def _predict(self, model_input, return_maps: bool) -> pd.DataFrame:
        rows = _rows(model_input, self.limits["max_rows"])
        batch = max(1, self.model.config.runtime.batch_size)
        scores, maps = [], []
        roots = path_roots()
        for start in range(0, len(rows), batch):  # decode one batch at a time, then score it
            images = [
                decode_row(i, row, self.limits, roots) for i, row in enumerate(rows[start : start + batch], start)
            ]
            predictions = self.model.predict(images, maps=return_maps, progress=False)
            scores.append(predictions.scores.astype(np.float64))
            if return_maps:
                maps += list(predictions.anomaly_maps)
        score = np.concatenate(scores)
        out = pd.DataFrame(
            {
                "score": score,
                "is_anomalous": score >= self.model.threshold_,
                "threshold": np.full(len(score), self.model.threshold_, dtype=np.float64),
            }
        )
        if return_maps:
            out["anomaly_map"] = maps
        return out


def path_roots() -> list[Path] | None:
    """The folders `path` inputs may come from (PATCHCORE_SERVE_PATH_ROOTS), resolved; [] = paths off
    (a model server without the variable); None = any readable file (the model loaded in the
    caller's own process, without the variable)."""
    roots = [Path(p).resolve() for p in os.environ.get(PATH_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    if roots:
        return roots
    return [] if any(os.environ.get(name, "").lower() in ("1", "true") for name in SERVING_ENVS) else None


def _rows(model_input: Any, max_rows: int) -> list[dict[str, Any]]:
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise RequestError(
            "model input must be a DataFrame with an `image` (encoded bytes) or `path` column; "
            "use pipeline.pyfunc_model.to_model_input(...) to build one from arrays"
        )
    if len(model_input) == 0:
        raise RequestError("model input has no rows")
    if len(model_input) > max_rows:
        raise RequestError(f"{len(model_input)} rows in one request; at most {max_rows}: send smaller batches")
    return model_input.to_dict("records")


def decode_row(i: int, row: dict[str, Any], limits: dict[str, int], roots: list[Path] | None) -> Image.Image:
    """One row's image, checked against the limits from its header before it is decoded."""
    data, path = row.get("image"), row.get("path")
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data):
        if len(data) > limits["max_image_bytes"]:
            raise RequestError(f"row {i}: {len(data)} bytes; at most {limits['max_image_bytes']} per image")
        return _open_checked(i, io.BytesIO(bytes(data)), limits)
    if isinstance(path, str) and path:
        if roots is not None and not roots:
            raise RequestError(f"row {i}: `path` inputs are off on this server; send the image bytes in `image`")
        return _open_checked(i, io.BytesIO(_read_under(i, path, roots, limits["max_image_bytes"])), limits)
    raise RequestError(f"row {i}: give encoded bytes in `image`" + (" or a file path in `path`" if roots != [] else ""))


def _read_under(i: int, path: str, roots: list[Path] | None, max_bytes: int) -> bytes:
    """A regular file's bytes, only when its resolved path lies under one of `roots`. The same
    answer for a missing file and one outside the roots (no probing of what exists), and no
    blocking on FIFOs or devices (the type is checked before the file is opened)."""
    refused = RequestError(f"row {i}: `path` is not a readable image file under the allowed folders")
    try:
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        raise refused from None
    if roots is not None and not any(resolved.is_relative_to(root) for root in roots):
        raise refused
    try:
        info = os.stat(resolved)
        if not stat.S_ISREG(info.st_mode):
            raise refused
        if info.st_size > max_bytes:
            raise RequestError(f"row {i}: {info.st_size} bytes; at most {max_bytes} per image")
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            return handle.read(max_bytes + 1)[:max_bytes]
    except OSError:
        raise refused from None


def _open_checked(i: int, stream: io.BytesIO, limits: dict[str, int]) -> Image.Image:
    from patchcore.data import DataError, to_rgb  # noqa: PLC0415  (the code path logged with the model)

    try:
        with Image.open(stream) as image:  # reads the header only
            width, height = image.size
            if width * height > limits["max_pixels"] or max(width, height) > limits["max_side_px"]:
                raise RequestError(
                    f"row {i}: {width}x{height} px; at most {limits['max_pixels']} pixels and "
                    f"{limits['max_side_px']} px a side (it is not decoded)"
                )
            if min(width, height) < limits["min_side_px"]:
                raise RequestError(
                    f"row {i}: {width}x{height} px; images need at least {limits['min_side_px']} px a side"
                )
            image.load()
            return to_rgb(image)  # the library's one decode: orientation, 16-bit, modes
    except RequestError:
        raise
    except DataError as exc:  # decodable, but not as an image the model can take (e.g. out-of-range 32-bit)
        raise RequestError(f"row {i}: {exc}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise RequestError(f"row {i}: `image` bytes are not a decodable image ({type(exc).__name__})") from None


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
