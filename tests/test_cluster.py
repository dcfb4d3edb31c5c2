"""The extract step on a Dask cluster (cluster.extract: dask; tasks/cluster.py, flows/extract.py):
the same features, bank and scores as in-process extraction, bit for bit."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PARAMS, pipeline_home, tiny_overrides, tree_digests

from patchcore.synthetic import generate_product

pytestmark = pytest.mark.slow


def test_dask_extraction_gives_the_bank_and_scores_of_in_process_extraction(tmp_path):
    from flows.train import train

    data = generate_product(tmp_path / "data", "tiles", n_train=20, n_test_good=3, n_test_defect=3, size_px=112, seed=3)
    # wide_resnet50_2: its CPU kernels round differently with 1 and 2 threads (resnet18's at these sizes
    # do not), so the Dask workers (1 thread by Dask's default) must run the plan's thread count
    common = tiny_overrides() | {
        "cluster.shard_images": 8,
        "model.backbone.name": "wide_resnet50_2",
        "model.image.resize": 112,
        "model.image.crop": 112,
        "model.features.pretrain_dim": 512,
        "model.features.target_dim": 512,
        "model.runtime.num_workers": 2,  # the default: a Dask worker (a daemon process) decodes in-process instead
    }
    with pipeline_home(tmp_path):
        local = train("tiles", str(data), PARAMS, common | {"pipeline.store": str(tmp_path / "local")})
        dask = train(
            "tiles",
            str(data),
            PARAMS,
            common | {"pipeline.store": str(tmp_path / "dask"), "cluster.extract": "dask", "cluster.local_workers": 2},
        )
    assert dask["features"]["n_extracted"] == local["features"]["n_extracted"] == local["features"]["n_images"]
    features_local = tree_digests(tmp_path / "local" / "features")
    assert len([k for k in features_local if k.endswith(".npy")]) == local["features"]["n_images"]
    assert tree_digests(tmp_path / "dask" / "features") == features_local  # every feature file, byte for byte
    banks_local, banks_dask = (tree_digests(tmp_path / s / "banks") for s in ("local", "dask"))
    assert banks_dask == banks_local
    assert dask["metrics"] == local["metrics"]
    assert dask["registry"]["unchanged"]  # the second training found the first's identical version


def test_with_gpu_resource_every_shard_runs_on_a_worker_that_offers_a_gpu(tmp_path):
    """cluster.gpu_resource: each shard asks for one GPU worker resource, so only the worker started
    with `--resources GPU=1` runs shards (here without a real GPU: the shard falls back to the CPU)."""
    from distributed import Client, LocalCluster

    from flows.train import train

    data = generate_product(tmp_path / "data", "tiles", n_train=14, n_test_good=2, n_test_defect=2, size_px=112, seed=4)
    dask = str(Path(sys.executable).parent / "dask")
    workers = []
    with LocalCluster(n_workers=0, processes=True, host="127.0.0.1", dashboard_address=":0") as cluster:
        try:
            with pipeline_home(tmp_path):
                from prefect.settings import PREFECT_API_URL

                env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}
                for name, extra in (("gpu", ["--resources", "GPU=1"]), ("cpu", [])):
                    argv = [dask, "worker", cluster.scheduler_address, "--name", name, "--nthreads", "1"]
                    argv += ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0", *extra]
                    workers.append(
                        subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    )
                with Client(cluster.scheduler_address) as client:
                    client.wait_for_workers(2, timeout=90)
                    settings = {
                        "cluster.shard_images": 4,
                        "cluster.dask_address": cluster.scheduler_address,
                        "cluster.gpu_resource": True,
                        "model.runtime.batch_size": 4,
                    }
                    result = train("tiles", str(data), PARAMS, tiny_overrides() | settings)
                    executed = dict(
                        client.run(lambda dask_worker: (dask_worker.name, dask_worker.state.executed_count)).values()
                    )
            n = result["features"]["n_images"]
            assert result["features"]["n_extracted"] == n > 8  # three shards or more
            assert executed == {"cpu": 0, "gpu": math.ceil(n / 4)}  # every shard, and only shards, on the GPU worker
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
