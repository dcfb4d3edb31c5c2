"""Reliability: no absolute path of the training machine in anything the tracking store holds (runs,
versions, artifacts, the logged model); a disk that fills up during feature writes (a real small
tmpfs where it can be mounted, and a writer that fails as a full disk does)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PARAMS, pipeline_home, tiny_config, tiny_overrides

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


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str):
    """A real small file system (tmpfs of `size`) at `path`; skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()[:120]}")
    try:
        yield lambda new_size: subprocess.run(
            ["mount", "-o", f"remount,size={new_size}", str(path)], check=True, capture_output=True
        )
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class _FillingUp:
    """A file handle on a disk with `budget` bytes left: the write that does not fit writes what fits,
    then fails with ENOSPC, as the kernel does."""

    def __init__(self, handle, budget: dict):
        self._handle, self._budget = handle, budget

    def write(self, data):
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if size > self._budget["left"]:
            self._handle.write(data[: self._budget["left"]])
            self._budget["left"] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget["left"] -= size
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


@pytest.mark.parametrize("disk", ["tmpfs", "patched writer"])
def test_a_full_disk_during_feature_writes_fails_clearly_and_the_rerun_reuses_only_complete_files(
    tmp_path, monkeypatch, product, disk
):
    """The store on a disk that fills up during extraction: a StorageFull error naming the file and
    the fix (no retry loop: it is not transient), no temporary or truncated feature file left, and
    once there is room the re-run extracts only the rest; every feature equals a clean run's."""
    from patchcore import atomic
    from patchcore.errors import StorageFull
    from pipeline import steps
    from pipeline.config import PipelineConfig
    from pipeline.store import Store
    from tasks.common import transient_io

    config = tiny_config()
    clean_store = Store(tmp_path / "clean")
    clean_manifest = steps.fingerprint_dataset(clean_store, product)
    clean = steps.extract_features(
        clean_store, clean_manifest, steps.split_dataset(clean_store, clean_manifest, PipelineConfig()), config
    )
    root = tmp_path / "small"
    with contextlib.ExitStack() as stack:
        if disk == "tmpfs":
            grow = stack.enter_context(_small_tmpfs(root, "1m"))  # room for a handful of 147 kB files
        else:
            budget = {"left": 900_000}
            real_fdopen = os.fdopen
            monkeypatch.setattr(atomic.os, "fdopen", lambda *a, **k: _FillingUp(real_fdopen(*a, **k), budget))
        store = Store(root / "store")
        manifest = steps.fingerprint_dataset(store, product)
        split = steps.split_dataset(store, manifest, PipelineConfig())
        with pytest.raises(StorageFull, match="no room left on its file system.*run again") as failed:
            steps.extract_features(store, manifest, split, config)
        assert not transient_io(None, None, type("State", (), {"result": lambda self, **k: failed.value})())
        folder = store.path("features", clean.identity)
        names = sorted(p.name for p in folder.iterdir())
        assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names
        written = [n for n in names if n.endswith(".npy")]
        assert 0 < len(written) < clean.n_images
        for name in written:  # every file that is there is whole
            assert (
                np.load(folder / name, allow_pickle=False).shape
                == np.load(Path(clean.feature_dir) / name, allow_pickle=False).shape
            )
        if disk == "tmpfs":
            grow("64m")
        else:
            budget["left"] = 10**12
        again = steps.extract_features(store, manifest, split, config)
        assert (again.n_cached, again.n_extracted) == (len(written), clean.n_images - len(written))
        for name in sorted(p.name for p in Path(clean.feature_dir).glob("*.npy")):
            assert (folder / name).read_bytes() == (Path(clean.feature_dir) / name).read_bytes(), name


def test_make_serve_recovers_from_stale_pid_files_after_a_crash_or_a_reboot(tmp_path):
    """deploy/servers.py: a pid file whose process is gone (a crash), or whose pid now belongs to
    another process (a reboot: same pid, other start time), is stale: removed, never signalled."""
    from deploy import servers as stack

    servers = stack.Servers(tmp_path / "home")
    servers.run_dir.mkdir(parents=True)
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        servers.pid_file("prefect").write_text(f"{child.pid} {stack._started(child.pid)}\n")
        assert stack.running(servers, "prefect") == child.pid
        servers.pid_file("mlflow").write_text(f"{child.pid} 1\n")  # same pid, another process's start time
        assert stack.running(servers, "mlflow") is None and not servers.pid_file("mlflow").exists()
        assert stack.down(servers) == ["prefect"] and child.wait(timeout=30) is not None
    finally:
        child.kill()
    servers.pid_file("deployments").write_text(f"{child.pid} {stack._started(os.getpid())}\n")  # gone
    assert stack.running(servers, "deployments") is None and not servers.pid_file("deployments").exists()
    assert stack.down(servers) == []
