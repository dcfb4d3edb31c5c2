"""Pretrained backbones: build a torchvision/timm model, resolve its weights, cut it after the
last layer PatchCore needs.

Weights come from one of three places, always recorded in a `WeightsIdentity` that travels with
the model (model.json):
- "imagenet": the library's own pretrained weights through the torchvision/timm cache;
- a local state_dict file, identified by sha256 (and checked against `weights_sha256` when set);
  a companion JSON beside it (same stem) may carry the input normalisation and the expected sha256;
- "random": explicit random initialisation from the seed, for tests and demos only (warns).
Offline with nothing cached is a `WeightsError` that says how to supply a file.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse

from patchcore.config import IMAGENET_MEAN, IMAGENET_STD, BackboneConfig
from patchcore.digest import sha256_file
from patchcore.errors import BackboneError, WeightsError

logger = logging.getLogger(__name__)

# Default layers per architecture. ResNets: the paper's layer2 + layer3 (stride 8 and 16).
# mobilenet_v2: the stride-8 block output features.6 with the stride-16 outputs features.10 and
# features.13, chosen on the MTD validation half with the ImageNet weights (image AUROC 0.821, PRO
# 0.536; the best pair, features.13 + features.16, reached 0.812 / 0.475, features.6 + features.13
# 0.787 / 0.540): bench/select_settings.py, bench/results/select_mobilenet_v2_*.json.
DEFAULT_LAYERS: dict[str, list[str]] = {
    "wide_resnet50_2": ["layer2", "layer3"],
    "wide_resnet101_2": ["layer2", "layer3"],
    "resnet18": ["layer2", "layer3"],
    "resnet34": ["layer2", "layer3"],
    "resnet50": ["layer2", "layer3"],
    "resnet101": ["layer2", "layer3"],
    "mobilenet_v2": ["features.6", "features.10", "features.13"],
}

TIMM_PREFIX = "timm/"


@dataclass(frozen=True)
class WeightsIdentity:
    """What the backbone's weights are, precisely enough to rebuild or refuse them later."""

    kind: str  # imagenet | file | random
    source: str  # checkpoint URL / file path / "seed=N"
    sha256: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalization_source: str  # config | weights-json | weights-meta | imagenet-default

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_random(self) -> bool:
        return self.kind == "random"


def default_layers(name: str) -> list[str]:
    arch = name.removeprefix(TIMM_PREFIX)
    if arch in DEFAULT_LAYERS:
        return list(DEFAULT_LAYERS[arch])
    raise BackboneError(
        f"no default layers are known for backbone {name!r}; name them explicitly "
        f"(e.g. --layers layer2,layer3). Known defaults: {', '.join(sorted(DEFAULT_LAYERS))}"
    )


def _construct(name: str) -> nn.Module:
    if name.startswith(TIMM_PREFIX):
        import timm  # noqa: PLC0415  lazy: timm takes ~1 s to import; only timm/<name> backbones need it

        arch = name.removeprefix(TIMM_PREFIX)
        if arch not in timm.list_models():
            raise BackboneError(f"unknown timm model {arch!r} (see timm.list_models())")
        return timm.create_model(arch, pretrained=False)
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise BackboneError(
            f"unknown backbone {name!r}: use a torchvision classification model name "
            f"(e.g. wide_resnet50_2, resnet18, mobilenet_v2) or 'timm/<name>'"
        )
    return torchvision.models.get_model(name, weights=None)


def _imagenet_state_dict(name: str) -> tuple[dict[str, torch.Tensor], str, str | None, tuple, tuple]:
    """Pretrained weights through the library cache; returns (state_dict, source, sha256, mean, std)."""
    hint = (
        "This machine may be offline. Supply the weights as a local file instead: "
        "--weights /path/to/state_dict.pth (a torchvision state_dict; pin it with "
        "backbone.weights_sha256), or set PATCHCORE_WEIGHTS; use --weights random only for tests."
    )
    if name.startswith(TIMM_PREFIX):
        import timm  # noqa: PLC0415  lazy: timm takes ~1 s to import; only timm/<name> backbones need it

        try:
            model = timm.create_model(name.removeprefix(TIMM_PREFIX), pretrained=True)
        except Exception as exc:  # timm raises hub/HTTP/OS errors of many kinds when offline
            raise WeightsError(f"cannot load pretrained timm weights for {name!r}: {exc}. {hint}") from None
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        return (
            model.state_dict(),
            f"timm:{cfg.get('hf_hub_id') or name}",
            None,
            tuple(cfg.get("mean", IMAGENET_MEAN)),
            tuple(cfg.get("std", IMAGENET_STD)),
        )
    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError offline, hash mismatch, truncated file
        raise WeightsError(
            f"cannot load ImageNet weights for {name!r} ({exc}). Expected them in the torchvision "
            f"cache at {cached} (download {weights.url} there on a connected machine). {hint}"
        ) from None
    sha = sha256_file(cached) if cached.is_file() else None
    return state, weights.url, sha, IMAGENET_MEAN, IMAGENET_STD


def _companion_json(path: Path) -> dict[str, Any]:
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{meta_path}: companion JSON of {path.name} is not valid JSON ({exc})") from None


def _file_state_dict(path: Path, expected_sha256: str | None) -> tuple[dict[str, torch.Tensor], str, dict]:
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} not found. Copy the backbone's state_dict file there, or point "
            f"backbone.weights / PATCHCORE_WEIGHTS / --weights at it."
        )
    sha = sha256_file(path)
    meta = _companion_json(path)
    recorded = (meta.get("pth") or {}).get("sha256")
    for label, expected in (
        ("backbone.weights_sha256", expected_sha256),
        (f"{path.with_suffix('.json').name}", recorded),
    ):
        if expected and expected.lower() != sha:
            raise WeightsError(f"{path}: sha256 is {sha} but {label} says {expected}; the file is not the one expected")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read as a torch state_dict ({exc})") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state_dict (a mapping of tensors), got {type(state).__name__}")
    return state, sha, meta


def build_backbone(config: BackboneConfig, seed: int = 0) -> tuple[nn.Module, WeightsIdentity]:
    """The full classification network with its weights loaded, in eval mode."""
    meta: dict[str, Any] = {}
    if config.weights == "random":
        # Re-initialise from the seed so the same seed always gives the same network, without
        # disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _construct(config.name)
        warnings.warn(
            f"backbone {config.name} uses RANDOM weights (seed {seed}): scores are not meaningful "
            "for real inspection; use them for tests and demos only",
            stacklevel=2,
        )
        kind, source, sha, mean, std, norm_src = (
            "random",
            f"seed={seed}",
            None,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "imagenet-default",
        )
    elif config.weights == "imagenet":
        model = _construct(config.name)
        state, source, sha, mean, std = _imagenet_state_dict(config.name)
        _load_strict(model, state, source)
        kind, norm_src = "imagenet", "weights-meta"
    else:
        path = Path(config.weights).expanduser()
        state, sha, meta = _file_state_dict(path, config.weights_sha256)
        model = _construct(config.name)
        _load_strict(model, state, str(path))
        kind, source = "file", str(path.resolve())
        meta_in = meta.get("input") or {}
        if "mean" in meta_in and "std" in meta_in:
            mean, std, norm_src = tuple(meta_in["mean"]), tuple(meta_in["std"]), "weights-json"
        else:
            mean, std, norm_src = IMAGENET_MEAN, IMAGENET_STD, "imagenet-default"
    if config.mean is not None or config.std is not None:
        mean = tuple(config.mean) if config.mean is not None else mean
        std = tuple(config.std) if config.std is not None else std
        norm_src = "config"
    identity = WeightsIdentity(kind, source, sha, tuple(map(float, mean)), tuple(map(float, std)), norm_src)
    return model.eval(), identity


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise WeightsError(f"{source}: weights do not fit the architecture: {' '.join(first)}") from None


def layer_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


class FeatureExtractor(nn.Module):
    """Runs the backbone only up to the last requested layer and returns those layers' outputs."""

    def __init__(self, model: nn.Module, layers: list[str], timm_model: bool = False):
        super().__init__()
        valid = set(layer_names(model))
        missing = [layer for layer in layers if layer not in valid]
        if missing:
            tops = [n for n in layer_names(model) if n.count(".") <= 1]
            raise BackboneError(
                f"layer(s) {', '.join(missing)} not found in {type(model).__name__}; valid names "
                f"include: {', '.join(tops)}"
            )
        if timm_model:
            from timm.models import create_feature_extractor  # noqa: PLC0415  lazy: as above
        else:
            from torchvision.models.feature_extraction import create_feature_extractor  # noqa: PLC0415  (same name)
        # FX graph pruning drops every module after the last requested layer.
        body = create_feature_extractor(model, return_nodes=list(layers))
        if not model.training and isinstance(body, torch.fx.GraphModule):
            # Inference only: fold every BatchNorm that directly follows a convolution into the
            # convolution's weights and bias (torch's own FX pass). Same function, one pass over
            # memory less per layer: ~10% of the CPU forward time; outputs agree to float rounding.
            # On a copy, so the caller's network keeps its own layers (deepcopy of torchvision's
            # DualGraphModule comes back in training mode, hence the .eval()).
            body = fuse(copy.deepcopy(body).eval(), inplace=True, no_trace=True)
        self.body = body
        self.layers = list(layers)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.body(images)
        return [outputs[layer] for layer in self.layers]
