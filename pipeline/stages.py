"""The DVC stages of dvc.yaml: `python -m pipeline.stages <stage> <product>`.

Each stage calls the same step functions as the Prefect tasks (pipeline/steps/; validation in
pipeline/validation.py), reads params.yaml through pipeline.config (the one config), then copies
what the next stage needs from the content-addressed store (pipeline/store.py) into outputs/<product>/
(the paths dvc.yaml declares, so DVC caches and restores them) and writes metrics (JSON) and plots:

    validate   data/<product>           -> validation/ (summary, per-file failures, Data Docs),
                                           manifest.json, data_version.json, metrics/validate.json
    extract    manifest                 -> split.json, features/ (bank images' patch features)
    coreset    features                 -> bank/ (PatchCore, no threshold), metrics/coreset.json
    evaluate   bank                     -> evaluation/, metrics/evaluate.json, plots/{roc,pr,scores}.csv
    calibrate  evaluation               -> model/ (the calibrated PatchCore), metrics/calibrate.json,
                                           plots/*.png (ROC, PR, score histogram, heatmaps)

Registration is not a stage (a registry is shared state DVC cannot cache or restore): the training
flow registers what it trains; see README "Data: validation and versioning".

Never imports prefect or mlflow.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from patchcore.errors import USER_ERRORS
from pipeline import steps
from pipeline.config import Params, load
from pipeline.io import plain, read_json, write_json
from pipeline.results import Bank, Evaluation, FeatureSet, Manifest, Split
from pipeline.store import Store

DATA_ROOT = Path("data")
OUTPUTS = Path("outputs")
STAGES = ("validate", "extract", "coreset", "evaluate", "calibrate")


def out_dir(product: str) -> Path:
    return OUTPUTS / product


def _write(path: Path, data: Any) -> Path:
    return write_json(path, plain(data))


def _read(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the earlier stages first (`dvc repro`)")
    return read_json(path)


def _fresh(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _copy_tree(source: str | Path, target: Path) -> Path:
    shutil.copytree(source, _fresh(target))
    return target


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same file system: no second copy of the features
    except OSError:
        shutil.copy2(source, target)


def _restore(store: Store, copy: Path, *parts: str) -> None:
    """Put a stage output that DVC restored (dvc pull / checkout) back into the store when the store
    lacks it (a fresh machine), so the later stages find their inputs."""
    if store.has(*parts) or not copy.exists():
        return
    if copy.is_dir():
        with store.directory(*parts) as folder:
            shutil.copytree(copy, folder, dirs_exist_ok=True)
    else:
        store.copy_in(copy, *parts)


# -- the stages ---------------------------------------------------------------------------------------
def validate(product: str, params: Params, store: Store) -> dict[str, Any]:
    """The Great Expectations suite on the nominal images, plus the steps' checks of test images and
    masks; a failure exits non-zero, so `dvc repro` stops before extraction."""
    out = out_dir(product)
    manifest = steps.fingerprint_dataset(store, DATA_ROOT / product, product)
    validation = steps.validate_dataset(store, manifest, params, product)
    _copy_tree(Path(validation.summary).parent, out / "validation")
    shutil.copyfile(manifest.manifest, out / "manifest.json")
    _write(out / "manifest_result.json", manifest.to_dict() | {"manifest": str(out / "manifest.json")})
    _write(out / "data_version.json", manifest.data_version_record)  # DVC md5 + git commit
    summary = _read(out / "validation" / "summary.json")
    metrics = {
        "n_files_checked": summary["n_files"],
        "n_failures": summary["n_failures"],
        "n_train": manifest.n_train,
        "n_test_good": manifest.n_test_good,
        "n_test_defect": manifest.n_test_defect,
        "luminance_mean": round(summary["stats"]["luminance_mean"]["mean"], 3),
    }
    _write(out / "metrics" / "validate.json", metrics)
    return metrics


def _manifest(product: str) -> Manifest:
    return Manifest.from_dict(_read(out_dir(product) / "manifest_result.json"))


def extract(product: str, params: Params, store: Store) -> dict[str, Any]:
    """Split (memory bank / held-out / calibration / report), then the bank images' patch features."""
    out = out_dir(product)
    manifest = _manifest(product)
    division = steps.split_dataset(store, manifest, params.pipeline)
    shutil.copyfile(division.split, out / "split.json")
    features = steps.extract_features(store, manifest, division.replace(split=str(out / "split.json")), params.model)
    target = _fresh(out / "features")
    target.mkdir()
    by_path = {e["path"]: e["sha256"] for e in _read(out / "manifest.json")["images"]}
    source = Path(features.feature_dir)
    for path in _read(out / "split.json")["bank"]:
        name = f"{by_path[path]}.npy"
        _link_or_copy(source / name, target / name)
    shutil.copyfile(source / "identity.json", target / "identity.json")
    summary = features.replace(seconds=0.0).to_dict() | {
        "split": division.replace(split=str(out / "split.json")).to_dict()
    }
    _write(out / "features.json", summary)
    return summary


def _features(product: str, store: Store) -> tuple[Split, FeatureSet]:
    out = out_dir(product)
    saved = _read(out / "features.json")
    features = FeatureSet.from_dict(saved)
    for name in sorted(p.name for p in (out / "features").glob("*.npy")):
        _restore(store, out / "features" / name, "features", features.identity, name)
    return Split.from_dict(saved["split"]), features


def coreset(product: str, params: Params, store: Store) -> dict[str, Any]:
    """Coreset-subsampled memory bank from the extracted features."""
    out = out_dir(product)
    division, features = _features(product, store)
    # warm_start stays off: a DVC-built bank depends on the data and params alone (reproducible).
    bank = steps.build_memory_bank(store, _manifest(product), division, features, params.model, warm_start=False)
    _copy_tree(bank.bank_dir, out / "bank")
    _write(out / "bank.json", bank.replace(seconds=0.0, cached=False).to_dict())
    metrics = {
        "bank_size": bank.bank_size,
        "n_train_patches": bank.n_train_patches,
        "fraction": params.model.coreset.fraction,
    }
    _write(out / "metrics" / "coreset.json", metrics)
    return metrics


def _bank(product: str, store: Store) -> Bank:
    bank = Bank.from_dict(_read(out_dir(product) / "bank.json"))
    _restore(store, out_dir(product) / "bank", "banks", bank.bank_key)
    return bank


def evaluate(product: str, params: Params, store: Store) -> dict[str, Any]:
    """Scores of the held-out nominal and test images: metrics, ROC/PR points, per-image scores."""
    out = out_dir(product)
    division, _ = _features(product, store)
    evaluation = steps.evaluate_bank(store, _manifest(product), division, _bank(product, store))
    # Keep the content key as the folder name: calibrate's model key is derived from it.
    key = evaluation.json_path.parent.name
    _fresh(out / "evaluation")
    _copy_tree(evaluation.evaluation_dir, out / "evaluation" / key)
    _write(out / "evaluation.json", evaluation.replace(seconds=0.0, cached=False).to_dict())
    _write(out / "metrics" / "evaluate.json", evaluation.metrics)
    _write_score_plots(out / "evaluation" / key / "evaluation.json", out / "plots")
    return evaluation.metrics


def calibrate(product: str, params: Params, store: Store) -> dict[str, Any]:
    """Threshold, the calibrated model (outputs/<product>/model) and its report plots."""
    out = out_dir(product)
    bank = _bank(product, store)
    evaluation = Evaluation.from_dict(_read(out / "evaluation.json"))
    key = evaluation.json_path.parent.name
    _restore(store, out / "evaluation" / key, "evaluations", key)
    division, features = _features(product, store)
    manifest = _manifest(product)
    provenance = steps.provenance(product, manifest, division.split_key, features.identity)
    provenance |= {"data_version_record": _read(out / "data_version.json"), "built_by": "dvc repro"}
    calibrated = steps.calibrate(store, evaluation, bank, product, params.pipeline, provenance)
    _copy_tree(calibrated.model_dir, out / "model")
    report = steps.make_report(store, evaluation, calibrated, manifest, params.pipeline)
    images = _fresh(out / "report")
    images.mkdir()
    for file in report.files:
        if file.endswith(".png"):
            shutil.copyfile(file, images / Path(file).name)
    c = calibrated.calibration
    metrics = {
        "threshold": c["threshold"],
        "rule": c["rule"],
        "heldout_fpr": c["heldout_fpr"],
        "n_heldout": c["n_heldout"],
    } | {f"at_threshold_{k}": v for k, v in (c.get("at_threshold") or {}).items()}
    _write(out / "metrics" / "calibrate.json", metrics)
    _write(out / "calibration.json", c)
    return metrics


def _write_score_plots(evaluation_json: Path, plots: Path) -> None:
    """ROC and PR points (labelled test images) and every scored image, as CSV for `dvc plots`."""
    records = _read(evaluation_json)["records"]
    _fresh(plots).mkdir()
    with open(plots / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "split", "defect_type", "label", "score"])
        for r in records:
            writer.writerow([r["path"], r["split"], r["defect_type"], r["label"], f"{r['score']:.6g}"])
    test = [r for r in records if r["split"] == steps.TEST]
    labels = np.array([r["label"] for r in test])
    scores = np.array([r["score"] for r in test])
    roc_rows, pr_rows = [], []
    if len(set(labels.tolist())) == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        roc_rows = [(f"{a:.6g}", f"{b:.6g}") for a, b in zip(fpr, tpr)]
        precision, recall, _ = precision_recall_curve(labels, scores)
        pr_rows = [(f"{a:.6g}", f"{b:.6g}") for a, b in zip(recall, precision)]
    for name, header, rows in (("roc.csv", ("fpr", "tpr"), roc_rows), ("pr.csv", ("recall", "precision"), pr_rows)):
        with open(plots / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)


STAGE_FUNCTIONS = {
    "validate": validate,
    "extract": extract,
    "coreset": coreset,
    "evaluate": evaluate,
    "calibrate": calibrate,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("product", help="folder name under data/ (MVTec layout)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load(args.params)
        result = STAGE_FUNCTIONS[args.stage](args.product, params, Store.from_settings(params))
    except USER_ERRORS as exc:  # bad data, config, weights: one message, no traceback
        print(f"error: stage {args.stage} ({args.product}): {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
