"""The step functions behind the training flow (no Prefect, no MLflow): splits, the feature-cache
identity, the threshold rules and their honest reporting."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import tiny_config
from patchcore.synthetic import generate_product
from pipeline import steps
from pipeline.config import PipelineConfig


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHCORE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _split(data, cfg=PipelineConfig()):
    fp = steps.fingerprint_dataset(data)
    return steps.read_json(steps.split_dataset(fp["manifest"], cfg)["split"])


def test_held_out_images_never_enter_the_bank_and_barely_move_when_images_are_added(home, tmp_path):
    data = generate_product(tmp_path / "a", "tiles", n_train=30, n_test_good=4, n_test_defect=2, size_px=64, seed=0)
    first = _split(data)
    assert len(first["holdout"]) == 6 and not set(first["holdout"]) & set(first["bank"])
    assert _split(data) == first  # deterministic
    grown = tmp_path / "b" / "tiles"
    shutil.copytree(data, grown)
    extra = generate_product(tmp_path / "c", "tiles", n_train=40, n_test_good=0, n_test_defect=0, size_px=64, seed=9)
    for i, path in enumerate(sorted((extra / "train" / "good").glob("*.png"))[:10]):
        shutil.copy(path, grown / "train" / "good" / f"new{i:02d}.png")
    second = _split(grown)
    assert len(second["holdout"]) == 8
    moved_into_bank = set(first["holdout"]) & set(second["bank"])
    assert len(moved_into_bank) <= 2  # membership is keyed on content: most held-out images stay held out


def test_calibration_split_is_stratified_and_disjoint(home, product):
    split = _split(product)
    assert split["mode"] == "labelled" and not set(split["calibration"]) & set(split["report"])
    for defect in ("good", "scratch", "spot", "missing"):
        in_calibration = [p for p in split["calibration"] if p.startswith(f"test/{defect}/")]
        in_report = [p for p in split["report"] if p.startswith(f"test/{defect}/")]
        assert len(in_calibration) >= len(in_report) >= len(in_calibration) - 1  # half each, per type


def test_feature_identity_follows_what_changes_features_and_nothing_else():
    base = steps.feature_identity(tiny_config())["key"]
    assert steps.feature_identity(tiny_config(**{"coreset.fraction": 0.5}))["key"] == base  # bank-only setting
    assert steps.feature_identity(tiny_config(**{"scoring.k": 3}))["key"] == base
    assert steps.feature_identity(tiny_config(**{"runtime.seed": 1}))["key"] != base  # another random backbone
    assert steps.feature_identity(tiny_config(**{"image.crop": 64}))["key"] != base
    assert steps.feature_identity(tiny_config(**{"backbone.layers": ["layer1", "layer2"]}))["key"] != base


def test_extraction_only_processes_images_missing_from_the_cache(home, product, monkeypatch):
    from patchcore import PatchCore

    fp = steps.fingerprint_dataset(product)
    split = steps.split_dataset(fp["manifest"], PipelineConfig())
    config = tiny_config()
    first = steps.extract_features(fp["manifest"], split["split"], config)
    assert first["n_extracted"] == first["n_images"] == split["n_bank"]
    victim = sorted((home / "features").rglob("*.npy"))[0]
    victim.unlink()  # as if the run had been interrupted before this image
    seen = []
    original = PatchCore.embed
    monkeypatch.setattr(PatchCore, "embed", lambda self, images, **kw: (seen.append(len(images)) or original(self, images, **kw)))
    again = steps.extract_features(fp["manifest"], split["split"], config)
    assert (again["n_extracted"], again["n_cached"], seen) == (1, first["n_images"] - 1, [1])
    assert victim.is_file()


def _evaluation(held, test):
    records = [{"split": "holdout", "role": "holdout", "label": 0, "score": s} for s in held]
    records += [{"split": "test", "role": role, "label": label, "score": s} for s, label, role in test]
    mode = "labelled" if any(t[1] == 1 for t in test) and any(t[1] == 0 for t in test) else "nominal-only"
    return {"mode": mode, "records": records}


def test_labelled_threshold_is_picked_on_calibration_images_and_measured_on_the_others():
    test = [(1.0, 0, "calibration"), (2.0, 0, "calibration"), (5.0, 1, "calibration"), (6.0, 1, "calibration"),
            (1.5, 0, "report"), (4.5, 0, "report"), (4.0, 1, "report"), (7.0, 1, "report")]
    c = steps.choose_threshold(_evaluation([1.0, 3.0], test), PipelineConfig())
    assert c["rule"] == "f1_optimal" and c["threshold"] == 5.0 and c["threshold_recall100"] == 5.0
    assert c["report_independent"] and c["n_report"] == 4
    assert c["at_threshold"]["recall"] == 0.5 and c["at_threshold"]["fpr"] == 0.0  # 4.0 missed on unseen images
    assert c["heldout_fpr"] == 0.0


def test_cold_start_threshold_reports_fpr_on_unseen_good_images_when_there_are_some():
    held = list(np.linspace(1.0, 2.0, 100))
    c = steps.choose_threshold(_evaluation(held, [(1.5, 0, None), (2.5, 0, None)]), PipelineConfig(target_fpr=0.05))
    assert c["rule"] == "nominal_quantile" and c["heldout_fpr"] <= 0.05
    assert 1.9 < c["threshold"] < 2.0
    assert c["report_independent"] and c["at_threshold"]["fpr"] == 0.5  # 2.5 flagged, 1.5 not
