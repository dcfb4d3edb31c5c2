"""Data versions: which exact image set a model was trained on, and how to get it back.

A product's version is DVC's md5 of its folder (what `dvc add data/<product>` would record,
"<hex>.dir"), plus the git commit of the code, params.yaml, dvc.yaml and data.dvc. The training
flow stores it as tags on the MLflow run and on the registered model version (`DataVersion.tags()`);
`changed_since()` tells the retraining trigger whether a product's images changed since the
champion's version; `reproduce_instructions()` says how to rebuild a registered model.

The md5 is computed here the way DVC 3 does for a directory (md5 of each file's bytes; md5 of the
JSON list of {"md5", "relpath"} sorted by relpath; ".dir" appended); tests/test_dvc_pipeline.py
checks it against `dvc add`. Files matched by a .dvcignore are not excluded here.

Never imports prefect, mlflow, great_expectations or dvc (git and DVC's files are read directly).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from patchcore.digest import file_digest
from pipeline.io import git_state, recorded_path

TAG_PREFIX = "data."


def file_md5(path: str | Path) -> str:
    return file_digest(path, "md5")


def _listing_md5(entries: list[dict[str, str]]) -> str:
    # dvc_data.hashfile.tree.Tree.as_bytes(): json.dumps of the sorted list, default separators.
    ordered = sorted(({"md5": e["md5"], "relpath": e["relpath"]} for e in entries), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(ordered, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def dir_listing(folder: str | Path) -> list[dict[str, str]]:
    """DVC's listing of a folder: every file below it (dotfiles included), md5 and posix relpath."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [{"md5": file_md5(p), "relpath": p.relative_to(folder).as_posix()} for p in files]


def dir_md5(folder: str | Path) -> str:
    """DVC's md5 of a folder ("<hex>.dir"), as `dvc add` / dvc.lock record it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    return _listing_md5(dir_listing(folder))


# -- git and DVC files ------------------------------------------------------------------------


def repo_root(start: str | Path) -> Path | None:
    """The git work tree holding `start` (None outside one)."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if (folder / ".git").exists():
            return folder
    return None


def tracking_dvc_file(folder: str | Path, root: str | Path | None = None) -> Path | None:
    """The .dvc file whose output contains `folder` (data.dvc for data/<product>), if any."""
    folder = Path(folder).resolve()
    stop = Path(root).resolve() if root else None
    for candidate in (folder, *folder.parents):
        dvc_file = candidate.parent / f"{candidate.name}.dvc"
        if dvc_file.is_file():
            return dvc_file
        if stop is not None and candidate == stop:
            break
    return None


def _dvc_out(dvc_file: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(dvc_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    outs = data.get("outs") or []
    return outs[0] if outs else None


def _cached_listing(root: Path, md5: str) -> list[dict[str, str]] | None:
    # DVC 3 keeps a directory's listing in the cache at files/md5/<2 chars>/<rest>.dir.
    cache = Path(os.environ.get("DVC_CACHE_DIR", root / ".dvc" / "cache"))
    for path in (cache / "files" / "md5" / md5[:2] / md5[2:], cache / md5[:2] / md5[2:]):
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


# -- the record -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataVersion:
    product: str
    path: str  # the product folder, relative to the repository root when inside one
    md5: str  # DVC md5 of the folder ("<hex>.dir")
    n_files: int
    git_commit: str | None = None  # HEAD when the version was recorded
    git_dirty: bool | None = None  # tracked files (code, params.yaml, data.dvc) had uncommitted changes
    dvc_file: str | None = None  # the .dvc file tracking the folder (data.dvc), relative to the root
    dvc_md5: str | None = None  # the md5 that .dvc file records for its whole output (data/)
    # Whether that .dvc file's version of data/ holds exactly this product folder (None: unknown,
    # the listing is not in the local DVC cache). False means `dvc add data` was not run after the
    # images changed: the version cannot be restored with `dvc pull`.
    in_dvc: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataVersion:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def tags(self) -> dict[str, str]:
        """MLflow tags (run and registered model version): data.product, data.md5, ..."""
        return {
            f"{TAG_PREFIX}{k}": ("" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in self.to_dict().items()
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> DataVersion:
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = tags.get(f"{TAG_PREFIX}{f.name}")
            if raw is None or raw == "":
                continue
            if f.name == "n_files":
                values[f.name] = int(raw)
            elif f.name in ("git_dirty", "in_dvc"):
                values[f.name] = raw.lower() == "true"
            else:
                values[f.name] = raw
        missing = [n for n in ("product", "path", "md5") if n not in values]
        if missing:
            raise KeyError(f"no data version in these tags (missing {', '.join(TAG_PREFIX + n for n in missing)})")
        values.setdefault("n_files", 0)
        return cls(**values)


def data_version(product_dir: str | Path, product: str | None = None) -> DataVersion:
    """The version of a product's image folder now: DVC md5, git commit, and whether data.dvc holds it."""
    folder = Path(product_dir).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    listing = dir_listing(folder)
    md5 = _listing_md5(listing)
    root = repo_root(folder)
    commit, dirty = git_state(root) if root else (None, None)
    dvc_file = tracking_dvc_file(folder, root)
    dvc_md5 = in_dvc = None
    if dvc_file is not None:
        out = _dvc_out(dvc_file) or {}
        dvc_md5 = out.get("md5")
        out_dir = (dvc_file.parent / out.get("path", dvc_file.stem)).resolve()
        if dvc_md5 and out_dir == folder:
            in_dvc = dvc_md5 == md5
        elif dvc_md5 and dvc_md5.endswith(".dir"):
            listing_at = _cached_listing(root or dvc_file.parent, dvc_md5)
            if listing_at is not None:
                prefix = folder.relative_to(out_dir).as_posix() + "/"
                sub = [
                    {"md5": e["md5"], "relpath": e["relpath"][len(prefix) :]}
                    for e in listing_at
                    if e["relpath"].startswith(prefix)
                ]
                in_dvc = bool(sub) and _listing_md5(sub) == md5

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix() if root and p.is_relative_to(root) else recorded_path(p)

    return DataVersion(
        product=product or folder.name,
        path=rel(folder),
        md5=md5,
        n_files=len(listing),
        git_commit=commit,
        git_dirty=dirty,
        dvc_file=rel(dvc_file) if dvc_file else None,
        dvc_md5=dvc_md5,
        in_dvc=in_dvc,
    )


def changed_since(product_dir: str | Path, recorded: DataVersion | dict[str, Any] | str | None) -> bool:
    """Whether the product's images differ from a recorded version (a DataVersion, its dict or
    tags, or the md5 itself). No record (no champion yet) counts as changed."""
    if recorded is None:
        return True
    if isinstance(recorded, DataVersion):
        md5 = recorded.md5
    elif isinstance(recorded, dict):
        md5 = recorded.get("md5") or recorded.get(f"{TAG_PREFIX}md5")
    else:
        md5 = str(recorded)
    if not md5:
        return True
    return dir_md5(product_dir) != md5


def reproduce_instructions(record: DataVersion | dict[str, Any], model: str | None = None) -> str:
    """The commands that rebuild a model from its recorded data version."""
    v = (
        record
        if isinstance(record, DataVersion)
        else (
            DataVersion.from_tags(record)
            if any(k.startswith(TAG_PREFIX) for k in record)
            else DataVersion.from_dict(record)
        )
    )
    what = f"{model} (product {v.product!r})" if model else f"product {v.product!r}"
    lines = [f"To rebuild {what} from its data version {v.md5} ({v.n_files} files in {v.path}):", ""]
    if v.git_commit:
        lines.append(
            f"  git checkout {v.git_commit}        "
            f"# code, params.yaml, dvc.yaml and {v.dvc_file or 'data.dvc'} as trained"
        )
    else:
        lines.append("  # no git commit was recorded: check out the code the model was trained with")
    lines += [
        f"  dvc pull {v.dvc_file or 'data.dvc'}                # the images, from the DVC remote",
        f"  patchcore data check {v.path} --md5 {v.md5}   # confirms the folder is that version",
        "  dvc repro                             # validate -> extract -> coreset -> evaluate -> calibrate",
    ]
    notes = []
    if v.git_dirty:
        notes.append(
            "the working tree had uncommitted changes when it was trained: the commit alone may not give the same model"
        )
    if v.in_dvc is False:
        notes.append(
            f"{v.dvc_file or 'data.dvc'} at that commit does not hold this version of {v.path} "
            "(`dvc add` was not run after the images changed): `dvc pull` restores different images; "
            "restore them from the original source and check the md5 as above"
        )
    elif v.in_dvc is None and v.dvc_file:
        notes.append(
            f"it was not checked that {v.dvc_file} holds this version (its listing was not in the "
            "local DVC cache); the `patchcore data check` step above tells"
        )
    if not v.dvc_file:
        notes.append(f"{v.path} was not tracked by DVC: run `dvc add` on its parent (data/) and commit the .dvc file")
    if notes:
        lines += ["", "Caveats:"] + [f"  - {n}" for n in notes]
    return "\n".join(lines)


__all__ = [
    "DataVersion",
    "changed_since",
    "data_version",
    "dir_md5",
    "file_md5",
    "reproduce_instructions",
    "tracking_dvc_file",
]
