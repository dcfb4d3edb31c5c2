"""The deployments against a real Prefect server, the way `make serve` runs them: a `prefect server`
on a free loopback port, `python -m deploy.serve` serving the deployments. Checks what a test
harness cannot: the server's scheduler turns the product's cron into scheduled runs, and new images
in the product folder start a retrain by themselves (the `watch` deployment on its interval ->
event `patchcore.data.settled` -> the deployment trigger on `retrain-<product>`), which trains and
registers a model. Bounded in time; both processes are stopped at the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import PARAMS, REPO, tiny_overrides

from patchcore.synthetic import generate_product

pytestmark = pytest.mark.slow

SCHEDULE = "15 4 * * *"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    tails = "\n".join(
        f"--- {p.name} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]) for p in logs if p.is_file()
    )
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def _params_file(path: Path) -> Path:
    """params.yaml with the tiny test model, a fast watcher and a known cron for `tiles`."""
    params = yaml.safe_load(Path(PARAMS).read_text())
    for dotted, value in tiny_overrides().items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    params["data"]["products"] = ["tiles"]
    params["operations"].update(
        {
            "schedule": {"default": SCHEDULE},
            "watch_interval_seconds": 3.0,
            "settle_seconds": 2.0,
            "git_commit_data": False,
        }
    )
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PATCHCORE_WEIGHTS")}
    env.update(
        {
            "PREFECT_HOME": str(root / "prefect"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PATCHCORE_HOME": str(root / "home"),
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    logs = [root / "prefect.log", root / "deployments.log"]
    procs = []
    try:
        with open(logs[0], "wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

        def healthy():
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        _wait("the Prefect server", healthy, 120, logs)
        data_root = root / "data"
        generate_product(data_root, "tiles", n_train=16, n_test_good=4, n_test_defect=4, size_px=112, seed=3)
        with open(logs[1], "wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "deploy.serve",
                        "--params",
                        str(_params_file(root / "params.yaml")),
                        "--data-root",
                        str(data_root),
                        "--allow-random-weights",
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        old_url = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
        try:
            yield {"logs": logs, "env": env}
        finally:
            if old_url is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = old_url
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)


def _client():
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return SyncPrefectClient(os.environ["PREFECT_API_URL"]), temporary_settings(
        {PREFECT_API_URL: os.environ["PREFECT_API_URL"]}
    )


def _deployment(client, name: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
    return found[0] if found else None


def _runs(client, deployment_id, state: str | None = None):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    run_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))) if state else None
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])), flow_run_filter=run_filter
    )


def test_new_images_start_a_retrain_through_watch_event_and_trigger_and_the_cron_is_scheduled(served):
    client, settings = _client()
    with client, settings:
        retrain = _wait(
            "the retrain-tiles deployment", lambda: _deployment(client, "retrain-tiles"), 120, served["logs"]
        )
        assert retrain.schedules and retrain.schedules[0].schedule.cron == SCHEDULE
        # The server's scheduler creates the cron's upcoming runs (needs a working scheduler service).
        scheduled = _wait(
            "scheduled runs of the cron", lambda: _runs(client, retrain.id, "SCHEDULED"), 120, served["logs"]
        )
        assert all(r.parameters.get("reason") == "schedule" for r in scheduled)

        # The watcher's first look at a product folder with images fires the event; the trigger starts
        # a retrain with reason new-data, which trains and registers version 1.
        def finished_new_data_run():
            runs = [r for r in _runs(client, retrain.id) if r.parameters.get("reason") == "new-data"]
            done = [r for r in runs if r.state and r.state.is_final()]
            return done[0] if done else None

        run = _wait("a retrain started by the new-data trigger to finish", finished_new_data_run, 420, served["logs"])
        assert run.state.is_completed(), f"retrain ended {run.state.name}: {run.state.message}"
        watch = _deployment(client, "watch")
        assert _runs(client, watch.id, "COMPLETED")  # the interval deployment ran
    result = subprocess.run(
        [sys.executable, "-m", "apps.cli", "status", "--product", "tiles", "--json"],
        cwd=REPO,
        env=served["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    tiles = json.loads(result.stdout)["products"]["tiles"]
    assert int(tiles["latest_version"]) >= 1 and "challenger" in tiles["aliases"]
