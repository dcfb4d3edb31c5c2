"""Scoring engines for the feature extractor (`model.runtime.engine`).

`torch` (default) runs the backbone and the patch aggregation in PyTorch. `onnxruntime` runs the
same computation (backbone up to the last used layer + the locally aware patch aggregation, one
graph) exported to ONNX, on a CPU through ONNX Runtime, for line PCs where that is the supported
runtime (on the 2-core test machine it scored within 3e-6 of torch but was not faster than torch,
which already folds BatchNorm and runs channels-last: bench/README.md). The memory bank, the
nearest-neighbour search, the image score and the maps are the same code for both engines.
Training always extracts with torch (the feature cache holds torch's features); the engine scores
(predict, evaluate, inspect, the served model).

The exported graph travels inside the saved model (`extractor.onnx`, covered by model.json's
checksums like every other file). It is checked at export: its patch features must match torch's
on a probe batch, else the export is refused.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from patchcore.errors import EngineError, ModelFileError
from patchcore.features import layer_maps, patch_features

logger = logging.getLogger(__name__)

ONNX_FILE = "extractor.onnx"
EXPORT_TOLERANCE = 1e-4  # max |onnx - torch| / max |torch| over a probe batch's patch features


def _onnxruntime():
    try:
        import onnxruntime  # noqa: PLC0415  lazy: only the onnxruntime engine needs it (~0.3 s)
    except ImportError:
        raise EngineError(
            "model.runtime.engine=onnxruntime needs the onnxruntime package: pip install onnxruntime "
            "(or set model.runtime.engine: torch)"
        ) from None
    return onnxruntime


class _Extractor(torch.nn.Module):
    """Backbone layers + patch aggregation as one module, the aggregation's maps held as constants."""

    def __init__(self, extractor: torch.nn.Module, features, channels: tuple[int, ...]):
        super().__init__()
        self.extractor, self.features = extractor, features
        self.maps = layer_maps(channels, features.patch_size, features.pretrain_dim, features.target_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.features
        return patch_features(self.extractor(images), f.patch_size, f.pretrain_dim, f.target_dim, maps=self.maps)


def export_onnx(extractor: torch.nn.Module, features, probe: torch.Tensor, fixed_size: bool) -> bytes:
    """The ONNX graph (bytes) of `extractor` + patch aggregation, on the CPU, with a dynamic batch
    (and dynamic height/width unless `fixed_size`: center_crop inputs all have the crop's size).
    `probe`: a (B, 3, H, W) example input; the export is refused if its features differ from torch's."""
    module = copy.deepcopy(extractor).to("cpu", memory_format=torch.contiguous_format).eval()
    probe = probe.to("cpu").contiguous()
    with torch.no_grad():
        channels = tuple(int(f.shape[1]) for f in module(probe))
        wrapped = _Extractor(module, features, channels).eval()
        expected = wrapped(probe)
    dims = {0: torch.export.Dim("batch", min=1, max=4096)}
    if not fixed_size:
        dims |= {2: torch.export.Dim("height", min=32, max=8192), 3: torch.export.Dim("width", min=32, max=8192)}
    with tempfile.TemporaryDirectory(prefix="patchcore-onnx-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / ONNX_FILE
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            torch.onnx.export(
                wrapped,
                (probe,),
                str(path),
                input_names=["images"],
                output_names=["patches"],
                dynamic_shapes={"images": dims},
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        finally:
            quiet.setLevel(level)
        data = path.read_bytes()
    got = OnnxEngine(data)(probe)
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if not error <= EXPORT_TOLERANCE:
        raise EngineError(f"the ONNX export differs from torch by {error:.2e} (relative; at most {EXPORT_TOLERANCE})")
    logger.info(
        "exported the feature extractor to ONNX (%.1f MB, max relative difference %.1e)", len(data) / 1e6, error
    )
    return data


class OnnxEngine:
    """(B, 3, H, W) float32 images -> (B, h, w, target_dim) patch features, through ONNX Runtime (CPU)."""

    def __init__(self, model: bytes | str | Path, threads: int | None = None):
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads() or os.cpu_count() or 1
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            where = "the exported graph" if isinstance(model, bytes) else str(model)
            raise ModelFileError(f"{where}: not a loadable ONNX feature extractor ({exc})") from None
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.detach().to("cpu", dtype=torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {self.input: batch})[0])


__all__ = ["EXPORT_TOLERANCE", "EngineError", "ONNX_FILE", "OnnxEngine", "export_onnx"]
