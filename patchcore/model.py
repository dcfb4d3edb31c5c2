"""The PatchCore estimator: `PatchCore(config).fit(images)`, `.predict(images)`, `.save(dir)`,
`PatchCore.load(dir)`.

fit streams patch features to a scratch file while keeping only their 128-d random projection in
memory, selects the coreset on the projection, then reads back just the selected rows: peak memory
stays far below the size of the full feature set. Saved models hold no pickle: a `.npy` memory
bank, a faiss index file and `model.json` (config, weights identity, dims, checksums, threshold).

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from patchcore import coreset as coreset_lib
from patchcore.atomic import atomic_directory
from patchcore.backbone import (
    TIMM_PREFIX,
    FeatureExtractor,
    WeightsError,
    WeightsIdentity,
    build_backbone,
    default_layers,
    sha256_file,
)
from patchcore.config import BackboneConfig, PatchCoreConfig, env_weights
from patchcore.coreset import GreedySelection
from patchcore.data import Sample, check_readable, make_loader, resolve_samples
from patchcore.digest import MODEL_JSON, model_digest
from patchcore.engines import ONNX_FILE, OnnxEngine, export_onnx
from patchcore.errors import ModelFileError
from patchcore.features import patch_features
from patchcore.geometry import image_transform, resized_size, tiled_features, to_image_frame
from patchcore.knn import FaissIndex, make_index

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
BANK_FILE, INDEX_FILE = "memory_bank.npy", "index.faiss"
# Written by fit (greedy coreset only): the selection and every training patch's final distance to
# it, the state an incremental refit continues from (see coreset.greedy_selection).
CORESET_INDICES_FILE, CORESET_DISTANCES_FILE = "coreset_indices.npy", "coreset_sq_distances.npy"


@dataclass
class Predictions:
    """Scores for a batch of images, in input order."""

    scores: np.ndarray  # (N,) image anomaly scores
    # One float32 map per image at the image's own (height, width), smoothed: image coordinates in
    # every mode (center_crop: 0 where the crop does not reach); None when maps were not asked for.
    anomaly_maps: list[np.ndarray] | None
    items: list  # the inputs (paths, arrays, ...) in order
    threshold: float | None = None
    # The same maps on the model's input (center_crop: the crop x crop square the reference's maps
    # cover; the full-image modes: the resized image), before they are laid back onto the image.
    input_maps: list[np.ndarray] | None = None

    @property
    def is_anomalous(self) -> np.ndarray | None:
        return None if self.threshold is None else self.scores >= self.threshold

    def records(self) -> list[dict[str, Any]]:
        flags = self.is_anomalous
        out = []
        for i, item in enumerate(self.items):
            record: dict[str, Any] = {
                "path": str(item) if isinstance(item, (str, Path)) else None,
                "score": float(self.scores[i]),
            }
            if flags is not None:
                record["is_anomalous"] = bool(flags[i])
            out.append(record)
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device={name} but no CUDA device is available; use 'auto' or 'cpu'")
    return device


def mixed_precision(device: torch.device, precision: str):
    """torch.autocast for the backbone on CUDA at bf16 / fp16; fp32 (no autocast) otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        _warn_once(f"runtime.precision={precision} applies on CUDA only; {device} runs fp32")
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@functools.lru_cache(maxsize=8)
def _warn_once(message: str) -> None:
    logger.warning(message)


def _as_items(images: Any) -> list:
    """A source (folder / list file / list of paths) -> paths; arrays and PIL images pass through."""
    if isinstance(images, (str, os.PathLike)):
        return [s.path for s in resolve_samples(images)]
    items = list(images)
    if items and all(isinstance(i, Sample) for i in items):
        return [i.path for i in items]
    return items


@dataclass
class _Runtime:
    extractor: FeatureExtractor
    device: torch.device
    transform: Any


class PatchCore:
    """PatchCore anomaly detector (Roth et al., CVPR 2022)."""

    def __init__(self, config: PatchCoreConfig | None = None):
        self.config = config if config is not None else PatchCoreConfig()
        self._runtime: _Runtime | None = None
        # Fitted state (set by fit / load).
        self.weights_: WeightsIdentity | None = None
        self.layers_: list[str] | None = None
        self.memory_bank_: np.ndarray | None = None
        self._index = None  # built on first search after fit (see index_), at load
        self.grid_: tuple[int, int] | None = None
        self.n_train_images_: int = 0
        self.n_train_patches_: int = 0
        self.threshold_: float | None = None
        self.calibration_: dict[str, Any] = {}
        self.provenance_: dict[str, Any] = {}
        self.timings_: dict[str, float] = {}
        self.coreset_state_ = None  # coreset.GreedySelection after a greedy fit
        self._onnx: bytes | None = None  # the exported extractor (runtime.engine onnxruntime)
        self._onnx_engine: OnnxEngine | None = None

    # -- backbone ----------------------------------------------------------------------------
    def _setup(self) -> _Runtime:
        if self._runtime is None:
            cfg = self.config
            model, identity = build_backbone(cfg.backbone, seed=cfg.runtime.seed)
            if self.weights_ is not None:
                _check_same_weights(self.weights_, identity)
            layers = cfg.backbone.layers or default_layers(cfg.backbone.name)
            device = resolve_device(cfg.runtime.device)
            extractor = FeatureExtractor(model, layers, timm_model=cfg.backbone.name.startswith(TIMM_PREFIX))
            extractor = extractor.to(device=device, memory_format=torch.channels_last).eval()
            self.weights_, self.layers_ = identity, layers
            self._runtime = _Runtime(extractor, device, image_transform(cfg.image, identity.mean, identity.std))
        return self._runtime

    def _backbone_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, h, w, target_dim) patch features (float32)."""
        rt = self._runtime
        images = images.to(rt.device, memory_format=torch.channels_last, non_blocking=True)
        f = self.config.features
        with torch.inference_mode():
            with mixed_precision(rt.device, self.config.runtime.precision):
                layers = rt.extractor(images)
            return patch_features(layers, f.patch_size, f.pretrain_dim, f.target_dim)

    def onnx_extractor(self) -> bytes:
        """The ONNX graph of the backbone + patch aggregation (exported on first use, checked
        against torch; patchcore.engines)."""
        if self._onnx is None:
            rt, image = self._setup(), self.config.image
            if image.mode == "center_crop":
                shape = (image.crop, image.crop)
            else:
                shape = resized_size(image.mode, image.resize, image.resize * 3 // 2, image.resize)
                if image.mode == "tiled":
                    shape = (min(image.tile_size, shape[0]), min(image.tile_size, shape[1]))
            probe = torch.randn((2, 3, *shape), generator=torch.Generator().manual_seed(0))
            self._onnx = export_onnx(rt.extractor, self.config.features, probe, fixed_size=image.mode == "center_crop")
        return self._onnx

    def _scoring_patches(self, images: torch.Tensor) -> torch.Tensor:
        """_backbone_patches through the configured engine (runtime.engine)."""
        if self.config.runtime.engine == "torch":
            return self._backbone_patches(images)
        if self._onnx_engine is None:
            self._onnx_engine = OnnxEngine(self.onnx_extractor())
        return self._onnx_engine(images)

    def _batch_features(self, batch: torch.Tensor | list[torch.Tensor], scoring: bool = False) -> list[torch.Tensor]:
        """A loader batch (stacked, or a list when the images' sizes differ) -> each image's
        (h, w, target_dim) patch features, in batch order (model.image.mode: patchcore.geometry).
        `scoring`: through runtime.engine (training always extracts with torch)."""
        image = self.config.image
        patches = self._scoring_patches if scoring else self._backbone_patches
        if image.mode == "tiled":
            return [
                tiled_features(x, image.tile_size, image.tile_overlap, patches, self.config.runtime.batch_size)
                for x in batch
            ]
        if isinstance(batch, torch.Tensor):
            return list(patches(batch))
        out: list[torch.Tensor] = [None] * len(batch)  # type: ignore[list-item]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(batch):
            by_shape.setdefault(tuple(x.shape), []).append(i)
        for members in by_shape.values():  # one forward pass per size
            for i, feats in zip(members, patches(torch.stack([batch[i] for i in members]))):
                out[i] = feats
        return out

    def embed(
        self, images: Any, progress: bool = True, desc: str = "extracting features"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (position, patch features of shape (h·w, target_dim) float32) per input image."""
        rt = self._setup()
        items = _as_items(images)
        cfg = self.config.runtime
        loader = make_loader(items, rt.transform, cfg.batch_size, cfg.num_workers, pin=rt.device.type == "cuda")
        with tqdm(total=len(items), desc=desc, unit="img", disable=not progress) as bar:
            for batch, positions, _ in loader:
                for position, feats in zip(positions.tolist(), self._batch_features(batch)):
                    self.grid_ = tuple(feats.shape[:2])  # the last image's (full-image modes: it varies)
                    yield position, feats.reshape(-1, feats.shape[-1]).cpu().numpy()
                bar.update(len(positions))

    # -- fit -----------------------------------------------------------------------------
    def fit(self, images: Any, progress: bool = True, scratch_dir: str | Path | None = None) -> PatchCore:
        """Build the memory bank from nominal images (a folder, list file or list of paths/arrays)."""
        items = _as_items(images)
        paths = [p for p in items if isinstance(p, (str, Path))]
        check_readable([Path(p) for p in paths])  # fail before any expensive work
        self._setup()
        start = time.perf_counter()
        features = (f for _, f in self.embed(items, progress=progress))
        self.fit_features(
            features, n_images=len(items), progress=progress, scratch_dir=scratch_dir, _extraction_start=start
        )
        if paths and len(paths) == len(items):
            self.provenance_["train_images_sha256"] = dataset_sha256(paths)
        return self

    def fit_features(
        self,
        features: Iterable[np.ndarray],
        n_images: int | None = None,
        progress: bool = True,
        scratch_dir: str | Path | None = None,
        warm_start=None,
        _extraction_start: float | None = None,
    ) -> PatchCore:
        """Build the bank from per-image patch features (each (h·w, dim)), e.g. read from a cache.

        `warm_start` (a `coreset.GreedySelection` over these rows: an earlier fit's
        `coreset_state_` re-mapped, NaN distances for rows added since) continues that greedy
        selection instead of starting afresh: the incremental refit after new images land."""
        self._setup()
        cfg = self.config
        if warm_start is not None and (cfg.coreset.method != "approx_greedy" or cfg.coreset.fraction >= 1.0):
            raise ValueError(
                "warm_start needs the approx_greedy coreset with fraction < 1, "
                f"not {cfg.coreset.method} at fraction {cfg.coreset.fraction}"
            )
        dim = cfg.features.target_dim
        greedy = cfg.coreset.method == "approx_greedy" and cfg.coreset.fraction < 1.0
        projected = _RowBuffer(n_images, coreset_lib.projected_width(dim, cfg.coreset.projection_dim))
        t0 = _extraction_start or time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="patchcore-fit-", dir=scratch_dir) as tmp:
            raw = Path(tmp) / "features.f32"
            rows = images = 0
            with open(raw, "wb") as out:
                for feats in features:
                    feats = np.ascontiguousarray(feats, dtype=np.float32)
                    if feats.ndim != 2 or feats.shape[1] != dim:
                        raise ValueError(f"patch features must have shape (patches, {dim}), got {feats.shape}")
                    out.write(feats.data)
                    if greedy:
                        coreset_lib.project(
                            feats,
                            cfg.coreset.projection_dim,
                            seed=cfg.runtime.seed,
                            out=projected.next_rows(len(feats)),
                        )
                    rows += len(feats)
                    images += 1
            if rows == 0:
                raise ValueError("no training images: the memory bank would be empty")
            self.timings_["extract_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            selected = self._select(rows, projected.rows(), progress, warm_start)
            del projected
            self.timings_["coreset_seconds"] = time.perf_counter() - t1
            bank = _read_rows(raw, rows, dim, None if selected is None else np.sort(selected))
        self.memory_bank_ = bank.astype(cfg.runtime.bank_dtype)
        self.n_train_images_, self.n_train_patches_ = n_images or images, rows
        self._index = None  # a new bank: the search index is built when first used
        logger.info(
            "memory bank: %d of %d patches (%s, fraction %s)", len(bank), rows, cfg.coreset.method, cfg.coreset.fraction
        )
        return self

    def _select(self, rows: int, projected: torch.Tensor | None, progress: bool, warm_start=None) -> np.ndarray | None:
        c, seed = self.config.coreset, self.config.runtime.seed
        self.coreset_state_ = None
        if c.method == "identity" or c.fraction >= 1.0:
            return None
        if c.method == "random":
            return coreset_lib.select_coreset(
                np.empty((rows, 1), np.float32), c.fraction, method="random", seed=seed, progress=False
            )
        self.coreset_state_ = coreset_lib.greedy_selection(
            projected,
            c.fraction,
            num_starts=c.num_starts,
            seed=seed,
            device=self._runtime.device,
            progress=progress,
            prior=warm_start,
        )
        return self.coreset_state_.indices

    # -- predict ---------------------------------------------------------------------------
    @property
    def index_(self):
        """The nearest-neighbour search over the memory bank (`scoring.knn_backend`). After fit it is
        built the first time it is needed (a fit whose model is only saved never pays for it);
        load builds it at once, so a served model answers its first request without that delay."""
        if self._index is None and self.memory_bank_ is not None:
            self._index = make_index(
                self.memory_bank_.astype(np.float32),
                self.config.scoring.knn_backend,
                resolve_device(self.config.runtime.device),
            )
        return self._index

    @index_.setter
    def index_(self, index) -> None:
        self._index = index

    def _check_fitted(self) -> None:
        if self.memory_bank_ is None:
            raise RuntimeError("this PatchCore model is not fitted: call fit() or PatchCore.load() first")

    def patch_scores(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P, dim) features -> (per-patch score (P,), nearest bank index (P,))."""
        s = self.config.scoring
        # Squared L2 to the k nearest bank rows, ascending, recomputed as |q − b|² by every backend
        # (no float32 |q|² + |b|² − 2q·b cancellation: see patchcore.knn).
        distances, indices = self.index_.search(features, s.k)
        if s.distance == "euclidean":
            distances = np.sqrt(np.maximum(distances, 0.0))
        return distances.mean(axis=1), indices[:, 0]

    def _image_score(self, features: np.ndarray, scores: np.ndarray, nearest: np.ndarray) -> float:
        best = int(np.argmax(scores))
        score = float(scores[best])
        if not self.config.scoring.reweight:
            return score
        # Paper Eq. 7: down-weight the score when the matched bank entry m* sits in a dense
        # neighbourhood, using the distances from the test patch to m*'s b nearest bank entries.
        bank = self.memory_bank_
        m_star = bank[nearest[best]].astype(np.float32)[None]
        b = min(self.config.scoring.reweight_b, len(bank))
        _, neighbours = self.index_.search(m_star, b)
        dists = np.linalg.norm(bank[neighbours[0]].astype(np.float32) - features[best][None], axis=1)
        d_star = float(np.linalg.norm(m_star[0] - features[best]))
        weight = 1.0 - float(np.exp(d_star - np.logaddexp.reduce(dists.astype(np.float64))))
        return weight * score

    def anomaly_maps(self, patch_grid_scores: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """(B, h, w) patch scores -> (B, *size) maps on the model's input (default: crop x crop):
        bilinear upsampling, Gaussian smoothing."""
        crop = self.config.image.crop
        up = F.interpolate(
            torch.from_numpy(np.ascontiguousarray(patch_grid_scores)).float()[:, None],
            size=size or (crop, crop),
            mode="bilinear",
            align_corners=False,
        )[:, 0].numpy()
        sigma = self.config.scoring.smoothing_sigma
        return np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in up]) if sigma > 0 else up

    def predict(self, images: Any, maps: bool = True, progress: bool = True) -> Predictions:
        """Score images (folder / list file / list of paths, uint8 arrays or PIL images)."""
        self._check_fitted()
        rt = self._setup()
        self.index_  # noqa: B018 (build the search index now: a backend that cannot run fails before any image is read)
        items = _as_items(images)
        cfg = self.config
        loader = make_loader(
            items, rt.transform, cfg.runtime.batch_size, cfg.runtime.num_workers, pin=rt.device.type == "cuda"
        )
        image = cfg.image
        scores = np.empty(len(items), dtype=np.float64)
        image_maps: list = [None] * len(items) if maps else None
        input_maps: list = [None] * len(items) if maps else None
        with tqdm(total=len(items), desc="scoring", unit="img", disable=not progress) as bar:
            for batch, positions, sizes in loader:
                feats = self._batch_features(batch, scoring=True)
                flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).cpu().numpy()
                patch, nearest = self.patch_scores(flat)  # one search for the whole batch
                start = 0
                for i, pos in enumerate(positions.tolist()):
                    grid = tuple(feats[i].shape[:2])
                    rows = slice(start, start + grid[0] * grid[1])
                    start = rows.stop
                    scores[pos] = self._image_score(flat[rows], patch[rows], nearest[rows])
                    if maps:
                        on_input = self.anomaly_maps(patch[rows].reshape(1, *grid), tuple(batch[i].shape[-2:]))[0]
                        input_maps[pos] = on_input
                        image_maps[pos] = to_image_frame(on_input, image.mode, image.resize, image.crop, sizes[i])
                bar.update(len(positions))
        return Predictions(scores, image_maps, items, self.threshold_, input_maps)

    # -- calibration -------------------------------------------------------------------------
    def set_threshold(self, threshold: float, rule: str, **details: Any) -> PatchCore:
        """Record the decision threshold (score >= threshold means anomalous) and how it was chosen."""
        self.threshold_ = float(threshold)
        self.calibration_ = {"rule": rule, **details}
        return self

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the model atomically: a half-written directory never replaces a good one."""
        self._check_fitted()
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            np.save(tmp / BANK_FILE, self.memory_bank_, allow_pickle=False)
            FaissIndex.from_bank(self.memory_bank_.astype(np.float32)).save(tmp / INDEX_FILE)
            files = [BANK_FILE, INDEX_FILE]
            if self.config.runtime.engine == "onnxruntime":
                (tmp / ONNX_FILE).write_bytes(self.onnx_extractor())
                files.append(ONNX_FILE)
            if self.coreset_state_ is not None:
                np.save(tmp / CORESET_INDICES_FILE, self.coreset_state_.indices, allow_pickle=False)
                np.save(tmp / CORESET_DISTANCES_FILE, self.coreset_state_.sq_distances, allow_pickle=False)
                files += [CORESET_INDICES_FILE, CORESET_DISTANCES_FILE]
            meta = {
                "format": "patchcore-model",
                "format_version": FORMAT_VERSION,
                "config": self.config.to_dict(),
                "backbone": {
                    "name": self.config.backbone.name,
                    "layers": self.layers_,
                    "weights": self.weights_.to_dict(),
                },
                "memory_bank": {
                    "size": int(len(self.memory_bank_)),
                    "dim": int(self.memory_bank_.shape[1]),
                    "dtype": str(self.memory_bank_.dtype),
                    "train_images": self.n_train_images_,
                    "train_patches": self.n_train_patches_,
                    "patch_grid": list(self.grid_ or ()),
                },
                "threshold": self.threshold_,
                "calibration": self.calibration_,
                "provenance": {**self.provenance_, "torch": torch.__version__},
                "timings": self.timings_,
                "files": {name: sha256_file(tmp / name) for name in files},
            }
            (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(
        cls, directory: str | Path, weights: str | None = None, device: str | None = None, digest: str | None = None
    ) -> PatchCore:
        """Load a saved model. `weights` re-points a file-weights model at the file's location on
        this machine (its sha256 must match the recorded one); `device` overrides runtime.device."""
        directory = Path(directory)
        meta = read_model_json(directory)
        actual = model_digest(directory) if digest is not None else None
        if digest is not None and actual != digest:
            raise ModelFileError(
                f"{directory / MODEL_JSON}: differs from the model that was registered (sha256 "
                f"{actual[:16]}..., recorded {digest[:16]}...): its threshold, calibration, settings "
                "or provenance were edited or corrupted; re-register the model instead of editing it"
            )
        for name, expected in meta["files"].items():
            path = directory / name
            if not path.is_file():
                raise ModelFileError(f"{path}: missing from the saved model")
            if sha256_file(path) != expected:
                raise ModelFileError(f"{path}: checksum differs from model.json; the model was altered or corrupted")
        try:
            config = PatchCoreConfig.from_dict(meta["config"])
        except ValueError as exc:
            raise ModelFileError(f"{directory / MODEL_JSON}: invalid config ({exc})") from None
        recorded = WeightsIdentity(
            **{
                **meta["backbone"]["weights"],
                "mean": tuple(meta["backbone"]["weights"]["mean"]),
                "std": tuple(meta["backbone"]["weights"]["std"]),
            }
        )
        backbone = config.backbone
        if recorded.kind == "file":
            backbone.weights = weights or env_weights() or recorded.source
            backbone.weights_sha256 = recorded.sha256
        if device is not None:
            config.runtime.device = device
        model = cls(config)
        model.weights_ = recorded
        model.layers_ = meta["backbone"]["layers"]
        bank = np.load(directory / BANK_FILE, allow_pickle=False)
        index = FaissIndex.read(directory / INDEX_FILE)
        info = meta["memory_bank"]
        if bank.shape != (info["size"], info["dim"]) or index.ntotal != len(bank) or index.dim != bank.shape[1]:
            raise ModelFileError(
                f"{directory}: memory bank {bank.shape} and index ({index.ntotal}, {index.dim}) "
                f"do not match model.json ({info['size']}, {info['dim']})"
            )
        model.memory_bank_ = bank
        model.grid_ = tuple(info.get("patch_grid") or ()) or None
        model.n_train_images_, model.n_train_patches_ = info["train_images"], info["train_patches"]
        model.threshold_ = meta.get("threshold")
        model.calibration_ = meta.get("calibration") or {}
        model.provenance_ = meta.get("provenance") or {}
        model.timings_ = meta.get("timings") or {}
        if ONNX_FILE in meta["files"]:  # checksum verified above, like every listed file
            model._onnx = (directory / ONNX_FILE).read_bytes()
        model._setup()  # rebuilds the backbone and refuses weights that differ from the record
        if config.runtime.engine == "onnxruntime":  # ready before the first request, like the index
            model._onnx_engine = OnnxEngine(model.onnx_extractor())
        model.index_ = make_index(
            bank.astype(np.float32), config.scoring.knn_backend, model._runtime.device, cpu_index=index.index
        )
        return model


class _RowBuffer:
    """The per-image projections of a fit, written into one growing float32 tensor.

    Sized from the first image's row count times the expected number of images, so a normal fit
    allocates it once: no per-image tensors left scattered over the heap (on a WRN50 10% MTD fit
    those, with their allocator fragmentation, held ~0.8 GB for 0.3 GB of rows) and no
    concatenated copy at the end. Grows by half again when the estimate is short."""

    def __init__(self, expected_images: int | None, width: int):
        self.expected_images = max(1, expected_images or 1)
        self.width = width
        self.data: torch.Tensor | None = None
        self.n = 0

    def next_rows(self, count: int) -> torch.Tensor:
        """A (count, width) view of the next free rows."""
        if self.data is None:
            self.data = torch.empty(count * self.expected_images, self.width, dtype=torch.float32)
        if self.n + count > len(self.data):
            grown = torch.empty(max(self.n + count, len(self.data) * 3 // 2), self.width, dtype=torch.float32)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        view = self.data[self.n : self.n + count]
        self.n += count
        return view

    def rows(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[: self.n]


def _read_rows(path: Path, n_rows: int, dim: int, rows: np.ndarray | None) -> np.ndarray:
    """Rows `rows` (sorted; None: all) of an (n_rows, dim) float32 file, read with plain file reads.

    Not through a memory map: the kernel maps the page-cached neighbours of every faulted page
    too (fault-around), so picking 10% of a freshly written 2.4 GB feature file through np.memmap
    put up to all of it into the process' resident set (a WRN50 10% fit measured 3.8 or 5.0 GiB
    peak RSS from one run to the next)."""
    row_bytes = dim * 4
    if rows is None:
        return np.fromfile(path, dtype=np.float32, count=n_rows * dim).reshape(n_rows, dim)
    out = np.empty((len(rows), dim), dtype=np.float32)
    view = out.view(np.uint8).reshape(len(rows), row_bytes)
    with open(path, "rb", buffering=0) as handle:
        for i, r in enumerate(rows.tolist()):
            handle.seek(r * row_bytes)
            if handle.readinto(view[i]) != row_bytes:
                raise OSError(f"{path}: short read at row {r}")
    return out


def read_coreset_state(directory: str | Path):
    """The greedy coreset state a fit saved in `directory` (checksums verified), or None when the
    model has none (random/identity coreset, or a directory re-saved after load)."""
    directory = Path(directory)
    files = read_model_json(directory)["files"]
    if CORESET_INDICES_FILE not in files or CORESET_DISTANCES_FILE not in files:
        return None
    arrays = []
    for name in (CORESET_INDICES_FILE, CORESET_DISTANCES_FILE):
        path = directory / name
        if not path.is_file() or sha256_file(path) != files[name]:
            raise ModelFileError(f"{path}: missing or checksum differs from model.json")
        arrays.append(np.load(path, allow_pickle=False))
    return GreedySelection(*arrays)


def read_model_json(directory: Path) -> dict[str, Any]:
    path = directory / MODEL_JSON
    if not path.is_file():
        raise ModelFileError(f"{directory}: not a saved PatchCore model (no {MODEL_JSON})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from None
    if meta.get("format") != "patchcore-model":
        raise ModelFileError(f"{path}: not a PatchCore model file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: format version {meta.get('format_version')} is not supported "
            f"by this version of patchcore (expects {FORMAT_VERSION})"
        )
    for key in ("config", "backbone", "memory_bank", "files"):
        if key not in meta:
            raise ModelFileError(f"{path}: missing key {key!r}")
    return meta


def _check_same_weights(recorded: WeightsIdentity, actual: WeightsIdentity) -> None:
    if recorded.kind != actual.kind or (recorded.sha256 and recorded.sha256 != actual.sha256):
        raise WeightsError(
            f"backbone weights differ from the ones this model was built with: recorded "
            f"{recorded.kind} {recorded.source} (sha256 {recorded.sha256}), got {actual.kind} "
            f"{actual.source} (sha256 {actual.sha256})"
        )
    if recorded.kind == "random" and recorded.source != actual.source:
        raise WeightsError(f"random backbone seed differs: model was built with {recorded.source}, got {actual.source}")
    if tuple(recorded.mean) != tuple(actual.mean) or tuple(recorded.std) != tuple(actual.std):
        raise WeightsError(
            f"input normalisation differs from the one this model was built with: recorded "
            f"mean {list(recorded.mean)} std {list(recorded.std)} ({recorded.normalization_source}), "
            f"now mean {list(actual.mean)} std {list(actual.std)} ({actual.normalization_source})"
        )


def dataset_sha256(paths: Sequence[str | Path]) -> str:
    """Content hash of an image set: independent of file order and names (sorted file hashes)."""
    digest = hashlib.sha256()
    for h in sorted(sha256_file(p) for p in paths):
        digest.update(h.encode())
    return digest.hexdigest()


__all__ = ["PatchCore", "Predictions", "ModelFileError", "BackboneConfig", "dataset_sha256", "read_coreset_state"]
