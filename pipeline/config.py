"""The typed pipeline settings: every section of params.yaml besides `model` (which
patchcore.config owns). Loaded once, shared by the Prefect flows, the DVC stages and the CLI.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchcore.config import ConfigError, PatchCoreConfig, apply_profile, build_settings, flatten, load_params


@dataclass
class ValidationConfig:
    """Parameters of the Great Expectations suite that every nominal image set must pass before a
    model is trained on it (the suite itself: pipeline/expectations/nominal_images.yaml)."""

    min_images: int = 10  # fewer nominal images than this fails the set
    # PIL format names. (Typed Optional only because patchcore.config._coerce reads a plain
    # list[str] hint as str; null is rejected below.)
    formats: list[str] | None = field(default_factory=lambda: ["PNG", "JPEG", "BMP", "TIFF"])
    # Smallest accepted width/height; None = pipeline.validation.MIN_USABLE_SIDE_PX (32 px). Images
    # smaller than model.image.resize pass with a note: the model upsamples them.
    min_side_px: int | None = None
    max_side_px: int = 10000  # larger sides fail (decompression-bomb guard)
    max_pixels: int = 40_000_000  # width x height above this fails, and the file is never decoded
    # Drift against the previously accepted version of the same product (skipped for a first
    # version): each image's luminance mean and contrast (luminance std) must lie within
    # accepted mean +- drift_band_std * accepted std (for at least drift_mostly of the images),
    # and the set's average within accepted mean +- drift_set_band_std * accepted std.
    drift_band_std: float = 4.0
    drift_mostly: float = 0.95
    drift_set_band_std: float = 1.0
    drift_min_band: float = 2.0  # a band is never narrower than +- this many grey levels (0-255)

    def __post_init__(self) -> None:
        checks = {
            "validation.min_images must be >= 1": self.min_images >= 1,
            "validation.formats must not be empty": bool(self.formats),
            "validation.min_side_px must be >= 1 or null": self.min_side_px is None or self.min_side_px >= 1,
            "validation.max_side_px and max_pixels must be positive": self.max_side_px > 0 and self.max_pixels > 0,
            "validation.drift_mostly must be in (0, 1]": 0.0 < self.drift_mostly <= 1.0,
            "validation.drift_* bands must be positive": min(self.drift_band_std, self.drift_set_band_std) > 0
            and self.drift_min_band >= 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ConfigError(message)


@dataclass
class DataConfig:
    """The image sets under data/ (one MVTec-layout folder per product, versioned by data.dvc) that
    `dvc repro` builds a model for: dvc.yaml runs its stages once per product listed here."""

    # (Typed Optional only for patchcore.config._coerce, as validation.formats; null is rejected.)
    products: list[str] | None = field(default_factory=lambda: ["tiles"])

    def __post_init__(self) -> None:
        if not self.products or any(not p or "/" in p or p in (".", "..") for p in self.products):
            raise ConfigError(f"data.products must be a list of product folder names under data/, got {self.products}")


@dataclass
class PipelineConfig:
    """How the training flow splits, calibrates and reports (params.yaml `pipeline:`)."""

    # Share of train/good kept out of the memory bank and always scored: the held-out nominal
    # split. Membership is decided per image by a keyed hash of its content (seeded), so adding
    # images to a product rarely moves an existing image between the bank and the held-out split.
    holdout_fraction: float = 0.2
    holdout_seed: int = 0
    # With labelled defects (test/<defect>): this share of the labelled test images (stratified by
    # type, seeded by holdout_seed) picks the F1-optimal threshold; the rest reports precision,
    # recall, FPR and errors at it. Too few images to split: picked and reported on the same images,
    # and the report says so.
    calibration_fraction: float = 0.5
    # Cold start (nominal images only): the lowest threshold that flags at most target_fpr of the
    # held-out nominal images (the (1 - target_fpr) quantile of their scores, resolution 1/n).
    target_fpr: float = 0.01
    # Heatmap overlays in the MLflow grid artifact (worst misses and false alarms first).
    heatmap_grid_size: int = 16
    # Retraining after new images landed continues the previous bank's greedy coreset (same images
    # plus new ones, same settings): its picks are kept and only the new images' share is added,
    # so the coreset costs time in proportion to the new images. false: every bank from scratch.
    # `dvc repro` always builds from scratch (reproducible from the data alone).
    incremental_coreset: bool = True
    # Where the content-addressed outputs live (pipeline/store.py): null = env PATCHCORE_STORE, else
    # $PATCHCORE_HOME; or a folder, or an fsspec URL such as s3://bucket/prefix or
    # file:///mnt/shared/patchcore (S3 endpoint and keys: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
    store: str | None = None

    def __post_init__(self) -> None:
        checks = {
            f"pipeline.holdout_fraction must be in (0, 1), got {self.holdout_fraction}": 0.0
            < self.holdout_fraction
            < 1.0,
            f"pipeline.calibration_fraction must be in (0, 1), got {self.calibration_fraction}": 0.0
            < self.calibration_fraction
            < 1.0,
            f"pipeline.target_fpr must be in [0, 1), got {self.target_fpr}": 0.0 <= self.target_fpr < 1.0,
            f"pipeline.heatmap_grid_size must be >= 0, got {self.heatmap_grid_size}": self.heatmap_grid_size >= 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ConfigError(message)


PROMOTION_METRICS = ("image_auroc", "pixel_auroc", "pro", "f1_max")


@dataclass
class PromotionConfig:
    """The gate that moves the `champion` alias (params.yaml `promotion:`)."""

    metric: str = "image_auroc"  # image_auroc | pixel_auroc | pro | f1_max, on the pinned evaluation set
    tolerance: float = 0.01  # the challenger may score this much below the champion and still win
    # Absolute floors every champion must pass (the first model of a product has nothing to beat).
    min_metric: float = 0.8
    # The challenger's FPR at its own threshold on its held-out nominal split must not exceed this.
    max_heldout_fpr: float = 0.1
    # Let a model built on RANDOM backbone weights become champion (the demo profile only; the
    # command line's --allow-random-weights does the same for one promotion).
    allow_random_weights: bool = False

    def __post_init__(self) -> None:
        if self.metric not in PROMOTION_METRICS:
            raise ConfigError(f"promotion.metric must be one of {', '.join(PROMOTION_METRICS)}, got {self.metric!r}")
        if self.tolerance < 0 or not 0.0 <= self.max_heldout_fpr <= 1.0:
            raise ConfigError("promotion.tolerance must be >= 0 and promotion.max_heldout_fpr in [0, 1]")


@dataclass
class MlflowConfig:
    """Where runs and registered models go (params.yaml `mlflow:`)."""

    # null: MLFLOW_TRACKING_URI, else sqlite:///$PATCHCORE_HOME/mlflow/mlflow.db with artifacts in
    # $PATCHCORE_HOME/mlflow/artifacts (`mlflow ui --backend-store-uri <that uri>` shows the runs).
    tracking_uri: str | None = None
    # Experiment and registered model of a product are both named <name_prefix><product>.
    name_prefix: str = "patchcore-"


@dataclass
class OperationsConfig:
    """Day-to-day operation (params.yaml `operations:`): when products retrain by themselves and how
    the new-data watcher settles (deploy/serve.py, deploy/watcher.py, flows/retrain.py)."""

    # Cron schedule of the scheduled retrain, per product; `default` applies to products not listed.
    # A scheduled run retrains only when the product's images differ from the champion's data version.
    schedule: dict[str, str] | None = field(default_factory=lambda: {"default": "0 2 * * *"})
    schedule_timezone: str = "UTC"
    # How the watcher (deploy/watcher.py) learns of new files: auto (inotify through watchdog, else
    # polling), inotify, or poll (network file systems, where inotify sees nothing).
    watch_mode: str = "auto"
    # The watcher rescans each product folder this often (inotify wakes it at once in between) ...
    watch_interval_seconds: float = 10.0
    # ... and fires once the folder has not changed (file count, bytes, newest mtime) for this long,
    # so copying 500 files starts one retrain after the copy ends. Delay from the last file landing to
    # the retrain running: settle + ~1 s (inotify; + the interval when polling) + a few seconds for
    # Prefect's trigger and the runner (README "Operating it" has the measured figure).
    settle_seconds: float = 20.0
    # Trainings of one product that may run at once (a Prefect global concurrency limit
    # `train-<product>`); further triggers queue.
    max_concurrent_trainings: int = 1
    # After training: run the promotion gate; commit data.dvc when the data lives in a git repo.
    promote_after_training: bool = True
    git_commit_data: bool = True
    # After a successful retrain: `dvc push` the data version to the repository's default DVC remote
    # when one is set (`make stack` sets one on its S3 store), so other machines can `dvc pull` it.
    dvc_push: bool = True

    def __post_init__(self) -> None:
        if not self.schedule or not all(isinstance(v, str) and len(v.split()) == 5 for v in self.schedule.values()):
            raise ConfigError(
                f"operations.schedule must map products (or `default`) to 5-field cron strings, got {self.schedule!r}"
            )
        if self.watch_interval_seconds <= 0 or self.settle_seconds < 0:
            raise ConfigError("operations.watch_interval_seconds must be > 0 and settle_seconds >= 0")
        if self.watch_mode not in ("auto", "inotify", "poll"):
            raise ConfigError(f"operations.watch_mode must be auto, inotify or poll, got {self.watch_mode!r}")
        if self.max_concurrent_trainings < 1:
            raise ConfigError(f"operations.max_concurrent_trainings must be >= 1, got {self.max_concurrent_trainings}")

    def cron_for(self, product: str) -> str:
        return (self.schedule or {}).get(product) or (self.schedule or {}).get("default") or "0 2 * * *"


EXTRACT_MODES = ("auto", "local", "dask")


@dataclass
class ClusterConfig:
    """Where the extract step runs (params.yaml `cluster:`; README "Scaling out"). The images missing
    from the feature cache are cut into shards; `local` extracts them one after the other in the
    flow's process, `dask` maps them over a Dask cluster through Prefect's DaskTaskRunner. Either
    way each image's features are written into the store by itself and are byte-identical."""

    # auto: dask when a scheduler address is known (dask_address, else env PATCHCORE_DASK_ADDRESS),
    # local otherwise | local | dask (with no address: a temporary LocalCluster of local_workers).
    extract: str = "auto"
    # tcp://host:8786 of a running `dask scheduler`; null: env PATCHCORE_DASK_ADDRESS (set by
    # `make stack` for its workers), else none.
    dask_address: str | None = None
    local_workers: int = 2  # the temporary LocalCluster's worker processes (extract: dask, no address)
    # Images per shard (rounded up to a multiple of model.runtime.batch_size, so every shard's
    # batches hold the same images in any mode: the features are bit-identical).
    shard_images: int = 32
    # Intra-op CPU threads of the backbone in every shard, wherever it runs; null: the cores of the
    # machine that plans the extraction. The CPU kernels round differently with another thread count,
    # so one count for all shards keeps the features bit-identical across workers (Dask's own
    # 1-thread-per-worker default does not apply to them).
    extract_threads: int | None = None
    # Each shard asks the scheduler for one "GPU" resource: start GPU workers with
    # `dask worker ... --nworkers 1 --resources GPU=1` (one per GPU, CUDA_VISIBLE_DEVICES set).
    gpu_resource: bool = False

    def __post_init__(self) -> None:
        if self.extract not in EXTRACT_MODES:
            raise ConfigError(f"cluster.extract must be one of {', '.join(EXTRACT_MODES)}, got {self.extract!r}")
        if self.local_workers < 1 or self.shard_images < 1:
            raise ConfigError("cluster.local_workers and cluster.shard_images must be >= 1")
        if self.extract_threads is not None and self.extract_threads < 1:
            raise ConfigError(f"cluster.extract_threads must be >= 1 or null, got {self.extract_threads}")
        if self.dask_address is not None and "://" not in self.dask_address:
            raise ConfigError(
                f"cluster.dask_address must be a scheduler URL such as tcp://127.0.0.1:8786, got {self.dask_address!r}"
            )

    def scheduler(self) -> str | None:
        """The scheduler address in effect: dask_address, else env PATCHCORE_DASK_ADDRESS."""
        return self.dask_address or os.environ.get("PATCHCORE_DASK_ADDRESS") or None

    def uses_dask(self) -> bool:
        return self.extract == "dask" or (self.extract == "auto" and self.scheduler() is not None)


@dataclass
class Params:
    """The whole params.yaml. Sections other than `model` are added by the pipeline modules."""

    # The active entry of params.yaml's `profiles:` (patchcore.config.apply_profile): production | demo
    profile: str = "production"
    model: PatchCoreConfig = field(default_factory=PatchCoreConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    operations: OperationsConfig = field(default_factory=OperationsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Params:
        return build_settings(cls, data or {}, "")


def load(path: str | Path | None = None) -> Params:
    """params.yaml (`path`, PATCHCORE_PARAMS or ./params.yaml) as typed settings."""
    try:
        return Params.from_dict(apply_profile(load_params(path)))
    except ConfigError as exc:
        raise ConfigError(f"{path or 'params.yaml'}: {exc}") from None


def params_to_dict(params: Params) -> dict[str, Any]:
    """The settings as plain JSON-able data (what Prefect flow parameters and MLflow params take)."""
    return dataclasses.asdict(params)


def flat_params(params: Params) -> dict[str, Any]:
    """`section.key[.key]` view of every setting, e.g. {"model.coreset.fraction": 0.1, ...}."""
    return flatten(params_to_dict(params))


def with_overrides(params: Params, overrides: dict[str, Any] | None) -> Params:
    """A copy with dotted-key overrides such as {"model.backbone.weights": "random"}; unknown keys
    are a ConfigError naming the key."""
    data = params_to_dict(params)
    for dotted, value in (overrides or {}).items():
        if dotted == "profile":
            raise ConfigError(
                "the profile cannot be set with --set: switch it with `patchcore profile NAME` "
                "(or `profile:` in params.yaml), then run again"
            )
        if "." not in dotted:
            raise ConfigError(f"setting {dotted!r} needs its section: section.key, e.g. model.coreset.fraction")
        node, *path, last = dotted.split(".")
        target = data.get(node)
        for part in path:
            target = target.get(part) if isinstance(target, dict) else None
        if not isinstance(target, dict) or last not in target:
            raise ConfigError(
                f"unknown setting {dotted!r} (keys look like model.coreset.fraction, "
                f"pipeline.holdout_fraction, promotion.metric)"
            )
        target[last] = value
    return Params.from_dict(data)


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """params.yaml (see load) with dotted overrides applied; what every flow and command starts from."""
    return with_overrides(load(path), overrides)
