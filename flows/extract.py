"""The extract step on a Dask cluster: a subflow of `train` that maps the planned shards over the
cluster through Prefect's DaskTaskRunner (tasks/cluster.py picks the scheduler). Each shard's
task writes its images' features into the store; the subflow returns the same FeatureSet the
in-process extraction does, and the features are bit-identical.
"""

from __future__ import annotations

import time

from prefect import flow

from pipeline import steps
from pipeline.config import Params
from pipeline.results import ExtractionPlan, FeatureSet
from pipeline.store import Store
from tasks import cluster
from tasks import training as t


@flow(name="extract-features", flow_run_name="extract-{plan.identity}", log_prints=True)
def extract_shards(store: Store, plan: ExtractionPlan, settings: Params) -> FeatureSet:
    start = time.perf_counter()
    with cluster.shard_resources(settings.cluster):
        futures = [
            t.extract_shard.submit(
                store, plan.identity, shard, f"{len(shard)} images from {shard[0][0][:8]}", plan.threads, settings
            )
            for shard in plan.shards
        ]
    written = sum(future.result() for future in futures)
    where = cluster.describe_cluster(settings.cluster)
    print(f"{written} image(s) extracted in {len(plan.shards)} shard(s) on {where}")
    return steps.feature_set(plan, written, time.perf_counter() - start)


def extract_on_cluster(store: Store, plan: ExtractionPlan, settings: Params) -> FeatureSet:
    """Run the subflow with the task runner of settings.cluster."""
    return extract_shards.with_options(task_runner=cluster.task_runner(settings.cluster))(store, plan, settings)


__all__ = ["extract_on_cluster", "extract_shards"]
