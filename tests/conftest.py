"""Shared fixtures: a small synthetic product and a tiny fitted model (resnet18, random weights,
small images), so the default suite stays fast on a 2-core CPU."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import warnings
from pathlib import Path

# Before any test module imports Prefect or MLflow: a private Prefect home and no telemetry.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
for _key, _value in (
    ("DO_NOT_TRACK", "true"),
    ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
    ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"),
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
    ("HF_HUB_OFFLINE", "1"),
):
    os.environ.setdefault(_key, _value)

import pytest

from patchcore import PatchCore, PatchCoreConfig
from patchcore.synthetic import generate_product

REPO = Path(__file__).resolve().parents[1]
MTD = REPO.parent / "shared" / "datasets" / "mtd"
SHARED_WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet_tflite_quant.pth"


def tiny_config(**overrides) -> PatchCoreConfig:
    """resnet18, random weights (explicit), 96 px crops: ~10 ms per image on CPU."""
    base = PatchCoreConfig.from_dict(
        {
            "backbone": {"name": "resnet18", "weights": "random"},
            "image": {"resize": 112, "crop": 96},
            "features": {"pretrain_dim": 256, "target_dim": 256},
            "coreset": {"fraction": 0.25},
            "runtime": {"num_workers": 0, "batch_size": 8, "device": "cpu"},
        }
    )
    return base.replace(**overrides) if overrides else base


PARAMS = str(REPO / "params.yaml")


def free_port() -> int:
    """A free TCP port on the loopback interface (for the servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides() -> dict:
    """tiny_config() as the dotted `model.*` overrides that the pipeline's settings take."""
    return {
        f"model.{section}.{key}": value
        for section, values in tiny_config().to_dict().items()
        for key, value in values.items()
    }


@contextlib.contextmanager
def pipeline_home(root: Path):
    """A private PATCHCORE_HOME (MLflow store, caches) under `root`, no inherited tracking URI or
    weights, and a Prefect test server, for as long as the context lasts."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        mp.setenv("PATCHCORE_HOME", str(root / "home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("PATCHCORE_WEIGHTS", raising=False)
        with prefect_test_harness(server_startup_timeout=90):
            yield


@pytest.fixture(scope="session")
def product(tmp_path_factory) -> Path:
    return generate_product(
        tmp_path_factory.mktemp("data"), "tiles", n_train=24, n_test_good=8, n_test_defect=6, size_px=112, seed=0
    )


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


def wait_for(what: str, check, timeout: float, logs: list[Path], interval: float = 1.0):
    """check() until it returns something truthy (returned), or fail after `timeout` seconds with the
    end of each log in `logs`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    tails = "\n".join(
        f"--- {p.name} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]) for p in logs if p.is_file()
    )
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def tree_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path; a saved model's model.json without its
    timings (they differ from run to run)."""
    import hashlib
    import json

    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "model.json":
            data = json.dumps({k: v for k, v in json.loads(data).items() if k != "timings"}, sort_keys=True).encode()
        out[path.relative_to(folder).as_posix()] = hashlib.sha256(data).hexdigest()
    return out
