"""Step 4, extract: the per-image feature cache of the memory-bank images."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from patchcore import PatchCore
from patchcore.backbone import default_layers, sha256_file
from patchcore.config import PatchCoreConfig
from pipeline.io import content_key
from pipeline.results import FeatureSet, Manifest, Split
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


def extract_features(
    store: Store,
    manifest: Manifest,
    split: Split,
    config: PatchCoreConfig,
    on_progress: Callable[[int, int], None] | None = None,
) -> FeatureSet:
    """Patch features of every memory-bank image, cached per image content hash + feature identity
    in features/<identity>/<sha256>.npy. Only images missing from the cache go through the
    backbone; each file is written atomically, so an interrupted extraction leaves only complete
    files behind and the re-run extracts only the rest."""
    start = time.perf_counter()
    content = load_manifest(manifest)
    by_path = {e["path"]: e for e in content["images"]}
    identity = feature_identity(config)
    key = identity["key"]
    if not store.has("features", key, "identity.json"):
        store.write_json("features", key, "identity.json", data=identity["description"])
    wanted = {by_path[p]["sha256"]: image_path(content, p) for p in load_split(split)["bank"]}
    missing = {sha: path for sha, path in wanted.items() if not store.has("features", key, f"{sha}.npy")}
    if missing:
        logger.info("extracting features of %d image(s) (%d already cached)", len(missing), len(wanted) - len(missing))
        shas, paths = list(missing), list(missing.values())
        for done, (position, features) in enumerate(PatchCore(config).embed(paths, progress=False), start=1):
            store.save_npy("features", key, f"{shas[position]}.npy", array=features)
            if on_progress is not None:
                on_progress(done, len(paths))
    return FeatureSet(
        feature_dir=str(store.path("features", key)),
        identity=key,
        n_images=len(wanted),
        n_cached=len(wanted) - len(missing),
        n_extracted=len(missing),
        seconds=time.perf_counter() - start,
    )


__all__ = ["FEATURE_CACHE_FORMAT", "bank_image_keys", "extract_features", "feature_identity"]
