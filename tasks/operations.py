"""Prefect tasks of the retrain: thin wrappers around pipeline/operations.py."""

from __future__ import annotations

import subprocess
from typing import Any

from prefect import task

from pipeline import operations
from pipeline.config import MlflowConfig
from tasks.common import IO_RETRIES, PLAIN


@task(name="check for new data", **PLAIN)
def check_new_data(product: str, data: str, mlflow: MlflowConfig) -> dict[str, Any]:
    result = operations.new_data(product, data, mlflow)
    print(result["message"])
    return result


@task(name="version data (dvc add)", **PLAIN)
def version_data(data: str, product: str) -> dict[str, Any]:
    result = operations.version_data(data, product)
    print(f"data version {result['md5']}: " + (f"dvc add {result['dvc_add']}" if result["dvc_add"] else result["note"]))
    return result


@task(name="commit data version", **PLAIN)
def commit_data_version(versioned: dict[str, Any], product: str) -> str | None:
    try:
        commit = operations.commit_data_version(versioned, product)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:  # the model is registered: carry on
        print(f"WARNING: {versioned['dvc_file']} could not be committed ({exc}); commit it by hand")
        return None
    print(f"committed {versioned['dvc_file']}: {commit[:12]}" if commit else "nothing to commit")
    return commit


@task(name="push data version (dvc push)", **IO_RETRIES)
def push_data_version(versioned: dict[str, Any]) -> str | None:
    try:
        remote = operations.push_data_version(versioned)
    except (RuntimeError, subprocess.SubprocessError) as exc:  # the model is registered: carry on
        print(f"WARNING: {versioned.get('dvc_add')} could not be pushed ({exc}); run `dvc push` by hand")
        return None
    print(
        f"pushed {versioned['dvc_add']} to DVC remote {remote}" if remote else "no DVC default remote: nothing pushed"
    )
    return remote


@task(name="revert data version", **PLAIN)
def revert_data_version(versioned: dict[str, Any]) -> bool:
    changed = operations.revert_data_version(versioned)
    if changed:
        print(f"training failed: {versioned['dvc_file']} put back as it was (nothing committed)")
    return changed
