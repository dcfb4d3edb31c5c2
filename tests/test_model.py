"""The estimator as a user sees it: fit on nominal images, rank defects, localise them, save and
load, refuse bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from patchcore import PatchCore
from patchcore.coreset import GreedySelection
from patchcore.data import DataError, ImageError, load_mask, resolve_samples
from patchcore.evaluation import evaluate
from patchcore.knn import make_index
from patchcore.model import ModelFileError, read_coreset_state


def test_defects_rank_above_good_images(fitted, product):
    result = evaluate(fitted, product, progress=False)
    assert result.metrics["n_good"] == 8 and result.metrics["n_defect"] == 18
    assert result.metrics["image_auroc"] >= 0.9
    assert result.metrics["pixel_auroc"] >= 0.85
    assert set(result.per_defect_type) == {"scratch", "spot", "missing"}


def test_anomaly_map_peak_lies_in_the_planted_defect(fitted, product):
    samples = [s for s in resolve_samples(product, split="test") if s.label == 1]
    predictions = fitted.predict([s.path for s in samples], progress=False)
    cfg = fitted.config.image
    assert [m.shape for m in predictions.input_maps] == [(cfg.crop, cfg.crop)] * len(samples)
    hits = 0
    for sample, amap in zip(samples, predictions.anomaly_maps):
        with Image.open(sample.path) as image:  # maps come back in the image's own coordinates
            assert amap.shape == (image.height, image.width)
        mask = load_mask(sample.mask_path, amap.shape)
        y, x = np.unravel_index(np.argmax(amap), amap.shape)
        # a few pixels of slack: the map is smoothed at the feature grid's resolution (8 px cells)
        hits += bool(mask[max(0, y - 4) : y + 5, max(0, x - 4) : x + 5].any())
    assert hits / len(samples) >= 0.8


def test_coreset_bank_is_the_requested_fraction(fitted):
    assert fitted.n_train_images_ == 24
    assert len(fitted.memory_bank_) == int(fitted.n_train_patches_ * 0.25)
    assert fitted.memory_bank_.shape[1] == 256


def test_save_load_gives_identical_scores(fitted, product, tmp_path):
    test_images = [s.path for s in resolve_samples(product, split="test")]
    before = fitted.predict(test_images, progress=False)
    fitted.set_threshold(float(np.median(before.scores)), rule="test-median")
    path = fitted.save(tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == [
        "coreset_indices.npy",
        "coreset_sq_distances.npy",
        "index.faiss",
        "memory_bank.npy",
        "model.json",
    ]
    loaded = PatchCore.load(path)
    after = loaded.predict(test_images, progress=False)
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(after.anomaly_maps, before.anomaly_maps)
    assert loaded.threshold_ == fitted.threshold_
    assert loaded.calibration_["rule"] == "test-median"
    meta = json.loads((path / "model.json").read_text())
    assert meta["backbone"]["weights"]["kind"] == "random"
    assert meta["provenance"]["train_images_sha256"] == fitted.provenance_["train_images_sha256"]


def test_same_inputs_and_seed_give_a_byte_identical_bank(product):
    a = PatchCore(tiny_config()).fit(product, progress=False).memory_bank_
    b = PatchCore(tiny_config()).fit(product, progress=False).memory_bank_
    assert a.tobytes() == b.tobytes()
    c = PatchCore(tiny_config(**{"runtime.seed": 1})).fit(product, progress=False).memory_bank_
    assert c.tobytes() != a.tobytes()


def test_corrupt_image_is_named_before_extraction(product, tmp_path):
    train = sorted((product / "train" / "good").glob("*.png"))[:4]
    bad = tmp_path / "broken.png"
    bad.write_bytes(train[0].read_bytes()[:60])  # truncated PNG
    with pytest.raises(ImageError, match="broken.png: cannot read image"):
        PatchCore(tiny_config()).fit(train + [bad], progress=False)


def test_several_bad_files_are_listed_together(tmp_path, product):
    good = sorted((product / "train" / "good").glob("*.png"))[:2]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match=r"2 unreadable image\(s\)") as err:
        PatchCore(tiny_config()).fit(good + [tmp_path / "empty.png", tmp_path / "notes.png"], progress=False)
    assert "empty.png" in str(err.value) and "zero-byte" in str(err.value) and "notes.png" in str(err.value)


def test_corrupt_image_at_predict_time_is_named(fitted, tmp_path):
    bad = tmp_path / "scan_17.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ImageError, match="scan_17.jpg"):
        fitted.predict([bad], progress=False)


def test_empty_folder_and_missing_list_entries_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        PatchCore(tiny_config()).fit(tmp_path / "empty", progress=False)
    listing = tmp_path / "list.txt"
    listing.write_text("missing/a.png\n")
    with pytest.raises(DataError, match="do not exist"):
        PatchCore(tiny_config()).fit(listing, progress=False)


def test_list_file_and_arrays_are_accepted_inputs(fitted, product, tmp_path):
    paths = sorted((product / "test" / "spot").glob("*.png"))[:3]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    from_list = fitted.predict(listing, maps=False, progress=False).scores
    arrays = [np.asarray(Image.open(p).convert("L")) for p in paths]  # grayscale arrays become RGB
    from_arrays = fitted.predict(arrays, maps=False, progress=False).scores
    from_paths = fitted.predict(paths, maps=False, progress=False).scores
    np.testing.assert_array_equal(from_list, from_paths)
    assert np.all(np.isfinite(from_arrays)) and len(from_arrays) == 3


def test_predict_before_fit_is_refused():
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchCore(tiny_config()).predict([np.zeros((32, 32), np.uint8)])


def test_tampered_model_directory_is_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model")
    bank = np.load(path / "memory_bank.npy")
    bank[0, 0] += 1.0
    np.save(path / "memory_bank.npy", bank)
    with pytest.raises(ModelFileError, match="checksum"):
        PatchCore.load(path)


def test_incompatible_format_version_is_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model")
    meta = json.loads((path / "model.json").read_text())
    meta["format_version"] = 99
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="format version 99"):
        PatchCore.load(path)
    with pytest.raises(ModelFileError, match="not a saved PatchCore model"):
        PatchCore.load(tmp_path)


def test_saving_over_an_existing_model_replaces_it_whole(fitted, tmp_path):
    path = fitted.save(tmp_path / "model")
    fitted.set_threshold(1.5, rule="manual")
    fitted.save(path)
    assert PatchCore.load(path).threshold_ == 1.5
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary leftovers


def test_eq7_reweighting_scales_scores_down_and_keeps_the_ranking(product, fitted):
    reweighted = PatchCore(tiny_config(**{"scoring.reweight": True}))
    reweighted.fit(product, progress=False)
    result_plain = evaluate(fitted, product, progress=False, pixel_metrics=False)
    result_rw = evaluate(reweighted, product, progress=False, pixel_metrics=False)
    plain, rw = result_plain.predictions.scores, result_rw.predictions.scores
    assert np.all(rw <= plain + 1e-9) and np.all(rw > 0)
    assert not np.allclose(rw, plain)
    assert result_rw.metrics["image_auroc"] >= 0.85


@pytest.mark.parametrize("backend", ["faiss", "bounded"])
def test_knn_backends_give_the_default_scores_and_maps(product, fitted, tmp_path, backend):
    images = [s.path for s in resolve_samples(product, split="test")]
    default = fitted.predict(images, progress=False)
    other = PatchCore.load(fitted.save(tmp_path / "m"))
    other.config.scoring.knn_backend = backend
    other.index_ = make_index(other.memory_bank_.astype(np.float32), backend, "cpu")
    assert other.index_.name == backend
    result = other.predict(images, progress=False)
    np.testing.assert_allclose(result.scores, default.scores, rtol=1e-6)
    np.testing.assert_allclose(result.anomaly_maps, default.anomaly_maps, rtol=1e-5, atol=1e-6)


def test_a_knn_backend_that_cannot_run_fails_before_any_image_is_read(product, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: faiss-gpu may run here")
    train = sorted((product / "train" / "good").glob("*.png"))[:2]
    model = PatchCore(tiny_config(**{"scoring.knn_backend": "faiss-gpu"})).fit(train, progress=False)
    with pytest.raises(RuntimeError, match="cannot run on a GPU"):
        PatchCore.load(model.save(tmp_path / "m"))  # refused at load too
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")  # reading it would raise ImageError instead
    with pytest.raises(RuntimeError, match="cannot run on a GPU"):
        model.predict([broken], progress=False)


def test_euclidean_distance_is_the_square_root_of_the_reference_score(product, fitted):
    model = PatchCore(tiny_config(**{"scoring.distance": "euclidean"})).fit(product, progress=False)
    images = sorted((product / "test" / "scratch").glob("*.png"))
    np.testing.assert_allclose(
        model.predict(images, maps=False, progress=False).scores ** 2,
        fitted.predict(images, maps=False, progress=False).scores,
        rtol=1e-5,
    )


def test_refit_after_new_images_continues_the_saved_coreset(product, tmp_path):
    """Incremental refit: the saved selection state (checked like the bank) seeds the refit on
    old + new images; every old pick stays in the bank and the bank has the usual size."""
    images = sorted((product / "train" / "good").iterdir())
    old = PatchCore(tiny_config()).fit(images[:16], progress=False)
    path = old.save(tmp_path / "old")
    state = read_coreset_state(path)
    np.testing.assert_array_equal(state.indices, old.coreset_state_.indices)
    feats = [f for _, f in old.embed(images, progress=False)]
    rows_old = sum(len(f) for f in feats[:16])
    prior = GreedySelection(
        state.indices,
        np.concatenate([state.sq_distances, np.full(sum(len(f) for f in feats[16:]), np.nan, np.float32)]),
    )
    new = PatchCore(tiny_config()).fit_features(feats, progress=False, warm_start=prior)
    all_rows = np.concatenate(feats)
    assert len(new.memory_bank_) == int(len(all_rows) * 0.25)
    kept = {row.tobytes() for row in all_rows[state.indices]}
    assert kept <= {row.tobytes() for row in new.memory_bank_}
    assert np.array_equal(new.coreset_state_.indices[: len(state.indices)], state.indices)
    assert np.any(new.coreset_state_.indices >= rows_old)  # the new images got picks of their own

    np.save(path / "coreset_sq_distances.npy", state.sq_distances * 2)  # tampered state is refused
    with pytest.raises(ModelFileError, match="checksum"):
        read_coreset_state(path)
    with pytest.raises(ValueError, match="warm_start needs the approx_greedy coreset"):
        PatchCore(tiny_config(**{"coreset.method": "random"})).fit_features(feats, progress=False, warm_start=prior)


@pytest.mark.parametrize("n_images", [None, 3, 12, 40])
def test_streamed_fit_selects_the_same_coreset_as_the_whole_feature_set(n_images):
    """fit keeps only the projection of each image in memory; whatever image count it is told to
    expect (none, too few, exact, too many), the bank is the coreset of all rows at once."""
    from patchcore import coreset

    rng = np.random.default_rng(3)
    feats = [rng.normal(size=(49, 32)).astype(np.float32) for _ in range(12)]
    cfg = tiny_config(**{"features.target_dim": 32})
    model = PatchCore(cfg).fit_features(iter(feats), n_images=n_images, progress=False)
    all_rows = np.concatenate(feats)
    expected = coreset.select_coreset(
        all_rows,
        cfg.coreset.fraction,
        projection_dim=cfg.coreset.projection_dim,
        num_starts=cfg.coreset.num_starts,
        seed=cfg.runtime.seed,
        progress=False,
    )
    np.testing.assert_array_equal(model.memory_bank_, all_rows[np.sort(expected)])
    assert model.n_train_patches_ == len(all_rows)


def test_bank_rows_are_read_back_exactly(tmp_path):
    from patchcore.model import _read_rows

    rows = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    rows.tofile(tmp_path / "f.f32")
    picked = np.array([0, 7, 8, 49])
    np.testing.assert_array_equal(_read_rows(tmp_path / "f.f32", 50, 16, picked), rows[picked])
    np.testing.assert_array_equal(_read_rows(tmp_path / "f.f32", 50, 16, None), rows)
    with pytest.raises(OSError, match="short read"):
        _read_rows(tmp_path / "f.f32", 51, 16, np.array([50]))
