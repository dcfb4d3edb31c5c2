"""DVC as a user drives it, in a temporary git repository holding a copy of the project's pipeline:
`dvc repro` builds the model, a second `dvc repro` does nothing, a params change re-runs only the
stages that depend on it (`dvc exp run -S ...`, then `dvc metrics diff` shows the change). The data
version the pipeline records is DVC's own md5 of the product folder, and it says when the images
changed and how to get them back."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Params, params_to_dict, with_overrides
from pipeline.data_version import DataVersion, changed_since, data_version, dir_md5, reproduce_instructions

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(
    shutil.which("dvc", path=str(VENV_BIN)) is None and shutil.which("dvc") is None, reason="dvc is not installed"
)

TINY = {
    "model.backbone.name": "resnet18",
    "model.backbone.weights": "random",
    "model.image.resize": 112,
    "model.image.crop": 96,
    "model.features.pretrain_dim": 256,
    "model.features.target_dim": 256,
    "model.coreset.fraction": 0.25,
    "model.runtime.num_workers": 0,
    "model.runtime.device": "cpu",
    "validation.min_images": 5,
}


def run(repo: Path, *args: str, check: bool = True) -> str:
    env = os.environ | {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "PATCHCORE_HOME": str(repo.parent / "home"),
        "GIT_TERMINAL_PROMPT": "0",
    }
    env.pop("PATCHCORE_PARAMS", None)
    done = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{output[-4000:]}")
    return output


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A user's project: the pipeline code, dvc.yaml, .dvcignore, a small params.yaml, data/ tracked by data.dvc."""
    from patchcore.synthetic import generate_product

    repo = tmp_path_factory.mktemp("dvc") / "project"
    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("patchcore", "pipeline"):  # the DVC stages import these two only
        shutil.copytree(REPO / package, repo / package, ignore=ignore)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    params = with_overrides(Params(), TINY)
    # dvc.yaml tracks `profile` and `profiles` (what the active profile changes) like any other params.
    profiles = {"profiles": {"demo": {"model.backbone.weights": "random"}}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params_to_dict(params) | profiles, sort_keys=False))
    generate_product(repo / "data", "tiles", n_train=12, n_test_good=4, n_test_defect=2, size_px=112, seed=0)
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "test@example.com")
    run(repo, "git", "config", "user.name", "test")
    run(repo, "dvc", "init", "-q")
    shutil.copy(REPO / ".dvcignore", repo / ".dvcignore")  # the project's: caches are not code
    run(repo, "dvc", "add", "-q", "data")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "project with data")
    return repo


def test_the_data_version_is_dvcs_own_md5(repo):
    recorded = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert dir_md5(repo / "data") == recorded

    version = data_version(repo / "data" / "tiles")
    assert version.product == "tiles" and version.path == "data/tiles" and version.n_files == 12 + 4 + 3 * 2 * 2
    assert version.dvc_file == "data.dvc" and version.dvc_md5 == recorded and version.in_dvc is True
    head = run(repo, "git", "rev-parse", "HEAD").strip()
    assert version.git_commit == head and version.git_dirty is False
    assert DataVersion.from_tags(version.tags()) == version
    assert not changed_since(repo / "data" / "tiles", version)
    assert not changed_since(repo / "data" / "tiles", version.tags())  # a model version's tags
    assert changed_since(repo / "data" / "tiles", None)  # no champion yet: train


def test_reproduce_instructions_name_the_commit_the_data_and_the_command(repo):
    version = data_version(repo / "data" / "tiles")
    text = reproduce_instructions(version.tags(), model="patchcore-tiles version 3")
    assert f"git checkout {version.git_commit}" in text and "dvc pull data.dvc" in text
    assert f"patchcore data check data/tiles --md5 {version.md5}" in text and "dvc repro" in text
    assert "Caveats" not in text


def test_the_data_commands_show_check_and_compare_versions(repo, tmp_path, capsys):
    from apps.cli import main

    product = str(repo / "data" / "tiles")
    assert main(["data", "version", product, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["md5"] == dir_md5(product) and shown["in_dvc"] is True
    assert main(["data", "check", product, "--md5", shown["md5"]]) == 0
    assert main(["data", "check", product, "--md5", "0" * 32 + ".dir"]) == 1
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"data_version": shown}))
    assert main(["data", "changed", product, "--since", str(record)]) == 0
    assert main(["data", "changed", product, "--since", "0" * 32 + ".dir"]) == 1
    capsys.readouterr()
    assert main(["data", "reproduce", "--record", str(record)]) == 0
    assert f"git checkout {shown['git_commit']}" in capsys.readouterr().out


def test_reproduce_reads_the_record_from_a_registered_model_version(repo, tmp_path, capsys):
    from mlflow import MlflowClient

    from apps.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("patchcore-tiles")
    version = data_version(repo / "data" / "tiles")
    mv = client.create_model_version("patchcore-tiles", source=str(tmp_path), tags=version.tags())
    client.set_registered_model_alias("patchcore-tiles", "champion", mv.version)

    assert main(["data", "reproduce", "--model", "patchcore-tiles", "--tracking-uri", uri]) == 0
    text = capsys.readouterr().out
    assert "patchcore-tiles version 1" in text and version.md5 in text and version.git_commit in text
    assert main(["data", "reproduce", "--model", "patchcore-tiles", "--version", "7", "--tracking-uri", uri]) == 2


def test_dvc_repro_builds_the_model_and_a_second_repro_changes_nothing(repo):
    first = run(repo, "dvc", "repro")
    assert stages_run(first) == {f"{s}@tiles" for s in ("validate", "extract", "coreset", "evaluate", "calibrate")}
    out = repo / "outputs" / "tiles"
    model = json.loads((out / "model" / "model.json").read_text())
    assert model["threshold"] is not None
    assert model["provenance"]["data_version_record"]["md5"] == dir_md5(repo / "data" / "tiles")
    metrics = json.loads((out / "metrics" / "evaluate.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert (out / "plots" / "roc.csv").read_text().startswith("fpr,tpr")
    assert (out / "validation" / "data_docs" / "index.html").is_file()
    assert (out / "report" / "score_histogram.png").is_file()

    second = run(repo, "dvc", "repro")
    assert stages_run(second) == set() and "Data and pipelines are up to date" in second
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "model built")
    assert run(repo, "git", "status", "--porcelain").strip() == ""


def test_a_params_change_reruns_only_the_affected_stages(repo):
    assert stages_run(run(repo, "dvc", "repro", "--dry")) == set()  # nothing changed: nothing to run
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pipeline"]["target_fpr"] = 0.05
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run(repo, "dvc", "repro", "--dry")) == {"calibrate@tiles"}
    run(repo, "git", "checkout", "params.yaml")

    experiment = run(repo, "dvc", "exp", "run", "-S", "model.coreset.fraction=0.1")
    assert stages_run(experiment) == {"coreset@tiles", "evaluate@tiles", "calibrate@tiles"}
    diff = run(repo, "dvc", "metrics", "diff", "--json")
    changes = json.loads(diff)["outputs/tiles/metrics/coreset.json"]
    assert changes["fraction"] == {"old": 0.25, "new": 0.1, "diff": pytest.approx(-0.15)}
    assert changes["bank_size"]["new"] < changes["bank_size"]["old"]


def test_an_experiment_in_another_image_mode_rebuilds_from_validation_with_that_geometry(repo):
    experiment = run(repo, "dvc", "exp", "run", "-S", "model.image.mode=full_frame")
    assert stages_run(experiment) == {f"{s}@tiles" for s in ("validate", "extract", "coreset", "evaluate", "calibrate")}
    out = repo / "outputs" / "tiles"
    assert json.loads((out / "model" / "model.json").read_text())["config"]["image"]["mode"] == "full_frame"
    assert json.loads((out / "metrics" / "evaluate.json").read_text())["pixel_auroc"] > 0.5


def test_a_set_that_fails_validation_stops_dvc_repro_before_extraction(repo):
    trained_on = data_version(repo / "data" / "tiles")
    (repo / "data" / "tiles" / "train" / "good" / "003.png").write_bytes(b"")

    now = data_version(repo / "data" / "tiles")
    assert now.in_dvc is False and changed_since(repo / "data" / "tiles", trained_on)
    assert "does not hold this version" in reproduce_instructions(now)

    output = run(repo, "dvc", "repro", check=False)
    assert "failed to reproduce 'validate@tiles'" in output
    assert "003.png: every file decodes" in output and "zero-byte file" in output
    assert stages_run(output) == {"validate@tiles"}
