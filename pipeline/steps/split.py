"""Step 3, split: memory bank / held-out nominal images, calibration / report test images."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

from pipeline.config import PipelineConfig
from pipeline.io import content_key, read_json
from pipeline.results import Manifest, Split
from pipeline.steps.fingerprint import load_manifest
from pipeline.store import Store

HOLDOUT, TEST, CALIBRATION, REPORT = "holdout", "test", "calibration", "report"


def keyed_order(items: Iterable[dict], seed: int, salt: str) -> list[dict]:
    """Items ordered by a seeded hash of their content: a stable pseudo-random order that does not
    depend on file names or on which other images are present."""
    return sorted(items, key=lambda e: hashlib.sha256(f"{seed}:{salt}:{e['sha256']}".encode()).hexdigest())


def split_dataset(store: Store, manifest: Manifest, cfg: PipelineConfig) -> Split:
    """Seeded, content-keyed splits: train/good -> memory bank + held-out nominal; labelled test
    images -> calibration (picks the threshold) + report (measures it), stratified by type."""
    content = load_manifest(manifest)
    train = [e for e in content["images"] if e["split"] == "train"]
    test = [e for e in content["images"] if e["split"] == "test"]
    n_holdout = min(max(1, round(cfg.holdout_fraction * len(train))), len(train) - 1)
    ordered = keyed_order(train, cfg.holdout_seed, "holdout")
    holdout, bank = ordered[:n_holdout], ordered[n_holdout:]
    labelled = any(e["label"] == 0 for e in test) and any(e["label"] == 1 for e in test)
    calibration: list[dict] = []
    report: list[dict] = []
    calibration_note = None
    if labelled:
        for defect_type in sorted({e["defect_type"] for e in test}):
            group = keyed_order([e for e in test if e["defect_type"] == defect_type], cfg.holdout_seed, "calibration")
            n = math.ceil(cfg.calibration_fraction * len(group))
            calibration += group[:n]
            report += group[n:]

        def has_both(part: list[dict]) -> bool:
            return {0, 1} <= {e["label"] for e in part}

        if not (has_both(calibration) and has_both(report)):
            calibration, report = test, []
            calibration_note = (
                "too few labelled test images to hold any out: the threshold is picked and "
                "reported on the same images (optimistic)"
            )
    split = {
        "manifest_sha256": content["manifest_sha256"],
        "mode": "labelled" if labelled else "nominal-only",
        "bank": sorted(e["path"] for e in bank),
        "holdout": sorted(e["path"] for e in holdout),
        "calibration": sorted(e["path"] for e in calibration),
        "report": sorted(e["path"] for e in report),
        "calibration_note": calibration_note,
        "settings": {
            "holdout_fraction": cfg.holdout_fraction,
            "holdout_seed": cfg.holdout_seed,
            "calibration_fraction": cfg.calibration_fraction,
        },
    }
    key = content_key(content["manifest_sha256"], split["settings"])
    path = store.write_json("splits", f"{key}.json", data=split)
    return Split(
        split=str(path),
        split_key=key,
        mode=split["mode"],
        n_bank=len(bank),
        n_holdout=len(holdout),
        n_calibration=len(calibration),
        n_report=len(report),
        calibration_note=calibration_note,
    )


def load_split(split: Split) -> dict:
    """The split's content (bank, holdout, calibration and report image paths)."""
    return read_json(split.split)


__all__ = ["CALIBRATION", "HOLDOUT", "REPORT", "TEST", "keyed_order", "load_split", "split_dataset"]
