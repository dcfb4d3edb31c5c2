"""Steps of the day-to-day retrain: is there new data for a product, and version it with DVC
(`dvc add` before training; the .dvc file is committed only after the training succeeded, and put
back when it failed).
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

from patchcore.atomic import atomic_file
from pipeline.config import MlflowConfig
from pipeline.data_version import data_version, dir_md5, repo_root, tracking_dvc_file
from pipeline.io import git
from pipeline.registry import Registry, RegistryError

logger = logging.getLogger(__name__)
EVENT_DATA_SETTLED = "patchcore.data.settled"  # a product folder changed and settled: retrain trigger
EVENT_WATCHER_HEARTBEAT = "patchcore.watcher.heartbeat"  # the watcher is alive (deploy/watcher.py)


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
        if alias == "challenger" and not mv.tags.get("promotion"):
            # A challenger that never went through the gate (its retrain stopped after training) does
            # not count as seen: the next retrain trains (unchanged: the same version) and gates it.
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


def version_data(product_dir: str | Path, product: str) -> dict[str, Any]:
    """Record the new image set with DVC: `dvc add` on the folder its .dvc file tracks (data/ for
    data.dvc), which updates that .dvc file in the working tree (nothing is committed here: see
    commit_data_version and revert_data_version). The .dvc file's previous content is kept in the
    result so a failed run can put it back. Outside a DVC repository only the md5 is recorded
    (returned, and tagged on the model by the training flow)."""
    folder = Path(product_dir).resolve()
    root = repo_root(folder)
    dvc = dvc_command()
    out: dict[str, Any] = {
        "md5": dir_md5(folder),
        "dvc_add": None,
        "git_commit": None,
        "root": None,
        "dvc_file": None,
        "previous": None,
    }
    if root is None or not (root / ".dvc").is_dir() or dvc is None:
        out["note"] = "not in a DVC repository: md5 recorded only"
        out["version"] = data_version(folder, product).to_dict()
        return out
    dvc_file = tracking_dvc_file(folder, root)
    target = (dvc_file.parent / dvc_file.stem) if dvc_file is not None else folder
    previous = dvc_file.read_text() if dvc_file is not None else None
    run = subprocess.run(
        [dvc, "add", str(target.relative_to(root))], cwd=root, capture_output=True, text=True, timeout=600
    )
    if run.returncode != 0:
        raise RuntimeError(f"dvc add {target}: {run.stderr.strip() or run.stdout.strip()}")
    dvc_file = tracking_dvc_file(folder, root)
    out |= {
        "dvc_add": str(target.relative_to(root)),
        "root": str(root),
        "dvc_file": str(dvc_file) if dvc_file else None,
        "previous": previous,
    }
    out["version"] = data_version(folder, product).to_dict()
    return out


def commit_data_version(versioned: dict[str, Any], product: str) -> str | None:
    """After a successful training: commit the .dvc file (and dvc.lock when it exists) that
    version_data updated, with only those paths (whatever else is staged stays staged). Returns the
    commit, or None when there was nothing to commit or no git repository."""
    if not versioned.get("dvc_file"):
        return None
    root = Path(versioned["root"])
    paths = [str(Path(versioned["dvc_file"]).relative_to(root))]
    paths += ["dvc.lock"] if (root / "dvc.lock").exists() else []
    if git(root, "rev-parse", "--is-inside-work-tree") != "true":
        return None
    subprocess.run(["git", "add", "--", *paths], cwd=root, check=True, capture_output=True, timeout=60)
    staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=root, timeout=60)
    if staged.returncode != 1:
        return None
    # A service account without a git identity still commits (as "patchcore"), its own being kept when set.
    identity = (
        []
        if git(root, "config", "user.email")
        else ["-c", "user.name=patchcore", "-c", "user.email=patchcore@localhost"]
    )
    commit = subprocess.run(
        ["git", *identity, "commit", "-m", f"data: {product} {versioned['md5']} (retrain)", "--", *paths],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if commit.returncode != 0:
        raise RuntimeError(f"git commit {' '.join(paths)}: {commit.stderr.strip() or commit.stdout.strip()}")
    return git(root, "rev-parse", "HEAD", timeout=60)


def push_data_version(versioned: dict[str, Any]) -> str | None:
    """After a successful training: `dvc push` the data version to the repository's default remote
    (`make stack` sets one on its S3 store), so any machine can `dvc pull` the images a version
    was trained on. Returns the remote's name, or None when there is no .dvc file or no default remote."""
    dvc = dvc_command()
    if not versioned.get("dvc_add") or dvc is None:
        return None
    root = Path(versioned["root"])
    remote = subprocess.run([dvc, "remote", "default"], cwd=root, capture_output=True, text=True, timeout=60)
    name = remote.stdout.strip()
    if remote.returncode != 0 or not name:
        return None
    run = subprocess.run(
        [dvc, "push", "--remote", name, versioned["dvc_add"]], cwd=root, capture_output=True, text=True, timeout=1800
    )
    if run.returncode != 0:
        raise RuntimeError(f"dvc push {versioned['dvc_add']} to {name}: {run.stderr.strip() or run.stdout.strip()}")
    return name


def revert_data_version(versioned: dict[str, Any]) -> bool:
    """After a failed training: put the .dvc file back as it was before version_data, so a failed
    run leaves neither a commit nor a changed .dvc file behind. Returns whether it changed a file."""
    path, previous = versioned.get("dvc_file"), versioned.get("previous")
    if not path or previous is None or Path(path).read_text() == previous:
        return False
    with atomic_file(path, "w") as handle:
        handle.write(previous)
    return True


def dvc_command() -> str | None:
    """The `dvc` program: on PATH, else the console script beside this interpreter (None: not installed)."""
    return shutil.which("dvc") or _venv_dvc()


def _venv_dvc() -> str | None:
    candidate = Path(sys.executable).parent / "dvc"  # the console script beside this interpreter
    return str(candidate) if candidate.exists() else None


def training_limit_name(product: str) -> str:
    """The name of the product's Prefect global concurrency limit (tasks/concurrency.py holds it)."""
    return f"train-{product}"


__all__ = [
    "EVENT_DATA_SETTLED",
    "EVENT_WATCHER_HEARTBEAT",
    "commit_data_version",
    "dvc_command",
    "push_data_version",
    "new_data",
    "revert_data_version",
    "training_limit_name",
    "version_data",
]
