"""Locally aware patch features (paper Sec. 3.1), defined as the reference implementation does.

For every layer: the p×p neighbourhood of each position (stride 1, zero padding) is flattened in
(channel, row, column) order and reduced to `pretrain_dim` values by 1-D adaptive average
pooling; deeper (coarser) layers are resized bilinearly (align_corners=False) onto the first
layer's grid; the per-layer vectors are concatenated and pooled to `target_dim` the same way.

How it is computed here: everything between a layer's output and the patch feature is linear.
The two poolings compose into one fixed map from each layer's C·p·p neighbourhood vector to the
target dimensions, and a bilinear resize acts on positions only, so it commutes with that map.
`_LayerMap` derives the composed map by pushing identity matrices through
`F.adaptive_avg_pool1d` (the reference's own operation, so the bin rule cannot drift), notes that
every output reads a few consecutive channels, and applies it as one grouped p×p convolution at
the layer's native resolution; only the target-sized result is resized. Same numbers as the
unfold → resize → pool definition (to float rounding; tests/test_features_knn.py checks it), with
no C·p·p-sized unfolded tensor at all.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _pooling_bins(length: int, out_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's adaptive-pooling bins: bin i covers [floor(i·L/n), ceil((i+1)·L/n))."""
    i = torch.arange(out_dim, dtype=torch.int64)
    starts = (i * length) // out_dim
    ends = -((-(i + 1) * length) // out_dim)
    return starts, ends - starts


def _pooling_matrix(length: int, out_dim: int) -> torch.Tensor:
    """(out_dim, length) float64 matrix of 1-D adaptive average pooling (tests check it against
    F.adaptive_avg_pool1d)."""
    starts, widths = _pooling_bins(length, out_dim)
    matrix = torch.zeros(out_dim, length, dtype=torch.float64)
    for j in range(int(widths.max())):
        rows = torch.nonzero(j < widths).flatten()
        matrix[rows, starts[rows] + j] = 1.0 / widths[rows].double()
    return matrix


@dataclass(frozen=True)
class _LayerMap:
    """One layer's share of the composed pooling, as a grouped convolution.

    rows: the target dimensions [first, last) this layer contributes to (always consecutive:
    pooling bins are contiguous and each layer is one block of the stacked vector); channels: for
    each of them the `group` consecutive input channels it reads (gather indices); weight:
    (rows, group, p, p).
    """

    rows: tuple[int, int]
    channels: torch.Tensor | None  # None: the gather is the identity
    weight: torch.Tensor
    groups: int


@functools.lru_cache(maxsize=16)
def _layer_maps(
    channels: tuple[int, ...], patch_size: int, pretrain_dim: int, target_dim: int
) -> tuple[_LayerMap, ...]:
    merge_starts, merge_widths = _pooling_bins(len(channels) * pretrain_dim, target_dim)
    maps = []
    for layer, c in enumerate(channels):
        neighbourhood = c * patch_size * patch_size
        pre = _pooling_matrix(neighbourhood, pretrain_dim)  # (pretrain, C·p·p)
        # composed = merge[:, this layer's block] @ pre; merge rows have only a few non-zeros
        composed = torch.zeros(target_dim, neighbourhood, dtype=torch.float64)
        for j in range(int(merge_widths.max())):
            source = merge_starts + j - layer * pretrain_dim  # row of `pre` that bin element j reads
            use = (j < merge_widths) & (source >= 0) & (source < pretrain_dim)
            composed[use] += pre[source[use]] / merge_widths[use, None].double()
        composed = composed.reshape(target_dim, c, patch_size, patch_size)  # (target, C, p, p)
        touched = composed.abs().sum(dim=(2, 3)) > 0  # (target, C)
        rows = torch.nonzero(touched.any(dim=1)).flatten()
        first = touched[rows].float().argmax(dim=1)
        last = c - 1 - touched[rows].flip(1).float().argmax(dim=1)
        group = int((last - first).max()) + 1
        start = torch.clamp(first, max=c - group)  # keep every window inside the layer
        index = start[:, None] + torch.arange(group)
        weight = torch.gather(composed[rows], 1, index[:, :, None, None].expand(-1, -1, patch_size, patch_size))
        flat = index.flatten()
        identity = len(flat) == c and bool(torch.equal(flat, torch.arange(c)))
        first_row, end_row = int(rows[0]), int(rows[-1]) + 1
        assert end_row - first_row == len(rows), "pooling bins are contiguous"
        maps.append(_LayerMap((first_row, end_row), None if identity else flat, weight.float().contiguous(), len(rows)))
    return tuple(maps)


def layer_maps(channels: tuple[int, ...], patch_size: int, pretrain_dim: int, target_dim: int) -> tuple[_LayerMap, ...]:
    """The composed pooling of layers with these channel counts, as fresh tensors (not the cached,
    possibly inference-mode ones): for a module that holds them as constants (the ONNX export)."""
    return tuple(
        _LayerMap(m.rows, None if m.channels is None else m.channels.clone(), m.weight.clone(), m.groups)
        for m in _layer_maps(tuple(channels), patch_size, pretrain_dim, target_dim)
    )


def patch_features(
    feature_maps: list[torch.Tensor],
    patch_size: int = 3,
    pretrain_dim: int = 1024,
    target_dim: int = 1024,
    maps: tuple[_LayerMap, ...] | None = None,
) -> torch.Tensor:
    """Backbone layer outputs -> patch features of shape (B, h, w, target_dim) on the first layer's grid.
    `maps`: layer_maps(...) computed beforehand (default: derived from the layers' channel counts)."""
    grid = tuple(feature_maps[0].shape[-2:])
    batch = feature_maps[0].shape[0]
    if maps is None:
        maps = _layer_maps(tuple(f.shape[1] for f in feature_maps), patch_size, pretrain_dim, target_dim)
    patches = feature_maps[0].new_zeros((batch, *grid, target_dim), dtype=torch.float32)
    for feature_map, m in zip(feature_maps, maps):
        x = feature_map.float()
        if m.channels is not None:
            x = x.index_select(1, m.channels.to(x.device))
        y = F.conv2d(x, m.weight.to(x.device), padding=(patch_size - 1) // 2, groups=m.groups)
        if tuple(y.shape[-2:]) != grid:
            y = F.interpolate(y, size=grid, mode="bilinear", align_corners=False)
        y = y.permute(0, 2, 3, 1)  # (B, h, w, rows); free when the backbone runs channels-last
        patches[..., m.rows[0] : m.rows[1]] += y
    return patches
