"""The Prefect flows end to end (under prefect_test_harness) on a temporary SQLite MLflow store:
train -> registered challenger with its artifacts, tags and Prefect artifacts; re-runs and
interrupted extractions re-use cached features; failed validation registers nothing; promotion
refuses random weights unless allowed; the champion loads and predicts in a fresh process; the
command line around it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PARAMS, pipeline_home, tiny_overrides
from PIL import Image

from patchcore import PatchCore
from patchcore.data import DataError
from patchcore.synthetic import generate_product

TINY = tiny_overrides()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    with pipeline_home(root):
        from pipeline.config import MlflowConfig
        from pipeline.registry import Registry

        yield {"root": root, "home": root / "home", "registry": Registry(MlflowConfig())}


@pytest.fixture(scope="module")
def trained(env, product):
    from flows.train import train

    state = train("tiles", str(product), PARAMS, TINY, return_state=True)
    return {"result": state.result(), "flow_run_id": state.state_details.flow_run_id}


@pytest.fixture(scope="module")
def retrained(env, product, trained):
    from flows.train import train

    state = train("tiles", str(product), PARAMS, TINY, return_state=True)
    return {"result": state.result(), "flow_run_id": state.state_details.flow_run_id}


@pytest.fixture(scope="module")
def promoted(env, retrained):
    from flows.promote import promote

    refused = promote("tiles", None, PARAMS, TINY)
    aliases_after_refusal = env["registry"].aliases("tiles")
    accepted = promote("tiles", None, PARAMS, TINY, allow_random_weights=True)
    return {"refused": refused, "aliases_after_refusal": aliases_after_refusal, "accepted": accepted}


def task_runs(flow_run_id) -> dict[str, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.name.rsplit("-", 1)[0], []).append(run)
    return out


def feature_files(home: Path) -> list[Path]:
    return sorted((home / "features").rglob("*.npy")) if (home / "features").is_dir() else []


# -- training --------------------------------------------------------------------------------------
def test_train_registers_a_challenger_with_metrics_tags_and_artifacts(trained, env):
    registry, result = env["registry"], trained["result"]
    version = result["registry"]["version"]
    assert registry.aliases("tiles") == {"challenger": version}
    mv = registry.client.get_model_version("patchcore-tiles", version)
    assert mv.tags["weights"] == "RANDOM (not for production)" and mv.tags["random_weights"] == "true"
    assert float(mv.tags["threshold"]) == pytest.approx(result["calibration"]["threshold"], rel=1e-5)
    assert {"image_auroc", "heldout_fpr", "threshold_rule", "training_key", "data_root"} <= set(mv.tags)
    assert len(mv.tags) <= 17, sorted(mv.tags)  # lean: the rest is in the description and on the run
    assert "memory bank" in mv.description and result["registry"]["run_id"] in mv.description

    run = registry.client.get_run(result["registry"]["run_id"])
    assert {
        "image_auroc",
        "pixel_auroc",
        "pro",
        "f1_max",
        "threshold",
        "threshold_recall100",
        "heldout_fpr",
        "report_precision",
        "report_recall",
        "report_fpr",
        "report_errors",
        "bank_size",
        "seconds_extract",
        "seconds_coreset",
        "image_auroc.scratch",
        "pro.spot",
    } <= set(run.data.metrics)
    assert run.data.params["model.backbone.name"] == "resnet18" and "pipeline.holdout_fraction" in run.data.params
    assert run.data.tags["git_commit"] and run.data.tags["random_weights"] == "true"
    assert run.data.tags["data.md5"] == mv.tags["data_version"]  # the full data record lives on the run
    assert "RANDOM" in run.info.run_name
    # The run covers the whole training (it opens at the register step, but starts when training began).
    assert (run.info.end_time - run.info.start_time) / 1000 >= sum(result["seconds"].values()) * 0.9
    experiment = registry.client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    def listing(path=""):
        for item in registry.client.list_artifacts(run.info.run_id, path):
            yield from listing(item.path) if item.is_dir else [item.path]

    files = set(listing())
    assert {
        "report/roc.png",
        "report/pr.png",
        "report/score_histogram.png",
        "report/heatmaps.png",
        "validation/summary.json",
        "evaluation/calibration.json",
        "evaluation/evaluation.json",
    } <= files


def test_registered_model_is_a_pyfunc_with_signature_example_and_no_pickles(trained, env):
    import yaml

    registry = env["registry"]
    model_dir = registry.download("tiles", trained["result"]["registry"]["version"])
    root = model_dir.parents[1]
    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models from code
    assert "image" in mlmodel["signature"]["inputs"] and "is_anomalous" in mlmodel["signature"]["outputs"]
    assert (root / mlmodel["saved_input_example_info"]["artifact_path"]).is_file()
    assert (root / "code" / "patchcore" / "model.py").is_file()  # the library travels with the model
    assert not [p for p in root.rglob("*") if p.suffix in (".pkl", ".pickle", ".pyc")]
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["threshold"] == pytest.approx(trained["result"]["calibration"]["threshold"])
    assert meta["calibration"]["rule"] == "f1_optimal" and meta["provenance"]["data_version"].endswith(".dir")


def test_calibration_reports_figures_on_images_that_did_not_pick_the_threshold(trained):
    c = trained["result"]["calibration"]
    assert c["mode"] == "labelled" and c["report_independent"] and c["heldout_fpr_independent"]
    assert c["n_calibration"] + c["n_report"] == 26 and c["n_report"] > 0
    assert {"precision", "recall", "fpr", "errors"} <= set(c["at_threshold"])
    assert c["threshold_recall100"] <= c["threshold"]  # the F1 working point never flags more than 100% recall does


def test_train_publishes_a_markdown_summary_and_a_per_defect_table(trained):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = {
            a.key: a
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-tiles", "train-tiles-per-defect"]))
            )
        }
    summary = found["train-tiles"].data
    assert trained["result"]["registry"]["run_id"] in summary and "threshold" in summary and "RANDOM" in summary
    rows = json.loads(found["train-tiles-per-defect"].data)
    assert {r["type"] for r in rows} == {"good", "scratch", "spot", "missing", "held-out nominal"}


def test_rerun_extracts_nothing_and_reuses_cached_stages(retrained, trained):
    features = retrained["result"]["features"]
    assert features["n_extracted"] == 0 and features["n_cached"] == trained["result"]["features"]["n_extracted"] > 0
    runs = task_runs(retrained["flow_run_id"])
    # One caching mechanism: the content-addressed store. The tasks run (Completed) and find their
    # outputs there instead of recomputing them; Prefect's own result cache is not used.
    assert runs["coreset memory bank"][0].state.name == "Completed"
    assert runs["evaluate"][0].state.name == "Completed"
    assert retrained["result"]["cached_stages"] == ["coreset", "evaluate"] and trained["result"]["cached_stages"] == []
    assert retrained["result"]["seconds"]["coreset"] < trained["result"]["seconds"]["coreset"]  # this run's time
    # Nothing changed: the same version, no new one (a re-run of `make demo` adds no registry version).
    assert retrained["result"]["registry"]["version"] == trained["result"]["registry"]["version"]
    assert retrained["result"]["registry"]["unchanged"] is True and "unchanged" not in trained["result"]["registry"]


@pytest.fixture(scope="module")
def widgets(env, tmp_path_factory):
    """A second product whose extraction fails once with an I/O error after 4 images (then retried)."""
    from flows.train import train

    data = generate_product(
        tmp_path_factory.mktemp("widgets"), "widgets", n_train=12, n_test_good=3, n_test_defect=2, size_px=112, seed=7
    )
    extracted: list[int] = []
    original = PatchCore.embed

    def flaky_embed(self, images, *args, **kwargs):
        for position, features in original(self, images, *args, **kwargs):
            if len(extracted) == 4 and not getattr(flaky_embed, "failed", False):
                flaky_embed.failed = True
                raise OSError(errno.EIO, "simulated I/O error while reading a batch")
            extracted.append(position)
            yield position, features

    before = len(feature_files(env["home"]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PatchCore, "embed", flaky_embed)
        state = train("widgets", str(data), PARAMS, TINY, return_state=True)
    return {
        "result": state.result(),
        "flow_run_id": state.state_details.flow_run_id,
        "extracted": extracted,
        "files_before": before,
    }


def test_interrupted_extraction_is_retried_and_writes_each_image_once(widgets, env):
    result = widgets["result"]
    n_bank = result["features"]["n_images"]
    # 4 before the failure, then the interrupted shard again as a whole (the same batches: the same
    # bits), of which only the images not yet written are written
    assert len(widgets["extracted"]) == 4 + n_bank
    assert result["features"] == {"n_images": n_bank, "n_cached": 4, "n_extracted": n_bank - 4}
    assert len(feature_files(env["home"])) >= widgets["files_before"] + n_bank
    assert not list((env["home"] / "features").rglob("*.tmp"))  # only complete files
    extract = task_runs(widgets["flow_run_id"])["extract features"][0]
    assert extract.run_count == 2  # failed once, retried


def test_failed_validation_stops_before_extraction_and_registers_nothing(env, product, tmp_path):
    from flows.train import train

    broken = tmp_path / "broken"
    shutil.copytree(product, broken)
    (broken / "train" / "good" / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    registry = env["registry"]
    versions_before = len(registry.client.search_model_versions())
    features_before = feature_files(env["home"])
    with pytest.raises(DataError, match="003.png"):
        train("broken", str(broken), PARAMS, TINY)
    assert "broken" not in registry.products()
    assert len(registry.client.search_model_versions()) == versions_before
    assert feature_files(env["home"]) == features_before


def test_the_drift_baseline_is_kept_with_the_registered_version(trained, env, product, tmp_path):
    """Any worker finds the baseline in the registry; a much darker set of the product fails validation."""
    from flows.train import train

    reference = env["registry"].drift_reference("tiles")
    assert reference["data_version"] == trained["result"]["data_version"]
    assert reference["n_images"] > 0 and "luminance_mean" in reference
    assert not (env["home"] / "validation" / "tiles" / "accepted.json").exists()  # not on this machine's disk
    dark = tmp_path / "tiles"
    shutil.copytree(product, dark)
    for path in (dark / "train" / "good").glob("*.png"):
        with Image.open(path) as image:
            image.point(lambda v: v // 3).save(path)
    versions_before = len(env["registry"].client.search_model_versions())
    with pytest.raises(DataError, match="luminance"):
        train("tiles", str(dark), PARAMS, TINY)
    assert len(env["registry"].client.search_model_versions()) == versions_before


def test_dataloader_worker_processes_work_inside_prefect_tasks(env, product, fitted, tmp_path):
    """Image decoding workers are forked from the task's process; Prefect's own exit hooks must
    not make them die (the default runtime.num_workers is 2)."""
    from prefect import flow, task

    from tasks.compat import install_fork_fix

    saved = fitted.save(tmp_path / "model")

    @task
    def score_with_workers() -> int:
        install_fork_fix()  # what the pipeline's extract / evaluate / score tasks do first
        model = PatchCore.load(saved)
        model.config.runtime.num_workers = 2
        return len(model.predict(product / "test", maps=False, progress=False).scores)

    @flow
    def workers_flow() -> int:
        return score_with_workers()

    assert workers_flow() == 26


# -- promotion ---------------------------------------------------------------------------------------
def test_random_weights_model_is_refused_unless_allowed(promoted, retrained):
    refused, accepted = promoted["refused"], promoted["accepted"]
    assert refused["outcome"] == "rejected" and "RANDOM" in refused["reasons"][0]
    assert "champion" not in promoted["aliases_after_refusal"]
    assert accepted["outcome"] == "promoted" and any("RANDOM" in n for n in accepted["notes"])
    assert accepted["aliases"]["champion"] == retrained["result"]["registry"]["version"]


def test_champion_loads_and_predicts_in_a_fresh_process(promoted, env, product, tmp_path):
    script = """
import json, sys
import numpy as np
import mlflow
from PIL import Image
from pipeline.pyfunc_model import to_model_input
model = mlflow.pyfunc.load_model("models:/patchcore-tiles@champion")
defect, good = sys.argv[1], sys.argv[2]
frame = to_model_input([open(defect, "rb").read(), good, np.asarray(Image.open(good).convert("RGB"))])
out = model.predict(frame)
with_maps = model.predict(frame.iloc[:1], params={"return_maps": True})
print(json.dumps({"columns": list(out.columns), "scores": out["score"].tolist(),
                  "flags": out["is_anomalous"].tolist(), "map_shape": list(with_maps["anomaly_map"][0].shape)}))
"""
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(product / "test" / "spot" / "000.png"),
            str(product / "test" / "good" / "000.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": env["registry"].uri},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["columns"] == ["score", "is_anomalous", "threshold"]
    assert out["flags"] == [True, False, False]
    assert out["scores"][1] == pytest.approx(out["scores"][2], rel=1e-4)  # path and uint8 array: same image
    with Image.open(product / "test" / "spot" / "000.png") as image:  # the map lies on the image it scores
        assert out["map_shape"] == [image.height, image.width]


def test_cold_start_product_calibrates_on_held_out_nominal_scores_and_can_be_promoted(env, tmp_path):
    """No defects yet (train/good only): a documented quantile rule, an honest report, a champion."""
    from flows.promote import promote
    from flows.train import train

    data = generate_product(tmp_path, "cold", n_train=12, n_test_good=0, n_test_defect=0, size_px=112, seed=3)
    result = train("cold", str(data), PARAMS, TINY)
    c = result["calibration"]
    assert c["mode"] == "nominal-only" and c["rule"] == "nominal_quantile" and c["target_fpr"] == 0.01
    assert c["heldout_fpr"] == 0.0 and not c["heldout_fpr_independent"]  # none of 2 held out: 0 <= 1% of them
    assert "impossible" in c["report_on"] and not c["report_independent"]  # no unseen good images: FPR not claimed
    assert c["expected_fpr_floor"] == pytest.approx(1 / 3)
    assert "image_auroc" not in result["metrics"]
    decision = promote("cold", None, PARAMS, TINY, allow_random_weights=True)
    assert decision["outcome"] == "promoted" and any("cannot be measured" in n for n in decision["notes"])


# -- command line ------------------------------------------------------------------------------------
def cli(*argv: str) -> int:
    from apps.cli import main

    return main(list(argv))


def test_status_json_names_the_tracking_store_and_each_alias(promoted, env, capsys):
    assert cli("status", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tracking_uri"] == env["registry"].uri
    tiles = report["products"]["tiles"]["aliases"]
    assert tiles["champion"]["version"] == promoted["accepted"]["aliases"]["champion"]
    assert tiles["champion"]["weights"] == "RANDOM (not for production)" and tiles["champion"]["threshold"] > 0


def test_inspect_writes_scores_and_heatmaps(promoted, product, tmp_path, capsys):
    out = tmp_path / "inspect"
    assert cli("inspect", "--product", "tiles", "--images", str(product / "test" / "scratch"), "--out", str(out)) == 0
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,score,is_anomalous,threshold" and len(rows) == 7
    assert json.loads((out / "scores.json").read_text())["version"] == promoted["accepted"]["aliases"]["champion"]
    assert len(list((out / "heatmaps").glob("*.png"))) == 6


def test_promote_again_is_a_no_op_and_evaluate_scores_the_champion(promoted, capsys):
    assert cli("promote", "--product", "tiles", "--params", PARAMS, "--allow-random-weights") == 0
    assert "already champion" in capsys.readouterr().out
    assert cli("evaluate", "--product", "tiles") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == promoted["accepted"]["aliases"]["champion"] and "image_auroc" in report


@pytest.mark.parametrize(
    "argv, message",
    [
        (("inspect", "--product", "nope", "--images", ".", "--out", "x"), "unknown product 'nope'"),
        (("inspect", "--product", "widgets", "--images", ".", "--out", "x"), "no champion yet for 'widgets'"),
        (("rollback", "--product", "tiles"), "only champion so far"),
    ],
)
def test_registry_errors_are_one_line_and_exit_2(promoted, widgets, argv, message, capsys):
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unreachable_tracking_store_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert cli("status") == 2
    assert "tracking store http://127.0.0.1:9 is unreachable" in capsys.readouterr().err


def test_evaluate_by_model_folder_and_by_registered_version_report_the_same_figures(trained, env, product, capsys):
    """One evaluation function: `patchcore evaluate --model DIR` (the library) and `--product` (the
    promotion gate's scoring of a registered version) give the same numbers under the same names."""
    version = trained["result"]["registry"]["version"]
    model_dir = env["registry"].download("tiles", version)
    assert cli("evaluate", "--model", str(model_dir), "--data", str(product), "--quiet") == 0
    by_folder = json.loads(capsys.readouterr().out)["metrics"]
    assert cli("evaluate", "--product", "tiles", "--version", version, "--data", str(product)) == 0
    by_version = json.loads(capsys.readouterr().out)
    for name in ("image_auroc", "pixel_auroc", "pro", "f1_max", "f1_max_threshold", "n_good", "n_defect"):
        assert by_version[name] == pytest.approx(by_folder[name], rel=1e-9), name


def test_the_full_image_modes_run_through_training_registry_serving_and_inspect(env, tmp_path):
    """A 2.5:1 product with every defect near an end (where the default crop never looks): the
    training flow, the registered pyfunc model (maps on the image it scored) and `inspect` in each
    full-image mode. (Last in the module: the CLI's log handlers outlive the test's capture.)"""
    import mlflow

    from flows.train import train
    from pipeline.pyfunc_model import to_model_input

    trained = {}
    # the tiled one scores with the exported engine: evaluated, registered and served through it
    for mode, product, engine in (("full_frame", "stripff", "torch"), ("tiled", "striptl", "onnxruntime")):
        data = generate_product(
            tmp_path, product, n_train=12, n_test_good=3, n_test_defect=3, size_px=96, width_px=240, defects_at="edges"
        )
        settings = {"model.image.mode": mode, "model.image.tile_size": 64, "model.runtime.engine": engine}
        result = train(product, str(data), PARAMS, TINY | settings)
        assert result["metrics"]["image_auroc"] >= 0.9 and result["metrics"]["pixel_auroc"] >= 0.9, result["metrics"]
        trained[product] = (data / "test" / "spot" / "000.png", result["registry"]["version"])
        tags = env["registry"].client.get_model_version(f"patchcore-{product}", result["registry"]["version"]).tags
        assert tags["engine"] == engine
    for product, (defect, version) in trained.items():
        served = mlflow.pyfunc.load_model(f"models:/patchcore-{product}/{version}")
        out = served.predict(to_model_input([str(defect)]), params={"return_maps": True})
        assert out["is_anomalous"].tolist() == [True] and out["anomaly_map"][0].shape == (96, 240)
        folder = tmp_path / f"inspect-{product}"
        assert (
            cli("inspect", "--product", product, "--version", version, "--images", str(defect), "--out", str(folder))
            == 0
        )
        (heatmap,) = (folder / "heatmaps").glob("*.png")
        assert Image.open(heatmap).size == (240, 96)  # the overlay covers the whole image
