"""The content-addressed store: where every training step keeps its outputs, named by a hash of
their inputs, so a step whose inputs did not change finds its output and returns at once.

    datasets/<manifest_sha256>.json          manifest: every image's path, label and sha256
    splits/<split_key>.json                  bank / held-out nominal / calibration / report images
    features/<identity>/<image sha256>.npy   per-image patch features (the feature cache)
    banks/<bank_key>/                        the fitted PatchCore (no threshold yet)
    evaluations/<eval_key>/                  per-image scores, anomaly maps, metrics
    models/<product>/<model_key>/            the calibrated PatchCore that gets registered
    reports/<model_key>/                     ROC, PR, score histogram, heatmap grid
    eval_sets/<sha256>.json                  pinned promotion evaluation sets (+ scores/)

A `Store` is passed to every step (never read from a global). Its root is a local folder (the
default: env PATCHCORE_STORE, else $PATCHCORE_HOME) or an fsspec URL (`file:///srv/patchcore`,
`s3://bucket/prefix`, ...; S3 endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...):

- local folder: files are written to a temporary name and renamed; folders are built in a
  temporary folder and renamed, so a reader never sees half of either;
- fsspec URL: the library reads and writes local files, so every entry is built in a local
  mirror (`$PATCHCORE_HOME/store-cache/<hash of the URL>/`) and uploaded; a single object is
  put whole; a folder is marked `.incomplete` before its first file is uploaded and the marker
  is removed after the last, so `has()` ignores a folder (and every file in it) whose upload
  died half-way. Reads download into the mirror once (entries are
  immutable: their names are hashes of their contents' inputs).

No Prefect and no MLflow here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from patchcore import atomic
from patchcore.paths import home
from pipeline.io import read_json, to_jsonable

INCOMPLETE = ".incomplete"


class Store:
    """Content-addressed outputs under one root (a local folder or an fsspec URL)."""

    def __init__(self, root: str | Path | None = None) -> None:
        if root is None or not str(root).strip():
            root = os.environ.get("PATCHCORE_STORE", "").strip() or home()
        text = str(root).strip()
        if "://" in text:
            text = text.rstrip("/")  # s3://b/p and s3://b/p/ are one store
        self.url = text
        self.is_local = "://" not in text
        if self.is_local:
            self.local_root = Path(text).expanduser().resolve()
            self.local_root.mkdir(parents=True, exist_ok=True)
            self._fs = None
            self._remote_root = ""
        else:
            self._fs, self._remote_root = fsspec.core.url_to_fs(text)
            self._remote_root = self._remote_root.rstrip("/")
            protocol = self._fs.protocol
            self._protocols = set(protocol if isinstance(protocol, (tuple, list)) else [protocol])
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            self.local_root = home() / "store-cache" / digest

    @classmethod
    def from_settings(cls, settings: Any) -> Store:
        """The store a Params (or PipelineConfig) names: `pipeline.store`, else env PATCHCORE_STORE,
        else $PATCHCORE_HOME."""
        pipeline = getattr(settings, "pipeline", settings)
        return cls(getattr(pipeline, "store", None))

    def __reduce__(self):
        # Sent to another process (a Dask worker) by its URL: the worker finds its own local mirror.
        return (Store, (self.url,))

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    # -- paths -----------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        """The local path of an entry (for a URL store: its place in the local mirror)."""
        return self.local_root.joinpath(*parts)

    def _remote(self, *parts: str) -> str:
        return "/".join([self._remote_root, *parts])

    def has(self, *parts: str) -> bool:
        """Whether a complete entry (file, or folder with everything in it) exists."""
        if self.is_local:
            return self.path(*parts).exists()
        if not self._fs.exists(self._remote(*parts)):
            return False
        return not any(self._fs.exists(self._remote(*parts[:n], INCOMPLETE)) for n in range(1, len(parts) + 1))

    def keys(self, *parts: str) -> list[str]:
        """Names of the complete entries directly under a folder of the store, sorted."""
        if self.is_local:
            folder = self.path(*parts)
            return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
        remote = self._remote(*parts)
        if not self._fs.isdir(remote):
            return []
        names = sorted(Path(p).name for p in self._fs.ls(remote, detail=False))
        return [n for n in names if not n.startswith(".") and self.has(*parts, n)]

    # -- reading -----------------------------------------------------------------------------------
    def fetch(self, *parts: str) -> Path:
        """A local path holding the entry (downloaded into the mirror once for a URL store)."""
        local = self.path(*parts)
        if self.is_local or local.exists():
            return local
        remote = self._remote(*parts)
        if not self.has(*parts):
            raise FileNotFoundError(f"{self.url}/{'/'.join(parts)}: not in the store")
        if self._fs.isdir(remote):
            with atomic.atomic_directory(local) as tmp:
                self._fs.get(f"{remote}/", f"{tmp}/", recursive=True)
        else:
            with atomic.atomic_file(local, "wb") as handle:
                handle.write(self._fs.cat_file(remote))
        return local

    def read_json(self, *parts: str) -> Any:
        return read_json(self.fetch(*parts))

    # -- writing -----------------------------------------------------------------------------------
    def write_json(self, *parts: str, data: Any) -> Path:
        local = atomic.write_json(self.path(*parts), data, default=to_jsonable)
        self._upload_file(local, parts)
        return local

    def save_npy(self, *parts: str, array: np.ndarray, dtype: Any = np.float32) -> Path:
        local = atomic.save_npy(self.path(*parts), array, dtype=dtype)
        self._upload_file(local, parts)
        return local

    def copy_in(self, source: str | Path, *parts: str) -> Path:
        """A local file copied into the store, atomically."""
        with atomic.atomic_file(self.path(*parts), "wb") as handle, open(source, "rb") as src:
            shutil.copyfileobj(src, handle)
        self._upload_file(self.path(*parts), parts)
        return self.path(*parts)

    @contextlib.contextmanager
    def directory(self, *parts: str) -> Iterator[Path]:
        """Build a folder entry: write into the yielded empty folder; on a clean exit it becomes the
        entry as a whole (renamed into place, or uploaded with its completion marker last); on an
        exception nothing of it remains."""
        with atomic.atomic_directory(self.path(*parts)) as tmp:
            yield tmp
        if not self.is_local:
            remote = self._remote(*parts)
            self._put(f"{remote}/{INCOMPLETE}", b"")
            for path in sorted(p for p in self.path(*parts).rglob("*") if p.is_file()):
                relative = path.relative_to(self.path(*parts)).as_posix()
                self._put(f"{remote}/{relative}", path.read_bytes())
            self._fs.rm(f"{remote}/{INCOMPLETE}")

    def _upload_file(self, local: Path, parts: tuple[str, ...]) -> None:
        if not self.is_local:
            self._put(self._remote(*parts), local.read_bytes())

    def _put(self, remote: str, data: bytes) -> None:
        """One object, put whole: object stores write an object at once; on a file system (file://,
        a shared mount) it is written under a temporary name and renamed."""
        self._fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        if "file" in self._protocols:
            tmp = f"{remote}.{uuid.uuid4().hex}.tmp"
            self._fs.pipe_file(tmp, data)
            self._fs.mv(tmp, remote)
        else:
            self._fs.pipe_file(remote, data)


__all__ = ["INCOMPLETE", "Store"]
