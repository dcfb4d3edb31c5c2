"""Provenance (what model.json records about where a model came from) and the training record
(everything the registry and the summaries need about one finished training)."""

from __future__ import annotations

import time
from typing import Any

from pipeline.io import content_key, recorded_path, source_commit
from pipeline.results import (
    Bank,
    Calibration,
    Evaluation,
    FeatureSet,
    Manifest,
    Report,
    Split,
    TrainingRecord,
    Validation,
)
from pipeline.steps.fingerprint import image_path, load_manifest
from pipeline.steps.split import load_split


def provenance(product: str, manifest: Manifest, split_key: str, feature_identity: str) -> dict[str, Any]:
    """What model.json records about where a model came from (beyond weights and config)."""
    return {
        "product": product,
        "data_version": manifest.data_version,
        "data_root": recorded_path(manifest.data_root),
        "manifest_sha256": manifest.manifest_sha256,
        "split_key": split_key,
        "feature_identity": feature_identity,
        "git": source_commit(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def training_record(
    product: str,
    manifest: Manifest,
    validation: Validation,
    split: Split,
    features: FeatureSet,
    bank: Bank,
    evaluation: Evaluation,
    calibrated: Calibration,
    report: Report,
    started_at: float | None = None,
) -> TrainingRecord:
    """The one record of a finished training, from the typed results of its steps."""
    steps = {
        "fingerprint": manifest,
        "validate": validation,
        "extract": features,
        "coreset": bank,
        "evaluate": evaluation,
        "calibrate": calibrated,
        "report": report,
    }
    holdout = load_split(split)["holdout"]
    return TrainingRecord(
        product=product,
        data_version=manifest.data_version,
        data_root=recorded_path(manifest.data_root),
        data_version_record=manifest.data_version_record,
        git=source_commit(),
        feature_identity=features.identity,
        model_dir=calibrated.model_dir,
        calibration=calibrated.calibration,
        metrics=evaluation.metrics,
        per_defect_type=evaluation.per_defect_type,
        per_defect_rows=calibrated.per_defect_rows,
        bank_size=bank.bank_size,
        n_bank=split.n_bank,
        weights_kind=bank.weights_kind,
        features={"n_images": features.n_images, "n_cached": features.n_cached, "n_extracted": features.n_extracted},
        coreset_continued=bank.coreset_continued,
        cached_stages=[name for name, step in (("coreset", bank), ("evaluate", evaluation)) if step.cached],
        seconds={name: round(float(step.seconds), 3) for name, step in steps.items()},
        artifacts={
            "report": report.files,
            "validation": validation.artifact_paths,
            # [file, name under which it is logged]
            "evaluation": [
                [str(evaluation.json_path), "evaluation.json"],
                [calibrated.calibration_file, "calibration.json"],
                [split.split, "split.json"],
            ],
        },
        input_example=image_path(load_manifest(manifest), holdout[0]).as_posix(),
        training_key=content_key(
            "training",
            product,
            manifest.manifest_sha256,
            split.split_key,
            bank.bank_key,
            evaluation.json_path.parent.name,
            calibrated.calibration["threshold"],
            calibrated.calibration["rule"],
            length=24,
        ),
        started_at=time.time() if started_at is None else started_at,
    )


__all__ = ["provenance", "training_record"]
