"""The DVC stages of dvc.yaml: `python -m pipeline.stages <stage> <product>`.

Each stage calls the same step functions as the Prefect tasks (pipeline/steps.py; validation in
pipeline/validation.py), reads params.yaml through pipeline.config (the one config), then copies
what the next stage needs from PATCHCORE_HOME's content-addressed store into outputs/<product>/
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
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from patchcore.cli import USER_ERRORS

from pipeline import config as pipeline_config
from pipeline import steps


DATA_ROOT = Path("data")
OUTPUTS = Path("outputs")
STAGES = ("validate", "extract", "coreset", "evaluate", "calibrate")


def out_dir(product: str) -> Path:
    return OUTPUTS / product


def _write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=steps._jsonable) + "\n")
    return path


def _read(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the earlier stages first (`dvc repro`)")
    return json.loads(path.read_text())


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


# -- the stages ---------------------------------------------------------------------------------------
def validate(product: str, params: pipeline_config.Params) -> dict[str, Any]:
    """The Great Expectations suite on the nominal images, plus the steps' checks of test images and
    masks; a failure exits non-zero, so `dvc repro` stops before extraction."""
    out = out_dir(product)
    fingerprint = steps.fingerprint_dataset(DATA_ROOT / product, product)
    validation = steps.validate_dataset(fingerprint["manifest"], params, product)
    _copy_tree(Path(validation["summary"]).parent, out / "validation")
    shutil.copyfile(fingerprint["manifest"], out / "manifest.json")
    _write(out / "data_version.json", fingerprint["data_version_record"])  # DVC md5 + git commit
    summary = _read(out / "validation" / "summary.json")
    metrics = {"n_files_checked": summary["n_files"], "n_failures": summary["n_failures"],
               "n_train": fingerprint["n_train"], "n_test_good": fingerprint["n_test_good"],
               "n_test_defect": fingerprint["n_test_defect"],
               "luminance_mean": round(summary["stats"]["luminance_mean"]["mean"], 3)}
    _write(out / "metrics" / "validate.json", metrics)
    return metrics


def extract(product: str, params: pipeline_config.Params) -> dict[str, Any]:
    """Split (memory bank / held-out / calibration / report), then the bank images' patch features."""
    out = out_dir(product)
    manifest = out / "manifest.json"
    split = steps.split_dataset(manifest, params.pipeline)
    shutil.copyfile(split["split"], out / "split.json")
    features = steps.extract_features(manifest, out / "split.json", params.model)
    target = _fresh(out / "features")
    target.mkdir()
    by_path = {e["path"]: e["sha256"] for e in _read(manifest)["images"]}
    source = Path(features["feature_dir"])
    for path in _read(out / "split.json")["bank"]:
        name = f"{by_path[path]}.npy"
        _link_or_copy(source / name, target / name)
    shutil.copyfile(source / "identity.json", target / "identity.json")
    summary = ({k: v for k, v in features.items() if k != "seconds"}
               | {"feature_dir": str(target), "split_key": split["split_key"]})
    _write(out / "features.json", summary)
    return summary


def coreset(product: str, params: pipeline_config.Params) -> dict[str, Any]:
    """Coreset-subsampled memory bank from the extracted features."""
    out = out_dir(product)
    features = _read(out / "features.json") | {"feature_dir": str(out / "features")}
    # warm_start stays off: a DVC-built bank depends on the data and params alone (reproducible).
    bank = steps.build_memory_bank(out / "manifest.json", out / "split.json", features, params.model, warm_start=False)
    _copy_tree(bank["bank_dir"], out / "bank")
    _write(out / "bank.json", {k: v for k, v in bank.items() if k != "seconds"} | {"bank_dir": str(out / "bank")})
    metrics = {"bank_size": bank["bank_size"], "n_train_patches": bank["n_train_patches"],
               "fraction": params.model.coreset.fraction}
    _write(out / "metrics" / "coreset.json", metrics)
    return metrics


def evaluate(product: str, params: pipeline_config.Params) -> dict[str, Any]:
    """Scores of the held-out nominal and test images: metrics, ROC/PR points, per-image scores."""
    out = out_dir(product)
    bank = _read(out / "bank.json") | {"bank_dir": str(out / "bank")}
    evaluation = steps.evaluate_bank(out / "manifest.json", out / "split.json", bank)
    # Keep the content key as the folder name: calibrate's model key is derived from it.
    key = Path(evaluation["evaluation_dir"]).name
    _fresh(out / "evaluation")
    _copy_tree(evaluation["evaluation_dir"], out / "evaluation" / key)
    _write(out / "evaluation.json", {k: v for k, v in evaluation.items() if k != "seconds"}
           | {"evaluation_dir": str(out / "evaluation" / key)})
    _write(out / "metrics" / "evaluate.json", evaluation["metrics"])
    _write_score_plots(out / "evaluation" / key / "evaluation.json", out / "plots")
    return evaluation["metrics"]


def calibrate(product: str, params: pipeline_config.Params) -> dict[str, Any]:
    """Threshold, the calibrated model (outputs/<product>/model) and its report plots."""
    out = out_dir(product)
    bank = _read(out / "bank.json") | {"bank_dir": str(out / "bank")}
    evaluation = _read(out / "evaluation.json")
    manifest, features = _read(out / "manifest.json"), _read(out / "features.json")
    fingerprint = {"data_version": manifest["data_version"], "data_root": manifest["root"],
                   "manifest_sha256": manifest["manifest_sha256"]}
    provenance = steps.provenance(product, fingerprint, {"split_key": features["split_key"]}, features)
    provenance |= {"data_version_record": _read(out / "data_version.json"), "built_by": "dvc repro"}
    calibrated = steps.calibrate(evaluation, bank, product, params.pipeline, provenance)
    _copy_tree(calibrated["model_dir"], out / "model")
    report = steps.make_report(evaluation, calibrated, out / "manifest.json", params.pipeline)
    images = _fresh(out / "report")
    images.mkdir()
    for file in report["files"]:
        if file.endswith(".png"):
            shutil.copyfile(file, images / Path(file).name)
    c = calibrated["calibration"]
    metrics = {"threshold": c["threshold"], "rule": c["rule"], "heldout_fpr": c["heldout_fpr"],
               "n_heldout": c["n_heldout"]} | {f"at_threshold_{k}": v for k, v in (c.get("at_threshold") or {}).items()}
    _write(out / "metrics" / "calibrate.json", metrics)
    _write(out / "calibration.json", c)
    return metrics


def _write_score_plots(evaluation_json: Path, plots: Path) -> None:
    """ROC and PR points (labelled test images) and every scored image, as CSV for `dvc plots`."""
    import csv

    import numpy as np
    from sklearn.metrics import precision_recall_curve, roc_curve

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("product", help="folder name under data/ (MVTec layout)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = pipeline_config.load(args.params)
        result = globals()[args.stage](args.product, params)
    except USER_ERRORS as exc:  # bad data, config, weights: one message, no traceback
        print(f"error: stage {args.stage} ({args.product}): {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
