"""The Dask side of the extract step: the Prefect task runner of `cluster:` (params.yaml).

    cluster.dask_address (or env PATCHCORE_DASK_ADDRESS) -> DaskTaskRunner(address=...): a running
        `dask scheduler` and its `dask worker`s, on this machine or others (README "Scaling out")
    none (cluster.extract: dask)  -> a temporary LocalCluster of cluster.local_workers processes
        on 127.0.0.1, for this flow run only

The workers run the `extract shard` task; they report to the same Prefect API as the flow.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import dask
from prefect.settings import PREFECT_API_URL
from prefect_dask import DaskTaskRunner

from pipeline.config import ClusterConfig

GPU_RESOURCE = "GPU"


def describe_cluster(cfg: ClusterConfig) -> str:
    address = cfg.scheduler()
    return f"scheduler {address}" if address else f"a temporary LocalCluster of {cfg.local_workers} workers"


# What deploy/dask/patchcore.yaml sets for external workers: Dask's default MALLOC_TRIM_THRESHOLD_
# (65536) turns off glibc's adaptive mmap threshold and made the backbone 1.6x slower in a worker.
WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def task_runner(cfg: ClusterConfig) -> DaskTaskRunner:
    """The DaskTaskRunner the extraction subflow runs its shards with."""
    address = cfg.scheduler()
    if address:
        return DaskTaskRunner(address=address)
    dask.config.set(WORKER_CONFIG)  # read when the LocalCluster's nannies spawn their workers
    env = {key: value for key, value in os.environ.items() if key.startswith(("PREFECT_", "PATCHCORE_", "AWS_"))}
    api = PREFECT_API_URL.value()
    if api:  # the workers report to the flow's API (otherwise each would start a temporary server)
        env["PREFECT_API_URL"] = api
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": cfg.local_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": ":0",
            "env": env,
        }
    )


@contextlib.contextmanager
def shard_resources(cfg: ClusterConfig) -> Iterator[None]:
    """Tasks submitted inside ask for one GPU worker resource when cluster.gpu_resource is set."""
    if cfg.gpu_resource:
        with dask.annotate(resources={GPU_RESOURCE: 1}):
            yield
    else:
        yield


__all__ = ["GPU_RESOURCE", "WORKER_CONFIG", "describe_cluster", "shard_resources", "task_runner"]
