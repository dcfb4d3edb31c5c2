"""The library's exceptions, in one light module (no torch), so the command line can name the errors
a user can fix without importing the model code. Each is also importable from the module that
raises it (patchcore.config, patchcore.data, patchcore.backbone, patchcore.model).

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


class DataError(ValueError):
    """An image source is missing, empty or malformed."""


class BackboneError(ValueError):
    """Unknown architecture or layer name."""


class WeightsError(RuntimeError):
    """Backbone weights cannot be obtained or do not match what was recorded."""


class ModelFileError(ValueError):
    """A saved model directory is missing, incompatible or has been altered."""


class EngineError(RuntimeError):
    """The configured scoring engine cannot run here (a package to install, or an export that does
    not match torch); the message says what to do."""


class StorageFull(OSError):
    """A write failed because its file system is full (or a quota / file-size limit was hit). The
    atomic writers (patchcore/atomic.py) raise it after removing their temporary file: nothing
    half-written is left, and what was written before is complete."""


# What a command reports as one line (exit status 2) instead of a traceback: bad data, settings,
# weights or model files, missing files and a full disk.
USER_ERRORS = (
    DataError,
    ConfigError,
    WeightsError,
    BackboneError,
    ModelFileError,
    EngineError,
    FileNotFoundError,
    StorageFull,
)

__all__ = [
    "USER_ERRORS",
    "BackboneError",
    "ConfigError",
    "DataError",
    "EngineError",
    "ModelFileError",
    "StorageFull",
    "WeightsError",
]
