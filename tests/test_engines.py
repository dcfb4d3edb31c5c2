"""The exported CPU engine (model.runtime.engine=onnxruntime): the same scores and ranking as torch,
the ONNX graph inside the saved model under its checksums, refused when altered."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_config

from patchcore import PatchCore
from patchcore.config import ConfigError, PatchCoreConfig
from patchcore.data import resolve_samples
from patchcore.engines import ONNX_FILE
from patchcore.model import ModelFileError


@pytest.mark.parametrize("mode", ["center_crop", "full_frame"])
def test_onnxruntime_scores_like_torch_and_its_graph_travels_in_the_saved_model(product, mode, tmp_path):
    settings = {"image.mode": mode}
    torch_model = PatchCore(tiny_config(**settings)).fit(product, progress=False)
    onnx_model = PatchCore(tiny_config(**settings, **{"runtime.engine": "onnxruntime"})).fit(product, progress=False)
    np.testing.assert_array_equal(onnx_model.memory_bank_, torch_model.memory_bank_)  # training extracts with torch
    test = [s.path for s in resolve_samples(product, split="test")]
    expected, got = torch_model.predict(test, progress=False), onnx_model.predict(test, progress=False)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-4)
    assert np.array_equal(np.argsort(got.scores), np.argsort(expected.scores))
    for a, b in zip(got.anomaly_maps, expected.anomaly_maps):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.max()))

    saved = onnx_model.save(tmp_path / "model")
    assert ONNX_FILE in json.loads((saved / "model.json").read_text())["files"]
    reloaded = PatchCore.load(saved)
    np.testing.assert_allclose(reloaded.predict(test, progress=False).scores, got.scores, rtol=1e-6)
    raw = bytearray((saved / ONNX_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (saved / ONNX_FILE).write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=f"{ONNX_FILE}: checksum differs"):
        PatchCore.load(saved)


def test_an_unknown_engine_is_named():
    with pytest.raises(ConfigError, match="runtime.engine must be torch or onnxruntime, got 'tensorrt'"):
        PatchCoreConfig.from_dict({"runtime": {"engine": "tensorrt"}})
