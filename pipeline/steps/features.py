"""Step 4, extract: the per-image feature cache of the memory-bank images."""

from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from patchcore import PatchCore
from patchcore.backbone import default_layers, sha256_file
from patchcore.config import PatchCoreConfig
from patchcore.data import DataError
from pipeline.io import content_key
from pipeline.results import ExtractionPlan, FeatureSet, Manifest, Split
from pipeline.steps.fingerprint import image_path, load_manifest
from pipeline.steps.split import load_split
from pipeline.store import Store

logger = logging.getLogger(__name__)

FEATURE_CACHE_FORMAT = 1


def feature_identity(config: PatchCoreConfig) -> dict[str, Any]:
    """What determines a training image's patch features, and its hash (the cache folder name):
    backbone name, weights identity, layers, image and feature settings. Weights files are
    identified by content (sha256), never by path."""
    b = config.backbone
    if b.weights == "random":
        weights = f"random:seed={config.runtime.seed}"
    elif b.weights == "imagenet":
        weights = f"imagenet:{b.name}"
    else:
        path = Path(b.weights).expanduser()
        weights = f"file:sha256={b.weights_sha256 or (_file_sha256(path) if path.is_file() else path)}"
        companion = path.with_suffix(".json")
        if companion.is_file() and b.mean is None:
            weights += f";normalisation={_file_sha256(companion)}"
    description = {
        "format": FEATURE_CACHE_FORMAT,
        "backbone": b.name,
        "weights": weights,
        "layers": b.layers or default_layers(b.name),
        "mean": b.mean,
        "std": b.std,
        "image": image_identity(config.image),
        "features": {
            "patch_size": config.features.patch_size,
            "pretrain_dim": config.features.pretrain_dim,
            "target_dim": config.features.target_dim,
        },
    }
    if config.runtime.precision != "fp32":  # mixed-precision features are not the fp32 ones (CUDA only)
        description["precision"] = config.runtime.precision
    return {"key": content_key(description, length=24), "description": description}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _cached_sha256(path: str, mtime_ns: int, size: int) -> str:  # a weights file is hashed once per change
    return sha256_file(path)


def image_identity(image) -> dict[str, Any]:
    """The image settings that decide the features in image.mode (center_crop keeps the key it had
    before the other modes existed, so existing caches stay valid)."""
    if image.mode == "center_crop":
        return {"resize": image.resize, "crop": image.crop}
    if image.mode == "full_frame":
        return {"mode": image.mode, "resize": image.resize}
    return {
        "mode": image.mode,
        "resize": image.resize,
        "tile_size": image.tile_size,
        "tile_overlap": image.tile_overlap,
    }


def bank_image_keys(manifest: Manifest, split: Split) -> list[str]:
    """Content hashes of the memory-bank images, sorted: the bank depends on content only."""
    by_path = {e["path"]: e["sha256"] for e in load_manifest(manifest)["images"]}
    return sorted(by_path[p] for p in load_split(split)["bank"])


def plan_extraction(
    store: Store,
    manifest: Manifest,
    split: Split,
    config: PatchCoreConfig,
    shard_images: int = 32,
    threads: int | None = None,
) -> ExtractionPlan:
    """Which memory-bank images are missing from the feature cache (features/<identity>/<sha256>.npy),
    cut into shards: sorted by content hash, `shard_images` per shard rounded up to a whole number
    of batches, each run with `threads` CPU threads (None: this machine's cores). The same images
    therefore meet in the same batches, computed by as many threads, whether the shards run one
    after the other here or on a cluster, and the features are bit-identical either way."""
    content = load_manifest(manifest)
    by_path = {e["path"]: e for e in content["images"]}
    identity = feature_identity(config)
    key = identity["key"]
    if not store.has("features", key, "identity.json"):
        store.write_json("features", key, "identity.json", data=identity["description"])
    wanted = {by_path[p]["sha256"]: str(image_path(content, p)) for p in load_split(split)["bank"]}
    missing = sorted(sha for sha in wanted if not store.has("features", key, f"{sha}.npy"))
    batch = max(1, config.runtime.batch_size)
    size = max(batch, math.ceil(max(1, shard_images) / batch) * batch)
    shards = [[[sha, wanted[sha]] for sha in missing[i : i + size]] for i in range(0, len(missing), size)]
    return ExtractionPlan(
        feature_dir=str(store.path("features", key)),
        identity=key,
        n_images=len(wanted),
        n_cached=len(wanted) - len(missing),
        shards=shards,
        threads=threads or available_cores(),
    )


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def extract_shard(
    store: Store,
    identity: str,
    shard: list[list[str]],
    config: PatchCoreConfig,
    on_progress: Callable[[int, int], None] | None = None,
    threads: int | None = None,
) -> int:
    """Extract one shard's images and write each one's features into the store by itself (atomic:
    a reader never sees a partial file). A retried shard (its worker died half-way) runs its whole
    batches again, so every image meets the same batch neighbours and its features stay
    bit-identical, but writes only the images still missing. Every image is checked against its
    content hash first: a worker that sees other bytes at the path (another mount, a changed file)
    stops with the path named. `threads`: torch's intra-op CPU threads for it (the plan's; the
    kernels' rounding depends on the count). Returns the number of images written."""
    missing = {sha for sha, _ in shard if not store.has("features", identity, f"{sha}.npy")}
    if not missing:
        return 0
    for sha, path in shard:
        found = _file_sha256(Path(path)) if Path(path).is_file() else None
        if found != sha:
            raise DataError(
                f"{path}: {'missing' if found is None else 'its content changed'} on {socket.gethostname()} "
                f"(the flow recorded sha256 {sha[:12]}…): every extraction worker must see the product's images "
                "at the same path (a shared mount of the data folder)"
            )
    if threads:
        torch.set_num_threads(threads)
    if multiprocessing.current_process().daemon and config.runtime.num_workers:
        # a Dask worker is a daemon process, which may not start DataLoader workers: decode here
        # (the decoded tensors, and so the features, are the same)
        config = config.replace(**{"runtime.num_workers": 0})
    written = 0
    for position, features in _extractor(json.dumps(config.to_dict(), sort_keys=True)).embed(
        [path for _, path in shard], progress=False
    ):
        sha = shard[position][0]
        if sha in missing:
            store.save_npy("features", identity, f"{sha}.npy", array=features)
            written += 1
            if on_progress is not None:
                on_progress(written, len(missing))
    return written


@functools.lru_cache(maxsize=2)
def _extractor(config_json: str) -> PatchCore:
    """One PatchCore per feature configuration and process: a worker that runs many shards builds
    (and loads the weights of) its backbone once."""
    return PatchCore(PatchCoreConfig.from_dict(json.loads(config_json)))


def feature_set(plan: ExtractionPlan, n_extracted: int, seconds: float) -> FeatureSet:
    """What the extraction of `plan` did: `n_extracted` images went through the backbone (fewer than
    planned when a retried shard found some already written); the rest came from the cache."""
    return FeatureSet(
        feature_dir=plan.feature_dir,
        identity=plan.identity,
        n_images=plan.n_images,
        n_cached=plan.n_images - n_extracted,
        n_extracted=n_extracted,
        seconds=seconds,
    )


def extract_features(
    store: Store,
    manifest: Manifest,
    split: Split,
    config: PatchCoreConfig,
    on_progress: Callable[[int, int], None] | None = None,
    shard_images: int = 32,
    threads: int | None = None,
) -> FeatureSet:
    """Patch features of every memory-bank image, cached per image content hash + feature identity
    in features/<identity>/<sha256>.npy, in this process (shard after shard). Only images missing
    from the cache go through the backbone; each file is written atomically, so an interrupted
    extraction leaves only complete files behind and the re-run extracts only the rest."""
    plan = plan_extraction(store, manifest, split, config, shard_images, threads)
    return extract_planned(store, plan, config, on_progress)


def extract_planned(
    store: Store,
    plan: ExtractionPlan,
    config: PatchCoreConfig,
    on_progress: Callable[[int, int], None] | None = None,
) -> FeatureSet:
    """Every shard of `plan`, one after the other, in this process; on_progress(done, total) per image."""
    start = time.perf_counter()
    if plan.shards:
        logger.info("extracting features of %d image(s) (%d already cached)", plan.n_missing, plan.n_cached)
    done = 0
    for shard in plan.shards:
        offset = done

        def progress(n: int, _total: int, offset: int = offset) -> None:
            if on_progress is not None:
                on_progress(offset + n, plan.n_missing)

        done += extract_shard(store, plan.identity, shard, config, progress, threads=plan.threads)
    return feature_set(plan, done, time.perf_counter() - start)


__all__ = [
    "FEATURE_CACHE_FORMAT",
    "bank_image_keys",
    "extract_features",
    "extract_planned",
    "extract_shard",
    "feature_identity",
    "feature_set",
    "plan_extraction",
]
