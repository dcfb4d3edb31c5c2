"""One typed config; backbone weights come from an explicit, recorded source."""

from __future__ import annotations

import json
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import REPO, tiny_config

from patchcore import PatchCore
from patchcore.backbone import BackboneError, FeatureExtractor, WeightsError, build_backbone
from patchcore.config import BackboneConfig, ConfigError, PatchCoreConfig, load_config


def test_params_yaml_holds_exactly_the_code_defaults():
    assert load_config(REPO / "params.yaml", use_env=False) == PatchCoreConfig()


def test_environment_points_the_install_at_its_backbone(monkeypatch):
    monkeypatch.setenv("PATCHCORE_WEIGHTS", "/opt/factory/mnv2.pth")
    monkeypatch.setenv("PATCHCORE_BACKBONE", "mobilenet_v2")
    cfg = load_config(REPO / "params.yaml")
    assert cfg.backbone.weights == "/opt/factory/mnv2.pth" and cfg.backbone.name == "mobilenet_v2"
    assert cfg.backbone.layers is None  # the architecture's own default pair, not wide_resnet's


def test_unknown_and_invalid_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="coreset.fractoin"):
        PatchCoreConfig.from_dict({"coreset": {"fractoin": 0.1}})
    with pytest.raises(ConfigError, match=r"coreset.fraction must be in \(0, 1\], got 1.5"):
        PatchCoreConfig.from_dict({"coreset": {"fraction": 1.5}})
    with pytest.raises(ConfigError, match="runtime.batch_size: cannot read 'many' as int"):
        PatchCoreConfig.from_dict({"runtime": {"batch_size": "many"}})
    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  scoring:\n    distance: manhattan\n")
    with pytest.raises(ConfigError, match="params.yaml: scoring.distance"):
        load_config(bad)


def test_replace_and_flat_views():
    cfg = PatchCoreConfig().replace(**{"coreset.fraction": 0.01, "backbone.layers": "layer1,layer2"})
    assert cfg.coreset.fraction == 0.01 and cfg.backbone.layers == ["layer1", "layer2"]
    assert cfg.flat()["coreset.fraction"] == 0.01


def test_random_weights_are_explicit_deterministic_and_warned():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        a, ident = build_backbone(BackboneConfig(name="resnet18", weights="random"), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b, _ = build_backbone(BackboneConfig(name="resnet18", weights="random"), seed=3)
    assert ident.kind == "random" and ident.source == "seed=3"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _save_resnet18(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_weights_file_is_hashed_and_checked(tmp_path):
    path = _save_resnet18(tmp_path / "r18.pth")
    _, ident = build_backbone(BackboneConfig(name="resnet18", weights=str(path)))
    assert ident.kind == "file" and len(ident.sha256) == 64
    assert ident.normalization_source == "imagenet-default"
    with pytest.raises(WeightsError, match="sha256 is .* but backbone.weights_sha256 says 00ff"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(path), weights_sha256="00ff"))


def test_missing_weights_file_says_how_to_supply_it(tmp_path):
    with pytest.raises(WeightsError, match="not found. Copy the backbone's state_dict file there"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "nope.pth")))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = _save_resnet18(tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="do not fit the architecture"):
        build_backbone(BackboneConfig(name="resnet34", weights=str(path)))


def test_companion_json_supplies_normalisation(tmp_path):
    path = _save_resnet18(tmp_path / "r18.pth")
    path.with_suffix(".json").write_text(json.dumps({"input": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    _, ident = build_backbone(BackboneConfig(name="resnet18", weights=str(path)))
    assert ident.mean == (0.5, 0.5, 0.5) and ident.normalization_source == "weights-json"
    _, ident = build_backbone(
        BackboneConfig(name="resnet18", weights=str(path), mean=[0.4, 0.4, 0.4], std=[0.2, 0.2, 0.2])
    )
    assert ident.mean == (0.4, 0.4, 0.4) and ident.normalization_source == "config"


def test_changed_normalisation_is_refused_at_load_time(tmp_path, product):
    path = _save_resnet18(tmp_path / "r18.pth")
    cfg = tiny_config(**{"backbone.weights": str(path)})
    saved = (
        PatchCore(cfg).fit(sorted((product / "train" / "good").glob("*.png"))[:4], progress=False).save(tmp_path / "m")
    )
    path.with_suffix(".json").write_text(json.dumps({"input": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    with pytest.raises(WeightsError, match="normalisation differs"):
        PatchCore.load(saved)


def test_moved_weights_file_is_found_by_argument_and_checked(tmp_path, product):
    path = _save_resnet18(tmp_path / "r18.pth")
    saved = (
        PatchCore(tiny_config(**{"backbone.weights": str(path)}))
        .fit(sorted((product / "train" / "good").glob("*.png"))[:4], progress=False)
        .save(tmp_path / "m")
    )
    moved = path.rename(tmp_path / "elsewhere.pth")
    with pytest.raises(WeightsError, match="not found"):
        PatchCore.load(saved)
    assert PatchCore.load(saved, weights=str(moved)).weights_.sha256 is not None
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), moved)
    with pytest.raises(WeightsError, match="sha256"):
        PatchCore.load(saved, weights=str(moved))


def test_offline_imagenet_weights_give_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(
        WeightsError, match="cannot load ImageNet weights for 'resnet18'.*--weights /path/to/state_dict.pth"
    ):
        build_backbone(BackboneConfig(name="resnet18", weights="imagenet"))


def test_unknown_backbone_and_layer_names_are_explained():
    with pytest.raises(BackboneError, match="unknown backbone 'resnet9000'"):
        build_backbone(BackboneConfig(name="resnet9000", weights="random"))
    model = torchvision.models.resnet18()
    with pytest.raises(BackboneError, match="layer5 not found in ResNet; valid names include: .*layer4"):
        FeatureExtractor(model, ["layer2", "layer5"])


def test_any_module_path_can_be_a_layer():
    model = torchvision.models.mobilenet_v2()
    outputs = FeatureExtractor(model, ["features.6", "features.13"])(torch.zeros(1, 3, 64, 64))
    assert [o.shape[1] for o in outputs] == [32, 96]


def test_inference_extractor_folds_batchnorm_without_changing_outputs_or_the_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # non-trivial statistics
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        layer2 = model.layer2(model.layer1(h))
        expected = [layer2, model.layer3(layer2)]
    extractor = FeatureExtractor(model, ["layer2", "layer3"])
    executed = [extractor.body.get_submodule(n.target) for n in extractor.body.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in executed)
    for got, want in zip(extractor(x), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the caller's network still has (and applies) its own BatchNorms
        torch.testing.assert_close(model.layer2(model.layer1(h)), layer2, rtol=0, atol=0)


def test_timm_backbones_work_by_prefix():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = build_backbone(BackboneConfig(name="timm/resnet18", weights="random"))
    outputs = FeatureExtractor(model, ["layer2", "layer3"], timm_model=True)(torch.zeros(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outputs] == [(128, 8, 8), (256, 4, 4)]


def test_plain_list_fields_are_read_as_lists():
    from dataclasses import dataclass

    from patchcore.config import build_settings

    @dataclass
    class Section:
        names: list[str]

    assert build_settings(Section, {"names": "a, b"}, "").names == ["a", "b"]
    assert build_settings(Section, {"names": ["x"]}, "").names == ["x"]
