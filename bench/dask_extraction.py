"""The extract step in one process against the same step mapped over a Dask cluster (cluster.extract:
dask), on the same images, in one run.

    single   pipeline.steps.extract_planned: every shard one after the other in this process (torch
             uses all cores)
    dask     flows/extract.py through Prefect's DaskTaskRunner on a LocalCluster of --workers
             processes (1 thread each), the product's path, twice: on fresh worker processes (they
             import the pipeline and build the backbone) and on the same, warm ones (a long-running
             cluster such as `make stack`'s); the cluster's start-up is timed apart
    one      the product's path again, all shards on one of those workers (the other idle), and the
             same shards through a plain Dask client, each timed inside the worker: the per-shard
             cost of a worker that has its machine to itself, and what Prefect adds

Each run writes into its own empty store, and the features of all three are compared byte for byte.
Every shard runs the plan's CPU thread count (cluster.extract_threads: this machine's cores), so on
one machine the Dask workers share its cores. From the per-shard cost of a worker alone and the
overhead (the product's path on one worker alone, minus its shards' own time) it projects the
wall time on N machines with one worker each: overhead + ceil(shards / N) * shard time. A GPU worker's
shard time is not measured here (bench/gpu.sh measures extraction img/s on a GPU): the projection
is the CPU figure, and the formula holds with the GPU's shard time put in.

    python bench/dask_extraction.py [--images 96] [--workers 2] [--backbone wide_resnet50_2]
        -> bench/results/dask_extraction_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
MTD = REPO.parent / "shared" / "datasets" / "mtd"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.npy"))}


def _timed_shard(store_url: str, identity: str, shard: list, config_dict: dict, threads: int) -> dict:
    """Runs inside a Dask worker: one shard, timed there."""
    import socket as _socket

    from patchcore.config import PatchCoreConfig
    from pipeline import steps
    from pipeline.store import Store

    start = time.perf_counter()
    n = steps.extract_shard(Store(store_url), identity, shard, PatchCoreConfig.from_dict(config_dict), threads=threads)
    return {"seconds": time.perf_counter() - start, "images": n, "worker": f"{_socket.gethostname()}:{os.getpid()}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-images", type=int, default=16)
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--size", type=int, default=256, help="resize; the crop is 7/8 of it")
    parser.add_argument("--out", default=str(RESULTS / "dask_extraction_cpu.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-bench-"))
    for key, value in (("DO_NOT_TRACK", "true"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false")):
        os.environ.setdefault(key, value)

    import dask
    import torch
    from distributed import Client, LocalCluster
    from prefect import flow
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.extract import extract_on_cluster
    from patchcore.synthetic import generate_product
    from pipeline import steps
    from pipeline.config import Params, with_overrides
    from pipeline.store import Store
    from tasks.cluster import WORKER_CONFIG

    work = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    os.environ["PATCHCORE_HOME"] = str(work / "home")
    if (MTD / "split.json").is_file():
        split = json.loads((MTD / "split.json").read_text())
        step = max(1, len(split["train"]) // args.images)
        source = [MTD / p for p in split["train"][::step][: args.images]]
        data = work / "data" / "mtd"
        (data / "train" / "good").mkdir(parents=True)
        for i, path in enumerate(source):
            shutil.copy(path, data / "train" / "good" / f"{i:04d}{path.suffix}")
        data_name = f"Magnetic Tile Defects, {len(source)} training images (every {step}th)"
    else:
        data = generate_product(work / "data", "synthetic", n_train=args.images, n_test_good=2, n_test_defect=2)
        data_name = f"synthetic, {args.images} training images"
    crop = args.size * 7 // 8 // 16 * 16
    base = with_overrides(
        Params(),
        {
            "model.backbone.name": args.backbone,
            "model.backbone.weights": "random",
            "model.image.resize": args.size,
            "model.image.crop": crop,
            "model.runtime.num_workers": 0,
            "model.runtime.device": "cpu",
            "pipeline.holdout_fraction": 0.01,
            "cluster.shard_images": args.shard_images,
            "cluster.extract": "dask",
        },
    )

    def planned(store_dir: Path):
        settings = with_overrides(base, {"pipeline.store": str(store_dir)})
        store = Store.from_settings(settings)
        manifest = steps.fingerprint_dataset(store, data, "bench")
        division = steps.split_dataset(store, manifest, settings.pipeline)
        return settings, store, steps.plan_extraction(store, manifest, division, settings.model, args.shard_images)

    results: dict = {
        "what": "the extract step: one process vs the shards mapped over a Dask LocalCluster, same images",
        "data": data_name,
        "settings": {
            "backbone": f"{args.backbone} (random weights: speed only)",
            "image": f"center_crop {args.size}/{crop}",
            "batch_size": base.model.runtime.batch_size,
            "shard_images": args.shard_images,
            "dask_workers": f"{args.workers} processes on this machine, each shard with the plan's threads",
            "single_process_threads": torch.get_num_threads(),
        },
        "machine": {
            "cpu": next(
                (
                    line.split(":", 1)[1].strip()
                    for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")
                ),
                "?",
            ),
            "cores": os.cpu_count(),
        },
        "date": time.strftime("%Y-%m-%d"),
    }

    # single process
    settings, store, plan = planned(work / "single")
    start = time.perf_counter()
    steps.extract_planned(store, plan, settings.model)
    single = time.perf_counter() - start
    n = plan.n_missing
    results["images"] = n
    results["shards"] = len(plan.shards)
    results["single"] = {"seconds": round(single, 2), "ms_per_image": round(1000 * single / n, 1)}
    print(f"single process: {n} images in {single:.1f} s ({1000 * single / n:.0f} ms/image)", flush=True)

    with prefect_test_harness(server_startup_timeout=90):

        @flow
        def warm() -> int:  # the API's first-run cost is not the extraction's
            return 1

        warm()
        dask.config.set(WORKER_CONFIG)  # as the product's LocalCluster and `make stack`'s workers have it
        start = time.perf_counter()
        cluster = LocalCluster(  # the workers report to the same Prefect API (as tasks/cluster.py arranges)
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
            env={"PREFECT_API_URL": PREFECT_API_URL.value(), "PATCHCORE_HOME": os.environ["PATCHCORE_HOME"]},
        )
        cluster_start = time.perf_counter() - start
        try:
            walls = []
            for name in ("dask-cold", "dask"):  # fresh workers (imports, backbone), then warm ones
                settings, store, plan = planned(work / name)
                settings = with_overrides(settings, {"cluster.dask_address": cluster.scheduler_address})
                start = time.perf_counter()
                extract_on_cluster(store, plan, settings)
                walls.append(time.perf_counter() - start)
                print(f"{name} via Prefect: {walls[-1]:.1f} s (cluster start {cluster_start:.1f} s)", flush=True)
            cold_wall, dask_wall = walls

            with Client(cluster.scheduler_address) as client:
                one = sorted(client.scheduler_info()["workers"])[:1]  # one worker alone: no other shard competes
                settings, store, plan = planned(work / "prefect-one")
                settings = with_overrides(settings, {"cluster.dask_address": cluster.scheduler_address})
                start = time.perf_counter()
                with dask.annotate(workers=one):  # the product's path, on one worker that has the machine
                    extract_on_cluster(store, plan, settings)
                prefect_one_wall = time.perf_counter() - start
                settings, store, plan = planned(work / "shards")
                start = time.perf_counter()
                futures = [
                    client.submit(
                        _timed_shard,
                        store.url,
                        plan.identity,
                        shard,
                        settings.model.to_dict(),
                        plan.threads,
                        pure=False,
                        workers=one,
                    )
                    for shard in plan.shards
                ]
                timed = client.gather(futures)
                plain_wall = time.perf_counter() - start
        finally:
            cluster.close()
    same = all(
        _digests(work / name / "features") == _digests(work / "single" / "features")
        for name in ("dask-cold", "dask", "prefect-one", "shards")
    )
    shard_s = sorted(t["seconds"] for t in timed)[len(timed) // 2]
    # what Prefect and Dask add to a run, measured where no shard competes: the product's path on one
    # worker minus the same shards' own time on that worker
    overhead = max(0.0, prefect_one_wall - sum(t["seconds"] for t in timed))
    results["dask"] = {
        "cluster_start_seconds": round(cluster_start, 2),
        "first_run_seconds": round(cold_wall, 2),  # fresh worker processes: imports and backbone
        "seconds": round(dask_wall, 2),
        "ms_per_image": round(1000 * dask_wall / n, 1),
        "overhead_ratio": round(dask_wall / single, 3),
        "one_worker_alone_seconds": round(prefect_one_wall, 2),
        "one_worker_alone_plain_dask_seconds": round(plain_wall, 2),
    }
    results["per_shard"] = {
        "median_seconds": round(shard_s, 3),  # one worker alone, with the plan's threads
        "images_per_shard": args.shard_images,
        "threads": plan.threads,
        "fixed_overhead_seconds": round(overhead, 2),
    }
    results["features_identical"] = same
    results["projection"] = {
        "formula": "fixed overhead + ceil(shards / N) * median shard time of a worker alone (N machines, "
        "one worker each; this machine's CPU shard time)",
        "by_workers": {
            str(k): round(overhead + math.ceil(len(plan.shards) / k) * shard_s, 1) for k in (1, 2, 4, 8, 16)
        },
        "by_workers_for_1000_images": {
            str(k): round(overhead + math.ceil(math.ceil(1000 / args.shard_images) / k) * shard_s, 1)
            for k in (1, 2, 4, 8, 16)
        },
    }
    print(json.dumps(results, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(results) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


def markdown(r: dict) -> str:
    d, s, p = r["dask"], r["single"], r["per_shard"]
    lines = [
        f"Extract step, {r['images']} images ({r['data']}), {r['settings']['backbone']}, {r['settings']['image']}, "
        f"{r['shards']} shards of {r['settings']['shard_images']}; {r['machine']['cores']}-core {r['machine']['cpu']}, "
        f"{r['date']} (`bench/dask_extraction.py`). Features identical in every run: {r['features_identical']}.",
        "",
        "| run | wall s | ms/image | vs one process |",
        "|---|---|---|---|",
        f"| one process ({r['settings']['single_process_threads']} threads) | {s['seconds']} | "
        f"{s['ms_per_image']} | 1× |",
        f"| Dask via Prefect, fresh workers ({r['settings']['dask_workers']}) | {d['first_run_seconds']} | "
        f"{round(1000 * d['first_run_seconds'] / r['images'], 1)} | "
        f"{round(d['first_run_seconds'] / s['seconds'], 3)}× |",
        f"| Dask via Prefect, warm workers | {d['seconds']} | {d['ms_per_image']} | {d['overhead_ratio']}× |",
        f"| Dask via Prefect, one warm worker alone | {d['one_worker_alone_seconds']} | "
        f"{round(1000 * d['one_worker_alone_seconds'] / r['images'], 1)} | "
        f"{round(d['one_worker_alone_seconds'] / s['seconds'], 3)}× |",
        "",
        f"Cluster start {d['cluster_start_seconds']} s (not in the wall times). "
        f"Per shard: median {p['median_seconds']} s; "
        f"{p['threads']} threads; what Prefect and Dask add to a run (one worker alone, minus its shards' "
        f"own time) {p['fixed_overhead_seconds']} s.",
        "",
        "| machines (one worker each) | projected wall s, these images | projected wall s, 1,000 images |",
        "|---|---|---|",
    ]
    for k, v in r["projection"]["by_workers"].items():
        lines.append(f"| {k} | {v} | {r['projection']['by_workers_for_1000_images'][k]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
