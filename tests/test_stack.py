"""The production stack (deploy/stack.py, `make stack`) for real, on free loopback ports: PostgreSQL,
SeaweedFS (S3), Prefect server on PostgreSQL, MLflow on PostgreSQL with artifacts proxied to S3, a
Dask scheduler with two workers, a Prefect process worker on the work pool and the new-data
watcher. Checks: new images start a retrain that a work-pool worker runs, whose extraction is
mapped over the Dask workers into the S3 store, and which lands in the PostgreSQL-backed registry
with its artifacts in S3; the data version is pushed to the DVC S3 remote and a fresh clone pulls
it; a Dask worker killed in the middle of an extraction leaves a run that still completes with the
bank of in-process extraction; nothing is written to a SQLite file or to the local default store.
Every process is stopped at the end (`down` by pid files), and the stack's data is deleted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PARAMS, REPO, tiny_overrides, tree_digests, wait_for

from patchcore.synthetic import generate_product

pytestmark = [pytest.mark.slow, pytest.mark.stack]

VENV_BIN = Path(sys.executable).parent


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_block(start: int, width: int, extra: tuple[int, ...] = ()) -> int:
    """A port p with p .. p+width-1 (and p+e for e in extra) all free on the loopback interface."""
    for base in range(start, start + 4000, 17):
        if all(_free(base + i) for i in range(width)) and all(_free(base + e) for e in extra):
            return base
    raise RuntimeError("no free loopback port block")


def _git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    return subprocess.run(["git", *identity, *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _dvc(repo: Path, *args: str) -> str:
    run = subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=repo, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout


def _params_file(path: Path) -> Path:
    """params.yaml on the demo profile (random weights, promotable) with the tiny test model, small
    shards (several per extraction) and a watcher that settles in 2 s."""
    params = yaml.safe_load(Path(PARAMS).read_text())
    params["profile"] = "demo"
    for dotted, value in tiny_overrides().items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    params["data"]["products"] = ["tiles"]
    params["operations"].update({"watch_interval_seconds": 30.0, "settle_seconds": 2.0})
    params["cluster"]["shard_images"] = 8
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from deploy import stack as stack_module

    if shutil.which("git") is None:
        pytest.skip("git is needed for the data repository")
    try:
        stack_module.pg_bin("initdb")
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL is needed (make test installs it): {exc}")
    root = tmp_path_factory.mktemp("stack")
    # The images live in their own git + DVC repository (data/tiles, versioned by data.dvc).
    data_repo = root / "factory"
    data_repo.mkdir()
    _git(data_repo, "init", "-q")
    _dvc(data_repo, "init", "-q")
    generate_product(data_repo / "data", "tiles", n_train=16, n_test_good=4, n_test_defect=4, size_px=112, seed=5)
    _dvc(data_repo, "add", "-q", "data")
    _git(data_repo, "add", "-A")
    _git(data_repo, "commit", "-qm", "data")
    params = _params_file(root / "params.yaml")
    s3 = _free_block(21000, 6, extra=(10001, 10002, 10003, 10000))
    ports = {"s3_port": s3, "postgres_port": _free_block(s3 + 50, 1), "dask_port": _free_block(s3 + 100, 2)}
    ports |= {"prefect_port": _free_block(s3 + 150, 1), "mlflow_port": _free_block(s3 + 200, 1)}
    stack = stack_module.Stack(root / "home", **ports)
    env = pytest.MonkeyPatch()
    env.setenv("PREFECT_HOME", str(root / "prefect"))
    env.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")  # the worker polls every 2 s (default 10)
    # what an earlier Registry() in this process exports (mlflow.set_registry_uri): the stack's processes
    # must not inherit it, or every registration would go to that SQLite file
    env.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{root / 'leaked-registry.db'}")
    logs = [stack.log_file(n) for n in ("prefect-worker", "watcher", "dask-workers", "mlflow", "s3", "deployments")]
    try:
        started = time.monotonic()
        timings = stack_module.up(
            stack, REPO, ["--params", str(params), "--data-root", str(data_repo / "data")], allow_random_weights=True
        )
        client, _ = stack_module.ensure_credentials(stack)
        yield {
            "stack": stack,
            "module": stack_module,
            "env": stack_module.pipeline_env(stack, client),
            "client": client,
            "root": root,
            "data_repo": data_repo,
            "params": params,
            "logs": logs,
            "timings": timings,
            "startup_s": time.monotonic() - started,
        }
    finally:
        stack_module.down(stack)
        stack_module.purge(stack)
        env.undo()


def _python(env: dict[str, str], code: str, timeout: float = 300) -> str:
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _s3_keys(env: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
    code = (
        "import boto3, json\n"
        "s3 = boto3.client('s3')\n"
        f"pages = s3.get_paginator('list_objects_v2').paginate(Bucket={bucket!r}, Prefix={prefix!r})\n"
        "print(json.dumps([o['Key'] for p in pages for o in p.get('Contents', [])]))\n"
    )
    return json.loads(_python(env, code))


def _flow_runs(env: dict[str, str]) -> list[dict]:
    code = (
        "import json\n"
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    runs = c.read_flow_runs()\n"
        "    print(json.dumps([{'name': r.name, 'state': r.state.type.value if r.state else None,\n"
        "        'pool': r.work_pool_name, 'queue': r.work_queue_name, 'parent': str(r.parent_task_run_id or ''),\n"
        "        'id': str(r.id)} for r in runs]))\n"
    )
    return json.loads(_python(env, code))


@pytest.fixture(scope="module")
def retrained(stack):
    """The first look of the watcher finds the product's images new: retrain-tiles runs by itself."""
    env = stack["env"]

    def done():
        runs = [r for r in _flow_runs(env) if r["name"].startswith("retrain-tiles")]
        if any(r["state"] in ("FAILED", "CRASHED") for r in runs):
            pytest.fail(f"the retrain failed: {runs}\n" + stack["logs"][0].read_text()[-6000:])
        return [r for r in runs if r["state"] == "COMPLETED"]

    finished = wait_for("the new-data retrain through the work pool", done, 420, stack["logs"])
    return {"run": finished[0], "runs": _flow_runs(env)}


def test_stack_comes_up_on_loopback_with_credentials_only_the_user_can_read(stack):
    s = stack["stack"]
    assert (s.credentials_file.stat().st_mode & 0o077) == 0 and (s.secrets_file.stat().st_mode & 0o077) == 0
    names = set(stack["module"].PROCESSES)
    assert all((s.run_dir / f"{n}.pid").is_file() for n in names), sorted(p.name for p in s.run_dir.glob("*.pid"))
    pids = {stack["module"].base.running(s, n) for n in names}
    assert None not in pids
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    ours = [line for line in listening if any(f"pid={pid}," in line for pid in pids)]
    assert ours and all(" 127.0.0.1:" in line for line in ours), ours
    state = json.loads(s.state_file.read_text())
    assert state["ports"]["postgres"] == s.postgres_port and state["startup_seconds"]["all"] > 0
    # the deployments are the work pool's, with the same cron and new-data trigger as `make serve`'s
    deployments = json.loads(
        _python(
            stack["env"],
            "import json\n"
            "from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    ds = c.read_deployments()\n"
            "    autos = [a.name for a in c.read_automations()]\n"
            "    print(json.dumps({'autos': autos, 'deps': {d.name: [d.work_pool_name, d.work_queue_name,\n"
            "        len(d.schedules)] for d in ds}}))\n",
        )
    )
    assert deployments["deps"]["retrain-tiles"] == ["patchcore", "gpu", 1]
    assert deployments["deps"]["promote"][:2] == ["patchcore", "cpu"]
    assert "new data for tiles" in deployments["autos"]


def test_new_images_retrain_through_the_work_pool_with_dask_extraction_into_s3_and_postgres_mlflow(stack, retrained):
    env, run = stack["env"], retrained["run"]
    assert run["pool"] == "patchcore" and run["queue"] == "gpu"  # picked up by the stack's Prefect worker
    names = [r["name"] for r in retrained["runs"]]
    assert any(n.startswith("extract-") for n in names)  # the Dask extraction subflow ran inside it
    shards = _python(
        env,
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    runs = [t for t in c.read_task_runs() if t.name.startswith('extract shard')]\n"
        "    print(len(runs), sum(t.state.is_completed() for t in runs))\n",
    ).split()
    assert int(shards[0]) >= 2 and shards[0] == shards[1]  # 13 bank images in shards of 8
    # the registry: PostgreSQL-backed MLflow over HTTP, champion set, artifacts in the S3 bucket
    version = _python(
        env,
        "import json, mlflow\n"
        "c = mlflow.MlflowClient()\n"
        "mv = c.get_model_version_by_alias('patchcore-tiles', 'champion')\n"
        "run = c.get_run(mv.run_id)\n"
        "print(json.dumps({'version': mv.version, 'artifacts': run.info.artifact_uri,\n"
        "    'uri': mlflow.get_tracking_uri(),\n"
        "    'baseline': mlflow.artifacts.load_dict(f'runs:/{mv.run_id}/validation/accepted.json')['n_images']}))\n",
    )
    version = json.loads(version)
    assert version["uri"].startswith("http://127.0.0.1:") and version["artifacts"].startswith("mlflow-artifacts:")
    assert version["baseline"] > 0  # the drift baseline is in the registry, for any worker
    artifacts = _s3_keys(env, "mlflow")
    assert any(k.endswith("model.json") for k in artifacts) and any("accepted.json" in k for k in artifacts)
    # the pipeline's store is the S3 bucket: every bank image's features, the bank and the model
    store = _s3_keys(env, "patchcore", "store/")
    features = [k for k in store if k.startswith("store/features/") and k.endswith(".npy")]
    assert len(features) == 13
    assert any(k.startswith("store/banks/") for k in store) and any(k.startswith("store/models/tiles/") for k in store)
    # nothing in a SQLite file, nothing in the local default store
    home = stack["stack"].home
    sqlite = [p for p in [*home.rglob("*"), *(stack["root"] / "prefect").rglob("*")] if p.suffix in (".db", ".sqlite")]
    assert sqlite == [] and not (stack["root"] / "leaked-registry.db").exists()
    assert not any((home / d).exists() for d in ("features", "banks", "models", "evaluations", "mlflow"))


def test_the_data_version_is_pushed_to_the_dvc_s3_remote_and_a_fresh_clone_pulls_it(stack, retrained, tmp_path):
    env, repo = stack["env"], stack["data_repo"]
    assert _s3_keys(env, "dvc", "store/")  # pushed by the retrain
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(repo), str(clone))
    shutil.copy(repo / ".dvc" / "config.local", clone / ".dvc" / "config.local")  # the remote's endpoint and keys
    _dvc(clone, "pull", "-q")
    original = sorted((repo / "data" / "tiles").rglob("*.png"))
    pulled = sorted((clone / "data" / "tiles").rglob("*.png"))
    assert [p.relative_to(repo) for p in original] == [p.relative_to(clone) for p in pulled] and pulled
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(original, pulled))


def test_a_dask_worker_killed_mid_extraction_the_run_completes_with_the_same_bank(stack, retrained, tmp_path):
    from distributed import Client

    env = stack["env"]
    data = generate_product(tmp_path / "data", "widgets", n_train=40, n_test_good=3, n_test_defect=3, size_px=112)
    settings = ["--set", "cluster.shard_images=8", "--set", "model.image.resize=160", "--set", "model.image.crop=144"]
    argv = [str(VENV_BIN / "patchcore"), "train", "--product", "widgets", "--data", str(data), "--params"]
    argv += [str(stack["params"]), *settings]
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        training = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    killed = None
    try:
        with Client(stack["stack"].dask_address, timeout=30) as dask:
            pids = dask.run(os.getpid)  # worker address -> pid
            deadline = time.monotonic() + 240
            while killed is None and time.monotonic() < deadline and training.poll() is None:
                busy = [addr for addr, tasks in dask.processing().items() if tasks]
                if busy:
                    time.sleep(0.5)  # into the shard's batches
                    killed = pids[busy[0]]
                    os.kill(killed, signal.SIGKILL)
                time.sleep(0.2)
        rc = training.wait(timeout=420)
    finally:
        if training.poll() is None:
            training.kill()
    text = log.read_text(errors="replace")
    assert killed is not None, "no shard was ever seen running on a worker\n" + text[-3000:]
    assert rc == 0, text[-5000:]
    store_url = stack["stack"].store_url
    # every feature file in the S3 store is whole, and the bank is bit for bit the in-process one
    local = tmp_path / "local-store"
    local_run = subprocess.run(
        [*argv, "--set", "cluster.extract=local", "--set", f"pipeline.store={local}"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert local_run.returncode == 0, local_run.stdout[-3000:] + local_run.stderr[-3000:]
    copied = tmp_path / "from-s3"
    _python(
        env,
        "import fsspec\n"
        f"fs, root = fsspec.core.url_to_fs({store_url!r})\n"
        f"fs.get(root + '/banks/', {str(copied / 'banks') + '/'!r}, recursive=True)\n"
        f"fs.get(root + '/features/', {str(copied / 'features') + '/'!r}, recursive=True)\n",
    )
    for path in (copied / "features").rglob("*.npy"):
        assert np.load(path).ndim == 2  # loads: no truncated file
    s3_banks, local_banks = tree_digests(copied / "banks"), tree_digests(local / "banks")
    assert set(local_banks) <= set(s3_banks)
    assert {k: s3_banks[k] for k in local_banks} == local_banks
    for path in (local / "features").rglob("*.npy"):
        assert (copied / "features" / path.relative_to(local / "features")).read_bytes() == path.read_bytes()


def test_down_stops_every_process_and_up_after_a_crash_recovers(stack, retrained):
    """A crash (every process SIGKILLed, pid files and sockets left behind) and `up` again."""
    s, module, env = stack["stack"], stack["module"], stack["env"]
    champion_code = (
        "import mlflow; print(mlflow.MlflowClient().get_model_version_by_alias('patchcore-tiles', 'champion').version)"
    )
    champion = _python(env, champion_code).strip()
    pids = {n: module.base.running(s, n) for n in module.PROCESSES}
    for pid in pids.values():
        os.killpg(pid, signal.SIGKILL)
    for pid in pids.values():
        wait_for(f"process {pid} to go", lambda pid=pid: module.base._started(pid) is None or _reap(pid), 30, [])
    time.sleep(1.0)
    params, data = stack["params"], stack["data_repo"] / "data"
    module.up(s, REPO, ["--params", str(params), "--data-root", str(data)], allow_random_weights=True)
    assert all(module.base.running(s, n) for n in module.PROCESSES)
    assert _python(env, champion_code).strip() == champion  # the registry (PostgreSQL, S3) survived the crash
    stopped = module.down(s)
    assert stopped == list(reversed(module.PROCESSES))
    assert not any(module.base.running(s, n) for n in module.PROCESSES)


def _reap(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return waited == pid
