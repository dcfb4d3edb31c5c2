"""The one typed configuration of a PatchCore model.

`params.yaml` at the repository root holds the defaults that the CLI, the Prefect flows and
`dvc.yaml` all read; this module is the only place that knows the keys and their types. The
dataclass defaults equal the paper / reference-implementation settings, so a config built in
code without `params.yaml` is still the faithful PatchCore.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from patchcore.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BackboneConfig:
    # torchvision model name (e.g. "wide_resnet50_2", "resnet18", "mobilenet_v2") or a timm name
    # prefixed with "timm/" (e.g. "timm/resnet18").
    name: str = "wide_resnet50_2"
    # Module paths of the layers whose outputs become patch features; the first one sets the grid.
    # None = the architecture's default pair (see patchcore.backbone.DEFAULT_LAYERS).
    layers: list[str] | None = None
    # "imagenet" (torchvision/timm cache), "random" (explicit random init, for tests and demos),
    # or the path of a torchvision state_dict file.
    weights: str = "imagenet"
    # When set, the weights file must have this sha256 (an air-gapped install ships both).
    weights_sha256: str | None = None
    # Input normalisation. None = from the weights file's companion JSON when present, else
    # ImageNet statistics. An explicit value always wins.
    mean: list[float] | None = None
    std: list[float] | None = None


IMAGE_MODES = ("center_crop", "full_frame", "tiled")  # model.image.mode (patchcore/geometry.py)
ENGINES = ("torch", "onnxruntime")  # model.runtime.engine (patchcore/engines.py)


@dataclass
class ImageConfig:
    # center_crop (the paper's) | full_frame (whole image, aspect kept) | tiled (whole image in
    # overlapping tiles); patchcore/geometry.py defines each, the README compares them on MTD.
    mode: str = "center_crop"
    resize: int = 256  # the shorter side the image is resized to (center_crop: before the crop)
    crop: int = 224  # center_crop: side of the square centre crop (unused by the other modes)
    tile_size: int = 224  # tiled: side of a tile (a multiple of 16), in resized pixels
    tile_overlap: float = 0.25  # tiled: at least this share of a tile overlaps its neighbour


@dataclass
class FeatureConfig:
    patch_size: int = 3  # locally aware neighbourhood (paper: p = 3)
    pretrain_dim: int = 1024  # each layer's flattened neighbourhood is pooled to this size
    target_dim: int = 1024  # the stacked layers are pooled to this size (bank dimension)


@dataclass
class CoresetConfig:
    method: str = "approx_greedy"  # approx_greedy | random | identity
    fraction: float = 0.1
    projection_dim: int = 128
    num_starts: int = 10


@dataclass
class ScoringConfig:
    k: int = 1  # nearest neighbours per patch
    # "squared": squared L2 as faiss returns it and the reference scores it; "euclidean": the
    # paper's L2. With k = 1 both give the same image ranking.
    distance: str = "squared"
    # Paper Eq. 7 reweighting of the image score by the density around the matched bank entry.
    reweight: bool = False
    reweight_b: int = 9  # neighbourhood size b of Eq. 7
    knn_backend: str = "auto"  # auto | faiss | bounded | faiss-gpu | torch
    smoothing_sigma: float = 4.0  # Gaussian sigma (pixels) applied to upsampled anomaly maps


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 8
    num_workers: int = 2  # image decoding workers (overlap decode with the forward pass)
    seed: int = 0
    # Bank storage precision: float16 halves the memory of large banks; scoring uses float32.
    bank_dtype: str = "float32"
    # The backbone's forward pass on CUDA: fp32, or bf16 / fp16 autocast (mixed precision); the
    # patch aggregation, coreset and nearest-neighbour search stay fp32. The CPU always runs fp32.
    precision: str = "fp32"
    # What scores (predict, evaluate, inspect, serving): torch, or onnxruntime (the backbone and
    # patch aggregation exported to ONNX inside the saved model, run by ONNX Runtime on the CPU).
    engine: str = "torch"


@dataclass
class PatchCoreConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        c = self
        _check(
            c.image.mode in IMAGE_MODES,
            f"image.mode must be center_crop, full_frame or tiled, got {c.image.mode!r}",
        )
        _check(
            c.image.crop > 0 and c.image.resize >= (c.image.crop if c.image.mode == "center_crop" else 32),
            f"image.resize ({c.image.resize}) must be >= image.crop ({c.image.crop}) > 0 in center_crop mode, "
            "and >= 32 in the others",
        )
        _check(
            c.image.tile_size >= 32 and c.image.tile_size % 16 == 0,
            f"image.tile_size must be a multiple of 16, at least 32, got {c.image.tile_size}",
        )
        _check(
            0.0 <= c.image.tile_overlap <= 0.75,
            f"image.tile_overlap must be in [0, 0.75], got {c.image.tile_overlap}",
        )
        _check(
            c.features.patch_size >= 1 and c.features.patch_size % 2 == 1,
            f"features.patch_size must be a positive odd number, got {c.features.patch_size}",
        )
        _check(
            c.features.pretrain_dim > 0 and c.features.target_dim > 0,
            "features.pretrain_dim and features.target_dim must be positive",
        )
        _check(
            c.coreset.method in ("approx_greedy", "random", "identity"),
            f"coreset.method must be approx_greedy, random or identity, got {c.coreset.method!r}",
        )
        _check(0.0 < c.coreset.fraction <= 1.0, f"coreset.fraction must be in (0, 1], got {c.coreset.fraction}")
        _check(c.scoring.k >= 1, f"scoring.k must be >= 1, got {c.scoring.k}")
        _check(
            c.scoring.distance in ("squared", "euclidean"),
            f"scoring.distance must be 'squared' or 'euclidean', got {c.scoring.distance!r}",
        )
        _check(
            c.scoring.knn_backend in ("auto", "faiss", "bounded", "faiss-gpu", "torch"),
            f"scoring.knn_backend must be auto, faiss, bounded, faiss-gpu or torch, got {c.scoring.knn_backend!r}",
        )
        _check(
            c.runtime.engine in ENGINES,
            f"runtime.engine must be torch or onnxruntime, got {c.runtime.engine!r}",
        )
        _check(
            c.runtime.precision in ("fp32", "bf16", "fp16"),
            f"runtime.precision must be fp32, bf16 or fp16, got {c.runtime.precision!r}",
        )
        _check(
            c.runtime.bank_dtype in ("float32", "float16"),
            f"runtime.bank_dtype must be float32 or float16, got {c.runtime.bank_dtype!r}",
        )
        _check(c.runtime.batch_size >= 1, "runtime.batch_size must be >= 1")
        for name in ("mean", "std"):
            value = getattr(c.backbone, name)
            _check(value is None or len(value) == 3, f"backbone.{name} must have 3 values, got {value}")

    # -- conversion -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PatchCoreConfig:
        return build_settings(cls, data or {}, "")

    def replace(self, **overrides: Any) -> PatchCoreConfig:
        """A copy with dotted-key overrides, e.g. replace(**{"coreset.fraction": 0.01})."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            set_dotted(data, dotted, value)
        return PatchCoreConfig.from_dict(data)

    def flat(self) -> dict[str, Any]:
        """Flattened `section.key` view (for experiment trackers and logs)."""
        return flatten(self.to_dict())


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level of dotted keys: {"coreset": {"fraction": 0.1}} -> {"coreset.fraction": 0.1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if not key or section not in data or key not in data[section]:
        raise ConfigError(f"unknown config key {dotted!r}")
    data[section][key] = value


def build_settings(cls: type, data: dict[str, Any], where: str) -> Any:
    """A settings dataclass `cls` (sections nested) from plain data, values coerced to the field
    types; unknown keys are a ConfigError naming them (`where` prefixes the names)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys: {', '.join(where + n for n in sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_settings(hint, value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, where + name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ConfigError(f"{key} must not be empty")
    target = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
        target = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(target)
    try:
        if origin is list:
            (item,) = typing.get_args(target)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [item(v) for v in value]
        if target is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if target is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return target(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {getattr(target, '__name__', target)}") from None


def default_params_path() -> Path | None:
    """`PATCHCORE_PARAMS`, else `params.yaml` in the current directory, else None."""
    env = os.environ.get("PATCHCORE_PARAMS")
    if env:
        return Path(env)
    local = Path("params.yaml")
    return local if local.is_file() else None


def load_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The whole params.yaml as a mapping (model config lives under its `model` key)."""
    path = Path(path) if path is not None else default_params_path()
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


# Environment variables that point an installation at its backbone without editing params.yaml
# (an air-gapped factory ships one weights file): they override the file, flags override them.
WEIGHTS_ENV = "PATCHCORE_WEIGHTS"
BACKBONE_ENV = "PATCHCORE_BACKBONE"
ENV_OVERRIDES = {WEIGHTS_ENV: "backbone.weights", BACKBONE_ENV: "backbone.name"}


def env_weights() -> str | None:
    """The backbone weights PATCHCORE_WEIGHTS names (imagenet | random | a file path), or None when
    it is unset or empty. The one reader of that variable: loading a config, the pipeline's
    settings on the command line and loading a saved model all ask here."""
    return os.environ.get(WEIGHTS_ENV) or None


def env_overrides(data: dict[str, Any]) -> dict[str, Any]:
    """Apply ENV_OVERRIDES to a config mapping in place; a new backbone gets its default layers."""
    weights = env_weights()
    if weights:
        set_dotted(data, ENV_OVERRIDES[WEIGHTS_ENV], weights)
    backbone = os.environ.get(BACKBONE_ENV)
    if backbone:
        set_dotted(data, ENV_OVERRIDES[BACKBONE_ENV], backbone)
        set_dotted(data, "backbone.layers", None)
    return data


def parse_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings (the command line's repeatable `--set`) as {KEY: value}, each value read
    as YAML (`3` an int, `0.5` a float, `true` a bool, `[a, b]` a list, `null` None, else a string);
    a later item wins over an earlier one with the same key. An item without `=`, or a value that is
    not YAML, is a ConfigError naming the item. The keys are not checked here: the config they are
    applied to names an unknown one."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    return out


PRODUCTION = "production"


def apply_profile(data: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's settings with its active profile applied: `profile:` names an entry of
    `profiles:` (a mapping of dotted keys to values, e.g. `model.backbone.weights: random`) whose
    values replace the ones above it; `production` (the default) changes nothing. The result keeps
    `profile` (so the profile a run used is recorded with its settings) and drops `profiles`.
    Every entry point (the CLI, the Prefect flows and deployments, `dvc repro`) reads params.yaml
    through here, so they all see the same settings, and DVC tracks them in the one file."""
    out = {k: v for k, v in data.items() if k != "profiles"}
    profiles = data.get("profiles") or {}
    name = data.get("profile") or PRODUCTION
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) or v is None for v in profiles.values()):
        raise ConfigError("profiles must map profile names to mappings of dotted settings (model.x.y: value)")
    if name != PRODUCTION:
        if name not in profiles:
            known = ", ".join([PRODUCTION, *sorted(profiles)])
            raise ConfigError(f"profile {name!r} is not defined under profiles: (known: {known})")
        for dotted, value in (profiles[name] or {}).items():
            *path, last = str(dotted).split(".")
            node = out
            for part in path:
                node[part] = dict(node.get(part) or {})
                node = node[part]
            node[last] = value
    out["profile"] = name
    return out


def load_config(path: str | os.PathLike | None = None, use_env: bool = True) -> PatchCoreConfig:
    """The model config from params.yaml's `model` section with its active profile applied
    (defaults when there is no file), then PATCHCORE_WEIGHTS / PATCHCORE_BACKBONE unless use_env
    is False."""
    params = apply_profile(load_params(path))
    try:
        data = PatchCoreConfig.from_dict(params.get("model") or {}).to_dict()
        return PatchCoreConfig.from_dict(env_overrides(data) if use_env else data)
    except ConfigError as exc:
        raise ConfigError(f"{path or default_params_path()}: {exc}") from None
