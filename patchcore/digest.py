"""Content digests of files (the one file-hashing helper), in a light module: no torch.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MODEL_JSON = "model.json"  # a saved model's description (patchcore/model.py writes it)


def file_digest(path: str | Path, algorithm: str = "sha256", chunk_bytes: int = 1 << 20) -> str:
    """Hex digest of a file's bytes, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def model_digest(directory: str | Path) -> str:
    """The sha256 of a saved model's model.json: it records the config, weights identity, threshold,
    calibration, provenance and the sha256 of every other file (bank, index, coreset state), so this
    one digest covers everything that decides a score. The registry records it at registration;
    loading with `digest=` refuses a model that no longer matches."""
    return sha256_file(Path(directory) / MODEL_JSON)


__all__ = ["MODEL_JSON", "file_digest", "model_digest", "sha256_file"]
