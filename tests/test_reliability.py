"""What #15 asks of tracking data and of failures: no absolute path of the training machine in
anything the tracking store holds (runs, versions, artifacts, the logged model)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import PARAMS, pipeline_home, tiny_overrides

from patchcore.synthetic import generate_product

TINY = tiny_overrides()
TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".txt", ".csv", ".html", ".py", ""}


def _texts(folder: Path):
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            yield path, path.read_text(errors="replace")


def test_tracking_data_holds_no_absolute_path_of_the_training_machine(tmp_path, monkeypatch):
    """A project (git repository) with its images under data/, trained and promoted from its root:
    params, tags, version tags, descriptions and every text artifact (validation summary, decision,
    evaluation set, MLmodel, model.json) name the data as `data/tiles` and never the project's,
    PATCHCORE_HOME's or this checkout's absolute path. (MLmodel's `artifact_path` is MLflow's own
    record of where the artifact store put the model, not a path of the training machine.)"""
    import mlflow

    project = tmp_path / "factory"
    generate_product(project / "data", "tiles", n_train=16, n_test_good=4, n_test_defect=4, size_px=112, seed=5)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    monkeypatch.chdir(project)
    with pipeline_home(tmp_path):
        from flows.promote import promote
        from flows.train import train
        from pipeline.config import MlflowConfig
        from pipeline.registry import Registry

        trained = train("tiles", "data/tiles", PARAMS, TINY)
        promote("tiles", None, PARAMS, TINY, allow_random_weights=True)
        registry = Registry(MlflowConfig())
        client = registry.client
        forbidden = [str(project.resolve()), str(project), str((tmp_path / "home").resolve()), str(Path(PARAMS).parent)]
        found: list[str] = []

        def check(where: str, text) -> None:
            for line in str(text).splitlines():
                if where.endswith("MLmodel") and line.startswith("artifact_path:"):
                    continue
                found.extend(f"{where}: {line.strip()[:160]}" for bad in forbidden if bad in line)

        mv = client.get_model_version("patchcore-tiles", trained["registry"]["version"])
        assert mv.tags["data_root"] == "data/tiles"
        check("version description", mv.description)
        for key, value in mv.tags.items():
            check(f"version tag {key}", value)
        for key, value in client.get_registered_model("patchcore-tiles").tags.items():
            check(f"model tag {key}", value)
        runs = client.search_runs([registry.experiment_id("tiles")])
        assert {r.data.tags.get("kind", "training") for r in runs} == {"training", "promotion"}
        for run in runs:
            for key, value in {**run.data.params, **run.data.tags}.items():
                check(f"run {run.info.run_name} {key}", value)
            local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "a")))
            for path, text in _texts(local):
                check(f"{run.info.run_name}:{path.relative_to(local)}", text)
        model = Path(
            mlflow.artifacts.download_artifacts(f"models:/patchcore-tiles/{mv.version}", dst_path=str(tmp_path / "m"))
        )
        names = {p.name for p, _ in _texts(model)}
        assert {"MLmodel", "model.json"} <= names
        for path, text in _texts(model):
            check(f"model:{path.relative_to(model)}", text)
    assert not found, "\n".join(found)
