"""Prefect tasks of the retrain and the watcher: thin wrappers around pipeline/operations.py."""

from __future__ import annotations

from typing import Any

from prefect import task

from pipeline import operations
from pipeline.config import MlflowConfig


@task(name="check for new data")
def check_new_data(product: str, data: str, mlflow: dict[str, Any]) -> dict[str, Any]:
    result = operations.new_data(product, data, MlflowConfig(**mlflow))
    print(result["message"])
    return result


@task(name="version data (dvc add)")
def version_data(data: str, product: str, git_commit: bool) -> dict[str, Any]:
    result = operations.version_data(data, product, git_commit)
    print(
        f"data version {result['md5']}: "
        + (f"dvc add {result['dvc_add']}" if result["dvc_add"] else result.get("note", ""))
        + (f", committed {result['git_commit'][:12]}" if result.get("git_commit") else "")
    )
    return result
