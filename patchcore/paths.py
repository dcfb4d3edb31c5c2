"""Where working files go: one working directory, `PATCHCORE_HOME` (default ./work), never the
source tree.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The working directory for models, caches and stores (created on first use)."""
    path = Path(os.environ.get("PATCHCORE_HOME", "work")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
