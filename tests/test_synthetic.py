"""Tests for patchcore.synthetic: layout, masks, determinism and defect placement."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore.synthetic import DEFECT_TYPES, generate_product, main, render_sample

SMALL = dict(n_train=5, n_test_good=3, n_test_defect=2, size_px=64)


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_product(tmp_path_factory) -> Path:
    return generate_product(tmp_path_factory.mktemp("synthetic"), "tiles", seed=0)


def test_default_layout_and_counts(default_product):
    assert default_product.name == "tiles"
    assert sorted(p.name for p in default_product.iterdir()) == ["ground_truth", "test", "train"]
    assert sorted(p.name for p in (default_product / "train").iterdir()) == ["good"]
    assert sorted(p.name for p in (default_product / "test").iterdir()) == sorted(("good",) + DEFECT_TYPES)
    assert sorted(p.name for p in (default_product / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)

    train = sorted((default_product / "train" / "good").glob("*.png"))
    assert [p.name for p in train] == [f"{i:03d}.png" for i in range(40)]
    assert len(list((default_product / "test" / "good").glob("*.png"))) == 10
    for defect in DEFECT_TYPES:
        images = sorted((default_product / "test" / defect).glob("*.png"))
        masks = sorted((default_product / "ground_truth" / defect).glob("*.png"))
        assert [p.name for p in images] == [f"{i:03d}.png" for i in range(8)]
        assert [p.name for p in masks] == [f"{i:03d}_mask.png" for i in range(8)]
    # Nothing but the MVTec layout: no README or other stray files.
    assert all(p.suffix == ".png" for p in default_product.rglob("*") if p.is_file())


def test_images_are_rgb_of_requested_size(default_product):
    for path in default_product.rglob("*.png"):
        if path.parent.parent.name == "ground_truth":
            continue
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (128, 128)


def test_every_defect_image_has_a_matching_nonempty_mask(default_product):
    for defect in DEFECT_TYPES:
        for image_path in sorted((default_product / "test" / defect).glob("*.png")):
            mask_path = default_product / "ground_truth" / defect / f"{image_path.stem}_mask.png"
            with Image.open(mask_path) as m, Image.open(image_path) as im:
                assert m.mode == "L"
                assert m.size == im.size
            mask = read(mask_path)
            assert set(np.unique(mask).tolist()) == {0, 255}
            # Clearly visible, but not the whole image.
            fraction = (mask > 0).mean()
            assert 0.001 < fraction < 0.1, (image_path, fraction)


def test_good_images_have_no_masks(default_product):
    assert not (default_product / "ground_truth" / "good").exists()
    mask_names = {p.name for p in (default_product / "ground_truth").rglob("*.png")}
    assert len(mask_names) > 0
    for split in ("train", "test"):
        for image_path in (default_product / split / "good").glob("*.png"):
            _, mask, nominal = render_sample(
                "tiles", split=split, kind="good", index=int(image_path.stem), size_px=128, seed=0
            )
            assert not mask.any()
            np.testing.assert_array_equal(read(image_path), nominal)


def test_defects_lie_exactly_where_the_masks_say(default_product):
    for defect in DEFECT_TYPES:
        for image_path in sorted((default_product / "test" / defect).glob("*.png")):
            image = read(image_path)
            mask = read(default_product / "ground_truth" / defect / f"{image_path.stem}_mask.png") > 0
            rendered, rendered_mask, nominal = render_sample(
                "tiles", kind=defect, index=int(image_path.stem), size_px=128, seed=0
            )
            np.testing.assert_array_equal(image, rendered)
            np.testing.assert_array_equal(mask, rendered_mask)
            diff = np.abs(image.astype(int) - nominal.astype(int)).max(axis=-1)
            assert not diff[~mask].any(), "pixels outside the mask were changed"
            assert (diff[mask] >= 20).mean() > 0.95, "the mask covers pixels that barely changed"


def test_defects_stand_out_from_the_nominal_texture(default_product):
    # Independent of render_sample: compare with the mean good training image.
    train = np.stack([read(p) for p in (default_product / "train" / "good").glob("*.png")]).astype(float)
    mean_good = train.mean(axis=0)
    spread = np.abs(train - mean_good).max(axis=-1).mean()
    for defect in DEFECT_TYPES:
        for image_path in (default_product / "test" / defect).glob("*.png"):
            image = read(image_path).astype(float)
            mask = read(default_product / "ground_truth" / defect / f"{image_path.stem}_mask.png") > 0
            deviation = np.abs(image - mean_good).max(axis=-1)
            assert deviation[mask].mean() > 3 * spread, (image_path, deviation[mask].mean(), spread)
            assert deviation[~mask].mean() < 1.5 * spread


def test_good_images_vary_but_only_slightly(default_product):
    a, b = (read(default_product / "train" / "good" / f"{i:03d}.png").astype(float) for i in (0, 1))
    assert np.abs(a - b).mean() > 1.0  # not copies of each other
    assert abs(a.mean() - b.mean()) < 20  # same product, similar overall appearance


def test_deterministic_byte_identical(tmp_path):
    first = generate_product(tmp_path / "a", "tiles", seed=3, **SMALL)
    second = generate_product(tmp_path / "b", "tiles", seed=3, **SMALL)
    files = all_files(first)
    assert len(files) == 5 + 3 + 2 * 3 * 2
    assert files == all_files(second)


def test_other_seed_or_product_gives_other_images(tmp_path):
    base = all_files(generate_product(tmp_path / "a", "tiles", seed=3, **SMALL))
    other_seed = all_files(generate_product(tmp_path / "b", "tiles", seed=4, **SMALL))
    other_product = generate_product(tmp_path / "c", "carpet", seed=3, **SMALL)
    assert base.keys() == other_seed.keys()
    assert all(base[k] != other_seed[k] for k in base)
    assert all(base[k] != v for k, v in all_files(other_product).items())


def test_products_differ_in_style(tmp_path):
    # Same seed, different product name: a different surface colour, not just noise.
    tiles, _, _ = render_sample("tiles", size_px=64)
    carpet, _, _ = render_sample("carpet", size_px=64)
    colour_gap = np.abs(tiles.reshape(-1, 3).mean(0) - carpet.reshape(-1, 3).mean(0)).max()
    assert colour_gap > 20


def test_counts_do_not_change_other_images(tmp_path):
    few = generate_product(tmp_path / "few", "tiles", seed=1, n_train=2, n_test_good=1, n_test_defect=1, size_px=64)
    many = generate_product(tmp_path / "many", "tiles", seed=1, **SMALL)
    for name, data in all_files(few).items():
        assert (many / name).read_bytes() == data


def test_rerun_overwrites_and_foreign_files_are_refused(tmp_path):
    folder = generate_product(tmp_path, "tiles", seed=0, **SMALL)
    before = all_files(folder)
    assert generate_product(tmp_path, "tiles", seed=0, **SMALL) == folder
    assert all_files(folder) == before
    # A smaller run would leave stale images behind: refuse rather than mix.
    with pytest.raises(FileExistsError, match="would not write"):
        generate_product(tmp_path, "tiles", seed=0, **{**SMALL, "n_train": 2})
    assert all_files(folder) == before


def test_grayscale_and_size(tmp_path):
    folder = generate_product(tmp_path, "grid", color=False, **{**SMALL, "size_px": 96})
    for path in folder.rglob("*.png"):
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (96, 96)
    image, mask, nominal = render_sample("grid", kind="spot", size_px=96, color=False)
    assert image.shape == nominal.shape == mask.shape == (96, 96)
    diff = np.abs(image.astype(int) - nominal.astype(int))
    assert not diff[~mask].any() and (diff[mask] >= 20).mean() > 0.95


@pytest.mark.parametrize(
    "kwargs",
    [
        {"product": "a/b"},
        {"product": ""},
        {"n_train": 0},
        {"n_test_good": -1},
        {"size_px": 16},
    ],
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_product(tmp_path, **{**SMALL, **kwargs})


def test_render_sample_rejects_defects_in_train():
    with pytest.raises(ValueError, match="train"):
        render_sample(split="train", kind="scratch")
    with pytest.raises(ValueError, match="kind"):
        render_sample(kind="crack")


def test_cli(tmp_path, capsys):
    rc = main(
        [
            "--out",
            str(tmp_path),
            "--product",
            "tiles",
            "--seed",
            "0",
            "--n-train",
            "4",
            "--n-test-good",
            "2",
            "--n-test-defect",
            "1",
            "--size",
            "64",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "tiles") in out and "wrote 9 images" in out
    assert len(list((tmp_path / "tiles").rglob("*.png"))) == 4 + 2 + 3 + 3


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--product" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--size", "8"])
    assert exc.value.code == 2
