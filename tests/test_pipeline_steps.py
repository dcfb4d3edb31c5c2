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
from pipeline.io import read_json
from pipeline.store import Store


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHCORE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def store(home):
    return Store(home / "store")


def _split(store, data, cfg=PipelineConfig()):
    manifest = steps.fingerprint_dataset(store, data)
    return read_json(steps.split_dataset(store, manifest, cfg).split)


def test_held_out_images_never_enter_the_bank_and_barely_move_when_images_are_added(store, tmp_path):
    data = generate_product(tmp_path / "a", "tiles", n_train=30, n_test_good=4, n_test_defect=2, size_px=64, seed=0)
    first = _split(store, data)
    assert len(first["holdout"]) == 6 and not set(first["holdout"]) & set(first["bank"])
    assert _split(store, data) == first  # deterministic
    grown = tmp_path / "b" / "tiles"
    shutil.copytree(data, grown)
    extra = generate_product(tmp_path / "c", "tiles", n_train=40, n_test_good=0, n_test_defect=0, size_px=64, seed=9)
    for i, path in enumerate(sorted((extra / "train" / "good").glob("*.png"))[:10]):
        shutil.copy(path, grown / "train" / "good" / f"new{i:02d}.png")
    second = _split(store, grown)
    assert len(second["holdout"]) == 8
    moved_into_bank = set(first["holdout"]) & set(second["bank"])
    assert len(moved_into_bank) <= 2  # membership is keyed on content: most held-out images stay held out


def test_calibration_split_is_stratified_and_disjoint(store, product):
    split = _split(store, product)
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
    assert steps.feature_identity(tiny_config(**{"runtime.precision": "bf16"}))["key"] != base
    full = steps.feature_identity(tiny_config(**{"image.mode": "full_frame"}))["key"]
    assert full != base and steps.feature_identity(tiny_config(**{"image.mode": "tiled"}))["key"] not in (base, full)
    # settings a mode does not use do not split its cache
    assert steps.feature_identity(tiny_config(**{"image.mode": "full_frame", "image.crop": 64}))["key"] == full
    assert steps.feature_identity(tiny_config(**{"image.tile_size": 64}))["key"] == base


def test_extraction_only_processes_images_missing_from_the_cache(store, product, monkeypatch):
    from patchcore import PatchCore

    manifest = steps.fingerprint_dataset(store, product)
    split = steps.split_dataset(store, manifest, PipelineConfig())
    config = tiny_config()
    first = steps.extract_features(store, manifest, split, config)
    assert first.n_extracted == first.n_images == split.n_bank
    victim = sorted(store.path("features").rglob("*.npy"))[0]
    victim.unlink()  # as if the run had been interrupted before this image
    seen = []
    original = PatchCore.embed
    monkeypatch.setattr(
        PatchCore, "embed", lambda self, images, **kw: seen.append(len(images)) or original(self, images, **kw)
    )
    again = steps.extract_features(store, manifest, split, config)
    assert (again.n_extracted, again.n_cached, seen) == (1, first.n_images - 1, [1])
    assert victim.is_file()


def _evaluation(held, test):
    records = [{"split": "holdout", "role": "holdout", "label": 0, "score": s} for s in held]
    records += [{"split": "test", "role": role, "label": label, "score": s} for s, label, role in test]
    mode = "labelled" if any(t[1] == 1 for t in test) and any(t[1] == 0 for t in test) else "nominal-only"
    return {"mode": mode, "records": records}


def test_labelled_threshold_is_picked_on_calibration_images_and_measured_on_the_others():
    test = [
        (1.0, 0, "calibration"),
        (2.0, 0, "calibration"),
        (5.0, 1, "calibration"),
        (6.0, 1, "calibration"),
        (1.5, 0, "report"),
        (4.5, 0, "report"),
        (4.0, 1, "report"),
        (7.0, 1, "report"),
    ]
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


def _train_steps(store, data, config):
    cfg = PipelineConfig()
    manifest = steps.fingerprint_dataset(store, data, "tiles")
    split = steps.split_dataset(store, manifest, cfg)
    features = steps.extract_features(store, manifest, split, config)
    bank = steps.build_memory_bank(store, manifest, split, features, config)
    evaluation = steps.evaluate_bank(store, manifest, split, bank)
    provenance = steps.provenance("tiles", manifest, split.split_key, features.identity)
    calibrated = steps.calibrate(store, evaluation, bank, "tiles", cfg, provenance)
    report = steps.make_report(store, evaluation, calibrated, manifest, cfg)
    return features, bank, evaluation, calibrated, report


def test_the_steps_run_on_a_store_url_and_a_second_machine_reuses_every_output(tmp_path, monkeypatch, product):
    """A shared store (here a file:// URL, the same code path as s3://): outputs land under the URL,
    and a machine with an empty local mirror finds the features, bank and evaluation there."""
    from patchcore import PatchCore

    url = f"file://{tmp_path / 'shared-store'}"
    monkeypatch.setenv("PATCHCORE_HOME", str(tmp_path / "machine-a"))
    features, bank, evaluation, calibrated, report = _train_steps(Store(url), product, tiny_config())
    shared = tmp_path / "shared-store"
    assert (shared / "banks" / bank.bank_key / "model.json").is_file()
    assert len(list((shared / "features" / features.identity).glob("*.npy"))) == features.n_images
    assert (shared / "models" / "tiles" / calibrated.model_key / "model.json").is_file()
    assert {p.name for p in (shared / "reports" / calibrated.model_key).iterdir()} >= {"scores.json", "roc.png"}

    monkeypatch.setenv("PATCHCORE_HOME", str(tmp_path / "machine-b"))
    monkeypatch.setattr(PatchCore, "embed", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-extracted")))
    features2, bank2, evaluation2, calibrated2, _ = _train_steps(Store(url), product, tiny_config())
    assert (features2.n_extracted, features2.n_cached) == (0, features.n_images)
    assert bank2.cached and evaluation2.cached and bank2.bank_key == bank.bank_key
    assert calibrated2.threshold == calibrated.threshold
    assert str(tmp_path / "machine-b") in bank2.bank_dir  # read through machine b's own mirror


def test_the_heatmap_grid_colour_scale_is_anchored_at_the_threshold_not_at_the_hottest_defect():
    from pipeline.steps.report import heatmap_scale

    records = [{"split": "holdout"}] * 3 + [{"split": "test"}] * 2
    maps = np.stack([np.full((4, 4), 1.0)] * 3 + [np.full((4, 4), 3.0), np.full((4, 4), 50.0)])
    low, high = heatmap_scale(records, maps, threshold=4.0)
    assert (low, high) == (1.0, 7.0)  # typical good pixel at the bottom, the threshold in the middle
    maps[-1] = 5000.0  # a far hotter defect does not wash out every other tile
    assert heatmap_scale(records, maps, threshold=4.0) == (1.0, 7.0)
