"""The training steps as plain functions, one module per stage:

    fingerprint -> validate -> split -> extract -> bank (coreset) -> evaluate -> calibrate -> report
    (+ record: provenance and the training record; its markdown summary is pipeline/summary.py)

The Prefect tasks (tasks/) and the DVC stages (pipeline/stages.py) call exactly these. Each step
takes a `Store` (pipeline/store.py: where content-addressed outputs live) and typed results of
the steps before it (pipeline/results.py: paths and content hashes, never arrays), and writes its
outputs in the store under a name made of the hash of its inputs, so a step whose inputs did not
change finds its output there and returns at once.

No Prefect and no MLflow here (MLflow lives in pipeline/registry.py).
"""

from pipeline.steps.bank import bank_key, build_memory_bank, warm_start_source
from pipeline.steps.calibrate import calibrate, choose_threshold, per_defect_rows
from pipeline.steps.evaluate import evaluate_bank, score_records
from pipeline.steps.features import (
    extract_features,
    extract_planned,
    extract_shard,
    feature_identity,
    feature_set,
    plan_extraction,
)
from pipeline.steps.fingerprint import fingerprint_dataset, image_path, load_manifest
from pipeline.steps.record import provenance, training_record
from pipeline.steps.report import make_report
from pipeline.steps.split import CALIBRATION, HOLDOUT, REPORT, TEST, split_dataset
from pipeline.steps.validate import ValidationFailed, current_reference, drift_reference, validate_dataset

__all__ = [
    "CALIBRATION",
    "HOLDOUT",
    "REPORT",
    "TEST",
    "ValidationFailed",
    "bank_key",
    "build_memory_bank",
    "calibrate",
    "choose_threshold",
    "current_reference",
    "drift_reference",
    "evaluate_bank",
    "extract_features",
    "extract_planned",
    "extract_shard",
    "feature_identity",
    "feature_set",
    "fingerprint_dataset",
    "image_path",
    "load_manifest",
    "make_report",
    "per_defect_rows",
    "plan_extraction",
    "provenance",
    "score_records",
    "split_dataset",
    "training_record",
    "validate_dataset",
    "warm_start_source",
]
