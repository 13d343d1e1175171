"""Training data: the built-in synthetic glyph set (generated in code) and HDF5 image files.

Both give uint8 images (N, C, H, W) and optional integer labels; batches come out as float32 in [-1, 1]
(x / 127.5 - 1, as the CM and iCT code feed pixels), drawn with an explicit generator so runs resume exactly.
An HDF5 file is validated from its metadata (structure, dtype, shape, labels) and its size checked against the
memory available before any array is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ctcore.errors import RunError, path_not_found
from ctcore.memory import require_memory

if TYPE_CHECKING:
    import h5py
    import numpy as np

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


MAX_CHANNELS = 1024  # as data.channels in a recipe
MAX_SIDE = 16_384
"""Bounds on an HDF5 file's per-image shape (C, H, W): anything beyond is a mislabelled or hostile file."""

HDF5_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)
"""What h5py raises on a file that is not HDF5, truncated, or damaged (OSError mostly; the rest on odd objects)."""


def _describe(obj) -> str:
    """What an HDF5 object holds, for messages: 'a group', 'float64 values of shape (5,)', 'strings of shape (5,)'."""
    import h5py

    if isinstance(obj, h5py.Group):
        return "a group"
    if not isinstance(obj, h5py.Dataset):
        return f"a {type(obj).__name__}"
    if h5py.check_string_dtype(obj.dtype) is not None or obj.dtype.kind in "SU":
        return f"strings of shape {obj.shape}"
    if obj.dtype.names:
        return f"compound records ({', '.join(obj.dtype.names)}) of shape {obj.shape}"
    return f"{obj.dtype} values of shape {obj.shape}"


def _check_structure(f, where: str) -> dict:
    """Validate `images` and `labels` of an open file from metadata alone (no array is read)."""
    import h5py
    import numpy as np

    images = f.get("images")
    if images is None:
        raise RunError(f"{where} has no `images` dataset (found: {', '.join(f) or 'nothing'})")
    if not isinstance(images, h5py.Dataset) or images.dtype != np.uint8 or images.ndim != 4:
        got = _describe(images) if not isinstance(images, h5py.Dataset) else f"{images.dtype} {images.shape}"
        raise RunError(f"{where}: `images` must be uint8 (N, C, H, W), got {got}")
    n, c, h, w = images.shape
    if n == 0:
        raise RunError(f"{where} holds no images (`images` has shape {images.shape}); import the data again")
    if c == h > 4 and w in (1, 3, 4):  # square images stored channels-last
        raise RunError(f"{where}: `images` has shape {images.shape}, which looks like (N, H, W, C): store images "
                       f"as (N, C, H, W)")
    if not (1 <= c <= MAX_CHANNELS and 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise RunError(f"{where}: `images` has shape {images.shape}, outside (N, 1..{MAX_CHANNELS} channels, "
                       f"1..{MAX_SIDE:,}, 1..{MAX_SIDE:,} pixels)")
    labels = f.get("labels")
    if labels is not None:
        if not isinstance(labels, h5py.Dataset) or labels.dtype.kind not in "iu":
            raise RunError(f"{where}: `labels` must be integers (N,), got {_describe(labels)}; store class "
                           f"indices 0, 1, ... as integers")
        if labels.shape != (n,):
            raise RunError(f"{where}: `labels` shape {labels.shape} does not match {n:,} images")
    return {"count": n, "shape": (c, h, w), "has_labels": labels is not None,
            "attrs": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}}


@contextmanager
def open_hdf5(path: str | Path) -> Iterator[h5py.File]:
    """`h5py.File(path, "r")` whose failures to open or read (not HDF5, truncated, damaged) are one RunError."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            yield f
    except RunError:
        raise
    except HDF5_ERRORS as exc:
        reason = (str(exc) or type(exc).__name__).splitlines()[0]
        raise RunError(f"dataset file {str(path)!r} cannot be read as HDF5 ({reason}); is it truncated? "
                       f"Import it again") from None


def _not_found(path: Path) -> RunError:
    return RunError(path_not_found(
        f"dataset file {str(path)!r} (data.path in the recipe)", path, f"create it with `ctcore data import SOURCE "
        f"{path}` (SOURCE: cifar-10-python.tar.gz from `ctcore data download cifar10`, an image folder, zip or tar "
        "with one subfolder per class, or ImageNet 64x64 .npz batches), or point data.path at an existing file"
    ))


def hdf5_summary(path: str | Path) -> dict:
    """Count, per-image shape (C, H, W), whether labels exist, and attrs of a dataset file, validated from its
    metadata alone: no array is read, so any file, even one claiming 10^12 images, answers at once."""
    path = Path(path)
    if not path.is_file():
        raise _not_found(path)
    with open_hdf5(path) as f:
        return _check_structure(f, f"dataset file {str(path)!r}")


def dataset_bytes(info: dict) -> int:
    """Memory that a dataset needs once read: its uint8 images plus int64 labels."""
    c, h, w = info["shape"]
    return info["count"] * (c * h * w + (8 if info["has_labels"] else 0))


def require_fits(path: str | Path, info: dict, device: torch.device | str = "cpu") -> None:
    """Refuse, with the numbers, a dataset that cannot be held in host memory (and on `device`, for CUDA)."""
    c, h, w = info["shape"]
    what = (f"dataset file {str(path)!r} holds {info['count']:,} images of {c}x{h}x{w}"
            f"{' with labels' if info['has_labels'] else ''}")
    fix = "use a smaller file (fewer images, or `ctcore data import --resolution`) or a machine with more memory"
    need = dataset_bytes(info)
    require_memory(need, "cpu", what, fix)  # read into host memory first on every device
    if torch.device(device).type == "cuda":
        require_memory(need, device, what, fix)
    check_complete(path, info)


def check_complete(path: str | Path, info: dict) -> None:
    """Refuse a file whose `images` were never completely written (an interrupted writer, a file made to claim
    more than it holds): its unwritten chunks would read as black images, and a streaming reader such as
    `ctcore eval-ref-stats` would grind through billions of them. Reads the chunk index only."""
    import math

    with open_hdf5(path) as f:
        images = f["images"]
        if images.chunks:
            expected = math.prod(-(-n // c) for n, c in zip(images.shape, images.chunks, strict=True))
            written = images.id.get_num_chunks()
        else:
            expected, written = 1, int(images.id.get_storage_size() > 0)
    if written < expected:
        raise RunError(f"dataset file {str(path)!r} claims {info['count']:,} images but only {written:,} of its "
                       f"{expected:,} storage chunks were ever written (an interrupted or damaged file); import it "
                       f"again")


def read_hdf5_labels(path: str | Path, info: dict) -> np.ndarray | None:
    """The `labels` array of a validated file (`info` from hdf5_summary), in its stored integer type (numpy
    compares uint64 exactly); None without labels."""
    if not info["has_labels"]:
        return None
    with open_hdf5(path) as f:
        return f["labels"][...]


def read_hdf5_images(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None,
                                                                                  dict]:
    """Load `images` (N, C, H, W uint8), optional `labels` (int64) and attrs, after checking that they fit in
    memory (of `device` too, for CUDA); clear errors for every malformed file."""
    info = hdf5_summary(path)
    require_fits(path, info, device)
    with open_hdf5(path) as f:
        images = torch.from_numpy(f["images"][...])
    labels = read_hdf5_labels(path, info)
    return images, (torch.from_numpy(labels.astype("int64")) if labels is not None else None), info["attrs"]


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


def check_data_file(section, device: torch.device | str = "cpu") -> dict:
    """Everything a run needs of a recipe's HDF5 file, checked before any image is read: its structure, the
    declared shape, the classes, that it fits in memory (of `device` too), then the label range (labels only).

    `ctcore check` (host memory) and `ctcore run` (the training device) share it; returns the file's summary.
    """
    path = section.path
    where = f"dataset file {path!r}"
    info = hdf5_summary(path)
    if info["shape"] != data_shape(section):
        raise RunError(f"{where} holds images of shape {info['shape']}, but the recipe's [data] declares "
                       f"channels = {section.channels}, resolution = {section.resolution}; make them agree")
    if section.num_classes > 0 and not info["has_labels"]:
        raise RunError(f"data.num_classes is {section.num_classes} but {where} has no `labels` dataset")
    require_fits(path, info, device)
    if section.num_classes > 0:
        labels = read_hdf5_labels(path, info)
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= section.num_classes:
            raise RunError(f"{where} has labels in [{low}, {high}], outside 0..{section.num_classes - 1} "
                           f"(data.num_classes = {section.num_classes})")
    return info


def load_data(section, seed: int, device: torch.device) -> ImageData:
    """Build the training data described by a recipe's [data] section; an HDF5 file is checked against the
    recipe and the memory of `device` before any image is read."""
    if section.source == "synthetic":
        images, labels = synthetic_glyphs(section.num_images, section.resolution, seed=seed)
    else:
        check_data_file(section, device)
        images, labels, _ = read_hdf5_images(section.path, device)
    return ImageData(images, labels, random_flip=section.random_flip, num_classes=section.num_classes, device=device)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 pixels."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
