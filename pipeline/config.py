"""The typed pipeline settings: every section of params.yaml besides `model` (which
patchcore.config owns). Loaded once, shared by the Prefect flows, the DVC stages and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchcore.config import ConfigError, PatchCoreConfig, _build, load_params


@dataclass
class Params:
    """The whole params.yaml. Sections other than `model` are added by the pipeline modules."""

    model: PatchCoreConfig = field(default_factory=PatchCoreConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Params:
        return _build(cls, data or {}, "")


def load(path: str | Path | None = None) -> Params:
    """params.yaml (`path`, PATCHCORE_PARAMS or ./params.yaml) as typed settings."""
    try:
        return Params.from_dict(load_params(path))
    except ConfigError as exc:
        raise ConfigError(f"{path or 'params.yaml'}: {exc}") from None
