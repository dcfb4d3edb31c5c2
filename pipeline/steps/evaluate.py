"""Step 6, evaluate: score the held-out nominal and test images with the bank; the threshold-free
figures come from the library's one evaluation function (patchcore.evaluation.labelled_metrics),
which the promotion gate and `patchcore evaluate` use too."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from patchcore import PatchCore
from patchcore.data import GOOD, Sample
from patchcore.evaluation import labelled_metrics
from pipeline.io import content_key, dumps
from pipeline.results import Bank, Evaluation, Manifest, Split
from pipeline.steps.fingerprint import load_manifest
from pipeline.steps.split import CALIBRATION, HOLDOUT, REPORT, TEST, load_split
from pipeline.store import Store


def score_records(
    model: PatchCore, root: str | Path, records: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any], list[np.ndarray]]:
    """Score `records` (dicts with path, split, label, defect_type and mask relative to `root`) in
    place (`score`), and compute the labelled figures of the test records when they hold both good
    and defective images: (metrics, per_defect_type, anomaly maps of every record in image
    coordinates)."""
    root = Path(root)
    predictions = model.predict([root / r["path"] for r in records], maps=True, progress=False)
    for record, score in zip(records, predictions.scores):
        record["score"] = float(score)
    test_idx = [i for i, r in enumerate(records) if r["split"] == TEST]
    figures: dict[str, Any] = {}
    per_type: dict[str, Any] = {}
    if {0, 1} <= {records[i]["label"] for i in test_idx}:
        samples = [
            Sample(
                root / records[i]["path"],
                records[i]["label"],
                records[i]["defect_type"],
                root / records[i]["mask"] if records[i].get("mask") else None,
            )
            for i in test_idx
        ]
        figures, per_type, _ = labelled_metrics(
            samples, predictions.scores[test_idx], [predictions.anomaly_maps[i] for i in test_idx]
        )
    return figures, per_type, predictions.anomaly_maps


MAPS_FILE = "maps.npz"
# 2: maps in image coordinates (maps.npz) and pixel metrics on the full frame; an evaluation stored
# in the earlier format (crop-sized maps.npy, pixel metrics inside the crop) is recomputed, not reused.
EVALUATION_FORMAT = 2


def save_maps(path: Path, maps: list[np.ndarray]) -> None:
    """Every record's map (image coordinates, so sizes may differ), float16, no pickle: one array
    per record, named by its position."""
    np.savez(path, **{str(i): np.asarray(m, dtype=np.float16) for i, m in enumerate(maps)})


def load_maps(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return [data[str(i)] for i in range(len(data.files))]


def evaluation_key(bank: Bank, split: Split) -> str:
    """evaluations/<key>: the bank and the split's content (which names the manifest, itself the
    hash of every image's content), so the same model on the same images finds its evaluation."""
    return content_key("evaluation", EVALUATION_FORMAT, bank.bank_key, load_split(split))


def evaluate_bank(store: Store, manifest: Manifest, split: Split, bank: Bank) -> Evaluation:
    """Score the held-out nominal split (always) and the labelled test images (when present):
    per-image scores and anomaly maps, image AUROC, pixel AUROC, PRO, F1-max and per-defect-type
    figures, under evaluations/<key>/ (found there when the same bank met the same images)."""
    start = time.perf_counter()
    key = evaluation_key(bank, split)
    cached = store.has("evaluations", key, "evaluation.json")
    if not cached:
        content, division = load_manifest(manifest), load_split(split)
        roles = {p: CALIBRATION for p in division["calibration"]} | {p: REPORT for p in division["report"]}
        records = [
            {"path": p, "split": HOLDOUT, "label": 0, "defect_type": GOOD, "role": HOLDOUT} for p in division["holdout"]
        ]
        records += [
            {
                "path": e["path"],
                "split": TEST,
                "label": e["label"],
                "defect_type": e["defect_type"],
                "role": roles.get(e["path"]),
                "mask": e["mask"],
            }
            for e in sorted((e for e in content["images"] if e["split"] == "test"), key=lambda e: e["path"])
        ]
        model = PatchCore.load(store.fetch("banks", bank.bank_key))
        figures, per_type, maps = score_records(model, content["root"], records)
        held = np.array([r["score"] for r in records if r["split"] == HOLDOUT])
        figures = {
            "n_holdout": len(division["holdout"]),
            "n_test": sum(r["split"] == TEST for r in records),
            **figures,
            "holdout_score_mean": float(held.mean()),
            "holdout_score_max": float(held.max()),
        }
        result = {
            "mode": division["mode"],
            "records": records,
            "metrics": figures,
            "per_defect_type": per_type,
            "image": asdict(model.config.image),
        }
        with store.directory("evaluations", key) as folder:
            save_maps(folder / MAPS_FILE, maps)
            (folder / "evaluation.json").write_text(dumps(result))
    data = store.read_json("evaluations", key, "evaluation.json")
    return Evaluation(
        evaluation_dir=str(store.fetch("evaluations", key)),
        mode=data["mode"],
        metrics=data["metrics"],
        per_defect_type=data["per_defect_type"],
        cached=cached,
        seconds=time.perf_counter() - start,
    )


__all__ = ["MAPS_FILE", "evaluate_bank", "evaluation_key", "load_maps", "save_maps", "score_records"]
