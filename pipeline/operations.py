"""Steps of the day-to-day retrain: is there new data for a product, version it with DVC, and
hold the product's training slot. Plain functions (the Prefect tasks in tasks/operations.py wrap
them); imports Prefect only inside `training_slot`.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline.config import MlflowConfig
from pipeline.data_version import data_version, dir_md5, repo_root, tracking_dvc_file

logger = logging.getLogger(__name__)
EVENT_DATA_SETTLED = "patchcore.data.settled"


def new_data(product: str, product_dir: str | Path, mlflow_cfg: MlflowConfig) -> dict[str, Any]:
    """Whether the product's images differ from those the champion (and the current challenger)
    were trained on. A challenger already trained on exactly these images counts as "no new data"
    too, so a refused challenger is not retrained every night on the same set."""
    from pipeline.registry import Registry, RegistryError

    md5 = dir_md5(product_dir)
    registry = Registry(mlflow_cfg)
    recorded: dict[str, str | None] = {}
    for alias in ("champion", "challenger"):
        try:
            mv = registry.version(product, alias)
        except RegistryError:  # no registered model or no such alias yet
            recorded[alias] = None
            continue
        recorded[alias] = mv.tags.get("data.md5") or mv.tags.get("data_version")
        recorded[f"{alias}_version"] = str(mv.version)
    same_as = [alias for alias in ("champion", "challenger") if recorded.get(alias) == md5]
    changed = not same_as
    if changed:
        message = (f"new data for {product}: images {md5} differ from the champion's "
                   f"{recorded.get('champion') or '(no champion yet)'}")
    else:
        message = f"no new data for {product}: images {md5} are the {same_as[0]}'s (v{recorded[same_as[0] + '_version']}) data version"
    return {"product": product, "data": str(product_dir), "md5": md5, "changed": changed, "recorded": recorded,
            "message": message}


def version_data(product_dir: str | Path, product: str, git_commit: bool = True) -> dict[str, Any]:
    """Record the new image set with DVC: `dvc add` on the folder its .dvc file tracks (data/ for
    data.dvc), and commit that .dvc file (and dvc.lock when it exists) when the data lives in a git
    repository. Outside a DVC repository only the md5 is recorded (returned, and tagged on the model
    by the training flow)."""
    folder = Path(product_dir).resolve()
    root = repo_root(folder)
    dvc = shutil.which("dvc") or _venv_dvc()
    out: dict[str, Any] = {"md5": dir_md5(folder), "dvc_add": None, "git_commit": None}
    if root is None or not (root / ".dvc").is_dir() or dvc is None:
        out["note"] = "not in a DVC repository: md5 recorded only"
        out["version"] = data_version(folder, product).to_dict()
        return out
    dvc_file = tracking_dvc_file(folder, root)
    target = (dvc_file.parent / dvc_file.stem) if dvc_file is not None else folder
    run = subprocess.run([dvc, "add", str(target.relative_to(root))], cwd=root, capture_output=True, text=True,
                         timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"dvc add {target}: {run.stderr.strip() or run.stdout.strip()}")
    out["dvc_add"] = str(target.relative_to(root))
    dvc_file = tracking_dvc_file(folder, root)
    if git_commit and dvc_file is not None:
        paths = [str(dvc_file.relative_to(root))] + (["dvc.lock"] if (root / "dvc.lock").exists() else [])
        subprocess.run(["git", "add", "--", *paths], cwd=root, check=True, capture_output=True, timeout=60)
        staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=root, timeout=60)
        if staged.returncode == 1:
            commit = subprocess.run(["git", "commit", "-m", f"data: {product} {out['md5']} (retrain)", "--", *paths],
                                    cwd=root, capture_output=True, text=True, timeout=60)
            if commit.returncode != 0:
                raise RuntimeError(f"git commit {' '.join(paths)}: {commit.stderr.strip() or commit.stdout.strip()}")
            out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                               text=True, timeout=60).stdout.strip()
    out["version"] = data_version(folder, product).to_dict()
    return out


def _venv_dvc() -> str | None:
    candidate = Path(sys.executable).parent / "dvc"  # the console script beside this interpreter
    return str(candidate) if candidate.exists() else None


def training_limit_name(product: str) -> str:
    return f"train-{product}"


def ensure_training_limit(product: str, limit: int) -> str:
    """Create (or resize) the Prefect global concurrency limit `train-<product>`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    name = training_limit_name(product)
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            existing = None
        if existing is None:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except Exception:  # created by a concurrent caller meanwhile
                client.read_global_concurrency_limit_by_name(name)
        elif existing.limit != limit or not existing.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))
    return name


@contextmanager
def training_slot(product: str, limit: int = 1) -> Iterator[None]:
    """Hold one of the product's `limit` training slots; other trainings of the product wait (queue)."""
    from prefect.concurrency.sync import concurrency

    name = ensure_training_limit(product, limit)
    logger.info("waiting for training slot %s", name)
    with concurrency(name, occupy=1, strict=True, lease_duration=300):
        yield


__all__ = ["EVENT_DATA_SETTLED", "ensure_training_limit", "new_data", "training_limit_name",
           "training_slot", "version_data"]
