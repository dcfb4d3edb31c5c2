"""Steps of the day-to-day retrain: is there new data for a product, and version it with DVC.
Plain functions (the Prefect tasks in tasks/operations.py wrap them); no Prefect here. The
product's training slot (a Prefect concurrency limit named by training_limit_name) is
tasks/concurrency.py.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.config import MlflowConfig
from pipeline.data_version import data_version, dir_md5, repo_root, tracking_dvc_file
from pipeline.io import git
from pipeline.registry import Registry, RegistryError

logger = logging.getLogger(__name__)
EVENT_DATA_SETTLED = "patchcore.data.settled"


def new_data(product: str, product_dir: str | Path, mlflow_cfg: MlflowConfig) -> dict[str, Any]:
    """Whether the product's images differ from those the champion (and the current challenger)
    were trained on. A challenger already trained on exactly these images counts as "no new data"
    too, so a refused challenger is not retrained every night on the same set."""
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
        message = (
            f"new data for {product}: images {md5} differ from the champion's "
            f"{recorded.get('champion') or '(no champion yet)'}"
        )
    else:
        which = same_as[0]
        message = (
            f"no new data for {product}: images {md5} are the {which}'s (v{recorded[which + '_version']}) data version"
        )
    return {
        "product": product,
        "data": str(product_dir),
        "md5": md5,
        "changed": changed,
        "recorded": recorded,
        "message": message,
    }


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
    run = subprocess.run(
        [dvc, "add", str(target.relative_to(root))], cwd=root, capture_output=True, text=True, timeout=600
    )
    if run.returncode != 0:
        raise RuntimeError(f"dvc add {target}: {run.stderr.strip() or run.stdout.strip()}")
    out["dvc_add"] = str(target.relative_to(root))
    dvc_file = tracking_dvc_file(folder, root)
    if git_commit and dvc_file is not None:
        paths = [str(dvc_file.relative_to(root))] + (["dvc.lock"] if (root / "dvc.lock").exists() else [])
        subprocess.run(["git", "add", "--", *paths], cwd=root, check=True, capture_output=True, timeout=60)
        staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=root, timeout=60)
        if staged.returncode == 1:
            commit = subprocess.run(
                ["git", "commit", "-m", f"data: {product} {out['md5']} (retrain)", "--", *paths],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if commit.returncode != 0:
                raise RuntimeError(f"git commit {' '.join(paths)}: {commit.stderr.strip() or commit.stdout.strip()}")
            out["git_commit"] = git(root, "rev-parse", "HEAD", timeout=60)
    out["version"] = data_version(folder, product).to_dict()
    return out


def _venv_dvc() -> str | None:
    candidate = Path(sys.executable).parent / "dvc"  # the console script beside this interpreter
    return str(candidate) if candidate.exists() else None


def training_limit_name(product: str) -> str:
    """The name of the product's Prefect global concurrency limit (tasks/concurrency.py holds it)."""
    return f"train-{product}"


__all__ = ["EVENT_DATA_SETTLED", "new_data", "training_limit_name", "version_data"]
