"""PatchCore (Roth et al., CVPR 2022) as a library: `PatchCore(config).fit(images)`,
`.predict(images)`, `.save(dir)`, `PatchCore.load(dir)`.

This package is the algorithm only: it must never import prefect, mlflow, dvc or
great_expectations (the pipeline in tasks/ and flows/ wraps it).

`PatchCore` and `Predictions` are loaded on first use (PEP 562): the model code imports torch
(~1.5 s), which the light parts of the package (config, errors, atomic writes) and the command
line's registry commands do not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from patchcore.config import PatchCoreConfig, load_config

if TYPE_CHECKING:
    from patchcore.model import PatchCore, Predictions

__version__ = "0.2.0"
__all__ = ["PatchCore", "PatchCoreConfig", "Predictions", "__version__", "load_config"]


def __getattr__(name: str) -> Any:
    if name in ("PatchCore", "Predictions"):
        from patchcore import model  # noqa: PLC0415  lazy: torch (see above)

        return getattr(model, name)
    raise AttributeError(f"module 'patchcore' has no attribute {name!r}")
