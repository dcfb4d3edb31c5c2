"""The training steps as plain functions: fingerprint -> validate -> split -> extract -> memory bank
-> evaluate -> calibrate -> report. The Prefect tasks (tasks/) and the DVC stages call exactly these.

Every step takes and returns paths, content hashes and small JSON-able dicts (never tensors), and
writes its outputs under PATCHCORE_HOME in a place named by the content hash of its inputs, so a
step whose inputs did not change finds its output already there and returns at once:

    datasets/<manifest_sha256>.json          manifest: every image's path, label and sha256
    validation/<product>/latest/             the validation report (pipeline/validation.py)
    splits/<split_key>.json                  bank / held-out nominal / calibration / report images
    features/<identity>/<image sha256>.npy   per-image patch features (the feature cache)
    banks/<bank_key>/                        the fitted PatchCore (no threshold yet)
    evaluations/<eval_key>/                  per-image scores, anomaly maps, metrics
    models/<product>/<model_key>/            the calibrated PatchCore that gets registered
    reports/<model_key>/                     ROC, PR, score histogram, heatmap grid

No Prefect and no MLflow here (MLflow lives in pipeline/registry.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from patchcore import metrics
from patchcore.backbone import default_layers, sha256_file
from patchcore.config import PatchCoreConfig
from patchcore.data import GOOD, IMAGE_SUFFIXES, DataError, check_readable, is_mvtec_root, load_mask, resolve_samples
from patchcore.paths import home

from pipeline.config import Params, PipelineConfig

logger = logging.getLogger(__name__)

FEATURE_CACHE_FORMAT = 1
HOLDOUT, TEST, CALIBRATION, REPORT = "holdout", "test", "calibration", "report"


class ValidationFailed(DataError):
    """The image set failed validation: nothing was extracted, trained or registered."""


# -- small helpers ------------------------------------------------------------------------------
def content_key(*parts: Any, length: int = 16) -> str:
    """A short hex key from JSON-able parts (the name of a content-addressed output)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def write_json(path: Path, data: Any) -> Path:
    """Atomic: a reader sees the old file or the whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=_jsonable)
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def git_commit() -> dict[str, Any]:
    """The source tree's commit (and whether it has uncommitted changes), or 'unknown'."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def _keyed_order(items: Iterable[dict], seed: int, salt: str) -> list[dict]:
    """Items ordered by a seeded hash of their content: a stable pseudo-random order that does not
    depend on file names or on which other images are present."""
    return sorted(items, key=lambda e: hashlib.sha256(f"{seed}:{salt}:{e['sha256']}".encode()).hexdigest())


# -- 1. fingerprint -----------------------------------------------------------------------------
def fingerprint_dataset(data_root: str | Path, product: str | None = None) -> dict[str, Any]:
    """Hash every image (and mask) of a product in MVTec layout into a manifest (path, split, label,
    defect type, sha256), written once per content as datasets/<manifest_sha256>.json. The data
    version shown to people is DVC's md5 of the folder (pipeline.data_version), with its git commit
    and whether data.dvc holds it."""
    from pipeline.data_version import data_version

    start = time.perf_counter()
    root = Path(data_root).expanduser().resolve()
    layout = ("a product's data is a folder in MVTec layout (train/good/*.png, optionally test/<type>/ "
              "and ground_truth/<type>/<name>_mask.png)")
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; {layout}")
    if not is_mvtec_root(root):
        raise DataError(f"{root}: no train/good folder; {layout}")
    entries = []
    for sample in resolve_samples(root, split="train"):
        entries.append({"path": sample.path.relative_to(root).as_posix(), "split": "train", "label": 0,
                        "defect_type": GOOD, "sha256": sha256_file(sample.path), "mask": None, "mask_sha256": None})
    test_dir = root / "test"
    if test_dir.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in test_dir.rglob("*") if p.is_file()):
        for sample in resolve_samples(root, split="test"):
            mask = sample.mask_path
            entries.append({"path": sample.path.relative_to(root).as_posix(), "split": "test", "label": sample.label,
                            "defect_type": sample.defect_type, "sha256": sha256_file(sample.path),
                            "mask": mask.relative_to(root).as_posix() if mask else None,
                            "mask_sha256": sha256_file(mask) if mask else None})
    entries.sort(key=lambda e: e["path"])
    manifest_sha = content_key([(e["path"], e["sha256"], e["mask_sha256"]) for e in entries], length=64)
    version = data_version(root, product or root.name).to_dict()
    manifest = {"root": str(root), "manifest_sha256": manifest_sha, "data_version": version["md5"],
                "data_version_record": version, "images": entries}
    path = write_json(home() / "datasets" / f"{manifest_sha}.json", manifest)
    test = [e for e in entries if e["split"] == "test"]
    return {"manifest": str(path), "manifest_sha256": manifest_sha, "data_version": version["md5"],
            "data_version_record": version, "data_root": str(root), "n_train": len(entries) - len(test),
            "n_test_good": sum(e["label"] == 0 for e in test), "n_test_defect": sum(e["label"] == 1 for e in test),
            "seconds": time.perf_counter() - start}


def load_manifest(manifest_path: str | Path) -> dict[str, Any]:
    return read_json(manifest_path)


def _abs(manifest: dict, rel: str) -> Path:
    return Path(manifest["root"]) / rel


# -- 2. validate --------------------------------------------------------------------------------
def validate_dataset(manifest_path: str | Path, params: Params, product: str) -> dict[str, Any]:
    """Stop before any feature is extracted when the images are not fit to train on.

    The nominal images (train/good) must pass the Great Expectations suite of pipeline/validation.py
    (counts, formats, sizes, drift against the product's accepted version); every test image and
    mask must decode; at least two nominal images (one for the bank, one held out). Raises a
    DataError listing every problem (file, check, observed value, fix)."""
    from pipeline.validation import ValidationError, validate_image_set

    start = time.perf_counter()
    manifest = load_manifest(manifest_path)
    result = validate_image_set(manifest["root"], params, product=product)
    problems: list[str] = []
    train = [e for e in manifest["images"] if e["split"] == "train"]
    if len(train) < 2:
        problems.append(f"{manifest['root']}/train/good: {len(train)} image(s); at least 2 are needed "
                        "(one for the memory bank, one held out)")
    files = [_abs(manifest, e["path"]) for e in manifest["images"] if e["split"] == "test"]
    files += [_abs(manifest, e["mask"]) for e in manifest["images"] if e["mask"]]
    try:
        check_readable(files)
    except DataError as exc:
        problems.append(f"test images / masks: {exc}")
    extra = {"test_files_checked": len(files), "problems": problems}
    write_json(result.out_dir / "pipeline_checks.json", extra)
    if not result.passed:
        raise ValidationError(result)
    if problems:
        raise ValidationFailed(f"data validation failed for {manifest['root']}:\n  " + "\n  ".join(problems))
    report_files = [str(p) for p in (result.summary_path, result.failures_path, result.out_dir / "pipeline_checks.json")
                    if p is not None]
    return {"ok": True, "summary": str(result.summary_path), "files": report_files,
            "docs_dir": str(result.docs_path.parent) if result.docs_path else None,
            "n_files": result.summary["n_files"], "seconds": time.perf_counter() - start}


def accept_validated_set(validation: dict[str, Any], extra: dict[str, Any]) -> str:
    """Make a validated set the product's drift reference (after its model is registered)."""
    from pipeline.validation import ValidationResult, accept_reference

    summary = read_json(validation["summary"])
    result = ValidationResult(passed=bool(summary["passed"]), product=summary["product"], folder=Path(summary["folder"]),
                              summary=summary, stats=summary.get("stats") or {})
    return str(accept_reference(result, extra))


# -- 3. split -----------------------------------------------------------------------------------
def split_dataset(manifest_path: str | Path, cfg: PipelineConfig) -> dict[str, Any]:
    """Seeded, content-keyed splits: train/good -> memory bank + held-out nominal; labelled test
    images -> calibration (picks the threshold) + report (measures it), stratified by type."""
    manifest = load_manifest(manifest_path)
    train = [e for e in manifest["images"] if e["split"] == "train"]
    test = [e for e in manifest["images"] if e["split"] == "test"]
    n_holdout = min(max(1, round(cfg.holdout_fraction * len(train))), len(train) - 1)
    ordered = _keyed_order(train, cfg.holdout_seed, "holdout")
    holdout, bank = ordered[:n_holdout], ordered[n_holdout:]
    labelled = any(e["label"] == 0 for e in test) and any(e["label"] == 1 for e in test)
    calibration, report, calibration_note = [], [], None
    if labelled:
        for defect_type in sorted({e["defect_type"] for e in test}):
            group = _keyed_order([e for e in test if e["defect_type"] == defect_type], cfg.holdout_seed, "calibration")
            n = math.ceil(cfg.calibration_fraction * len(group))
            calibration += group[:n]
            report += group[n:]
        has_both = lambda part: {0, 1} <= {e["label"] for e in part}  # noqa: E731
        if not (has_both(calibration) and has_both(report)):
            calibration, report = test, []
            calibration_note = ("too few labelled test images to hold any out: the threshold is picked and "
                                "reported on the same images (optimistic)")
    split = {"manifest_sha256": manifest["manifest_sha256"], "mode": "labelled" if labelled else "nominal-only",
             "bank": sorted(e["path"] for e in bank), "holdout": sorted(e["path"] for e in holdout),
             "calibration": sorted(e["path"] for e in calibration), "report": sorted(e["path"] for e in report),
             "calibration_note": calibration_note,
             "settings": {"holdout_fraction": cfg.holdout_fraction, "holdout_seed": cfg.holdout_seed,
                          "calibration_fraction": cfg.calibration_fraction}}
    key = content_key(manifest["manifest_sha256"], split["settings"])
    path = write_json(home() / "splits" / f"{key}.json", split)
    return {"split": str(path), "split_key": key, "mode": split["mode"], "n_bank": len(bank), "n_holdout": len(holdout),
            "n_calibration": len(calibration), "n_report": len(report), "calibration_note": calibration_note}


# -- 4. extract (the feature cache) ----------------------------------------------------------------
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
        "format": FEATURE_CACHE_FORMAT, "backbone": b.name, "weights": weights,
        "layers": b.layers or default_layers(b.name), "mean": b.mean, "std": b.std,
        "image": {"resize": config.image.resize, "crop": config.image.crop},
        "features": {"patch_size": config.features.patch_size, "pretrain_dim": config.features.pretrain_dim,
                     "target_dim": config.features.target_dim},
    }
    return {"key": content_key(description, length=24), "description": description}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _cached_sha256(path: str, mtime_ns: int, size: int) -> str:  # a weights file is hashed once per change
    return sha256_file(path)


def feature_dir(config: PatchCoreConfig) -> Path:
    return home() / "features" / feature_identity(config)["key"]


def extract_features(manifest_path: str | Path, split_path: str | Path, config: PatchCoreConfig,
                     on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Patch features of every memory-bank image, cached per image content hash + feature identity.
    Only images missing from the cache go through the backbone; each file is written atomically
    (temporary file + rename), so an interrupted extraction leaves only complete files behind."""
    from patchcore import PatchCore

    start = time.perf_counter()
    manifest, split = load_manifest(manifest_path), read_json(split_path)
    by_path = {e["path"]: e for e in manifest["images"]}
    identity = feature_identity(config)
    folder = home() / "features" / identity["key"]
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "identity.json").is_file():
        write_json(folder / "identity.json", identity["description"])
    wanted = {by_path[p]["sha256"]: _abs(manifest, p) for p in split["bank"]}
    missing = {sha: path for sha, path in wanted.items() if not (folder / f"{sha}.npy").is_file()}
    if missing:
        logger.info("extracting features of %d image(s) (%d already cached)", len(missing), len(wanted) - len(missing))
        shas, paths = list(missing), list(missing.values())
        for done, (position, features) in enumerate(PatchCore(config).embed(paths, progress=False), start=1):
            _save_npy_atomic(folder / f"{shas[position]}.npy", features)
            if on_progress is not None:
                on_progress(done, len(paths))
    return {"feature_dir": str(folder), "identity": identity["key"], "n_images": len(wanted),
            "n_cached": len(wanted) - len(missing), "n_extracted": len(missing), "seconds": time.perf_counter() - start}


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- 5. memory bank -------------------------------------------------------------------------------
def _bank_images(manifest_path: str | Path, split_path: str | Path) -> list[str]:
    """Content hashes of the memory-bank images, sorted: the bank depends on content only."""
    manifest, split = load_manifest(manifest_path), read_json(split_path)
    by_path = {e["path"]: e["sha256"] for e in manifest["images"]}
    return sorted(by_path[p] for p in split["bank"])


def warm_start_source(images: list[str], config: PatchCoreConfig) -> Path | None:
    """The bank an incremental refit continues from: among the banks built here with the same
    feature identity and model config, the one over the largest proper subset of `images` that
    kept its coreset state. None when there is none (first training, images removed, settings
    changed, or a coreset that is not greedy)."""
    from patchcore.model import CORESET_DISTANCES_FILE, ModelFileError, read_model_json

    if config.coreset.method != "approx_greedy" or config.coreset.fraction >= 1.0:
        return None
    wanted, identity, settings = set(images), feature_identity(config)["key"], config.to_dict()
    best, best_size = None, 0
    for folder in sorted((home() / "banks").glob("*/")):
        try:
            meta = read_model_json(folder)
        except ModelFileError:
            continue
        prior = meta.get("provenance", {}).get("train_image_keys") or []
        if (CORESET_DISTANCES_FILE in meta["files"] and meta["config"] == settings and len(prior) > best_size
                and meta["provenance"].get("feature_identity") == identity and set(prior) < wanted):
            best, best_size = folder, len(prior)
    return best


def bank_key(manifest_path: str | Path, split_path: str | Path, config: PatchCoreConfig,
             warm_start: bool = False) -> str:
    images = _bank_images(manifest_path, split_path)
    source = warm_start_source(images, config) if warm_start else None
    parts = ["bank", feature_identity(config)["key"], images, config.to_dict()]
    return content_key(*parts, *([f"continued from {source.name}"] if source else []))


def bank_dir(manifest_path: str | Path, split_path: str | Path, config: PatchCoreConfig,
             warm_start: bool = False) -> Path:
    return home() / "banks" / bank_key(manifest_path, split_path, config, warm_start)


def _carry_over(source: Path, images: list[str]):
    """The source bank's coreset state re-mapped onto the rows of `images` (every image has the
    same number of patches): its picks keep their place, rows of new images get NaN distances."""
    from patchcore.coreset import GreedySelection
    from patchcore.model import read_coreset_state, read_model_json

    meta = read_model_json(source)
    state = read_coreset_state(source)
    prior = meta["provenance"]["train_image_keys"]
    per_image = meta["memory_bank"]["train_patches"] // len(prior)
    position = {sha: i for i, sha in enumerate(images)}
    new_start = np.array([position[sha] * per_image for sha in prior], dtype=np.int64)
    distances = np.full(len(images) * per_image, np.nan, dtype=np.float32)
    rows = (new_start[:, None] + np.arange(per_image)).reshape(-1)
    distances[rows] = state.sq_distances
    picks = new_start[state.indices // per_image] + state.indices % per_image
    return GreedySelection(picks, distances), {"from_bank": source.name, "prior_images": len(prior),
                                               "new_images": len(images) - len(prior), "prior_picks": len(picks)}


def build_memory_bank(manifest_path: str | Path, split_path: str | Path, features: dict[str, Any],
                      config: PatchCoreConfig, progress: bool = False, warm_start: bool = False) -> dict[str, Any]:
    """The coreset-subsampled memory bank from the cached features, saved as a PatchCore directory
    (no threshold yet) under banks/<bank_key>/.

    With `warm_start`, an earlier bank over a subset of these images (`warm_start_source`) is
    continued: its coreset picks are kept and only the picks the new images need are added, so
    the coreset time grows with the new images, not the whole set. The result then depends on
    that history (it is recorded in the bank's provenance and its key); `dvc repro` builds from
    scratch."""
    from patchcore import PatchCore

    start = time.perf_counter()
    key = bank_key(manifest_path, split_path, config, warm_start)
    out = home() / "banks" / key
    if not (out / "model.json").is_file():
        shas = _bank_images(manifest_path, split_path)
        files = [Path(features["feature_dir"]) / f"{sha}.npy" for sha in shas]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{len(absent)} cached feature file(s) are missing, e.g. {absent[0]}; "
                                    "run the extract step again")
        source = warm_start_source(shas, config) if warm_start else None
        prior, continued = _carry_over(source, shas) if source else (None, None)
        if continued:
            logger.info("coreset continues bank %s (%d images, %d picks): %d new image(s)", source.name,
                        continued["prior_images"], continued["prior_picks"], continued["new_images"])
        model = PatchCore(config)
        model.fit_features((np.load(f, mmap_mode="r", allow_pickle=False) for f in files), n_images=len(files),
                           progress=progress, warm_start=prior)
        digest = hashlib.sha256()
        for sha in shas:
            digest.update(sha.encode())
        model.provenance_.update({"train_images_sha256": digest.hexdigest(), "feature_identity": features["identity"],
                                  "train_image_keys": shas, "coreset_continued": continued})
        model.save(out)
    meta = read_json(out / "model.json")
    return {"bank_dir": str(out), "bank_key": key, "bank_size": meta["memory_bank"]["size"],
            "n_train_patches": meta["memory_bank"]["train_patches"], "weights_kind": meta["backbone"]["weights"]["kind"],
            "coreset_seconds": meta.get("timings", {}).get("coreset_seconds"),
            "coreset_continued": meta["provenance"].get("coreset_continued"),
            "seconds": time.perf_counter() - start}


# -- 6. evaluate ----------------------------------------------------------------------------------
def evaluate_bank(manifest_path: str | Path, split_path: str | Path, bank: dict[str, Any],
                  progress: bool = False) -> dict[str, Any]:
    """Score the held-out nominal split (always) and the labelled test images (when present):
    per-image scores and anomaly maps, image AUROC, pixel AUROC, PRO and per-defect-type figures."""
    from patchcore import PatchCore

    start = time.perf_counter()
    split = read_json(split_path)
    out = evaluation_dir(bank, split_path)
    if not (out / "evaluation.json").is_file():
        manifest = load_manifest(manifest_path)
        model = PatchCore.load(bank["bank_dir"])
        result = score_images(model, manifest, split)
        out.mkdir(parents=True, exist_ok=True)
        _save_npy_atomic_f16(out / "maps.npy", result.pop("maps"))
        write_json(out / "evaluation.json", result)
    evaluation = read_json(out / "evaluation.json")
    return {"evaluation_dir": str(out), "mode": evaluation["mode"], "metrics": evaluation["metrics"],
            "seconds": time.perf_counter() - start}


def evaluation_dir(bank: dict[str, Any], split_path: str | Path) -> Path:
    """evaluations/<key>: key of the bank and of the split's content (which names the manifest,
    itself the hash of every image's content), so the same model on the same images finds it."""
    return home() / "evaluations" / content_key("evaluation", bank["bank_key"], read_json(split_path))


def score_images(model, manifest: dict[str, Any], split: dict[str, Any]) -> dict[str, Any]:
    """Score held-out + test images with a PatchCore model; records, metrics and maps (float32)."""
    roles = {p: CALIBRATION for p in split["calibration"]} | {p: REPORT for p in split["report"]}
    records = [{"path": p, "split": HOLDOUT, "label": 0, "defect_type": GOOD, "role": HOLDOUT} for p in split["holdout"]]
    records += [{"path": e["path"], "split": TEST, "label": e["label"], "defect_type": e["defect_type"],
                 "role": roles.get(e["path"]), "mask": e["mask"]}
                for e in sorted((e for e in manifest["images"] if e["split"] == "test"), key=lambda e: e["path"])]
    predictions = model.predict([_abs(manifest, r["path"]) for r in records], maps=True, progress=False)
    for record, score in zip(records, predictions.scores):
        record["score"] = float(score)
    test_idx = [i for i, r in enumerate(records) if r["split"] == TEST]
    metrics_out: dict[str, Any] = {"n_holdout": len(split["holdout"]), "n_test": len(test_idx)}
    per_type: dict[str, dict[str, Any]] = {}
    if split["mode"] == "labelled":
        metrics_out.update(labelled_metrics(model, manifest, [records[i] for i in test_idx],
                                            predictions.anomaly_maps[test_idx], per_type))
    held = np.array([r["score"] for r in records if r["split"] == HOLDOUT])
    metrics_out.update({"holdout_score_mean": float(held.mean()), "holdout_score_max": float(held.max())})
    return {"mode": split["mode"], "records": records, "metrics": metrics_out, "per_defect_type": per_type,
            "maps": predictions.anomaly_maps, "threshold_in_model": model.threshold_,
            "crop": model.config.image.crop, "resize": model.config.image.resize}


def labelled_metrics(model, manifest: dict, records: list[dict], maps: np.ndarray,
                     per_type: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Threshold-free metrics on labelled images (all of them: no threshold is chosen here)."""
    labels = np.array([r["label"] for r in records])
    scores = np.array([r["score"] for r in records])
    out: dict[str, Any] = {"n_good": int((labels == 0).sum()), "n_defect": int((labels == 1).sum()),
                           "image_auroc": metrics.image_auroc(labels, scores)}
    out["f1_max_threshold"], out["f1_max"] = metrics.f1_optimal_threshold(labels, scores)
    # Pixel metrics over the images whose ground truth is known: good ones, and defects with a mask.
    known = np.array([r["label"] == 0 or bool(r.get("mask")) for r in records])
    masks = None
    if any(r["label"] == 1 and r.get("mask") for r in records):
        cfg = model.config.image
        masks = np.stack([load_mask(_abs(manifest, r["mask"]) if r.get("mask") else None, cfg.resize, cfg.crop)
                          for r in records])
        out["pixel_auroc"] = metrics.pixel_auroc(masks[known], maps[known])
        out["pro"] = metrics.pro_auc(masks[known], maps[known])
    good = labels == 0
    for defect in sorted({r["defect_type"] for r in records if r["label"] == 1}):
        sel = np.array([r["defect_type"] == defect for r in records])
        row: dict[str, Any] = {"n_images": int(sel.sum()),
                               "image_auroc": metrics.image_auroc(labels[sel | good], scores[sel | good])}
        with_mask = (sel & known) | good
        if masks is not None and masks[sel & known].any():
            row["pro"] = metrics.pro_auc(masks[with_mask], maps[with_mask])
        per_type[defect] = row
    return out


def _save_npy_atomic_f16(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy.tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:
        np.save(handle, np.asarray(array, dtype=np.float16), allow_pickle=False)
    os.replace(tmp, path)


# -- 7. calibrate ---------------------------------------------------------------------------------
def choose_threshold(evaluation: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
    """The decision threshold and its honest figures.

    Labelled defects: the F1-optimal threshold on the calibration images (the paper's working point),
    and the threshold at 100% recall on the same images; precision, recall, FPR and errors of both
    on the report images, which picked nothing. Nominal only (cold start): the lowest threshold that
    flags at most target_fpr of the held-out nominal images; its FPR on unseen nominal images where
    there are any (test/good), otherwise the report says it cannot be measured."""
    records = evaluation["records"]
    held = np.array([r["score"] for r in records if r["role"] == HOLDOUT])
    test = [r for r in records if r["split"] == TEST]
    out: dict[str, Any] = {"mode": evaluation["mode"]}
    if evaluation["mode"] == "labelled":
        calib = [r for r in test if r["role"] == CALIBRATION]
        report = [r for r in test if r["role"] == REPORT]
        y, s = np.array([r["label"] for r in calib]), np.array([r["score"] for r in calib])
        threshold, f1 = metrics.f1_optimal_threshold(y, s)
        recall100 = metrics.threshold_at_recall(y, s, 1.0)
        out.update(rule="f1_optimal", threshold=threshold, rule_detail=(
            f"F1-optimal threshold on {len(calib)} labelled calibration images "
            f"({int(y.sum())} defective); F1 there {f1:.3f}"),
            calibration_f1=f1, threshold_recall100=recall100, n_calibration=len(calib))
        if report:
            out["report_on"] = f"{len(report)} labelled test images not used to pick the threshold"
            evaluated = report
        else:
            out["report_on"] = ("the calibration images themselves: too few labelled images to hold any out, "
                                "so these figures are optimistic")
            evaluated = calib
        ry, rs = np.array([r["label"] for r in evaluated]), np.array([r["score"] for r in evaluated])
        out["at_threshold"] = metrics.confusion_at(ry, rs, threshold)
        out["at_recall100"] = metrics.confusion_at(ry, rs, recall100)
        out["n_report"] = len(evaluated)
        out["report_independent"] = bool(report)
        out["heldout_fpr_independent"] = True
    else:
        # The lowest threshold that flags at most floor(target_fpr * n) held-out nominal images: just
        # above the (k+1)-th highest score. With n held-out images the resolution is 1/n, and new good
        # parts will exceed the highest of n nominal scores about 1/(n+1) of the time.
        n = len(held)
        allowed = int(math.floor(cfg.target_fpr * n + 1e-9))
        ordered = np.sort(held)[::-1]
        threshold = float(np.nextafter(ordered[allowed], np.inf))
        out.update(rule="nominal_quantile", threshold=threshold, target_fpr=cfg.target_fpr, rule_detail=(
            f"cold start (no labelled defects): just above the {_ordinal(allowed + 1)} highest of {n} held-out "
            f"nominal scores, flagging at most {allowed} of them (target false-positive rate {cfg.target_fpr:g}); "
            f"with {n} held-out images expect a false-positive rate of about {1 / (n + 1):.1%} or more on new good parts"),
            expected_fpr_floor=1.0 / (n + 1))
        unseen_good = np.array([r["score"] for r in test if r["label"] == 0])
        defects = np.array([r["score"] for r in test if r["label"] == 1])
        if len(unseen_good):
            fp = int((unseen_good >= threshold).sum())
            out["at_threshold"] = {"fp": fp, "tn": len(unseen_good) - fp, "fpr": fp / len(unseen_good)}
            out["report_on"] = f"{len(unseen_good)} nominal test images (test/good) not used to pick the threshold"
            out["report_independent"] = True
        else:
            out["at_threshold"] = {}
            out["report_on"] = ("impossible: no nominal images besides the held-out split that picked the "
                                "threshold; add test/good images to measure the false-positive rate")
            out["report_independent"] = False
        if len(defects):
            tp = int((defects >= threshold).sum())
            out["at_threshold"].update({"tp": tp, "fn": len(defects) - tp, "recall": tp / len(defects)})
        out["n_report"] = len(unseen_good) + len(defects)
        out["heldout_fpr_independent"] = False  # the held-out scores picked this threshold
    out["heldout_fpr"] = float((held >= out["threshold"]).mean())
    out["heldout_false_alarms"] = int((held >= out["threshold"]).sum())
    out["n_heldout"] = len(held)
    return out


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def calibrate(evaluation: dict[str, Any], bank: dict[str, Any], product: str, cfg: PipelineConfig,
              provenance: dict[str, Any]) -> dict[str, Any]:
    """Choose the threshold, then save the calibrated model (bank + threshold + provenance) under
    models/<product>/<model_key>/: the directory that gets registered."""
    from patchcore import PatchCore

    start = time.perf_counter()
    data = read_json(Path(evaluation["evaluation_dir"]) / "evaluation.json")
    calibration = choose_threshold(data, cfg)
    key = content_key("model", bank["bank_key"], Path(evaluation["evaluation_dir"]).name, calibration["threshold"],
                      calibration["rule"], provenance)
    out = home() / "models" / product / key
    if not (out / "model.json").is_file():
        model = PatchCore.load(bank["bank_dir"])
        details = {k: calibration[k] for k in ("rule_detail", "report_on", "heldout_fpr") if k in calibration}
        if "threshold_recall100" in calibration:
            details["threshold_recall100"] = calibration["threshold_recall100"]
        model.set_threshold(calibration["threshold"], calibration["rule"], **details)
        model.provenance_.update(provenance)
        model.save(out)
    write_json(out.parent / f"{key}-calibration.json", calibration)
    return {"model_dir": str(out), "model_key": key, "calibration": calibration,
            "calibration_file": str(out.parent / f"{key}-calibration.json"), "seconds": time.perf_counter() - start}


# -- 8. report (plots) ----------------------------------------------------------------------------
def make_report(evaluation: dict[str, Any], calibrated: dict[str, Any], manifest_path: str | Path,
                cfg: PipelineConfig) -> dict[str, Any]:
    """ROC and PR curves, the score histogram with the threshold, a grid of heatmap overlays (worst
    misses and false alarms first) and a per-image score table, under reports/<model_key>/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    start = time.perf_counter()
    out = home() / "reports" / calibrated["model_key"]
    out.mkdir(parents=True, exist_ok=True)
    data = read_json(Path(evaluation["evaluation_dir"]) / "evaluation.json")
    threshold = calibrated["calibration"]["threshold"]
    records = data["records"]
    test = [r for r in records if r["split"] == TEST]
    files = []
    if data["mode"] == "labelled":
        y, s = np.array([r["label"] for r in test]), np.array([r["score"] for r in test])
        fpr, tpr, _ = roc_curve(y, s)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr, tpr, lw=2, label=f"image AUROC {data['metrics']['image_auroc']:.3f}")
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (test images)")
        ax.legend(loc="lower right")
        files.append(_savefig(fig, out / "roc.png"))
        precision, recall, _ = precision_recall_curve(y, s)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(recall, precision, lw=2, label=f"F1 max {data['metrics']['f1_max']:.3f}")
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test images)", ylim=(0, 1.05))
        ax.legend(loc="lower left")
        files.append(_savefig(fig, out / "pr.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = {"held-out nominal": [r["score"] for r in records if r["split"] == HOLDOUT],
              "test good": [r["score"] for r in test if r["label"] == 0],
              "test defect": [r["score"] for r in test if r["label"] == 1]}
    all_scores = [v for vs in groups.values() for v in vs] + [threshold]
    low, high = min(all_scores), max(all_scores)
    if low > 0 and high / low > 50:  # scores spanning orders of magnitude: a log axis keeps the good ones visible
        bins = np.geomspace(low, high, 40)
        ax.set_xscale("log")
    else:
        bins = np.linspace(low, high, 30)
    for (name, values), colour in zip(groups.items(), ("tab:blue", "tab:green", "tab:red")):
        if values:
            ax.hist(values, bins=bins, alpha=0.5, color=colour, edgecolor=colour, histtype="stepfilled",
                    label=f"{name} ({len(values)})")
    ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.4g} ({calibrated['calibration']['rule']})")
    ax.set(xlabel="image anomaly score", ylabel="images", title="Scores: good vs defect")
    ax.legend(fontsize=8)
    files.append(_savefig(fig, out / "score_histogram.png"))
    if cfg.heatmap_grid_size > 0:
        grid = _heatmap_grid(records, np.load(Path(evaluation["evaluation_dir"]) / "maps.npy"), threshold,
                             load_manifest(manifest_path), data["resize"], data["crop"], cfg.heatmap_grid_size)
        if grid is not None:
            grid.save(out / "heatmaps.png")
            files.append(str(out / "heatmaps.png"))
    table = [{k: r.get(k) for k in ("path", "split", "role", "label", "defect_type", "score")}
             | {"is_anomalous": r["score"] >= threshold} for r in records]
    write_json(out / "scores.json", table)
    files.append(str(out / "scores.json"))
    return {"report_dir": str(out), "files": files, "seconds": time.perf_counter() - start}


def _savefig(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _heatmap_grid(records: list[dict], maps: np.ndarray, threshold: float, manifest: dict, resize: int,
                  crop: int, size: int):
    """Overlays in order of what a reviewer should see first: missed defects (lowest score first),
    false alarms (highest first), then the remaining images closest to the threshold."""
    from PIL import Image, ImageDraw

    from patchcore.viz import overlay

    indexed = list(enumerate(records))
    misses = sorted((x for x in indexed if x[1]["label"] == 1 and x[1]["score"] < threshold), key=lambda x: x[1]["score"])
    alarms = sorted((x for x in indexed if x[1]["label"] == 0 and x[1]["score"] >= threshold), key=lambda x: -x[1]["score"])
    shown = {i for i, _ in misses + alarms}
    rest = sorted((x for x in indexed if x[0] not in shown), key=lambda x: abs(x[1]["score"] - threshold))
    chosen = (misses + alarms + rest)[:size]
    if not chosen:
        return None
    vmin, vmax = (float(v) for v in np.percentile(maps.astype(np.float32), [1.0, 99.9]))
    columns = min(4, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    label_px = 28
    sheet = Image.new("RGB", (columns * crop, rows * (crop + label_px)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (i, record) in enumerate(chosen):
        tile = overlay(_abs(manifest, record["path"]), maps[i].astype(np.float32), resize, crop, vmin, vmax)
        x, y = (n % columns) * crop, (n // columns) * (crop + label_px)
        sheet.paste(tile, (x, y + label_px))
        flagged = record["score"] >= threshold
        verdict = ("MISS" if record["label"] == 1 and not flagged else
                   "FALSE ALARM" if record["label"] == 0 and flagged else "ok")
        colour = "red" if verdict != "ok" else "black"
        draw.text((x + 3, y + 2), f"{record['defect_type']} {record['split']}", fill="black")
        draw.text((x + 3, y + 14), f"{record['score']:.4g} {verdict}", fill=colour)
    return sheet


# -- provenance and the training record -------------------------------------------------------------
def provenance(product: str, fingerprint: dict[str, Any], split: dict[str, Any], features: dict[str, Any]) -> dict[str, Any]:
    """What model.json records about where a model came from (beyond weights and config)."""
    return {"product": product, "data_version": fingerprint["data_version"], "data_root": fingerprint["data_root"],
            "manifest_sha256": fingerprint["manifest_sha256"], "split_key": split["split_key"],
            "feature_identity": features["identity"], "git": git_commit(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def training_record(product: str, fingerprint: dict, validation: dict, split: dict, features: dict, bank: dict,
                    evaluation: dict, calibrated: dict, report: dict) -> dict[str, Any]:
    """Everything the registry and the summaries need about one finished training, as one dict."""
    data = read_json(Path(evaluation["evaluation_dir"]) / "evaluation.json")
    record = {
        "product": product, "data_version": fingerprint["data_version"], "data_root": fingerprint["data_root"],
        "data_version_record": fingerprint["data_version_record"], "git": git_commit(),
        "feature_identity": features["identity"], "model_dir": calibrated["model_dir"],
        "calibration": calibrated["calibration"], "metrics": data["metrics"], "per_defect_type": data["per_defect_type"],
        "bank_size": bank["bank_size"], "n_bank": split["n_bank"], "weights_kind": bank["weights_kind"],
        "features": {k: features[k] for k in ("n_images", "n_cached", "n_extracted")},
        "coreset_continued": bank.get("coreset_continued"),
        "cached_stages": [name for name, step in (("coreset", bank), ("evaluate", evaluation)) if step.get("cached")],
        "seconds": {name: round(float(step["seconds"]), 3) for name, step in (
            ("fingerprint", fingerprint), ("validate", validation), ("extract", features), ("coreset", bank),
            ("evaluate", evaluation), ("calibrate", calibrated), ("report", report))},
        "artifacts": {
            "report": report["files"],
            "validation": validation["files"] + ([validation["docs_dir"]] if validation.get("docs_dir") else []),
            # [file, name under which it is logged]
            "evaluation": [[str(Path(evaluation["evaluation_dir"]) / "evaluation.json"), "evaluation.json"],
                           [calibrated["calibration_file"], "calibration.json"], [split["split"], "split.json"]],
        },
        "input_example": _abs(load_manifest(fingerprint["manifest"]), read_json(split["split"])["holdout"][0]).as_posix(),
    }
    record["per_defect_rows"] = per_defect_rows(evaluation, calibrated["calibration"]["threshold"])
    return record


# -- summaries (for Prefect artifacts, MLflow and the CLI) ------------------------------------------
def per_defect_rows(evaluation: dict[str, Any], threshold: float) -> list[dict[str, Any]]:
    """One row per test image type (good and each defect) plus one for the held-out nominal split:
    counts, AUROC and PRO (all test images), share flagged at the threshold (all images of the row,
    and only the report images, which did not pick the threshold)."""
    data = read_json(Path(evaluation["evaluation_dir"]) / "evaluation.json")
    groups: dict[str, list[dict]] = {}
    for r in data["records"]:
        groups.setdefault(r["defect_type"] if r["split"] == TEST else "held-out nominal", []).append(r)
    rows = []
    for name in sorted(groups, key=lambda n: (n == "held-out nominal", n != GOOD, n)):
        group = groups[name]
        flagged = sum(r["score"] >= threshold for r in group)
        report = [r for r in group if r.get("role") == REPORT]
        figures = data["per_defect_type"].get(name, {})
        rows.append({
            "type": name, "label": "good" if group[0]["label"] == 0 else "defect", "images": len(group),
            "image_auroc": _round(figures.get("image_auroc")), "pro": _round(figures.get("pro")),
            "flagged_at_threshold": flagged, "flagged_share": round(flagged / len(group), 4),
            "flagged_share_report_images": round(sum(r["score"] >= threshold for r in report) / len(report), 4)
            if report else None,
            "mean_score": round(float(np.mean([r["score"] for r in group])), 6),
        })
    return rows


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def summary_markdown(result: dict[str, Any]) -> str:
    """The markdown summary of one training run (Prefect artifact, MLflow run description)."""
    c = result["calibration"]
    m = result["metrics"]
    lines = [f"# PatchCore model for `{result['product']}`", ""]
    if result.get("weights_kind") == "random":
        lines += ["> **RANDOM backbone weights: scores are not meaningful for real inspection (demo/test only).**", ""]
    reg = result.get("registry") or {}
    lines += [
        "| | |", "|---|---|",
        f"| registered model | `{reg.get('name', '-')}` version **{reg.get('version', '-')}** (alias `challenger`) |",
        f"| MLflow run | `{reg.get('run_id', '-')}` ({reg.get('tracking_uri', '-')}) |",
        f"| data version | `{result['data_version'][:16]}` ({result['data_root']}) |",
        f"| mode | {c['mode']} |",
        f"| memory bank | {result['bank_size']} patches from {result['n_bank']} images |",
        f"| features | {result['features']['n_extracted']} images extracted, {result['features']['n_cached']} from the cache |",
        f"| held-out nominal images | {c['n_heldout']} |",
        f"| threshold | **{c['threshold']:.6g}** — rule `{c['rule']}`: {c['rule_detail']} |",
        f"| held-out FPR at threshold | {c['heldout_fpr']:.3f} ({c['heldout_false_alarms']} of {c['n_heldout']})"
        + ("" if c["heldout_fpr_independent"] else " — in-sample: these scores picked the threshold") + " |",
        f"| figures at threshold measured on | {c['report_on']} |",
    ]
    continued = result.get("coreset_continued")
    if continued:
        lines.append(f"| coreset | continued bank `{continued['from_bank']}` ({continued['prior_images']} images, "
                     f"{continued['prior_picks']} picks kept) with {continued['new_images']} new image(s) |")
    at = c.get("at_threshold") or {}
    if at:
        lines.append("| at threshold | " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in at.items()) + " |")
    if "threshold_recall100" in c:
        r100 = c["at_recall100"]
        lines.append(f"| threshold at 100% recall | {c['threshold_recall100']:.6g} (on report images: recall "
                     f"{r100['recall']:.3f}, FPR {r100['fpr']:.3f}) |")
    for name in ("image_auroc", "pixel_auroc", "pro", "f1_max"):
        if name in m:
            lines.append(f"| {name} (all test images) | {m[name]:.4f} |")
    cached = set(result.get("cached_stages", []))
    lines.append("| seconds per stage | " + ", ".join(f"{k} {v:.1f}" + (" (cached)" if k in cached else "")
                                                    for k, v in result["seconds"].items()) + " |")
    return "\n".join(lines) + "\n"
