"""Day-to-day operation: the new-data watcher fires once per settled batch; a scheduled retrain
without new data is a quick no-op; new images are versioned, trained incrementally (only their
features extracted) and gated; one training per product at a time (concurrent triggers queue);
the deployments carry the configured schedule and trigger; `dvc add` + commit of data.dvc."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import PARAMS, pipeline_home, tiny_overrides

from patchcore.synthetic import generate_product
from pipeline.watching import Snapshot, WatchState, observe

TINY = tiny_overrides()


# -- the watcher's debounce (pure logic) -------------------------------------------------------------
def _copy_in_batches(src: list[Path], dst: Path, batches: int):
    """Yield after each batch of files lands in dst (a copy in progress)."""
    per = -(-len(src) // batches)
    for i in range(0, len(src), per):
        for path in src[i : i + per]:
            shutil.copy(path, dst / path.name)
        yield


def test_copying_500_files_fires_once_after_the_copy_settles(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "product"
    src.mkdir(), dst.mkdir()
    for i in range(500):
        (src / f"{i:03d}.png").write_bytes(b"x" * (i + 1))
    settle, now = 20.0, 1000.0
    state, fired = observe(WatchState(), Snapshot.of(dst), now, settle)  # baseline: empty folder
    assert not fired
    fires = []
    for _ in _copy_in_batches(sorted(src.iterdir()), dst, batches=25):  # one look every 5 s while copying
        now += 5
        state, fired = observe(state, Snapshot.of(dst), now, settle)
        fires.append(fired)
    assert not any(fires), "fired while the copy was still going"
    for _ in range(10):  # the copy is over: looks every 5 s
        now += 5
        state, fired = observe(state, Snapshot.of(dst), now, settle)
        fires.append(fired)
    assert sum(fires) == 1 and state.fired_count == 1
    assert fires.index(True) == 25 + 3  # the 4th look after the copy: 20 s of the same snapshot
    assert state.fired_for == Snapshot(500, sum(range(1, 501)), state.fired_for.newest_mtime_ns)


def test_a_second_batch_fires_again_and_an_unchanged_folder_never_does(tmp_path):
    (tmp_path / "a.png").write_bytes(b"a")
    state, fired = observe(WatchState(), Snapshot.of(tmp_path), 0.0, 10)
    for t in (5.0, 20.0, 40.0):
        state, fired = observe(state, Snapshot.of(tmp_path), t, 10)
        assert not fired  # nothing changed since the baseline
    (tmp_path / "b.png").write_bytes(b"bb")
    state, fired = observe(state, Snapshot.of(tmp_path), 45.0, 10)
    assert not fired  # changed, not yet settled
    state, fired = observe(state, Snapshot.of(tmp_path), 56.0, 10)
    assert fired
    state, fired = observe(WatchState.from_dict(state.to_dict()), Snapshot.of(tmp_path), 70.0, 10)  # JSON round trip
    assert not fired and state.fired_count == 1


def test_the_first_look_fires_only_when_asked(tmp_path):
    assert observe(WatchState(), Snapshot.of(tmp_path), 0.0, 10, fire_on_first_look=True)[1]
    assert not observe(WatchState(), Snapshot.of(tmp_path), 0.0, 10)[1]


# -- settings and deployments -----------------------------------------------------------------------
def test_params_yaml_operations_section_equals_the_code_defaults():
    from pipeline.config import OperationsConfig, load

    ops = load(PARAMS).operations
    assert ops == OperationsConfig()
    assert ops.settle_seconds + ops.watch_interval_seconds <= 60  # the documented worst-case delay


def test_bad_operations_settings_are_named():
    from patchcore.config import ConfigError
    from pipeline.config import load_settings

    with pytest.raises(ConfigError, match="cron"):
        load_settings(PARAMS, {"operations.schedule": {"default": "every night"}})
    with pytest.raises(ConfigError, match="max_concurrent_trainings"):
        load_settings(PARAMS, {"operations.max_concurrent_trainings": 0})


def test_deployments_carry_the_per_product_cron_and_the_new_data_trigger():
    from deploy.serve import build_deployments
    from pipeline.config import load_settings

    settings = load_settings(
        PARAMS,
        {
            "data.products": ["tiles", "bolts"],
            "operations.schedule": {"default": "0 2 * * *", "bolts": "30 3 * * 1"},
            "operations.watch_interval_seconds": 7,
        },
    )
    found = {d.name: d for d in build_deployments(settings, PARAMS)}
    # No watch deployment: the watcher is a long-running loop beside them, not a flow run every 10 s.
    assert {"train", "promote", "inspect", "retrain-tiles", "retrain-bolts"} == set(found)
    bolts = found["retrain-bolts"]
    assert (
        bolts.schedules[0].schedule.cron == "30 3 * * 1"
        and found["retrain-tiles"].schedules[0].schedule.cron == "0 2 * * *"
    )
    assert bolts.schedules[0].parameters["reason"] == "schedule"
    trigger = bolts.triggers[0]
    assert (
        trigger.expect == {"patchcore.data.settled"}
        and trigger.match.root["prefect.resource.id"] == "patchcore.product.bolts"
    )
    assert trigger.parameters["product"] == "bolts" and trigger.parameters["reason"] == "new-data"
    # The automation explains itself in the UI (name and description, not "None").
    assert trigger.name == "new data for bolts" and "data/bolts" in trigger.description
    assert all(d.description for d in found.values())


def test_serving_deployments_refuses_to_start_without_a_prefect_server(monkeypatch):
    from deploy import serve

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr("prefect.settings.PREFECT_API_URL.value", lambda: None)
    with pytest.raises(SystemExit, match="PREFECT_API_URL is not set"):
        serve.check_api_url()


# -- versioning new data with DVC ------------------------------------------------------------------------
def test_new_images_are_dvc_added_then_committed_only_after_training_succeeds(tmp_path):
    """dvc add before training; the .dvc file is committed after a successful training, and put back
    (no commit, no changed file) after a failed one."""
    from pipeline.operations import commit_data_version, dvc_command, revert_data_version, version_data

    dvc = dvc_command()
    if not dvc or not shutil.which("git"):
        pytest.skip("dvc and git are needed")

    repo = tmp_path / "repo"
    product = repo / "data" / "tiles" / "train" / "good"
    product.mkdir(parents=True)
    (product / "000.png").write_bytes(b"first")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }

    def sh(*cmd):
        return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True, env=env, timeout=60).stdout

    sh("git", "init", "-q")
    sh(dvc, "init", "-q")
    sh(dvc, "add", "-q", "data")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    head = sh("git", "rev-parse", "HEAD").strip()
    committed_dvc = (repo / "data.dvc").read_text()
    with pytest.MonkeyPatch.context() as mp:
        for k in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
            mp.setenv(k, env[k])
        # A training that fails: the .dvc file comes back, nothing is committed.
        (product / "001.png").write_bytes(b"second")
        failed = version_data(repo / "data" / "tiles", "tiles")
        assert failed["dvc_add"] == "data" and (repo / "data.dvc").read_text() != committed_dvc
        assert revert_data_version(failed) is True
        assert (repo / "data.dvc").read_text() == committed_dvc
        assert sh("git", "rev-parse", "HEAD").strip() == head and not sh("git", "status", "--porcelain", "data.dvc")
        # A training that succeeds: committed, with only the .dvc file.
        result = version_data(repo / "data" / "tiles", "tiles")
        assert result["version"]["in_dvc"] is True and result["version"]["n_files"] == 2
        commit = commit_data_version(result, "tiles")
    assert commit and commit != head
    log = sh("git", "log", "--name-only", "--format=%s", "-1")
    assert "data: tiles" in log and "data.dvc" in log
    assert not sh("git", "status", "--porcelain", "data.dvc").strip()


# -- the retrain flow under a Prefect test server ----------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("operations")
    with pipeline_home(root):
        data = generate_product(root / "data", "tiles", n_train=20, n_test_good=6, n_test_defect=6, size_px=112, seed=0)
        yield {"root": root, "data": data}


@pytest.fixture(scope="module")
def first(env):
    from flows.retrain import retrain

    return retrain("tiles", str(env["data"]), "new-data", params_path=PARAMS, overrides=TINY, allow_random_weights=True)


def test_first_retrain_trains_registers_and_gates(first):
    assert first["outcome"] == "trained" and first["registry"]["version"] == "1"
    assert first["promotion"] is not None and "summary" in first["promotion"]
    assert first["features"]["n_extracted"] > 0 and first["features"]["n_cached"] == 0
    assert first["data_version"]["dvc_add"] is None  # a temporary folder outside any DVC repo: md5 only


def test_scheduled_retrain_without_new_data_is_a_quick_no_op(first, env):
    from flows.retrain import retrain
    from pipeline.config import MlflowConfig
    from pipeline.registry import Registry

    start = time.perf_counter()
    result = retrain("tiles", str(env["data"]), "schedule", params_path=PARAMS, overrides=TINY)
    assert result["outcome"] == "no new data" and "no new data for tiles" in result["message"]
    assert time.perf_counter() - start < 15
    assert len(Registry(MlflowConfig()).client.search_model_versions("name='patchcore-tiles'")) == 1  # nothing trained


def test_two_simultaneous_triggers_queue_and_new_images_are_extracted_incrementally(first, env):
    """New images land; two triggers arrive at once. One trains (extracting only the new images),
    the other waits for the product's training slot, then finds the images already trained."""
    from flows.retrain import retrain

    good = env["data"] / "train" / "good"
    extra = (
        generate_product(
            env["root"] / "extra", "tiles", n_train=4, n_test_good=1, n_test_defect=1, size_px=112, seed=99
        )
        / "train"
        / "good"
    )
    for i, path in enumerate(sorted(extra.iterdir())):
        shutil.copy(path, good / f"new-{i}.png")
    results, spans = {}, {}

    def run(name):
        start = time.monotonic()
        results[name] = retrain(
            "tiles", str(env["data"]), f"new-data-{name}", params_path=PARAMS, overrides=TINY, allow_random_weights=True
        )
        spans[name] = (start, time.monotonic())

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=240)
    assert sorted(r["outcome"] for r in results.values()) == ["no new data", "trained"]
    trained = next(r for r in results.values() if r["outcome"] == "trained")
    assert trained["registry"]["version"] == "2"
    assert 0 < trained["features"]["n_extracted"] <= 4  # the new images only (some may go to the held-out split)
    assert trained["features"]["n_cached"] == first["features"]["n_extracted"]
    # ... and the coreset continued the first bank instead of starting over: its picks are kept
    continued = trained["coreset_continued"]
    assert first["coreset_continued"] is None and continued is not None
    assert (
        continued["prior_images"] == first["n_bank"] and continued["new_images"] == trained["n_bank"] - first["n_bank"]
    )
    assert continued["prior_picks"] == first["bank_size"] < trained["bank_size"]


def test_the_training_slot_admits_one_training_per_product_at_a_time(env):
    from tasks.concurrency import training_slot

    spans: dict[str, tuple[float, float]] = {}

    def hold(name, product, seconds):
        with training_slot(product, 1):
            start = time.monotonic()
            time.sleep(seconds)
            spans[name] = (start, time.monotonic())

    threads = [threading.Thread(target=hold, args=(n, "bolts", 1.5)) for n in ("a", "b")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert set(spans) == {"a", "b"}
    (a0, a1), (b0, b1) = spans["a"], spans["b"]
    assert a1 <= b0 or b1 <= a0, "two trainings of one product overlapped"
    # Another product is not held back: its slot is free while this product's is taken.
    with training_slot("bolts", 1):
        other = threading.Thread(target=hold, args=("c", "nuts", 0.0))
        other.start()
        other.join(timeout=60)
        assert "c" in spans, "a training of another product waited for this product's slot"


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_the_watcher_fires_once_per_settled_copy_and_remembers_across_restarts(tmp_path, monkeypatch, mode):
    """The long-running watcher (no flow runs): inotify wakes it at once, polling rescans; a copy in
    progress fires once after it settled; a restarted watcher does not fire again for what it saw,
    but does for a change made while it was down; its heartbeat file says it is alive."""
    from deploy.watcher import Watcher
    from pipeline.watching import heartbeat

    monkeypatch.setenv("PATCHCORE_HOME", str(tmp_path / "home"))
    good = tmp_path / "data" / "tiles" / "train" / "good"
    good.mkdir(parents=True)
    (good / "000.png").write_bytes(b"x" * 100)
    emitted = []

    def make():
        return Watcher(
            ["tiles"],
            tmp_path / "data",
            settle_seconds=0.6,
            interval_seconds=0.3 if mode == "poll" else 30,
            mode=mode,
            emit=lambda product, folder, snap: emitted.append((product, snap.n_files, time.time())),
            heartbeat=None,
        )

    watcher = make()
    thread = watcher.start()
    deadline = time.time() + 10
    while not emitted and time.time() < deadline:  # the first look fires (the retrain decides what is new)
        time.sleep(0.05)
    assert [e[:2] for e in emitted] == [("tiles", 1)] and watcher.active_mode == mode
    for i in range(5):  # a copy in progress: keeps changing for ~1 s, then stops
        (good / f"new{i}.png").write_bytes(b"y" * 100)
        last_file = time.time()
        time.sleep(0.2)
    while len(emitted) < 2 and time.time() < last_file + 10:
        time.sleep(0.05)
    time.sleep(1.0)
    watcher.stop()
    thread.join(timeout=10)
    assert [e[:2] for e in emitted] == [("tiles", 1), ("tiles", 6)]  # once for the whole copy
    latency = emitted[1][2] - last_file
    assert 0.6 <= latency < 0.6 + (1.5 if mode == "inotify" else 2.0), latency
    beat = heartbeat()
    assert beat["mode"] == mode and beat["looks"] > 2 and beat["age_seconds"] < 5

    again = make()  # a restart: what it saw before is not new
    again.look()
    assert len(emitted) == 2
    (good / "while-down.png").write_bytes(b"z" * 100)  # changed while no watcher ran
    later = make()
    later.look()
    later.look(time.time() + 1.0)
    assert [e[:2] for e in emitted][-1] == ("tiles", 7)


def test_inspect_flow_scores_a_folder_with_the_champion_and_shows_progress(first, env, tmp_path, capfd):
    from flows.inspect import inspect
    from pipeline.config import MlflowConfig
    from pipeline.registry import Registry

    champion = Registry(MlflowConfig()).aliases("tiles").get("champion")
    if champion is None:
        pytest.skip(f"the first retrain was not promoted: {first['promotion']['summary']}")
    out = tmp_path / "inspect"
    result = inspect("tiles", str(env["data"] / "test" / "scratch"), str(out), params_path=PARAMS)
    assert result["version"] == champion and result["n_images"] == 6
    assert (out / "scores.csv").read_text().splitlines()[0] == "path,score,is_anomalous,threshold"
    assert len(list((out / "heatmaps").glob("*.png"))) == 6
    assert "6/6" in capfd.readouterr().err  # the tqdm progress bar


def test_a_damaged_watch_state_starts_a_new_baseline_instead_of_stopping_the_watcher(tmp_path, monkeypatch):
    from deploy.watcher import Watcher
    from pipeline.watching import state_path

    monkeypatch.setenv("PATCHCORE_HOME", str(tmp_path / "home"))
    (tmp_path / "data" / "tiles" / "train" / "good").mkdir(parents=True)
    (tmp_path / "data" / "tiles" / "train" / "good" / "000.png").write_bytes(b"x")
    state_path("tiles").parent.mkdir(parents=True)
    state_path("tiles").write_text("{not json")
    emitted = []
    watcher = Watcher(
        ["tiles", "missing"],
        tmp_path / "data",
        0.0,
        1.0,
        mode="poll",
        emit=lambda *a: emitted.append(a[0]),
        heartbeat=None,
    )
    assert watcher.look() == ["tiles"] and emitted == ["tiles"]
