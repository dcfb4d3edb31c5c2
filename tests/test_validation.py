"""Data validation as a user meets it: a good nominal image set passes; every kind of bad input is
caught and reported per file (file, check, observed value, fix); a set whose brightness moved away
from the accepted version is flagged; `patchcore validate` exits non-zero on failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from patchcore.data import DataError
from pipeline.config import Params, ValidationConfig
from pipeline.validation import (
    SET_LEVEL,
    ValidationError,
    accept_reference,
    inspect_image,
    raise_for_failures,
    validate_image_set,
)

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, SIDE_PX, CROP_PX = 8, 64, 48


def texture(seed: int, side: int = SIDE_PX, brightness: float = 0.0, mode: str = "RGB") -> Image.Image:
    """A nominal image: a smooth grating plus noise, with a little brightness jitter per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    grey = 110 + 30 * np.sin(xx / 3.0 + seed) + rng.normal(0, 6, (side, side)) + rng.normal(0, 3) + brightness
    rgb = np.clip(np.stack([grey, grey * 0.9, grey * 0.8], axis=-1), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def make_product(root: Path, name: str = "widget", seeds=range(N_IMAGES), brightness: float = 0.0) -> Path:
    good = root / name / "train" / "good"
    good.mkdir(parents=True)
    for seed in seeds:
        texture(seed, brightness=brightness).save(good / f"{seed:03d}.png")
    return root / name


@pytest.fixture
def params() -> Params:
    return Params.from_dict({"model": {"image": {"resize": SIDE_PX, "crop": CROP_PX}}, "validation": {"min_images": 5}})


@pytest.fixture
def product(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PATCHCORE_HOME", str(tmp_path / "home"))  # drift references land here
    return make_product(tmp_path / "data")


def check(product: Path, params: Params, **kwargs):
    kwargs.setdefault("reference", None)
    kwargs.setdefault("docs", False)
    return validate_image_set(product, params, out_dir=product.parent.parent / "report", **kwargs)


def failures_of(result, rule_words: str) -> list:
    return [f for f in result.failures if rule_words in f.expectation]


def test_a_good_set_passes_with_a_summary_a_table_and_data_docs(product, params):
    result = check(product, params, docs=True)

    assert result.passed and result.failures == []
    summary = json.loads(result.summary_path.read_text())
    assert summary["passed"] is True and summary["n_files"] == N_IMAGES
    assert summary["expectations"] and all(e["success"] for e in summary["expectations"])
    assert result.docs_path.name == "index.html" and result.docs_path.is_file()
    assert any(result.docs_path.parent.glob("validations/**/*.html"))
    table = result.table_path.read_text().splitlines()
    assert table[0].startswith("path,bytes,sha256") and len(table) == N_IMAGES + 1
    assert summary["stats"]["mode"] == "RGB" and 90 < summary["stats"]["luminance_mean"]["mean"] < 130
    assert raise_for_failures(result) is result


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the IDAT chunk: its checksum no longer matches
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_INPUTS = {
    # name: (damage the set, file, rule words, observed text)
    "corrupt": (lambda good: _corrupt(good / "002.png"), "002.png", "every file decodes", "broken"),
    "truncated": (lambda good: _truncate(good / "002.png"), "002.png", "every file decodes", "truncated"),
    "zero-byte": (lambda good: (good / "002.png").write_bytes(b""), "002.png", "no zero-byte files", "0"),
    "zero-byte decodes": (
        lambda good: (good / "002.png").write_bytes(b""),
        "002.png",
        "every file decodes",
        "zero-byte file",
    ),
    "non-image content": (
        lambda good: (good / "002.png").write_text("not a picture"),
        "002.png",
        "every file decodes",
        "not a recognised image format",
    ),
    "non-image file": (
        lambda good: (good / "notes.txt").write_text("hello"),
        "notes.txt",
        "only image files",
        "notes.txt",
    ),
    "mixed modes": (lambda good: texture(2, mode="L").save(good / "002.png"), "002.png", "one colour mode", "L"),
    "too small": (  # below the usable floor (32 px by default), not merely below the crop: that is a note
        lambda good: texture(2, side=20).save(good / "002.png"),
        "002.png",
        "width within",
        "20",
    ),
    "too large": (lambda good: Image.new("RGB", (2500, 40)).save(good / "002.png"), "002.png", "width within", "2500"),
    "too many pixels": (
        lambda good: Image.new("RGB", (1200, 1200)).save(good / "002.png"),
        "002.png",
        "at most max_pixels",
        "1440000",
    ),
    "duplicates": (
        lambda good: shutil.copy(good / "003.png", good / "003 copy.png"),
        "003 copy.png",
        "no exact duplicates",
        "same bytes as 003.png",
    ),
    "format": (lambda good: texture(2).save(good / "002.jpg", quality=95), "002.jpg", "allowed image formats", "JPEG"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_kind_of_bad_input_is_caught_and_named(product, params, case):
    damage, file_name, rule_words, observed = BAD_INPUTS[case]
    good = product / "train" / "good"
    damage(good)
    strict = Params.from_dict(
        {
            **_as_dict(params),
            "validation": {"min_images": 5, "max_side_px": 2000, "max_pixels": 1_000_000, "formats": ["PNG"]},
        }
    )

    result = check(product, strict)

    assert not result.passed
    hits = [f for f in failures_of(result, rule_words) if Path(f.file).name == file_name]
    assert hits, f"{case}: expected a '{rule_words}' failure for {file_name}, got:\n{result.report()}"
    assert observed.lower() in str(hits[0].observed).lower(), hits[0]
    assert Path(hits[0].file) == good / file_name and hits[0].fix
    # The other (intact) files are not blamed for it.
    blamed = {Path(f.file).name for f in result.failures} - {file_name, "003.png"}
    assert blamed == set()


def _as_dict(params: Params) -> dict:
    from dataclasses import asdict

    return asdict(params)


def test_a_huge_image_is_never_decoded(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000)).save(path)  # 9 Mpx of zeros: a few kB on disk
    row = inspect_image(path, tmp_path, max_pixels=1_000_000)
    assert row["pixels"] == 9_000_000 and row["decodes"] is None and row["error"].startswith("not decoded")
    assert row["luminance_mean"] is None


def test_too_few_images_fails_the_set_not_a_file(product, params):
    result = check(product, Params.from_dict({**_as_dict(params), "validation": {"min_images": 20}}))
    assert not result.passed
    (failure,) = result.failures
    assert failure.file == SET_LEVEL and "at least min_images" in failure.expectation and failure.observed == N_IMAGES


def test_an_empty_folder_fails_on_the_count(tmp_path, params):
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    result = check(tmp_path / "empty", params)
    assert not result.passed and [f.file for f in result.failures] == [SET_LEVEL]


def test_a_missing_folder_is_a_data_error(tmp_path, params):
    with pytest.raises(DataError, match="no such folder"):
        check(tmp_path / "nope", params)


def test_the_error_names_file_check_observed_value_and_fix(product, params):
    _truncate(product / "train" / "good" / "004.png")
    result = check(product, params)
    with pytest.raises(ValidationError) as caught:
        raise_for_failures(result)
    message = str(caught.value)
    assert isinstance(caught.value, DataError) and caught.value.result is result
    assert f"{product / 'train' / 'good' / '004.png'}: every file decodes" in message
    assert "observed Truncated File Read" in message and "remove or replace the file" in message
    rows = json.loads(result.failures_path.read_text())
    assert rows == result.failure_rows() and rows[0]["file"].endswith("004.png")


def test_drift_flags_a_set_whose_brightness_moved(tmp_path, params, monkeypatch):
    monkeypatch.setenv("PATCHCORE_HOME", str(tmp_path / "home"))
    accepted = check(make_product(tmp_path / "v1"), params)
    accept_reference(accepted)

    # New images of the same product (other seeds), same lighting: inside the band.
    same_light = check(make_product(tmp_path / "v2", seeds=range(20, 28)), params, reference="auto")
    assert same_light.passed, same_light.report()
    assert same_light.summary["drift_reference"]["n_images"] == N_IMAGES
    assert any("luminance" in e["rule"] for e in same_light.summary["expectations"])

    brighter = check(make_product(tmp_path / "v3", seeds=range(20, 28), brightness=40), params, reference="auto")
    assert not brighter.passed
    assert failures_of(brighter, "set's average luminance")
    per_image = failures_of(brighter, "each image's mean luminance")
    assert len(per_image) == N_IMAGES and all(f.observed > 130 for f in per_image)


def test_without_a_reference_there_is_no_drift_check(product, params):
    result = check(product, params, reference="auto")  # nothing accepted yet in this PATCHCORE_HOME
    assert result.passed and result.summary["drift_reference"] is None
    assert not any("luminance" in e["rule"] for e in result.summary["expectations"])


def test_a_failed_set_cannot_become_the_reference(product, params):
    (product / "train" / "good" / "000.png").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot become the reference"):
        accept_reference(check(product, params))


def test_cli_validate_exits_non_zero_on_failure(product, params, tmp_path, capsys):
    from apps.cli import main

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_as_dict(params)))
    out = str(tmp_path / "cli-report")
    assert main(["validate", str(product), "--params", str(params_file), "--out", out, "--no-docs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True

    (product / "train" / "good" / "001.png").write_bytes(b"")
    assert main(["validate", str(product), "--params", str(params_file), "--out", out, "--no-docs"]) == 1
    printed = capsys.readouterr().out
    assert "001.png: no zero-byte files" in printed and "problem(s)" in printed


def test_params_yaml_validation_section_equals_the_code_defaults():
    from dataclasses import asdict

    in_file = yaml.safe_load((REPO / "params.yaml").read_text())["validation"]
    assert in_file == asdict(ValidationConfig())


def test_the_suite_in_the_repo_is_readable_and_complete():
    suite = yaml.safe_load((REPO / "pipeline" / "expectations" / "nominal_images.yaml").read_text())
    rules = " | ".join(e["rule"] for e in suite["expectations"])
    for words in (
        "decodes",
        "zero-byte",
        "formats",
        "colour mode",
        "width",
        "height",
        "max_pixels",
        "duplicates",
        "min_images",
        "luminance",
        "contrast",
    ):
        assert words in rules
    assert all(e.get("fix") for e in suite["expectations"])


def test_great_expectations_is_imported_only_when_a_validation_runs():
    import subprocess
    import sys

    code = (
        "import sys, pipeline.validation, pipeline.data_version, apps.cli; "
        "apps.cli.build_parser(); print('great_expectations' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.stdout.strip() == "False", done.stderr
