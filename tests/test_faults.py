"""Fault injection on the real command line (`patchcore train` / `promote` as subprocesses):
SIGKILL at each stage of training and of promotion and SIGTERM at the stages doing work, and the MLflow tracking server
stopping in the middle of either. Each must end with a clear failure or a clean retry, no
half-written cache entry ever read (every cached feature file equals a clean run's, to the float
rounding that another batch size gives), and a
registry that passes the consistency checks (no unfinished registration left unmarked, no run left
RUNNING, no champion move left half-done, champion / previous / history agreeing)."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PARAMS, REPO, free_port, tiny_config, tiny_overrides

from patchcore.synthetic import generate_product

pytestmark = pytest.mark.slow

# (stage, a line of the command's output that shows it is under way). The signal goes out when the
# line appears, so the process dies in that stage or just after it.
# SIGKILL (a crash, the OOM killer, a power cut) goes out at every stage; SIGTERM (systemd, a
# Prefect cancellation), whose handling is the same code at every stage, at the stages where work
# is under way (it keeps the suite inside CI's time: each run is a fresh `patchcore` process).
KILL, TERM = (signal.SIGKILL,), (signal.SIGTERM, signal.SIGKILL)
TRAIN_STAGES = [
    ("validate", "[fingerprint data", KILL),
    ("extract", "extracted 4/", TERM),
    ("coreset", "features of ", KILL),
    ("evaluate and calibrate", "[coreset memory bank", TERM),
    ("register: logging the model", "Validating input example", TERM),
    ("register: the version exists", "Created version", KILL),
]
PROMOTE_STAGES = [
    ("score", "[pin evaluation set", TERM),
    ("decide", "on the pinned set", KILL),
    ("move the aliases", "[decide", TERM),
    ("publish", "aliases now", KILL),
]


def _params(path: Path) -> Path:
    params = yaml.safe_load(Path(PARAMS).read_text())
    params["profile"] = "demo"  # random weights that may be promoted: offline
    path.write_text(yaml.safe_dump(params))
    return path


def _sets() -> list[str]:
    args = []
    for key, value in tiny_overrides().items():
        args += ["--set", f"{key}={'null' if value is None else value}"]
    return args


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "apps.cli", *args]


def signal_group(sig: int) -> Callable[[subprocess.Popen], None]:
    return lambda proc: os.killpg(proc.pid, sig)


def run_until(
    argv: list[str],
    env: dict,
    marker: str | None,
    action: Callable[[subprocess.Popen], None] | None,
    timeout: float = 300,
) -> dict:
    """Run a command; when `marker` appears in its output do `action` (e.g. signal its process
    group). Returns what happened: whether the action ran, the exit status and the output."""
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    lines: list[str] = []
    sent = False
    try:
        buffer = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=1.0):
                    if proc.poll() is not None:
                        break
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for raw in complete:
                    line = raw.decode(errors="replace")
                    lines.append(line)
                    if marker and action and not sent and marker in line:
                        action(proc)
                        sent = True
            else:
                pytest.fail(f"{' '.join(argv[2:4])} still running after {timeout:.0f} s:\n" + "\n".join(lines[-40:]))
        lines += buffer.decode(errors="replace").splitlines()
        code = proc.wait(timeout=60)
    finally:  # whatever happened: nothing of the command (its temporary Prefect server) outlives it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return {"sent": sent, "code": code, "output": "\n".join(lines)}


def _registry(env: dict):
    from mlflow import MlflowClient

    uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{env['PATCHCORE_HOME']}/mlflow/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_consistent(env: dict, product: str = "tiles", final: bool = False) -> dict:
    """`patchcore status` answers; every version is complete or marked orphaned (after the next
    run has reconciled: `final`), no run is left RUNNING (final), no champion move is pending (final),
    and champion / previous / history agree."""
    status = subprocess.run(
        _command("status", "--json"), cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 0, status.stderr[-2000:]
    report = json.loads(status.stdout)["products"].get(product)
    client = _registry(env)
    name = f"patchcore-{product}"
    if report is None:  # nothing registered yet
        return {}
    model = client.get_registered_model(name)
    versions = client.search_model_versions(f"name = '{name}'")
    states = {str(v.version): v.tags.get("registration", "complete") for v in versions}
    history = [v for v in model.tags.get("champion_history", "").split(",") if v]
    aliases = model.aliases
    if final:
        assert set(states.values()) <= {"complete", "orphaned"}, states
        assert report["champion_change_pending"] is None
        experiment = client.get_experiment_by_name(name)
        running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
        assert not running, [r.info.run_name for r in running]
    if "challenger" in aliases and final:
        assert states[str(aliases["challenger"])] == "complete"
    if "champion" in aliases and report["champion_change_pending"] is None:
        assert history and history[-1] == str(aliases["champion"]), (history, aliases)
        assert aliases.get("previous") == (history[-2] if len(history) > 1 else None), (history, aliases)
        assert all(a != b for a, b in zip(history, history[1:], strict=False)), history
    return {"states": states, "aliases": aliases, "history": history}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = generate_product(root / "data", "tiles", n_train=12, n_test_good=3, n_test_defect=3, size_px=112, seed=7)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PATCHCORE_WEIGHTS")}
    env |= {"PATCHCORE_HOME": str(root / "home"), "PREFECT_HOME": str(root / "prefect")}
    env.pop("PREFECT_API_URL", None)
    return {"root": root, "data": data, "env": env, "params": str(_params(root / "params.yaml"))}


def _clean_features(data: Path, root: Path) -> Path:
    """Features of the same images from one uninterrupted extraction (the library's steps)."""
    from pipeline import steps
    from pipeline.config import PipelineConfig
    from pipeline.store import Store

    store = Store(root)
    manifest = steps.fingerprint_dataset(store, data)
    return Path(
        steps.extract_features(
            store, manifest, steps.split_dataset(store, manifest, PipelineConfig()), tiny_config()
        ).feature_dir
    )


def test_sigterm_and_sigkill_at_each_training_stage_end_cleanly_and_the_retry_completes(project, tmp_path):
    env, data = project["env"], project["data"]
    train = _command("train", "--product", "tiles", "--data", str(data), "--params", project["params"], *_sets())
    interrupted = []
    for stage, marker, signals in TRAIN_STAGES:
        for sig in signals:
            outcome = run_until(train, env, marker, signal_group(sig))
            if not outcome["sent"]:  # the stage was not reached (e.g. its work is cached): it ran through
                assert outcome["code"] == 0, outcome["output"][-3000:]
                continue
            interrupted.append((stage, sig.name, outcome["code"]))
            assert outcome["code"] == (143 if sig == signal.SIGTERM else -9) or "Created version" in marker, (
                stage,
                sig.name,
                outcome["output"][-2000:],
            )
            if sig == signal.SIGTERM and outcome["code"] == 143:  # a clean stop: one line, no traceback
                assert "error: stopped by SIGTERM" in outcome["output"] and "Traceback" not in outcome["output"]
            check_consistent(env)
    assert len(interrupted) >= sum(len(s) for *_, s in TRAIN_STAGES) - 2, interrupted
    assert {sig for _, sig, _ in interrupted} == {"SIGTERM", "SIGKILL"}, interrupted
    final = run_until(train, env, None, None)
    assert final["code"] == 0, final["output"][-3000:]
    state = check_consistent(env, final=True)
    assert state["aliases"].get("challenger") and state["states"][str(state["aliases"]["challenger"])] == "complete"
    # No half-written feature was ever used: the cache equals one uninterrupted extraction, file by file.
    clean = _clean_features(data, tmp_path / "clean")
    cached = Path(env["PATCHCORE_HOME"]) / "features" / clean.name
    names = sorted(p.name for p in clean.glob("*.npy"))
    assert names and sorted(p.name for p in cached.glob("*.npy")) == names
    for name in names:  # every file complete (a truncated or half-written one would not load or would differ
        # grossly); values equal to float rounding: a rerun extracts the missing images in batches of
        # another size, and the CPU convolution kernels round a few last bits differently per batch size
        np.testing.assert_allclose(np.load(cached / name), np.load(clean / name), rtol=1e-5, atol=1e-5, err_msg=name)
    print(f"\ninterrupted: {interrupted}")


def test_sigterm_and_sigkill_at_each_promotion_stage_leave_the_aliases_consistent(project):
    env = project["env"]
    promote = _command("promote", "--product", "tiles", "--params", project["params"], *_sets())
    check_consistent(env)
    interrupted = []
    for stage, marker, signals in PROMOTE_STAGES:
        for sig in signals:
            outcome = run_until(promote, env, marker, signal_group(sig))
            if outcome["sent"]:
                interrupted.append((stage, sig.name, outcome["code"]))
            check_consistent(env)
    assert len(interrupted) >= sum(len(s) for *_, s in PROMOTE_STAGES) - 2, interrupted
    final = run_until(promote, env, None, None)
    assert final["code"] == 0, final["output"][-3000:]
    state = check_consistent(env, final=True)
    assert state["aliases"]["champion"] == state["aliases"]["challenger"] and state["history"][-1:] == [
        str(state["aliases"]["champion"])
    ]
    print(f"\ninterrupted: {interrupted}")


def test_the_mlflow_server_stopping_during_training_and_promotion_is_a_clear_failure_then_a_clean_retry(
    tmp_path, monkeypatch
):
    """The tracking server (make serve's: basic-auth, over HTTP) stops after the features are
    extracted: the training fails at registration with one line naming the server and what to do
    (exit 2, no traceback); after a restart the rerun extracts nothing again and registers. Then it
    stops while the promotion scores: the same clear failure, no alias moved; the rerun promotes."""
    from deploy import servers as stack

    servers = stack.Servers(tmp_path / "home", free_port(), free_port())
    client, secret = stack.ensure_credentials(servers)
    env = {k: v for k, v in os.environ.items() if k not in ("PATCHCORE_WEIGHTS", "PREFECT_API_URL")}
    env |= stack.client_env(servers, client) | {
        "PATCHCORE_HOME": str(servers.home),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        # bounded client retries, so that a lost server is reported in seconds, not minutes
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    }
    env.pop("PREFECT_API_URL", None)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, env[key])

    def start_server() -> None:
        stack.start_mlflow(servers, client, secret)
        stack.wait_healthy(f"{servers.mlflow_uri}/health", servers.log_file("mlflow"))

    def stop_server(proc) -> None:
        stack.stop(servers, "mlflow")

    def lost_server(output: str) -> bool:
        """One `error:` line naming the server: lost before a step talks to it ("is unreachable ...
        start the server") or in the middle of one ("stopped answering during ...")."""
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        return (
            len(errors) == 1
            and servers.mlflow_uri in errors[0]
            and ("is unreachable" in errors[0] or "stopped answering during" in errors[0])
        )

    params = str(_params(tmp_path / "params.yaml"))
    data = generate_product(tmp_path / "data", "tiles", n_train=16, n_test_good=4, n_test_defect=4, size_px=112, seed=8)
    train = _command("train", "--product", "tiles", "--data", str(data), "--params", params, *_sets())
    promote = _command("promote", "--product", "tiles", "--params", params, *_sets())
    start_server()
    try:
        lost = run_until(train, env, "features of ", stop_server)
        assert lost["sent"] and lost["code"] == 2, lost["output"][-3000:]
        assert lost_server(lost["output"]) and "Traceback" not in lost["output"], lost["output"][-3000:]
        start_server()
        check_consistent(env)
        again = run_until(train, env, None, None)
        assert again["code"] == 0 and "0 extracted" in again["output"], again["output"][-3000:]
        check_consistent(env, final=True)

        lost = run_until(promote, env, "[pin evaluation set", stop_server)
        assert lost["sent"] and lost["code"] == 2, lost["output"][-3000:]
        assert lost_server(lost["output"]) and "Traceback" not in lost["output"], lost["output"][-3000:]
        start_server()
        assert "champion" not in check_consistent(env)["aliases"]
        again = run_until(promote, env, None, None)
        assert again["code"] == 0, again["output"][-3000:]
        state = check_consistent(env, final=True)
        assert state["aliases"]["champion"] == state["aliases"]["challenger"]
    finally:
        stack.stop(servers, "mlflow")
