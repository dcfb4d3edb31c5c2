"""Step 5, bank: the coreset-subsampled memory bank from the cached features."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import numpy as np

from patchcore import PatchCore
from patchcore.config import PatchCoreConfig
from patchcore.coreset import GreedySelection
from patchcore.model import CORESET_DISTANCES_FILE, ModelFileError, read_coreset_state, read_model_json
from pipeline.io import content_key
from pipeline.results import Bank, FeatureSet, Manifest, Split
from pipeline.steps.features import bank_image_keys, feature_identity
from pipeline.store import Store

logger = logging.getLogger(__name__)


def warm_start_source(store: Store, images: list[str], config: PatchCoreConfig) -> tuple[str, dict] | None:
    """The bank an incremental refit continues from: among the banks in the store with the same
    feature identity and model config, the one over the largest proper subset of `images` that
    kept its coreset state, as (key, its model.json). None when there is none (first training,
    images removed, settings changed, or a coreset that is not greedy). Reads each bank's
    model.json once."""
    if config.coreset.method != "approx_greedy" or config.coreset.fraction >= 1.0:
        return None
    wanted, identity, settings = set(images), feature_identity(config)["key"], config.to_dict()
    best: tuple[str, dict] | None = None
    best_size = 0
    for key in store.keys("banks"):
        try:
            meta = read_model_json(store.fetch("banks", key))
        except (ModelFileError, FileNotFoundError):
            continue
        prior = meta.get("provenance", {}).get("train_image_keys") or []
        if (
            CORESET_DISTANCES_FILE in meta["files"]
            and meta["config"] == settings
            and len(prior) > best_size
            and meta["provenance"].get("feature_identity") == identity
            and set(prior) < wanted
        ):
            best, best_size = (key, meta), len(prior)
    return best


def bank_key(feature_key: str, images: list[str], config: PatchCoreConfig, source: str | None) -> str:
    """The bank's store key: its feature identity, image hashes and model settings, and the bank
    it continued (a continued bank depends on that history)."""
    parts = ["bank", feature_key, images, config.to_dict()]
    return content_key(*parts, *([f"continued from {source}"] if source else []))


def _carry_over(store: Store, source: str, meta: dict[str, Any], images: list[str]):
    """The source bank's coreset state re-mapped onto the rows of `images` (every image has the
    same number of patches): its picks keep their place, rows of new images get NaN distances."""
    state = read_coreset_state(store.fetch("banks", source))
    prior = meta["provenance"]["train_image_keys"]
    per_image = meta["memory_bank"]["train_patches"] // len(prior)
    position = {sha: i for i, sha in enumerate(images)}
    new_start = np.array([position[sha] * per_image for sha in prior], dtype=np.int64)
    distances = np.full(len(images) * per_image, np.nan, dtype=np.float32)
    rows = (new_start[:, None] + np.arange(per_image)).reshape(-1)
    distances[rows] = state.sq_distances
    picks = new_start[state.indices // per_image] + state.indices % per_image
    return GreedySelection(picks, distances), {
        "from_bank": source,
        "prior_images": len(prior),
        "new_images": len(images) - len(prior),
        "prior_picks": len(picks),
    }


def build_memory_bank(
    store: Store,
    manifest: Manifest,
    split: Split,
    features: FeatureSet,
    config: PatchCoreConfig,
    warm_start: bool = False,
    progress: bool = False,
) -> Bank:
    """The coreset-subsampled memory bank from the cached features, saved as a PatchCore folder
    (no threshold yet) under banks/<bank_key>/; an existing one with that key is returned as is
    (`cached`).

    With `warm_start`, an earlier bank over a subset of these images (`warm_start_source`) is
    continued: its coreset picks are kept and only the picks the new images need are added, so
    the coreset time grows with the new images, not the whole set. The result then depends on
    that history (it is recorded in the bank's provenance and its key); `dvc repro` builds from
    scratch."""
    start = time.perf_counter()
    shas = bank_image_keys(manifest, split)
    source = warm_start_source(store, shas, config) if warm_start else None
    key = bank_key(features.identity, shas, config, source[0] if source else None)
    cached = store.has("banks", key, "model.json")
    if not cached:
        absent = [
            f"{features.feature_dir}/{sha}.npy"
            for sha in shas
            if not store.has("features", features.identity, f"{sha}.npy")
        ]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} cached feature file(s) are missing, e.g. {absent[0]}; run the extract step again"
            )
        files = [store.fetch("features", features.identity, f"{sha}.npy") for sha in shas]
        prior, continued = _carry_over(store, source[0], source[1], shas) if source else (None, None)
        if continued:
            logger.info(
                "coreset continues bank %s (%d images, %d picks): %d new image(s)",
                source[0],
                continued["prior_images"],
                continued["prior_picks"],
                continued["new_images"],
            )
        model = PatchCore(config)
        model.fit_features(
            (np.load(f, mmap_mode="r", allow_pickle=False) for f in files),
            n_images=len(files),
            progress=progress,
            warm_start=prior,
        )
        digest = hashlib.sha256("".join(shas).encode())
        model.provenance_.update(
            {
                "train_images_sha256": digest.hexdigest(),
                "feature_identity": features.identity,
                "train_image_keys": shas,
                "coreset_continued": continued,
            }
        )
        with store.directory("banks", key) as folder:
            model.save(folder)
    folder = store.fetch("banks", key)  # (a URL store: downloaded into the local mirror)
    meta = read_model_json(folder)
    return Bank(
        bank_dir=str(folder),
        bank_key=key,
        bank_size=meta["memory_bank"]["size"],
        n_train_patches=meta["memory_bank"]["train_patches"],
        weights_kind=meta["backbone"]["weights"]["kind"],
        coreset_seconds=meta.get("timings", {}).get("coreset_seconds"),
        coreset_continued=meta["provenance"].get("coreset_continued"),
        cached=cached,
        seconds=time.perf_counter() - start,
    )


__all__ = ["bank_key", "build_memory_bank", "warm_start_source"]
