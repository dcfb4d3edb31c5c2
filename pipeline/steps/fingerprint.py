"""Step 1, fingerprint: hash every image (and mask) of a product into a manifest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from patchcore.backbone import sha256_file
from patchcore.data import GOOD, IMAGE_SUFFIXES, DataError, is_mvtec_root, resolve_samples
from pipeline.data_version import data_version
from pipeline.io import content_key, read_json
from pipeline.results import Manifest
from pipeline.store import Store

LAYOUT = (
    "a product's data is a folder in MVTec layout (train/good/*.png, optionally test/<type>/ "
    "and ground_truth/<type>/<name>_mask.png)"
)


def product_folder(data_root: str | Path) -> Path:
    """The resolved product folder, or a DataError saying what the layout must be."""
    root = Path(data_root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; {LAYOUT}")
    if not is_mvtec_root(root):
        raise DataError(f"{root}: no train/good folder; {LAYOUT}")
    return root


def manifest_entries(root: Path) -> list[dict[str, Any]]:
    """One entry per image (path relative to `root`, split, label, defect type, sha256, mask)."""
    entries = []
    for sample in resolve_samples(root, split="train"):
        entries.append(
            {
                "path": sample.path.relative_to(root).as_posix(),
                "split": "train",
                "label": 0,
                "defect_type": GOOD,
                "sha256": sha256_file(sample.path),
                "mask": None,
                "mask_sha256": None,
            }
        )
    test_dir = root / "test"
    if test_dir.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in test_dir.rglob("*") if p.is_file()):
        for sample in resolve_samples(root, split="test"):
            mask = sample.mask_path
            entries.append(
                {
                    "path": sample.path.relative_to(root).as_posix(),
                    "split": "test",
                    "label": sample.label,
                    "defect_type": sample.defect_type,
                    "sha256": sha256_file(sample.path),
                    "mask": mask.relative_to(root).as_posix() if mask else None,
                    "mask_sha256": sha256_file(mask) if mask else None,
                }
            )
    entries.sort(key=lambda e: e["path"])
    return entries


def fingerprint_dataset(store: Store, data_root: str | Path, product: str | None = None) -> Manifest:
    """Hash every image (and mask) of a product in MVTec layout into a manifest (path, split, label,
    defect type, sha256), written once per content as datasets/<manifest_sha256>.json. The data
    version shown to people is DVC's md5 of the folder (pipeline.data_version), with its git commit
    and whether data.dvc holds it."""
    start = time.perf_counter()
    root = product_folder(data_root)
    entries = manifest_entries(root)
    manifest_sha = content_key([(e["path"], e["sha256"], e["mask_sha256"]) for e in entries], length=64)
    version = data_version(root, product or root.name).to_dict()
    manifest = {
        "root": str(root),
        "manifest_sha256": manifest_sha,
        "data_version": version["md5"],
        "data_version_record": version,
        "images": entries,
    }
    path = store.write_json("datasets", f"{manifest_sha}.json", data=manifest)
    test = [e for e in entries if e["split"] == "test"]
    return Manifest(
        manifest=str(path),
        manifest_sha256=manifest_sha,
        data_version=version["md5"],
        data_version_record=version,
        data_root=str(root),
        n_train=len(entries) - len(test),
        n_test_good=sum(e["label"] == 0 for e in test),
        n_test_defect=sum(e["label"] == 1 for e in test),
        seconds=time.perf_counter() - start,
    )


def load_manifest(manifest: Manifest | str | Path) -> dict[str, Any]:
    """The manifest's content (root, manifest_sha256, data version, images)."""
    return read_json(manifest.manifest if isinstance(manifest, Manifest) else manifest)


def image_path(manifest: dict[str, Any], relative: str) -> Path:
    """The absolute path of a manifest entry's image or mask."""
    return Path(manifest["root"]) / relative


__all__ = ["fingerprint_dataset", "image_path", "load_manifest", "manifest_entries", "product_folder"]
