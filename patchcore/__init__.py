"""PatchCore (Roth et al., CVPR 2022) as a library: `PatchCore(config).fit(images)`,
`.predict(images)`, `.save(dir)`, `PatchCore.load(dir)`.

This package is the algorithm only: it must never import prefect, mlflow, dvc or
great_expectations (the pipeline in tasks/ and flows/ wraps it).
"""

from patchcore.config import PatchCoreConfig, load_config
from patchcore.model import PatchCore, Predictions

__version__ = "0.1.0"
__all__ = ["PatchCore", "PatchCoreConfig", "Predictions", "load_config", "__version__"]
