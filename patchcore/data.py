"""Image inputs: where images come from (MVTec-layout folder, plain folder, list file, arrays)
and how they become normalised tensors, with errors that name the file and the problem.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from patchcore.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GOOD = "good"


class ImageError(DataError):
    """One file is not a readable image."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: cannot read image ({reason}); remove or replace it")

    def __reduce__(self):  # survive the trip from a DataLoader worker process
        return (ImageError, (self.path, self.reason))


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int | None = None  # 0 nominal, 1 anomalous, None unknown
    defect_type: str | None = None  # "good" or the defect folder name (MVTec test split)
    mask_path: Path | None = None


def is_mvtec_root(path: Path) -> bool:
    return (path / "train" / GOOD).is_dir()


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mvtec_test(root: Path) -> list[Sample]:
    test = root / "test"
    if not test.is_dir():
        raise DataError(f"{root}: MVTec layout without a test/ folder (expected test/good, test/<defect>)")
    samples = []
    for type_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        for path in _images_in(type_dir):
            if type_dir.name == GOOD:
                samples.append(Sample(path, 0, GOOD, None))
                continue
            mask = root / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"
            samples.append(Sample(path, 1, type_dir.name, mask if mask.is_file() else None))
    return samples


def resolve_samples(source: str | Path | Sequence[str | Path], split: str = "train") -> list[Sample]:
    """Images from a folder in MVTec layout (its `train/good` or `test/*` split), any folder of
    images (recursive), one image file, a text file of image paths (one per line, relative to the
    file), or a list."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(source, (list, tuple)):
        samples = [Sample(Path(p)) for p in source]
    else:
        src = Path(source).expanduser()
        if src.is_dir():
            if is_mvtec_root(src):
                samples = (
                    [Sample(p, 0, GOOD) for p in _images_in(src / "train" / GOOD)]
                    if split == "train"
                    else _mvtec_test(src)
                )
            else:
                samples = [Sample(p) for p in _images_in(src)]
        elif src.is_file() and src.suffix.lower() in IMAGE_SUFFIXES:  # one image
            samples = [Sample(src)]
        elif src.is_file():
            try:
                lines = [ln.strip() for ln in src.read_text().splitlines()]
            except UnicodeDecodeError:
                raise DataError(
                    f"{src}: neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a text file of image paths"
                ) from None
            paths = [Path(ln) for ln in lines if ln and not ln.startswith("#")]
            samples = [Sample(p if p.is_absolute() else src.parent / p) for p in paths]
            missing = [str(s.path) for s in samples if not s.path.is_file()]
            if missing:
                raise DataError(f"{src}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}")
        else:
            raise DataError(f"{src}: no such folder or list file")
    if not samples:
        raise DataError(f"{source}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return samples


def check_readable(paths: Sequence[Path]) -> None:
    """Cheap pre-flight: every file opens as an image; raises one error listing every bad file."""
    problems = []
    for path in paths:
        try:
            if os.path.getsize(path) == 0:
                raise ValueError("zero-byte file")
            with Image.open(path) as image:
                image.verify()
        except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as exc:
            problems.append(ImageError(path, _reason(exc)))
    if len(problems) == 1:
        raise problems[0]
    if problems:
        listed = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} unreadable image(s):\n  {listed}{more}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    return str(exc) or type(exc).__name__


# The full range of each integer grey mode Pillow decodes to (16-bit PNG and TIFF open as I;16*).
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """The one conversion of a decoded image into the 8-bit RGB the backbone sees, used by training,
    evaluation, inspection, serving and the validation's statistics alike:

    - EXIF orientation is applied (a photo stored sideways is seen upright);
    - 16-bit grey (PNG, TIFF: modes I;16*) is scaled by the full range of the type, v * 255 / 65535,
      rounded, never clipped; 32-bit integer grey (mode I, which Pillow uses for some 16-bit files) the
      same way when its values fit 16 bits, else refused;
    - float grey (mode F, e.g. float TIFF) is read as 0..1 (values outside are clipped to it);
    - 16-bit RGB PNGs are reduced to 8 bits by Pillow itself (the high byte: the same full-range scaling);
    - palette, 1-bit and CMYK images become RGB by Pillow's conversion; an alpha channel (RGBA, LA,
      PA, a palette's transparency) is dropped: the colour values are kept as stored.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(
                f"{mode} image with values in [{values.min()}, {values.max()}]: expected 0..65535 (16-bit grey)"
            )
        grey = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        grey = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("P", "PA"):  # through RGBA: a palette's transparency is read, then dropped
        return image.convert("RGBA").convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def load_rgb(item: str | Path | np.ndarray | Image.Image) -> Image.Image:
    """Decode one input to an 8-bit RGB PIL image (to_rgb: orientation, bit depth, modes)."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        if item.dtype == np.uint16 and item.ndim == 2:
            return to_rgb(Image.fromarray(item))
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
            raise DataError(
                f"array input must be uint8 HxW, HxWx1, HxWx3 or HxWx4 (or uint16 HxW), got {item.dtype} {item.shape}"
            )
        return to_rgb(Image.fromarray(item.squeeze(-1) if item.ndim == 3 and item.shape[2] == 1 else item))
    path = Path(item)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as exc:
        raise ImageError(path, _reason(exc)) from None


def load_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask of an image of (height, width) `shape`, at that full resolution, as bool
    (nearest-neighbour resized when the mask file has another size; no mask: all False)."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    with Image.open(path) as mask:
        mask = ImageOps.exif_transpose(mask).convert("L")
        if mask.size != (shape[1], shape[0]):
            mask = mask.resize((shape[1], shape[0]), Image.NEAREST)
        return np.asarray(mask) > 127


class ImageDataset(torch.utils.data.Dataset):
    """Items (paths, arrays or PIL images) -> (normalised tensor, position, (height, width) of the
    decoded image); errors travel as ImageError."""

    def __init__(self, items: Sequence, transform: Callable):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[int, int]]:
        image = load_rgb(self.items[index])
        return self.transform(image), index, (image.height, image.width)


def collate(batch: list) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, list[tuple[int, int]]]:
    """(images stacked when they share a shape, else a list; positions; original sizes)."""
    images = [b[0] for b in batch]
    same = all(i.shape == images[0].shape for i in images)
    return (torch.stack(images) if same else images), torch.tensor([b[1] for b in batch]), [b[2] for b in batch]


def make_loader(
    items: Sequence, transform: Callable, batch_size: int, num_workers: int, pin: bool = False
) -> torch.utils.data.DataLoader:
    """`pin`: page-locked batches (CUDA), so the copy to the GPU overlaps the next forward pass."""
    # Workers decode and resize the next batches while the backbone runs on the current one.
    workers = num_workers if len(items) > batch_size else 0
    return torch.utils.data.DataLoader(
        ImageDataset(items, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
        collate_fn=collate,
        pin_memory=pin,
    )
