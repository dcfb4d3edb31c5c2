"""The `patchcore` command line as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO
from PIL import Image

from apps.cli import main as app_main
from patchcore import PatchCore
from patchcore.cli import main
from patchcore.config import ConfigError, parse_overrides

TINY = [
    "--backbone",
    "resnet18",
    "--weights",
    "random",
    "--resize",
    "112",
    "--crop",
    "96",
    "--set",
    "features.pretrain_dim=256",
    "--set",
    "features.target_dim=256",
    "--set",
    "runtime.num_workers=0",
]


@pytest.fixture(scope="module")
def cli_model(product, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "model"
    assert main(["fit", "--images", str(product), "--out", str(out), "--coreset", "0.1", "--quiet", *TINY]) == 0
    return out


def test_fit_writes_a_model_with_the_flags_applied(cli_model):
    meta = json.loads((cli_model / "model.json").read_text())
    assert meta["config"]["backbone"]["name"] == "resnet18"
    assert meta["backbone"]["layers"] == ["layer2", "layer3"]
    assert meta["config"]["coreset"]["fraction"] == 0.1
    assert meta["backbone"]["weights"]["kind"] == "random"


def test_predict_writes_scores_and_heatmaps(cli_model, product, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert (
        main(
            [
                "predict",
                "--model",
                str(cli_model),
                "--images",
                str(product / "test"),
                "--out",
                str(out),
                "--maps",
                str(tmp_path / "maps"),
                "--quiet",
            ]
        )
        == 0
    )
    records = json.loads(out.read_text())
    assert len(records) == 26 and all(set(r) == {"path", "score"} for r in records)
    assert len(list((tmp_path / "maps").glob("*.png"))) == 26  # names include the defect folder: no clashes
    assert "heatmaps:" in capsys.readouterr().out


def test_threshold_adds_is_anomalous(cli_model, product, tmp_path):
    model = PatchCore.load(cli_model)
    model.set_threshold(0.0, rule="everything")
    model.save(tmp_path / "m")
    out = tmp_path / "s.json"
    main(
        [
            "predict",
            "--model",
            str(tmp_path / "m"),
            "--images",
            str(product / "test" / "spot"),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert all(r["is_anomalous"] is True for r in json.loads(out.read_text()))


def test_evaluate_prints_metrics(cli_model, product, capsys):
    assert main(["evaluate", "--model", str(cli_model), "--data", str(product), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"image_auroc", "pixel_auroc", "pro", "f1_max_threshold"} <= set(report["metrics"])


def test_bad_input_exits_non_zero_with_the_file_named(tmp_path, product):
    bad = tmp_path / "imgs"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    run = subprocess.run(
        [sys.executable, "-m", "patchcore.cli", "fit", "--images", str(bad), "--out", str(tmp_path / "m"), *TINY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "a.png: cannot read image" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "m").exists()


def test_unknown_setting_is_a_clear_error(tmp_path, product, capsys):
    assert main(["fit", "--images", str(product), "--out", str(tmp_path / "m"), "--set", "coreset.speed=9"]) == 2
    assert "unknown config key 'coreset.speed'" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert (
        main(["predict", "--model", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "o.json")]) == 2
    )
    assert "not a saved PatchCore model" in capsys.readouterr().err


def test_patchcore_weights_env_is_used(monkeypatch, tmp_path, product, capsys):
    monkeypatch.setenv("PATCHCORE_WEIGHTS", str(tmp_path / "factory.pth"))
    assert main(["fit", "--images", str(product), "--out", str(tmp_path / "m"), "--backbone", "resnet18"]) == 2
    assert "factory.pth not found" in capsys.readouterr().err


def test_the_console_script_evaluates_a_model_folder_like_the_library(cli_model, product, capsys):
    assert app_main(["evaluate", "--model", str(cli_model), "--data", str(product), "--quiet"]) == 0
    assert {"image_auroc", "pixel_auroc", "pro"} <= set(json.loads(capsys.readouterr().out)["metrics"])
    assert app_main(["evaluate", "--model", str(cli_model)]) == 2
    assert "--data is required with --model" in capsys.readouterr().err


def test_set_values_are_read_as_yaml_and_a_missing_equals_sign_is_named():
    assert parse_overrides(
        [
            "scoring.k=3",
            "coreset.fraction=0.5",
            "scoring.reweight=true",
            "backbone.layers=[a, b]",
            " backbone.name =resnet18",
            "scoring.k=5",
        ]
    ) == {
        "scoring.k": 5,
        "coreset.fraction": 0.5,
        "scoring.reweight": True,
        "backbone.layers": ["a", "b"],
        "backbone.name": "resnet18",
    }
    assert parse_overrides(None) == {}
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE, got 'scoring.k'"):
        parse_overrides(["scoring.k"])


def test_switching_the_profile_keeps_comments_and_the_file_mode_and_never_writes_a_broken_file(tmp_path):
    import os
    import stat

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("profile: production", "profile: production  # note"))
    os.chmod(params, 0o644)
    assert app_main(["profile", "demo", "--params", str(params)]) == 0
    assert "profile: demo  # note" in params.read_text() and stat.S_IMODE(params.stat().st_mode) == 0o644
    before = params.read_text()
    assert app_main(["profile", "nightly", "--params", str(params)]) == 2  # unknown: nothing written
    assert params.read_text() == before


def test_fit_and_predict_in_tiled_mode_draw_heatmaps_over_the_whole_image(tmp_path):
    from patchcore.synthetic import generate_product

    data = generate_product(
        tmp_path, "strip", n_train=8, n_test_good=1, n_test_defect=1, size_px=96, width_px=240, defects_at="edges"
    )
    model = tmp_path / "model"
    fit = ["fit", "--images", str(data), "--out", str(model), "--mode", "tiled", "--set", "image.tile_size=64"]
    assert main([*fit, "--quiet", *TINY]) == 0
    assert json.loads((model / "model.json").read_text())["config"]["image"]["mode"] == "tiled"
    out = tmp_path / "scores.json"
    predict = ["predict", "--model", str(model), "--images", str(data / "test"), "--out", str(out)]
    assert main([*predict, "--maps", str(tmp_path / "maps"), "--quiet"]) == 0
    heatmaps = sorted((tmp_path / "maps").glob("*.png"))
    assert len(heatmaps) == 4 and all(Image.open(p).size == (240, 96) for p in heatmaps)
