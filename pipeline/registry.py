"""MLflow tracking and the model registry: one experiment and one registered model per product
(`<prefix><product>`, default `patchcore-<product>`), each version an `mlflow.pyfunc` model whose
artifact is the saved PatchCore directory; aliases `challenger` (newest trained), `champion`
(serving) and `previous` (the champion before it). Stages are not used (deprecated in MLflow 3).

The tracking URI is `mlflow.tracking_uri` from params.yaml, else MLFLOW_TRACKING_URI, else a SQLite
store under PATCHCORE_HOME (`sqlite:///$PATCHCORE_HOME/mlflow/mlflow.db`, artifacts beside it in
`artifacts/`), which `mlflow ui --backend-store-uri <uri>` shows.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import mlflow
import pandas as pd
import requests
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking.context import registry as context_registry
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME
from PIL import Image

from patchcore.atomic import atomic_directory
from patchcore.data import to_rgb
from patchcore.digest import model_digest
from patchcore.paths import home
from pipeline.config import MlflowConfig, Params, flat_params
from pipeline.data_version import DataVersion
from pipeline.locks import product_lock
from pipeline.results import TrainingRecord
from pipeline.summary import summary_markdown

logger = logging.getLogger(__name__)
T = TypeVar("T")

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
ALIASES = (CHAMPION, CHALLENGER, PREVIOUS)
RANDOM_WEIGHTS_TAG = "RANDOM (not for production)"
REGISTRATION_TAG, STARTED, COMPLETE, ORPHANED = "registration", "started", "complete", "orphaned"
HISTORY_TAG = "champion_history"  # registered-model tag: versions that were champion, oldest first
# Registered-model tag written before the champion moves and deleted after: the state before and
# after the move, so a move cut short (kill -9, a lost server) is finished or undone by the next
# holder of the product's lock (reconcile), never left with champion, previous and history disagreeing.
PENDING_TAG = "champion_change_pending"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# The tags a registered version carries besides threshold, held-out FPR, run, training key and metrics.
VERSION_TAGS = (
    "data_version",
    "data_root",
    "weights",
    "random_weights",
    "threshold_rule",
    "mode",
    "engine",
)
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
PATCHCORE_PACKAGE = Path(__file__).resolve().parents[1] / "patchcore"
MODEL_ARTIFACT = "patchcore_model"
# What a serving machine installs besides the bundled `patchcore` package (pinned to this machine's).
SERVING_REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "faiss-cpu",
    "numpy",
    "scipy",
    "pillow",
    "pyyaml",
    "tqdm",
    "pandas",
)


class RegistryError(RuntimeError):
    """A registry request that cannot be served as asked (the message says what to do)."""


class TrackingStoreUnreachable(RegistryError):
    pass


# What MLflow's client says when the server is gone (after its own retries: MLFLOW_HTTP_REQUEST_*).
_CONNECTION_SIGNS = ("Max retries exceeded", "Connection refused", "ConnectionError", "Failed to establish")


def tracking_call(what: str, after: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a function whose first argument is a Registry: the tracking server going away
    during `what` becomes one clear TrackingStoreUnreachable (`after`: the state that leaves and
    what to do) instead of a client traceback."""

    def decorate(func: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(func)
        def wrapper(registry: Registry, *args: Any, **kwargs: Any) -> T:
            try:
                return func(registry, *args, **kwargs)
            except (requests.ConnectionError, requests.Timeout, MlflowException) as exc:
                if isinstance(exc, MlflowException) and not any(sign in str(exc) for sign in _CONNECTION_SIGNS):
                    raise
                raise TrackingStoreUnreachable(
                    f"tracking server {registry.uri} stopped answering during {what}; {after}"
                ) from None

        return wrapper

    return decorate


class UnknownProduct(RegistryError):
    pass


class NoSuchAlias(RegistryError):
    pass


# MLflow tags a run with the launching script's absolute path (mlflow.source.name); runs record
# only its name, so no checkout path of the training machine lands in the tracking store.
SOURCE_TAGS = {MLFLOW_SOURCE_NAME: Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "patchcore"}


# -- where -----------------------------------------------------------------------------------------
def default_tracking_uri() -> str:
    return f"sqlite:///{home() / 'mlflow' / 'mlflow.db'}"


def resolve_tracking_uri(cfg: MlflowConfig) -> str:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _local_artifact_root(uri: str) -> Path | None:
    """Artifacts of a local store go beside it; a tracking server decides for itself."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
    if parsed.scheme in ("", "file"):
        return Path(parsed.path) / "artifacts"
    return None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingStoreUnreachable(
                f"tracking store {uri}: cannot create {db.parent} ({exc}); "
                "set mlflow.tracking_uri or MLFLOW_TRACKING_URI"
            ) from None
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise TrackingStoreUnreachable(f"tracking store {uri}: {db} is not readable and writable")
    elif parsed.scheme in ("http", "https"):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
        except requests.RequestException as exc:
            raise TrackingStoreUnreachable(
                f"tracking store {uri} is unreachable ({type(exc).__name__}: {exc}); start the server "
                "(`mlflow server ...`) or point mlflow.tracking_uri / MLFLOW_TRACKING_URI elsewhere"
            ) from None
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None
        try:
            probe = requests.get(
                uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                params={"max_results": 1},
                auth=auth,
                timeout=timeout_s,
            )
        except requests.RequestException:
            return
        if probe.status_code in (401, 403):
            who = f"as {user!r}" if user else "without credentials"
            raise TrackingStoreUnreachable(
                f"tracking server {uri} refused the request {who} (HTTP {probe.status_code}): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or PATCHCORE_CREDENTIALS to the file "
                "`make serve` wrote ($PATCHCORE_HOME/run/credentials.env)"
            )


def serving_requirements(engine: str = "torch") -> list[str]:
    pins = []
    for name in SERVING_REQUIREMENTS + (("onnxruntime",) if engine == "onnxruntime" else ()):
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


# -- the registry ------------------------------------------------------------------------------------
class Registry:
    """The tracking store and model registry of every product, behind one connection."""

    def __init__(self, cfg: MlflowConfig | None = None):
        cfg = cfg or MlflowConfig()
        self.uri = resolve_tracking_uri(cfg)
        self.prefix = cfg.name_prefix
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # names
    def model_name(self, product: str) -> str:
        return f"{self.prefix}{product}"

    def products(self) -> list[str]:
        models = self.client.search_registered_models(filter_string=f"name LIKE '{self.prefix}%'")
        return sorted(m.name.removeprefix(self.prefix) for m in models)

    def require_product(self, product: str):
        try:
            return self.client.get_registered_model(self.model_name(product))
        except MlflowException:
            known = self.products()
            raise UnknownProduct(
                f"unknown product {product!r}: no registered model {self.model_name(product)!r} at {self.uri}"
                + (f" (known: {', '.join(known)})" if known else " (nothing registered yet: run `patchcore train`)")
            ) from None

    def experiment_id(self, product: str) -> str:
        name = self.model_name(product)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before the tag was set
                self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return experiment.experiment_id
        root = _local_artifact_root(self.uri)
        location = (root / name).as_uri() if root else None
        # Marked as model training (not GenAI): MLflow's experiment kind tag. (The 3.17 UI also keeps a
        # per-browser choice; the addresses this project prints add ?workflowType=machine_learning.)
        return self.client.create_experiment(
            name, artifact_location=location, tags={"product": product, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )

    def _versions(self, product: str) -> list:
        """Every version of the product's registered model ([] before its first registration)."""
        name = self.model_name(product)
        if not self.client.search_registered_models(f"name = '{name}'"):
            return []
        return self.client.search_model_versions(f"name = '{name}'")

    def incomplete(self, product: str) -> list:
        """Versions whose registration started and never finished (the process died half-way)."""
        return sorted((mv for mv in self._versions(product) if not is_complete(mv)), key=lambda mv: int(mv.version))

    def reconcile(self, product: str) -> dict[str, list[str]]:
        """Clean up after a registration that died half-way (kill -9, a crash): each such version is
        tagged `registration=orphaned` and loses the challenger alias, and the training runs left
        RUNNING are ended as FAILED. Call it holding the product's lock (pipeline/locks.py), where
        no other registration can be under way: training's registration and the promotion flow do."""
        done: dict[str, list[str]] = {"versions": [], "runs": [], "champion_change": []}
        name = self.model_name(product)
        experiment = self.client.get_experiment_by_name(name)
        repaired = self.repair_champion_change(product)
        if repaired:
            done["champion_change"].append(repaired)
        for mv in self.incomplete(product):
            if mv.tags.get(REGISTRATION_TAG) == ORPHANED:
                continue
            self.tag_version(product, mv.version, {REGISTRATION_TAG: ORPHANED})
            if self.aliases(product).get(CHALLENGER) == str(mv.version):
                self.set_alias(product, CHALLENGER, None)
            done["versions"].append(str(mv.version))
            logger.warning("%s v%s: its registration never finished; marked orphaned", name, mv.version)
        if experiment is not None:
            for run in self.client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'"):
                self.client.set_terminated(run.info.run_id, "FAILED")
                done["runs"].append(run.info.run_id)
                logger.warning(
                    "%s: run %s was left RUNNING by a stopped process: ended as FAILED", name, run.info.run_id
                )
        return done

    def find_training(self, product: str, training_key: str):
        """The registered version whose training had exactly this key (same images, split, bank,
        evaluation and threshold), or None."""
        if not training_key:
            return None
        versions = self._versions(product)
        same = [mv for mv in versions if mv.tags.get("training_key") == training_key and is_complete(mv)]
        return max(same, key=lambda mv: int(mv.version)) if same else None

    def drift_reference(self, product: str) -> dict[str, Any] | None:
        """The drift baseline logged with the product's newest complete version (None before the
        first registration, or when that version predates baselines in the registry)."""
        versions = [mv for mv in self._versions(product) if is_complete(mv)]
        if not versions:
            return None
        newest = max(versions, key=lambda mv: int(mv.version))
        try:
            return mlflow.artifacts.load_dict(f"runs:/{newest.run_id}/{DRIFT_REFERENCE_ARTIFACT}")
        except (MlflowException, OSError):
            return None

    # versions and aliases
    def version(self, product: str, alias: str | None = None, version: str | int | None = None):
        """The ModelVersion behind an alias (or a version number); NoSuchAlias if it is not set."""
        self.require_product(product)
        name = self.model_name(product)
        if version is not None:
            try:
                return self.client.get_model_version(name, str(version))
            except MlflowException:
                raise RegistryError(f"{name} has no version {version}") from None
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            hint = {
                CHAMPION: f"no champion yet for {product!r}: run `patchcore promote --product {product}`",
                CHALLENGER: f"no challenger for {product!r}: run `patchcore train --product {product}`",
                PREVIOUS: f"no previous champion for {product!r} (alias 'previous' is set when a promotion "
                "replaces a champion)",
            }
            raise NoSuchAlias(hint.get(alias, f"{name} has no alias {alias!r}")) from None

    def aliases(self, product: str) -> dict[str, str]:
        return {alias: str(version) for alias, version in self.require_product(product).aliases.items()}

    def history(self, product: str) -> list[str]:
        text = self.require_product(product).tags.get(HISTORY_TAG, "")
        return [v for v in text.split(",") if v]

    def set_alias(self, product: str, alias: str, version: str | None) -> None:
        name = self.model_name(product)
        if version is None:
            if alias in self.aliases(product):
                self.client.delete_registered_model_alias(name, alias)
        else:
            self.client.set_registered_model_alias(name, alias, str(version))

    def move_champion(self, product: str, champion: str, previous: str | None, history: list[str]) -> None:
        """Set champion, previous and the history together, crash-consistently: the states before
        and after are written to a journal tag first and the tag is deleted last; reconcile()
        finishes or undoes a move that was cut short. Call it holding the product's lock."""
        aliases = self.aliases(product)
        history_before = self.history(product)
        before = {"champion": aliases.get(CHAMPION), "previous": aliases.get(PREVIOUS), "history": history_before}
        after = {"champion": str(champion), "previous": previous, "history": history}
        name = self.model_name(product)
        self.client.set_registered_model_tag(name, PENDING_TAG, json.dumps({"before": before, "after": after}))
        self._apply_champion_state(product, after)
        self.client.delete_registered_model_tag(name, PENDING_TAG)

    def _apply_champion_state(self, product: str, state: dict[str, Any]) -> None:
        self.set_history(product, state["history"])
        self.set_alias(product, PREVIOUS, state["previous"])
        self.set_alias(product, CHAMPION, state["champion"])  # last: what serving resolves

    def pending_champion_change(self, product: str, model=None) -> dict[str, Any] | None:
        """The journalled move of a cut-short champion change, or None (`model`: the registered
        model when the caller already has it)."""
        if model is None:
            try:
                model = self.client.get_registered_model(self.model_name(product))
            except MlflowException:  # nothing registered yet
                return None
        text = model.tags.get(PENDING_TAG)
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return {"before": None, "after": None, "raw": text}

    def repair_champion_change(self, product: str) -> str | None:
        """Finish a champion move that was cut short if the champion alias already moved, else undo
        it; a one-line account of what was done, or None when no move was pending."""
        pending = self.pending_champion_change(product)
        if pending is None:
            return None
        name = self.model_name(product)
        before, after = pending.get("before"), pending.get("after")
        if not before or not after:
            self.client.delete_registered_model_tag(name, PENDING_TAG)
            message = f"{name}: an unreadable {PENDING_TAG} tag was removed; check the aliases with `patchcore status`"
        elif self.aliases(product).get(CHAMPION) == after["champion"]:
            self._apply_champion_state(product, after)
            self.client.delete_registered_model_tag(name, PENDING_TAG)
            message = f"{name}: a champion move to v{after['champion']} was cut short after the alias moved: finished"
        else:
            self._apply_champion_state(product, before)  # a champion of None: the alias is removed
            self.client.delete_registered_model_tag(name, PENDING_TAG)
            message = (
                f"{name}: a champion move to v{after['champion']} was cut short before the alias moved: undone "
                f"(champion stays v{before['champion'] or '-'})"
            )
        logger.warning("%s", message)
        return message

    def set_history(self, product: str, versions: list[str]) -> None:
        """The versions that were champion, oldest first; a version never follows itself."""
        kept = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
        self.client.set_registered_model_tag(self.model_name(product), HISTORY_TAG, ",".join(kept))

    def tag_version(self, product: str, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name(product), str(version), key, _tag_value(value))

    def version_key(self, product: str, version: str, mv=None) -> str:
        """A version number plus its run: stays unique if a store is deleted and numbering restarts."""
        mv = mv or self.client.get_model_version(self.model_name(product), str(version))
        return f"v{version}-{(mv.run_id or 'norun')[:12]}"

    def download(self, product: str, version: str) -> Path:
        """The PatchCore directory of a registered version (cached: versions are immutable), checked
        against the model digest recorded at registration."""
        name = self.model_name(product)
        mv = self.client.get_model_version(name, str(version))
        target = home() / "registry-cache" / name / self.version_key(product, version, mv)
        if not (target / "MLmodel").is_file():
            with atomic_directory(target) as tmp:
                mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
        mlmodel = yaml.safe_load((target / "MLmodel").read_text())
        relative = mlmodel["flavors"]["python_function"]["artifacts"][MODEL_ARTIFACT]["path"]
        recorded = mv.tags.get("model_sha256")
        actual = model_digest(target / relative) if recorded else None
        if recorded and actual != recorded:
            raise RegistryError(
                f"{name} v{version}: the downloaded model differs from the registered one (model.json sha256 "
                f"{actual[:16]}..., recorded {recorded[:16]}...): edited or corrupted in the artifact store or in "
                f"{target}; delete that folder to download it again, or re-register"
            )
        return target / relative

    # training runs
    @tracking_call(
        "the registration",
        "start it again and rerun the training: the steps' results are in the store (nothing is extracted "
        "again) and a half-registered version is marked orphaned by the next run",
    )
    def log_training(
        self, product: str, params: Params, training: TrainingRecord, drift_reference: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Log a finished training (params, metrics, tags, artifacts, the pyfunc model) as one run and
        register it as a new version with alias `challenger`; `drift_reference` (the validated set's
        statistics) is logged as the run's validation/accepted.json: the baseline the product's next
        image sets are checked against, wherever they are validated. Called last, after every step
        succeeded: a failure before registration leaves a FAILED run and no version; a server lost
        half-way leaves a version the next registration marks orphaned (see reconcile)."""
        record = training.to_dict()
        name = self.model_name(product)
        self.reconcile(product)
        existing = self.find_training(product, training.training_key)
        if existing is not None:  # nothing changed since that version: register nothing new
            if self.aliases(product).get(CHAMPION) != str(existing.version):
                self.set_alias(product, CHALLENGER, existing.version)  # it is what the next promotion weighs
            return {
                "name": name,
                "version": str(existing.version),
                "run_id": existing.run_id,
                "model_uri": f"models:/{name}/{existing.version}",
                "logged_model_uri": existing.source,
                "tracking_uri": self.uri,
                "experiment_id": self.experiment_id(product),
                "random_weights": existing.tags.get("random_weights") == "true",
                "unchanged": True,
            }
        model_dir = Path(record["model_dir"])
        meta = json.loads((model_dir / "model.json").read_text())
        weights = meta["backbone"]["weights"]
        is_random = weights["kind"] == "random"
        calibration = record["calibration"]
        metrics = training_metrics(record)
        tags = {
            "product": product,
            "data_version": record["data_version"],
            "data_root": record["data_root"],
            "git_commit": record["git"]["commit"],
            "git_dirty": record["git"]["dirty"],
            "backbone": meta["backbone"]["name"],
            "layers": ",".join(meta["backbone"]["layers"]),
            "weights": RANDOM_WEIGHTS_TAG if is_random else weights["kind"],
            "weights_source": weights["source"],
            "weights_sha256": weights["sha256"] or "none",
            "random_weights": is_random,
            "feature_identity": record["feature_identity"],
            "threshold_rule": calibration["rule"],
            "mode": calibration["mode"],
            # the scoring engine the evaluation and calibration ran with, and the served model uses
            "engine": meta["config"]["runtime"].get("engine", "torch"),
            "figures_measured_on": calibration["report_on"],
            "coreset_continued_from": (record.get("coreset_continued") or {}).get("from_bank", "none"),
            "images_extracted": record["features"]["n_extracted"],
            "images_from_cache": record["features"]["n_cached"],
        }
        tags |= DataVersion.from_dict(record["data_version_record"]).tags()
        run_name = f"train-{product}-{record['data_version'][:8]}" + ("-RANDOM-WEIGHTS" if is_random else "")
        # The run starts when the training started, so its duration in the UI is the whole training.
        started = self.client.create_run(
            self.experiment_id(product),
            start_time=int(training.started_at * 1000) if training.started_at else None,
            tags=context_registry.resolve_tags(SOURCE_TAGS),
            run_name=run_name,
        )
        with mlflow.start_run(run_id=started.info.run_id) as run:
            mlflow.log_params(
                {k: _param_value(v) for k, v in flat_params(params).items()}
                | {"product": product, "data_root": record["data_root"]}
            )
            mlflow.log_metrics(metrics)
            mlflow.set_tags({k: _tag_value(v) for k, v in tags.items()})
            if drift_reference is not None:
                mlflow.log_dict(drift_reference, DRIFT_REFERENCE_ARTIFACT)
            for folder, entries in record["artifacts"].items():
                for entry in entries:
                    path, logged_as = (
                        (Path(entry[0]), entry[1]) if isinstance(entry, (list, tuple)) else (Path(entry), None)
                    )
                    if path.is_dir():
                        mlflow.log_artifacts(str(path), artifact_path=f"{folder}/{path.name}")
                    elif logged_as:
                        mlflow.log_dict(json.loads(path.read_text()), f"{folder}/{logged_as}")
                    else:
                        mlflow.log_artifact(str(path), artifact_path=folder)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Operation with range is deprecated")  # inside MLflow
                digest = model_digest(model_dir)
                info = self._log_pyfunc(
                    model_dir, meta, record, calibration, tags, serving_limits(params) | {"model_sha256": digest}
                )
            # A lean set of version tags (what the gate, `status` and the retrain read); the rest is
            # in the description, and all of it on the run (tags, params, artifacts).
            version_tags = {k: tags[k] for k in VERSION_TAGS if k in tags} | {
                "threshold": calibration["threshold"],
                "heldout_fpr": calibration["heldout_fpr"],
                "run_id": run.info.run_id,
                "training_key": training.training_key,
                "model_sha256": digest,
                REGISTRATION_TAG: STARTED,  # "complete" is the very last step (see reconcile)
            }
            version_tags |= {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pro", "f1_max") if k in metrics}
            version = mlflow.register_model(
                info.model_uri, name, tags={k: _tag_value(v) for k, v in version_tags.items()}
            )
            description = (
                f"PatchCore for {product}: threshold {calibration['threshold']:.6g} ({calibration['rule']}); "
                f"data {record['data_version']} ({record['data_root']}, git {record['git']['commit'][:12]}); "
                f"backbone {tags['backbone']} [{tags['layers']}], weights {tags['weights']} "
                f"({tags['weights_source']}, sha256 {tags['weights_sha256'][:16]}); memory bank {record['bank_size']} "
                f"patches; figures measured on {calibration['report_on']}. Training run {run.info.run_id}."
            )
            self.client.update_model_version(name, version.version, description=description)
            self.set_alias(product, CHALLENGER, version.version)
            registered = {
                "name": name,
                "version": str(version.version),
                "run_id": run.info.run_id,
                "model_uri": f"models:/{name}/{version.version}",
                "logged_model_uri": info.model_uri,
                "tracking_uri": self.uri,
                "experiment_id": run.info.experiment_id,
                "random_weights": is_random,
            }
            mlflow.set_tag("mlflow.note.content", summary_markdown(training, registered))
        self.tag_version(product, version.version, {REGISTRATION_TAG: COMPLETE})
        return registered

    def _log_pyfunc(
        self,
        model_dir: Path,
        meta: dict[str, Any],
        record: dict[str, Any],
        calibration: dict[str, Any],
        tags: dict[str, Any],
        limits: dict[str, int],
    ):
        """The promotable model: pyfunc from code (pyfunc_model.py) + the PatchCore folder + the
        `patchcore` package, with signature, input example, pinned requirements and the serving
        limits (its model config)."""
        # MLflow records where it copied the code and the model from (MLmodel `model_code_path`, the
        # artifact's `uri`): stage both in a throwaway folder so no path of this machine's checkout
        # or PATCHCORE_HOME is written into the registry. The model's files are hard-linked when the
        # temporary folder is on their filesystem (MLflow refuses symlinks), else copied.
        with tempfile.TemporaryDirectory(prefix="patchcore-stage-") as tmp:
            package = Path(tmp) / "patchcore"  # the library's sources only: no __pycache__
            shutil.copytree(PATCHCORE_PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            code = Path(tmp) / PYFUNC_CODE.name
            shutil.copyfile(PYFUNC_CODE, code)
            staged_model = Path(tmp) / model_dir.name
            shutil.copytree(model_dir, staged_model, copy_function=_link_or_copy)
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                artifacts={MODEL_ARTIFACT: str(staged_model)},
                code_paths=[str(package)],
                signature=model_signature(),
                input_example=_input_example(record.get("input_example"), meta),
                pip_requirements=serving_requirements(tags["engine"]),
                model_config=limits,
                metadata={
                    "threshold": calibration["threshold"],
                    "threshold_rule": calibration["rule"],
                    "data_version": record["data_version"],
                    "weights": tags["weights"],
                },
            )


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


DRIFT_REFERENCE_ARTIFACT = "validation/accepted.json"


def is_complete(version) -> bool:
    """Whether a version's registration finished (versions from before the tag existed count as complete)."""
    return version.tags.get(REGISTRATION_TAG, COMPLETE) == COMPLETE


def serving_limits(params: Params) -> dict[str, int]:
    """What one request to the served model may hold: training's image limits (validation:
    max_pixels, max_side_px) and the serving defaults (pipeline/pyfunc_model.py DEFAULT_LIMITS)."""
    from pipeline.pyfunc_model import DEFAULT_LIMITS  # noqa: PLC0415  lazy: the serving module sets its model on import

    return DEFAULT_LIMITS | {"max_pixels": params.validation.max_pixels, "max_side_px": params.validation.max_side_px}


def training_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The run's metrics: AUROCs, PRO, F1, thresholds, held-out FPR, figures at the threshold, bank
    size, per-defect-type AUROC/PRO and seconds per stage."""
    result = record
    c, m = result["calibration"], result["metrics"]
    out: dict[str, float] = {
        k: m[k] for k in ("image_auroc", "pixel_auroc", "pro", "f1_max", "f1_max_threshold") if k in m
    }
    out |= {
        "threshold": c["threshold"],
        "heldout_fpr": c["heldout_fpr"],
        "heldout_false_alarms": c["heldout_false_alarms"],
        "bank_size": result["bank_size"],
        "n_bank_images": result["n_bank"],
        "n_heldout_images": c["n_heldout"],
    }
    if "threshold_recall100" in c:
        out["threshold_recall100"] = c["threshold_recall100"]
        out |= {f"recall100_{k}": float(v) for k, v in c["at_recall100"].items() if k in ("precision", "recall", "fpr")}
    out |= {f"report_{k}": float(v) for k, v in (c.get("at_threshold") or {}).items()}
    for defect, row in result.get("per_defect_type", {}).items():
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in defect)
        out |= {f"{k}.{safe}": v for k, v in row.items() if k in ("image_auroc", "pro")}
    out |= {f"seconds_{stage}": float(s) for stage, s in result["seconds"].items()}
    return {k: float(v) for k, v in out.items() if v is not None}


def model_signature():
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)]),
        outputs=Schema(
            [ColSpec("double", "score"), ColSpec("boolean", "is_anomalous"), ColSpec("double", "threshold")]
        ),
        params=ParamSchema([ParamSpec("return_maps", "boolean", False)]),
    )


def _input_example(image_path: str | None, meta: dict[str, Any]):
    """One nominal image, shrunk to the model's resize side and PNG-encoded (keeps the example small)."""
    if image_path is None:
        return None
    with Image.open(image_path) as image:
        image = to_rgb(image)
        side = meta["config"]["image"]["resize"]
        if min(image.size) > side:
            image.thumbnail((side * image.size[0] // min(image.size), side * image.size[1] // min(image.size)))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def _tag_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return str(value)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -- rollback -------------------------------------------------------------------------------------------
@tracking_call(
    "the rollback", "start it again and run the rollback again: a half-done move is finished or undone first"
)
def rollback(registry: Registry, product: str) -> dict[str, Any]:
    """Move `champion` back to `previous`; the one before that (if any) becomes `previous`. Under the
    product's registry lock, re-reading the aliases inside it; a rollback that would not change the
    champion is refused (RegistryError: exit status 2)."""
    with product_lock(product):
        return _rollback(registry, product)


def _rollback(registry: Registry, product: str) -> dict[str, Any]:
    registry.reconcile(product)
    aliases = registry.aliases(product)
    if CHAMPION not in aliases:
        raise NoSuchAlias(f"no champion yet for {product!r}: nothing to roll back")
    current = aliases[CHAMPION]
    history = registry.history(product) or [v for v in (aliases.get(PREVIOUS), current) if v]
    if history and history[-1] == current:
        history = history[:-1]
    if not history:
        raise NoSuchAlias(f"no previous champion for {product!r}: v{current} is the only champion so far")
    target = history[-1]
    if target == current:  # a history with a repeated version (written before versions were de-duplicated)
        raise NoSuchAlias(f"nothing to roll back for {product!r}: the previous champion is v{current} itself")
    registry.move_champion(product, target, history[-2] if len(history) > 1 else None, history)
    stamp = now_iso()
    registry.tag_version(product, current, {"rolled_back_at": stamp, "rolled_back_to": target})
    with mlflow.start_run(
        experiment_id=registry.experiment_id(product),
        run_name=f"rollback-v{current}-to-v{target}",
        tags=SOURCE_TAGS,
    ) as run:
        mlflow.set_tags({"kind": "rollback", "from_version": current, "to_version": target})
    return {
        "product": product,
        "from_version": current,
        "to_version": target,
        "run_id": run.info.run_id,
        "aliases": registry.aliases(product),
    }


# -- what is registered -------------------------------------------------------------------------------
def status(registry: Registry, product: str | None = None) -> dict[str, Any]:
    """Per product: the versions behind champion / challenger / previous with their numbers."""
    products = [product] if product else registry.products()
    out: dict[str, Any] = {"tracking_uri": registry.uri, "products": {}}
    for name in products:
        model = registry.require_product(name)
        entry: dict[str, Any] = {
            "registered_model": model.name,
            "aliases": {},
            "champion_history": registry.history(name),
        }
        for alias, version in sorted(model.aliases.items()):
            mv = registry.client.get_model_version(model.name, version)
            tags = dict(mv.tags)
            entry["aliases"][alias] = {
                "version": str(version),
                "run_id": mv.run_id,
                "created": mv.creation_timestamp,
                "threshold": _number(tags.get("threshold")),
                "threshold_rule": tags.get("threshold_rule"),
                "data_version": tags.get("data_version"),
                "weights": tags.get("weights"),
                "heldout_fpr": _number(tags.get("heldout_fpr")),
                "metrics": {k: _number(tags[k]) for k in ("image_auroc", "pixel_auroc", "pro", "f1_max") if k in tags},
                "promotion": tags.get("promotion"),
            }
        latest = registry.client.search_model_versions(
            f"name = '{model.name}'", max_results=1, order_by=["version_number DESC"]
        )
        entry["latest_version"] = str(latest[0].version) if latest else None
        entry["incomplete_registrations"] = [str(mv.version) for mv in registry.incomplete(name)]
        pending = registry.pending_champion_change(name, model)
        entry["champion_change_pending"] = (pending.get("after") or {}).get("champion", "?") if pending else None
        out["products"][name] = entry
    return out


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
