"""Training data: the built-in synthetic glyph set (generated in code) and HDF5 image files.

Both give uint8 images (N, C, H, W) and optional integer labels; batches come out as float32 in [-1, 1]
(x / 127.5 - 1, as the CM and iCT code feed pixels), drawn with an explicit generator so runs resume exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ctcore.errors import RunError

GLYPH_NAMES: tuple[str, ...] = (
    "horizontal-bar", "vertical-bar", "diagonal", "anti-diagonal", "frame", "plus", "block", "checker",
)
GLYPH_COLORS: tuple[tuple[int, int, int], ...] = ((230, 60, 50), (60, 200, 80), (70, 110, 235))


def _glyph_masks(resolution: int) -> torch.Tensor:
    """One boolean (H, W) mask per glyph, drawn at any resolution."""
    r = resolution
    i = torch.arange(r)[:, None].expand(r, r)
    j = torch.arange(r)[None, :].expand(r, r)
    t = max(1, r // 4)  # stroke width
    lo, hi = (r - t) // 2, (r - t) // 2 + t
    inner = (i >= 1) & (i < r - 1) & (j >= 1) & (j < r - 1)
    masks = [
        (i >= lo) & (i < hi) & inner,
        (j >= lo) & (j < hi) & inner,
        ((i - j).abs() < max(1, t // 2 + 1)) & inner,
        ((i + j - (r - 1)).abs() < max(1, t // 2 + 1)) & inner,
        inner & ~((i >= 1 + t) & (i < r - 1 - t) & (j >= 1 + t) & (j < r - 1 - t)),
        (((i >= lo) & (i < hi)) | ((j >= lo) & (j < hi))) & inner,
        (i >= r // 4) & (i < r - r // 4) & (j >= r // 4) & (j < r - r // 4),
        ((i // max(1, r // 4) + j // max(1, r // 4)) % 2 == 0),
    ]
    return torch.stack(masks)


def synthetic_glyphs(num_images: int, resolution: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy RGB dataset with 24 modes: 8 glyph shapes x 3 colours on a dark background, small pixel noise.

    Returns uint8 images (N, 3, R, R) and glyph labels (N,). Deterministic in `seed`; no download.
    """
    g = torch.Generator().manual_seed(seed)
    masks = _glyph_masks(resolution).float()  # (8, R, R)
    glyph = torch.randint(0, len(GLYPH_NAMES), (num_images,), generator=g)
    color = torch.randint(0, len(GLYPH_COLORS), (num_images,), generator=g)
    rgb = torch.tensor(GLYPH_COLORS, dtype=torch.float32)[color]  # (N, 3)
    background = 20.0
    img = background + masks[glyph][:, None] * (rgb[:, :, None, None] - background)
    img = img + 6.0 * torch.randn(img.shape, generator=g)
    return img.round().clamp(0, 255).to(torch.uint8), glyph


def _read_hdf5(path: str | Path, arrays: bool) -> dict:
    """Open and validate a dataset file; with `arrays` also read images and labels. One RunError per problem."""
    import h5py
    import numpy as np

    path = Path(path)
    where = f"dataset file {str(path)!r}"
    if not path.is_file():
        raise RunError(
            f"{where} not found (data.path in the recipe). Create it with `ctcore data import SOURCE {path}` "
            "(SOURCE: cifar-10-python.tar.gz from `ctcore data download cifar10`, an image folder, zip or tar with "
            "one subfolder per class, or ImageNet 64x64 .npz batches), or point data.path at an existing file."
        )
    try:
        with h5py.File(path, "r") as f:
            if "images" not in f:
                raise RunError(f"{where} has no `images` dataset (found: {', '.join(f) or 'nothing'})")
            images = f["images"]
            if images.dtype != np.uint8 or images.ndim != 4:
                raise RunError(f"{where}: `images` must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
            labels = f.get("labels")
            if labels is not None and labels.shape != (images.shape[0],):
                raise RunError(f"{where}: `labels` shape {labels.shape} does not match {images.shape[0]} images")
            info = {"count": images.shape[0], "shape": tuple(images.shape[1:]), "has_labels": labels is not None,
                    "attrs": {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}}
            if arrays:
                info["images"] = torch.from_numpy(images[...])
                info["labels"] = torch.from_numpy(labels[...].astype("int64")) if labels is not None else None
            return info
    except RunError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise RunError(f"{where} cannot be read as HDF5 ({exc}); is it truncated?") from None


def hdf5_summary(path: str | Path) -> dict:
    """Count, per-image shape, whether labels exist, and attrs of a dataset file, without reading the images."""
    return _read_hdf5(path, arrays=False)


def read_hdf5_images(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Load `images` (N, C, H, W uint8) and optional `labels` from an HDF5 file, with clear errors."""
    info = _read_hdf5(path, arrays=True)
    return info["images"], info["labels"], info["attrs"]


class ImageData:
    """A dataset held in memory (on the training device) that serves random batches in [-1, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, *, random_flip: bool = False,
                 num_classes: int = 0, device: torch.device | str = "cpu") -> None:
        self.images = images.to(device)
        self.labels = labels.to(device) if labels is not None else None
        self.random_flip = random_flip
        self.num_classes = num_classes
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batch(self, batch_size: int, generator: torch.Generator, *, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Random examples (with replacement), optionally flipped; float32 in [-1, 1] plus labels.

        For distributed training every rank draws the same global batch of `batch_size` (same generator seed)
        and keeps its contiguous share, so the ranks' shares concatenate to the single-process batch.
        """
        if not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over world_size {world_size} (rank {rank})")
        # drawn where the generator lives (the training device): no host-to-device copy, no sync per step
        idx = torch.randint(0, len(self), (batch_size,), generator=generator, device=generator.device)
        flip = torch.rand(batch_size, generator=generator, device=generator.device) < 0.5 if self.random_flip else None
        share = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        idx = idx[share].to(self.device)
        x = self.images[idx].float().div_(127.5).sub_(1.0)  # in place: no extra temporaries
        if flip is not None:
            x = torch.where(flip[share].to(self.device)[:, None, None, None], x.flip(-1), x)
        labels = self.labels[idx] if (self.labels is not None and self.num_classes > 0) else None
        return x, labels


def data_shape(section) -> tuple[int, int, int]:
    """(C, H, W) that a recipe's [data] section declares; networks are built for it before any data loads."""
    return (section.channels, section.resolution, section.resolution)


def load_data(section, seed: int, device: torch.device) -> ImageData:
    """Build the training data described by a recipe's [data] section, checked against its declared shape."""
    if section.source == "synthetic":
        images, labels = synthetic_glyphs(section.num_images, section.resolution, seed=seed)
    else:
        images, labels, _ = read_hdf5_images(section.path)
        where = f"dataset file {section.path!r}"
        if tuple(images.shape[1:]) != data_shape(section):
            raise RunError(
                f"{where} holds images of shape {tuple(images.shape[1:])}, but the recipe's [data] declares "
                f"channels = {section.channels}, resolution = {section.resolution}; make them agree"
            )
        if section.num_classes > 0:
            if labels is None:
                raise RunError(f"data.num_classes is {section.num_classes} but {where} has no `labels` dataset")
            if int(labels.min()) < 0 or int(labels.max()) >= section.num_classes:
                raise RunError(f"{where} has labels in [{int(labels.min())}, {int(labels.max())}], outside "
                               f"0..{section.num_classes - 1} (data.num_classes = {section.num_classes})")
    return ImageData(images, labels, random_flip=section.random_flip, num_classes=section.num_classes, device=device)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 pixels."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
