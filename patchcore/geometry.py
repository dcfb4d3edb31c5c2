"""How an image becomes the model's input, and how maps go back onto the image (`model.image.mode`).

- `center_crop` (default; the paper's and the reference's): the shorter side is resized to
  `resize`, then the central `crop` x `crop` square is kept. What lies outside the square is never
  seen: in image coordinates its anomaly map is 0 (no evidence), so full-frame pixel metrics count
  defects there as missed.
- `full_frame`: the whole image, resized so that its shorter side is `resize` and its longer side
  keeps the aspect ratio; the patch grid follows the image (a 2:1 image gives a 2:1 grid).
- `tiled`: the same resized full image, cut into overlapping `tile_size` squares (`tile_overlap`
  of a tile shared with its neighbour); each tile goes through the backbone on its own and each
  patch of the image takes its feature from the tile in which it lies most centrally (no blending:
  the tile with the most context around the patch decides, the same rule at fit and at predict),
  stitched into the full image's patch grid. The backbone's memory then depends on the tile, not
  on the image, so high resolutions stay affordable; `resize` sets the scale at which defects are
  seen.

In the two full-image modes both sides are rounded to a multiple of ALIGN pixels (so that patch
cells and tiles fall on whole pixels of every layer; the aspect ratio moves by at most
ALIGN / 2 pixels on the longer side), so images of one product that differ slightly in size get
slightly different patch grids: nothing is padded or cut, maps are computed on each image's own
grid and resized back onto it, and the memory bank does not care how many patches an image has.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

ALIGN = 16  # the deepest stride among the known backbones' default layers (layer3, features.13)


def aligned(length: float) -> int:
    return max(ALIGN, int(round(length / ALIGN)) * ALIGN)


def resized_size(mode: str, resize: int, width: int, height: int) -> tuple[int, int]:
    """(height, width) the image is resized to before any crop or tiling."""
    short, long_ = min(width, height), max(width, height)
    if mode == "center_crop":  # torchvision.transforms.Resize(int): the longer side is truncated
        new_short, new_long = resize, int(resize * long_ / short)
    else:
        new_short, new_long = aligned(resize), aligned(resize * long_ / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def crop_box(resized: tuple[int, int], crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop in the resized image."""
    h, w = resized
    return int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))


class _FrameResize:
    """Resize a PIL image to `resized_size` of a full-image mode (antialiased bilinear, as torchvision
    resizes PIL images)."""

    def __init__(self, mode: str, resize: int):
        self.mode, self.resize = mode, resize

    def __call__(self, image: Image.Image) -> Image.Image:
        h, w = resized_size(self.mode, self.resize, *image.size)
        return image.resize((w, h), Image.BILINEAR)


def image_transform(image_cfg, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """PIL image -> normalised (3, H, W) tensor of the configured mode."""
    tail = [transforms.ToTensor(), transforms.Normalize(mean=list(mean), std=list(std))]
    if image_cfg.mode == "center_crop":
        # PIL-based torchvision transforms, exactly as the reference preprocesses.
        return transforms.Compose([transforms.Resize(image_cfg.resize), transforms.CenterCrop(image_cfg.crop), *tail])
    return transforms.Compose([_FrameResize(image_cfg.mode, image_cfg.resize), *tail])


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile offsets along one side: the first at 0, the last flush with the end, evenly spread so
    that neighbours share at least `overlap` of a tile, each on the ALIGN grid."""
    if length <= tile:
        return [0]
    step = tile * (1.0 - overlap)
    n = math.ceil((length - tile) / step) + 1
    return [int(round(s / ALIGN)) * ALIGN for s in np.linspace(0, length - tile, n)]


def _owner(starts: list[int], tile: int, cells: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each patch cell along one side: the tile whose centre is nearest the cell's centre, and
    the cell's index inside that tile."""
    centres = (torch.arange(cells, dtype=torch.float64) + 0.5) * stride
    tile_centres = torch.tensor(starts, dtype=torch.float64) + tile / 2.0
    owner = torch.argmin((centres[:, None] - tile_centres[None, :]).abs(), dim=1)
    local = torch.arange(cells) - torch.tensor(starts)[owner] // stride
    return owner, local


def tiled_features(
    image: torch.Tensor, tile: int, overlap: float, features: Callable[[torch.Tensor], torch.Tensor], batch_size: int
) -> torch.Tensor:
    """(3, H, W) image -> (h, w, D) patch features of the whole image, from overlapping tiles.

    `features` maps a (n, 3, th, tw) batch of tiles to (n, th/s, tw/s, D) patch features."""
    _, height, width = image.shape
    th, tw = min(tile, height), min(tile, width)
    ys, xs = tile_starts(height, th, overlap), tile_starts(width, tw, overlap)
    crops = torch.stack([image[:, y : y + th, x : x + tw] for y in ys for x in xs])
    parts = torch.cat([features(crops[i : i + batch_size]) for i in range(0, len(crops), max(1, batch_size))])
    stride = th // parts.shape[1]
    row_tile, row = _owner(ys, th, height // stride, stride)
    col_tile, col = _owner(xs, tw, width // stride, stride)
    which = (row_tile[:, None] * len(xs) + col_tile[None, :]).to(parts.device)
    return parts[which, row[:, None].to(parts.device), col[None, :].to(parts.device)]


def to_image_frame(input_map: np.ndarray, mode: str, resize: int, crop: int, image_size: tuple[int, int]) -> np.ndarray:
    """A map on the model's input (crop or resized image) -> the same map on the original image,
    (height, width) = image_size; bilinear. center_crop: 0 outside the part the model saw."""
    height, width = image_size
    if mode == "center_crop":
        resized = resized_size(mode, resize, width, height)
        top, left = crop_box(resized, crop)
        canvas = np.zeros(resized, dtype=np.float32)
        canvas[top : top + crop, left : left + crop] = input_map  # resize >= crop: the crop lies inside
        input_map = canvas
    if input_map.shape == (height, width):
        return np.asarray(input_map, dtype=np.float32)
    out = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(input_map, dtype=np.float32))[None, None],
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )
    return out[0, 0].numpy()


def visible_mask(mode: str, resize: int, crop: int, image_size: tuple[int, int]) -> np.ndarray:
    """(height, width) bool: the pixels of the original image the model's input covers."""
    height, width = image_size
    if mode != "center_crop":
        return np.ones(image_size, dtype=bool)
    resized = resized_size(mode, resize, width, height)
    top, left = crop_box(resized, crop)
    sy, sx = height / resized[0], width / resized[1]
    ys = (np.arange(height) + 0.5) / sy  # pixel centres in resized coordinates
    xs = (np.arange(width) + 0.5) / sx
    return ((ys >= top) & (ys < top + crop))[:, None] & ((xs >= left) & (xs < left + crop))[None, :]


__all__ = [
    "ALIGN",
    "image_transform",
    "resized_size",
    "tile_starts",
    "tiled_features",
    "to_image_frame",
    "visible_mask",
]
