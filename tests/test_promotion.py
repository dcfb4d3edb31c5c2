"""The promotion gate and the registry aliases, on a temporary SQLite MLflow store: a better, an
equal and a worse challenger, the first model, rollback. The step functions are called directly
here (the Prefect flow that composes them is exercised in test_pipeline.py)."""

from __future__ import annotations

import shutil

import pytest
from conftest import REPO, tiny_overrides

from pipeline import promotion, steps
from pipeline.config import PromotionConfig, load_settings, with_overrides
from pipeline.locks import product_lock
from pipeline.registry import NoSuchAlias, Registry, RegistryError, UnknownProduct
from pipeline.registry import rollback as registry_rollback
from pipeline.registry import status as registry_status
from pipeline.results import Validation
from pipeline.store import Store

TINY = tiny_overrides()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("promotion")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATCHCORE_HOME", str(root / "home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        settings = load_settings(None, TINY | {"promotion.min_metric": 0.0, "promotion.max_heldout_fpr": 1.0})
        yield {"root": root, "settings": settings, "registry": Registry(settings.mlflow)}


@pytest.fixture(scope="module")
def worse_data(product, env):
    """Same test images, but the 'nominal' training images are defective ones: a model that
    learns defects as normal, i.e. a clearly worse challenger."""
    folder = env["root"] / "worse" / "tiles"
    shutil.copytree(product / "test", folder / "test")
    shutil.copytree(product / "ground_truth", folder / "ground_truth")
    (folder / "train" / "good").mkdir(parents=True)
    for i, path in enumerate(sorted((product / "test").glob("[!g]*/*.png"))):
        shutil.copy(path, folder / "train" / "good" / f"{i:03d}.png")
    return folder


def register_version(registry: Registry, settings, data_root) -> str:
    """The training steps without Prefect (what the DVC stages run), then registration."""
    store = Store.from_settings(settings)
    manifest = steps.fingerprint_dataset(store, data_root, "tiles")
    split = steps.split_dataset(store, manifest, settings.pipeline)
    features = steps.extract_features(store, manifest, split, settings.model)
    bank = steps.build_memory_bank(store, manifest, split, features, settings.model)
    evaluation = steps.evaluate_bank(store, manifest, split, bank)
    provenance = steps.provenance("tiles", manifest, split.split_key, features.identity)
    calibrated = steps.calibrate(store, evaluation, bank, "tiles", settings.pipeline, provenance)
    report = steps.make_report(store, evaluation, calibrated, manifest, settings.pipeline)
    validation = Validation(summary="", files=[], docs_dir=None, n_files=0)
    record = steps.training_record("tiles", manifest, validation, split, features, bank, evaluation, calibrated, report)
    return registry.log_training("tiles", settings, record)["version"]


def run_gate(registry: Registry, settings, data_root, allow_random_weights: bool = True) -> dict:
    """What flows/promote.py composes, step by step."""
    store = Store.from_settings(settings)
    found = promotion.candidates(registry, "tiles")
    eval_set = promotion.pin_evaluation_set(store, data_root)
    challenger = promotion.score_version(registry, store, "tiles", found["challenger"]["version"], eval_set)
    champion = (
        promotion.score_version(registry, store, "tiles", found["champion"]["version"], eval_set)
        if found["champion"]
        else None
    )
    decision = promotion.decide(
        found["challenger"], found["champion"], challenger, champion, settings.promotion, allow_random_weights
    )
    return promotion.apply_decision(
        registry, "tiles", decision, eval_set, {"challenger": challenger, "champion": champion}
    )


@pytest.fixture(scope="module")
def history(env, product, worse_data):
    """worse first (becomes champion: nothing to beat), then better, then equal, then worse again.
    "equal" is the same bank with another calibration split, and the last "worse" the first's data with
    that split (a training identical to a registered one registers nothing new, so each must differ in
    something that decides the model)."""
    registry, settings = env["registry"], env["settings"]
    equal = with_overrides(settings, {"pipeline.calibration_fraction": 0.6})
    out = {}
    for name, data, how in (
        ("first", worse_data, settings),
        ("better", product, settings),
        ("equal", product, equal),
        ("worse", worse_data, equal),  # (the same settings as "first" would be "first" again)
    ):
        version = register_version(registry, how, data)
        out[name] = {
            "version": version,
            "decision": run_gate(registry, settings, product),
            "aliases": registry.aliases("tiles"),
        }
    return out


def test_first_model_becomes_champion_when_it_passes_the_minimums(history):
    first = history["first"]
    assert first["decision"]["promote"] and first["decision"]["champion_version"] is None
    assert first["aliases"]["champion"] == first["version"] and "previous" not in first["aliases"]


def test_better_challenger_is_promoted_and_the_old_champion_becomes_previous(history, env):
    better = history["better"]["decision"]
    assert better["promote"], better["reasons"]
    assert better["challenger_metric"] > better["champion_metric"] + 0.1
    assert history["better"]["aliases"] == {
        "champion": history["better"]["version"],
        "challenger": history["better"]["version"],
        "previous": history["first"]["version"],
    }
    old = env["registry"].client.get_model_version("patchcore-tiles", history["first"]["version"])
    assert old.tags["challenged_by"].startswith(f"v{history['better']['version']} (promoted, ")


def test_equal_challenger_is_promoted_within_tolerance(history):
    equal = history["equal"]["decision"]
    assert equal["promote"] and equal["challenger_metric"] == pytest.approx(equal["champion_metric"])
    assert history["equal"]["aliases"]["champion"] == history["equal"]["version"]
    assert history["equal"]["aliases"]["previous"] == history["better"]["version"]


def test_worse_challenger_is_rejected_and_the_champion_stays(history, env):
    worse = history["worse"]
    assert not worse["decision"]["promote"]
    assert any("worse than the champion" in r for r in worse["decision"]["reasons"])
    assert worse["aliases"]["champion"] == history["equal"]["version"]
    assert worse["aliases"]["challenger"] == worse["version"]
    tags = env["registry"].client.get_model_version("patchcore-tiles", worse["version"]).tags
    assert tags["promotion"] == "rejected" and "worse than the champion" in tags["promotion_summary"] + str(
        worse["decision"]["reasons"]
    )
    assert len(tags) <= 20, sorted(tags)  # a lean set: the rest is in the description and on the runs


def test_an_unchanged_training_registers_no_new_version(history, env, product):
    registry = env["registry"]
    before = len(registry.client.search_model_versions("name = 'patchcore-tiles'"))
    again = register_version(registry, env["settings"], product)  # what "better" was trained on
    assert again == history["better"]["version"]
    assert len(registry.client.search_model_versions("name = 'patchcore-tiles'")) == before
    # ... and it is the challenger again (what the next promotion weighs), the champion untouched
    assert registry.aliases("tiles")["challenger"] == again != registry.aliases("tiles")["champion"]


def test_every_decision_is_an_mlflow_run(history, env):
    registry = env["registry"]
    runs = registry.client.search_runs([registry.experiment_id("tiles")], "tags.kind = 'promotion'")
    assert sorted(r.data.tags["decision"] for r in runs) == ["promoted", "promoted", "promoted", "rejected"]
    assert all(r.data.tags["eval_set_sha256"] == runs[0].data.tags["eval_set_sha256"] for r in runs)  # pinned


def test_rollback_walks_back_through_previous_champions(history, env):
    registry = env["registry"]
    first, better, equal = (history[k]["version"] for k in ("first", "better", "equal"))
    challenger = registry.aliases("tiles")["challenger"]  # a rollback leaves the challenger alone
    assert registry_rollback(registry, "tiles")["aliases"] | {} == {
        "champion": better,
        "previous": first,
        "challenger": challenger,
    }
    assert registry.client.get_model_version("patchcore-tiles", equal).tags["rolled_back_to"] == better
    assert registry_rollback(registry, "tiles")["to_version"] == first
    assert "previous" not in registry.aliases("tiles")
    with pytest.raises(NoSuchAlias, match="only champion so far"):
        registry_rollback(registry, "tiles")


def test_status_reports_aliases_numbers_and_the_tracking_uri(history, env):
    report = registry_status(env["registry"])
    assert report["tracking_uri"].startswith("sqlite:///") and report["tracking_uri"].endswith("mlflow.db")
    tiles = report["products"]["tiles"]
    assert set(tiles["aliases"]) >= {"champion", "challenger"}
    challenger = tiles["aliases"]["challenger"]
    assert (
        challenger["version"] == env["registry"].aliases("tiles")["challenger"] and challenger["threshold"] is not None
    )
    assert challenger["data_version"].endswith(".dir") and challenger["weights"] == "RANDOM (not for production)"
    with pytest.raises(UnknownProduct, match="unknown product 'bolts'"):
        registry_status(env["registry"], "bolts")


# -- the gate as a pure function ----------------------------------------------------------------------
def _challenger(random_weights=False, heldout_fpr=0.0):
    return {"version": "2", "random_weights": random_weights, "heldout_fpr": heldout_fpr}


@pytest.mark.parametrize(
    "value, champion_value, promoted",
    [
        (0.95, 0.90, True),  # better
        (0.90, 0.90, True),  # equal
        (0.895, 0.90, True),  # worse, within the tolerance
        (0.85, 0.90, False),  # worse beyond the tolerance
    ],
)
def test_gate_compares_with_the_champion_within_the_tolerance(value, champion_value, promoted):
    cfg = PromotionConfig(metric="image_auroc", tolerance=0.01, min_metric=0.5, max_heldout_fpr=0.1)
    decision = promotion.decide(
        _challenger(), {"version": "1"}, {"image_auroc": value}, {"image_auroc": champion_value}, cfg
    )
    assert decision["promote"] is promoted


def test_gate_refuses_random_weights_high_fpr_and_weak_first_models():
    cfg = PromotionConfig(min_metric=0.9, max_heldout_fpr=0.05)
    scores = {"image_auroc": 0.99}
    assert not promotion.decide(_challenger(random_weights=True), None, scores, None, cfg)["promote"]
    assert promotion.decide(_challenger(random_weights=True), None, scores, None, cfg, allow_random_weights=True)[
        "promote"
    ]
    assert "held-out FPR" in promotion.decide(_challenger(heldout_fpr=0.2), None, scores, None, cfg)["reasons"][0]
    assert "min_metric" in promotion.decide(_challenger(), None, {"image_auroc": 0.8}, None, cfg)["reasons"][0]
    cold = promotion.decide(_challenger(), None, {}, None, cfg)  # no labelled defects to measure the metric
    assert cold["promote"] and "cannot be measured" in cold["notes"][0]


# -- settings ----------------------------------------------------------------------------------------
def test_params_yaml_holds_exactly_the_pipeline_defaults():
    from pipeline.config import MlflowConfig, PipelineConfig, load

    params = load(REPO / "params.yaml")
    assert params.pipeline == PipelineConfig()
    assert params.promotion == PromotionConfig()
    assert params.mlflow == MlflowConfig()


def test_overrides_reach_any_section_and_unknown_keys_are_named():
    from patchcore.config import ConfigError

    settings = load_settings(REPO / "params.yaml", {"pipeline.target_fpr": 0.05, "model.coreset.fraction": 0.2})
    assert settings.pipeline.target_fpr == 0.05 and settings.model.coreset.fraction == 0.2
    with pytest.raises(ConfigError, match="pipeline.target_fp"):
        load_settings(REPO / "params.yaml", {"pipeline.target_fp": 0.05})
    with pytest.raises(ConfigError, match="promotion.metric must be one of"):
        load_settings(REPO / "params.yaml", {"promotion.metric": "accuracy"})
    with pytest.raises(ConfigError, match="patchcore profile NAME"):
        load_settings(REPO / "params.yaml", {"profile": "demo"})
    with pytest.raises(ConfigError, match="needs its section"):
        load_settings(REPO / "params.yaml", {"fraction": 0.2})


def test_the_active_profile_changes_the_settings_of_every_entry_point_alike(tmp_path):
    """`profile: demo` (what `make demo` sets) gives the CLI, the flows and deployments (load_settings),
    the DVC stages (load) and the library (load_config) the same settings: random weights that may be
    promoted. An unknown profile is named with the known ones."""
    import yaml

    from patchcore.config import ConfigError, load_config
    from pipeline.config import load

    text = (REPO / "params.yaml").read_text()
    assert (
        yaml.safe_load(text)["profile"] == "production"
        and load(REPO / "params.yaml").promotion.allow_random_weights is False
    )
    demo = tmp_path / "params.yaml"
    demo.write_text(text.replace("profile: production", "profile: demo", 1))
    assert load_settings(demo).model.backbone.weights == "random" == load(demo).model.backbone.weights
    assert load(demo).promotion.allow_random_weights is True and load(demo).profile == "demo"
    assert load_config(demo, use_env=False).backbone.weights == "random"
    demo.write_text(text.replace("profile: production", "profile: nightly", 1))
    with pytest.raises(ConfigError, match="profile 'nightly' is not defined.*production, demo"):
        load(demo)


def test_two_promotions_at_once_promote_once_and_the_history_never_repeats_a_version(history, env, product):
    """What flows/promote.py does under the product lock, from two threads at once (the lock is a
    file lock, so it holds across processes and without a Prefect server as well)."""
    import threading

    from pipeline.locks import product_lock

    registry, settings = env["registry"], env["settings"]
    version = register_version(registry, with_overrides(settings, {"pipeline.calibration_fraction": 0.7}), product)
    outcomes = []

    def promote_once():
        with product_lock("tiles"):
            found = promotion.candidates(registry, "tiles")
            if found["champion"] and found["champion"]["version"] == found["challenger"]["version"]:
                outcomes.append("unchanged")
                return
            outcomes.append(run_gate(registry, settings, product)["outcome"])

    threads = [threading.Thread(target=promote_once) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(outcomes) == ["promoted", "unchanged"]
    champions = registry.history("tiles")
    assert champions[-1] == version and all(a != b for a, b in zip(champions, champions[1:]))


def test_a_promotion_decided_against_a_stale_champion_changes_nothing(history, env, product):
    registry, settings = env["registry"], env["settings"]
    found = promotion.candidates(registry, "tiles")
    decision = promotion.decide(
        found["challenger"], {"version": "1"}, {"image_auroc": 1.0}, {"image_auroc": 0.0}, settings.promotion, True
    )
    before = registry.aliases("tiles")
    with pytest.raises(RegistryError, match="the champion changed while this promotion was deciding"):
        promotion.apply_decision(registry, "tiles", decision, {"eval_set_sha256": "x" * 64, "eval_set": ""}, {})
    assert registry.aliases("tiles") == before


def test_a_rollback_that_would_not_change_the_champion_is_refused(history, env):
    registry = env["registry"]
    champion = registry.aliases("tiles")["champion"]
    registry.client.set_registered_model_tag("patchcore-tiles", "champion_history", f"1,{champion},{champion}")
    with pytest.raises(NoSuchAlias, match=f"nothing to roll back.*v{champion} itself"):
        registry_rollback(registry, "tiles")
    assert registry.aliases("tiles")["champion"] == champion


def test_a_registration_killed_half_way_is_seen_as_incomplete_and_cleaned_up_by_the_next_one(env, product):
    """kill -9 (os._exit) right after MLflow created the version, before the alias, the description
    and the completion tag: the version shows as incomplete in `status`, the next registration marks
    it orphaned and ends its RUNNING run as FAILED, and registers the same training anew."""
    import os
    import subprocess
    import sys

    from pipeline.registry import status as registry_status

    registry, settings = env["registry"], env["settings"]
    data = env["root"] / "killed" / "tiles"
    shutil.copytree(product, data)
    (data / "train" / "good" / "000.png").unlink()  # a training no earlier test registered
    paths = [str(REPO / "tests"), str(REPO)]
    code = f"""
import os, sys
sys.path[:0] = {paths!r}
from test_promotion import TINY, register_version
from pipeline.config import load_settings
from pipeline.registry import Registry
settings = load_settings(None, TINY | {{"promotion.min_metric": 0.0, "promotion.max_heldout_fpr": 1.0}})
registry = Registry(settings.mlflow)
Registry.set_alias = lambda *a, **k: os._exit(9)  # the process dies right after register_model
register_version(registry, settings, {data.as_posix()!r})
"""
    environment = {**os.environ, "PATCHCORE_HOME": str(env["root"] / "home")}
    environment.pop("MLFLOW_TRACKING_URI", None)
    died = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert died.returncode == 9, died.stderr[-2000:]
    report = registry_status(registry, "tiles")["products"]["tiles"]
    orphan = report["incomplete_registrations"][-1]
    run_id = registry.client.get_model_version("patchcore-tiles", orphan).run_id
    assert registry.client.get_run(run_id).info.status == "RUNNING"

    again = register_version(registry, settings, data)
    assert again != orphan  # the same training registered anew, not the orphan reused
    tags = registry.client.get_model_version("patchcore-tiles", orphan).tags
    assert tags["registration"] == "orphaned" and registry.client.get_run(run_id).info.status == "FAILED"
    assert registry.client.get_model_version("patchcore-tiles", again).tags["registration"] == "complete"
    assert orphan in registry_status(registry, "tiles")["products"]["tiles"]["incomplete_registrations"]


CUT_SHORT = {
    # where the process dies inside a champion move (rollback here; promotion moves the same way)
    "before the history": "Registry.set_history = lambda *a, **k: os._exit(9)",
    "before previous": "_set = Registry.set_alias\n"
    "Registry.set_alias = lambda s, p, a, v: os._exit(9) if a == 'previous' else _set(s, p, a, v)",
    "before champion": "_set = Registry.set_alias\n"
    "Registry.set_alias = lambda s, p, a, v: os._exit(9) if a == 'champion' else _set(s, p, a, v)",
    "after champion": "MlflowClient.delete_registered_model_tag = lambda *a, **k: os._exit(9)",
}


@pytest.mark.parametrize("point", list(CUT_SHORT))
def test_a_champion_move_cut_short_by_kill_9_is_finished_or_undone_by_the_next_lock_holder(history, env, point):
    """kill -9 (os._exit) at each write of a rollback: `status` shows the move as pending, and the
    next promotion / rollback / training (reconcile, under the product's lock) leaves champion,
    previous and the history agreeing: undone when the champion alias had not moved yet, finished
    when it had. Never a repeated version, never a stale `previous`."""
    import os
    import subprocess
    import sys

    from pipeline.registry import status as registry_status

    registry = env["registry"]
    first, better, equal = (history[k]["version"] for k in ("first", "better", "equal"))
    with product_lock("tiles"):
        registry.move_champion("tiles", equal, better, [first, better, equal])
    paths = [str(REPO / "tests"), str(REPO)]
    code = f"""
import os, sys
sys.path[:0] = {paths!r}
from mlflow import MlflowClient
from test_promotion import TINY
from pipeline.config import load_settings
from pipeline.registry import Registry, rollback
registry = Registry(load_settings(None, TINY).mlflow)
{CUT_SHORT[point]}
rollback(registry, "tiles")
"""
    environment = {**os.environ, "PATCHCORE_HOME": str(env["root"] / "home")}
    environment.pop("MLFLOW_TRACKING_URI", None)
    died = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert died.returncode == 9, died.stderr[-2000:]
    assert registry_status(registry, "tiles")["products"]["tiles"]["champion_change_pending"] == better

    with product_lock("tiles"):
        repaired = registry.reconcile("tiles")["champion_change"]
    assert len(repaired) == 1 and ("finished" if point == "after champion" else "undone") in repaired[0]
    aliases, versions = registry.aliases("tiles"), registry.history("tiles")
    expected = [first, better] if point == "after champion" else [first, better, equal]
    assert versions == expected and aliases["champion"] == expected[-1] and aliases["previous"] == expected[-2]
    assert registry_status(registry, "tiles")["products"]["tiles"]["champion_change_pending"] is None
