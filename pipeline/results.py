"""Typed results of the training steps: what one step hands the next (paths in the store,
content hashes, counts and small figures; never arrays).

Each is a frozen dataclass that round-trips through JSON (`to_dict` / `from_dict`), so the same
objects pass between Prefect tasks, DVC stages (as JSON files) and tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R", bound="StepResult")


class StepResult:
    """JSON round trip shared by every step result."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self: R, **changes: Any) -> R:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class Manifest(StepResult):
    """fingerprint: every image's path, label and sha256 in `manifest` (a JSON file in the store)."""

    manifest: str
    manifest_sha256: str
    data_root: str
    data_version: str
    data_version_record: dict[str, Any]
    n_train: int
    n_test_good: int
    n_test_defect: int
    seconds: float = 0.0


@dataclass(frozen=True)
class Validation(StepResult):
    """validate: the report files of a set that passed."""

    summary: str
    files: list[str]
    docs_dir: str | None
    n_files: int
    seconds: float = 0.0

    @property
    def artifact_paths(self) -> list[str]:
        return self.files + ([self.docs_dir] if self.docs_dir else [])


@dataclass(frozen=True)
class Split(StepResult):
    """split: which images build the bank, which are held out, which calibrate and which report."""

    split: str
    split_key: str
    mode: str  # "labelled" | "nominal-only"
    n_bank: int
    n_holdout: int
    n_calibration: int
    n_report: int
    calibration_note: str | None = None


@dataclass(frozen=True)
class ExtractionPlan(StepResult):
    """extract, planned: the images missing from the feature cache, cut into shards of
    [sha256, image path] pairs (sorted by sha256; each shard a whole number of batches)."""

    feature_dir: str
    identity: str
    n_images: int
    n_cached: int
    shards: list[list[list[str]]]
    threads: int = 1  # intra-op CPU threads of every shard (the same everywhere: the same bits)

    @property
    def n_missing(self) -> int:
        return sum(len(shard) for shard in self.shards)


@dataclass(frozen=True)
class FeatureSet(StepResult):
    """extract: the feature-cache folder of one feature identity and what this run added to it."""

    feature_dir: str
    identity: str
    n_images: int
    n_cached: int
    n_extracted: int
    seconds: float = 0.0


@dataclass(frozen=True)
class Bank(StepResult):
    """coreset: the fitted memory bank (a saved PatchCore without threshold)."""

    bank_dir: str
    bank_key: str
    bank_size: int
    n_train_patches: int
    weights_kind: str
    coreset_seconds: float | None = None
    coreset_continued: dict[str, Any] | None = None
    cached: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class Evaluation(StepResult):
    """evaluate: per-image scores and maps (in `evaluation_dir`), with the threshold-free figures."""

    evaluation_dir: str
    mode: str
    metrics: dict[str, Any]
    per_defect_type: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0

    @property
    def json_path(self) -> Path:
        return Path(self.evaluation_dir) / "evaluation.json"

    @property
    def maps_path(self) -> Path:
        return Path(self.evaluation_dir) / "maps.npz"


@dataclass(frozen=True)
class Calibration(StepResult):
    """calibrate: the threshold with its figures and the calibrated model that gets registered."""

    model_dir: str
    model_key: str
    calibration: dict[str, Any]
    calibration_file: str
    per_defect_rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def threshold(self) -> float:
        return float(self.calibration["threshold"])


@dataclass(frozen=True)
class Report(StepResult):
    """report: the plot and table files of one calibrated model."""

    report_dir: str
    files: list[str]
    seconds: float = 0.0


@dataclass(frozen=True)
class TrainingRecord(StepResult):
    """Everything the registry and the summaries need about one finished training."""

    product: str
    data_version: str
    data_root: str
    data_version_record: dict[str, Any]
    git: dict[str, Any]
    feature_identity: str
    model_dir: str
    calibration: dict[str, Any]
    metrics: dict[str, Any]
    per_defect_type: dict[str, Any]
    per_defect_rows: list[dict[str, Any]]
    bank_size: int
    n_bank: int
    weights_kind: str
    features: dict[str, int]
    coreset_continued: dict[str, Any] | None
    cached_stages: list[str]
    seconds: dict[str, float]
    artifacts: dict[str, list[Any]]
    input_example: str
    # What decides the registered model (images, split, bank, evaluation, threshold), without times:
    # a training identical to a registered version's registers nothing new.
    training_key: str = ""
    started_at: float = 0.0  # when the training began (the MLflow run's start time)


__all__ = [
    "Bank",
    "Calibration",
    "Evaluation",
    "ExtractionPlan",
    "FeatureSet",
    "Manifest",
    "Report",
    "Split",
    "StepResult",
    "TrainingRecord",
    "Validation",
]
