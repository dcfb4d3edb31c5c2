"""Locally aware patch features (paper Sec. 3.1), defined as the reference implementation does.

For every layer: the p×p neighbourhood of each position (stride 1, zero padding) is flattened in
(channel, row, column) order and reduced to `pretrain_dim` values by 1-D adaptive average
pooling; deeper (coarser) layers are resized bilinearly (align_corners=False) onto the first
layer's grid; the per-layer vectors are concatenated and pooled to `target_dim` the same way.

The reference resizes the unpooled C·p·p neighbourhood maps and pools afterwards. Channel pooling
and spatial bilinear resizing are both linear and act on different axes, so they commute: pooling
first gives the same numbers (up to float rounding) with up to 9× less data to resize.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pooled_neighbourhoods(feature_map: torch.Tensor, patch_size: int, dim: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, dim, h, w): each position's C·p·p neighbourhood pooled to `dim`."""
    batch, _, height, width = feature_map.shape
    unfolded = F.unfold(feature_map, kernel_size=patch_size, padding=(patch_size - 1) // 2, stride=1)
    # (B, C·p·p, h·w) -> (B·h·w, 1, C·p·p): pool along the neighbourhood vector.
    vectors = unfolded.transpose(1, 2).reshape(batch * height * width, 1, -1)
    pooled = F.adaptive_avg_pool1d(vectors, dim)
    return pooled.reshape(batch, height, width, dim).permute(0, 3, 1, 2)


def patch_features(
    feature_maps: list[torch.Tensor], patch_size: int = 3, pretrain_dim: int = 1024, target_dim: int = 1024
) -> torch.Tensor:
    """Backbone layer outputs -> patch features of shape (B, h, w, target_dim) on the first layer's grid."""
    grid = feature_maps[0].shape[-2:]
    per_layer = []
    for feature_map in feature_maps:
        pooled = _pooled_neighbourhoods(feature_map.float(), patch_size, pretrain_dim)
        if pooled.shape[-2:] != grid:
            pooled = F.interpolate(pooled, size=tuple(grid), mode="bilinear", align_corners=False)
        per_layer.append(pooled)
    stacked = torch.cat(per_layer, dim=1).permute(0, 2, 3, 1)  # (B, h, w, L·pretrain_dim)
    batch, height, width, _ = stacked.shape
    merged = F.adaptive_avg_pool1d(stacked.reshape(batch * height * width, 1, -1), target_dim)
    return merged.reshape(batch, height, width, target_dim)
