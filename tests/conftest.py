"""Shared fixtures: a small synthetic product and a tiny fitted model (resnet18, random weights,
small images), so the default suite stays fast on a 2-core CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from patchcore import PatchCore, PatchCoreConfig
from patchcore.synthetic import generate_product

REPO = Path(__file__).resolve().parents[1]
MTD = REPO.parent / "shared" / "datasets" / "mtd"
SHARED_WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet_tflite_quant.pth"


def tiny_config(**overrides) -> PatchCoreConfig:
    """resnet18, random weights (explicit), 96 px crops: ~10 ms per image on CPU."""
    base = PatchCoreConfig.from_dict({
        "backbone": {"name": "resnet18", "weights": "random"},
        "image": {"resize": 112, "crop": 96},
        "features": {"pretrain_dim": 256, "target_dim": 256},
        "coreset": {"fraction": 0.25},
        "runtime": {"num_workers": 0, "batch_size": 8, "device": "cpu"},
    })
    return base.replace(**overrides) if overrides else base


@pytest.fixture(scope="session")
def product(tmp_path_factory) -> Path:
    return generate_product(tmp_path_factory.mktemp("data"), "tiles", n_train=24, n_test_good=8,
                            n_test_defect=6, size_px=112, seed=0)


@pytest.fixture(scope="session")
def fitted(product) -> PatchCore:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-weights warning, tested on its own
        return PatchCore(tiny_config()).fit(product, progress=False)


@pytest.fixture(autouse=True)
def _quiet_random_weights_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        yield
