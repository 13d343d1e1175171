"""PNG pictures: image grids, and samples shown next to training data; and `read_image`, the one reader of the
image files a user gives ctcore (edit sources and masks, imported folders and archives)."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ctcore.errors import CtcoreError


def grid_array(images: torch.Tensor, ncol: int | None = None, pad: int = 1, scale: int = 1) -> torch.Tensor:
    """Tile uint8 images (N, C, H, W) into one (H', W', 3) uint8 array; small images are upscaled."""
    import torch

    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(n, 3, h, w)
    images = images[:, :3].cpu()
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = max(1, math.ceil(n / ncol))
    out = torch.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for k in range(n):
        r, col = divmod(k, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y : y + h, x : x + w] = images[k].permute(1, 2, 0)
    return out


def _auto_scale(h: int) -> int:
    return max(1, 64 // h) if h < 64 else 1


IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
"""Image files ctcore writes. Pillow registers more suffixes (.h5, .bufr, ...) whose formats it cannot write."""


MAX_IMAGE_PIXELS = 64_000_000
"""The most pixels ctcore decodes from one image file it is given. 64 megapixels decode to 192 MB as RGB (256 MB
as RGBA): room for a 61-megapixel camera's photo and 3.8x the largest image a ctcore model makes (4,096 x 4,096,
MAX_RESOLUTION of the command line and data.resolution), while a decompression bomb (a 20000 x 20000 PNG is a few
hundred KB on disk, 1.2 GB decoded) is refused from its header, before anything is decoded."""


READ_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
"""The formats read_image decodes (PPM: also .pgm and .pbm), whatever the file's suffix: Pillow would otherwise
pick any of its plugins by the content, EPS among them, which runs Ghostscript."""


def _pixels_text(width: int, height: int) -> str:
    return f"{width}x{height} pixels ({width * height / 1e6:.1f} megapixels)"


def _too_large(where: str, fix: str, size: tuple[int, int] | None, detail: str = "") -> str:
    bound = f"more than the {MAX_IMAGE_PIXELS // 1_000_000} megapixels ctcore reads from an image file"
    what = f"is {_pixels_text(*size)}, {bound}" if size is not None else f"is {bound} ({detail})"
    return f"{where} {what}; {fix}"


@contextlib.contextmanager
def _pillow_bomb_check_off() -> Iterator[None]:
    """Pillow's own decompression-bomb check off while a header is read: read_image checks the size itself, with
    its own bound, so that its message can name the size (Pillow's error does not)."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def _unreadable(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return f"not an image of a format ctcore reads: {', '.join(READ_FORMATS)}"
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def read_image(source: str | Path | bytes, where: str, error: type[CtcoreError], fix: str, *,
               mode: str | None = None, header_only: bool = False, reduce_to: int | None = None) -> Any:
    """Every image file a user gives ctcore is read here: a file, or its bytes (an archive's member), as a loaded
    PIL image (converted to `mode` when given); with `header_only` just its (width, height), nothing decoded.

    An image of more than MAX_IMAGE_PIXELS is refused from its header, before it is decoded; so is what Pillow
    refuses itself (DecompressionBombError, or its warning), and a file that is no image, truncated or corrupt:
    each one `error` naming the file (`where`, e.g. "--mask 'big.png'"), and its size when that is the problem,
    and ending in `fix` (which reads right for both).
    `reduce_to` (a short side in pixels) lets a JPEG decode at a reduced scale no smaller than that.
    """
    import warnings

    from PIL import Image

    from ctcore.errors import CtcoreError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _pillow_bomb_check_off():
                img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=READ_FORMATS)
            with img:  # closes the file; a loaded image stays usable
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise error(_too_large(where, fix, (width, height)))
                if header_only:
                    return width, height
                scale = reduce_to / min(width, height) if reduce_to is not None else 1.0
                if scale < 0.5:  # JPEG: decode at a reduced scale, never below the size it is resized to
                    img.draft("RGB", (max(reduce_to, round(width * scale)), max(reduce_to, round(height * scale))))
                img.load()
                return img.convert(mode) if mode is not None and img.mode != mode else img
    except CtcoreError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # a frame larger than the header
        raise error(_too_large(where, fix, None, str(exc).split(",")[0])) from None
    except Exception as exc:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, ...) for broken files
        raise error(f"{where} cannot be read as an image ({_unreadable(exc)}); {fix}") from None


def check_image_path(path: str | Path | None, option: str = "--grid") -> None:
    """Refuse, before any work, an image path that does not end in .png, .jpg (.jpeg) or .webp."""
    if path is None:
        return
    from ctcore.errors import UsageError

    if Path(path).suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"{option} {str(path)!r}: give an image file name ending in .png (or .jpg, .webp)")


def save_grid(images: torch.Tensor, path: str | Path, ncol: int | None = None,
              captions: Sequence[str] | None = None) -> Path:
    """Write uint8 images (N, C, H, W) as one PNG grid; `captions` (one per image, e.g. class labels) are
    written in black under each image."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = _auto_scale(images.shape[2])
    if captions is None:
        Image.fromarray(grid_array(images, ncol, scale=scale).numpy()).save(path)
        return path
    if len(captions) != len(images):
        raise ValueError(f"need one caption per image: {len(captions)} captions, {len(images)} images")
    n, _, h, w = images.shape
    h, w, pad, line = h * scale, w * scale, 1, _TEXT_HEIGHT + 2
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = max(1, math.ceil(n / ncol))
    canvas = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + line + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        r, col = divmod(k, ncol)
        x, y = pad + col * (w + pad), pad + r * (h + line + pad)
        canvas.paste(Image.fromarray(grid_array(images[k : k + 1], 1, pad=0, scale=scale).numpy()), (x, y))
        width = draw.textlength(captions[k])
        draw.text((x + max(0.0, (w - width) / 2), y + h + 1), captions[k], fill="black")
    canvas.save(path)
    return path


_TEXT_HEIGHT = 11
"""Pixel height of a line in Pillow's default font (a fixed bitmap font, or its builtin FreeType font at 10 px)."""


def save_rows(rows: Sequence[tuple[str, torch.Tensor]], path: str | Path, ncol: int = 8) -> Path:
    """One row of up to `ncol` uint8 images (N, C, H, W) per (caption, images) pair, each captioned at its left
    (e.g. one row per class, labelled with the class name)."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _, _, h, w = rows[0][1].shape
    scale = _auto_scale(h)
    row_h, row_w = h * scale + 2, ncol * (w * scale + 1) + 1  # as grid_array pads: 1 pixel around each image
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = int(max(draw.textlength(caption) for caption, _ in rows)) + 8
    canvas = Image.new("RGB", (margin + row_w, len(rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (caption, images) in enumerate(rows):
        y = r * row_h
        canvas.paste(Image.fromarray(grid_array(images[:ncol], ncol, scale=scale).numpy()), (margin, y))
        draw.text((4, y + max(0, (row_h - _TEXT_HEIGHT) // 2)), caption, fill="black")
    canvas.save(path)
    return path


def save_side_by_side(samples: torch.Tensor, data: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Samples (left) next to training data (right), captioned, as one PNG."""
    from PIL import Image, ImageDraw

    scale = _auto_scale(samples.shape[2])
    left, right = grid_array(samples, scale=scale), grid_array(data, scale=scale)
    gap, top = 12, 18
    h = max(left.shape[0], right.shape[0])
    canvas = Image.new("RGB", (left.shape[1] + gap + right.shape[1], h + top), "white")
    canvas.paste(Image.fromarray(left.numpy()), (0, top))
    canvas.paste(Image.fromarray(right.numpy()), (left.shape[1] + gap, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 3), f"samples ({title})" if title else "samples", fill="black")
    draw.text((left.shape[1] + gap + 2, 3), "data", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_line_plot(xs: list[float], ys: list[float], path: str | Path, title: str, xlabel: str = "step") -> Path:
    """A small PNG line chart (e.g. FID over training) drawn with Pillow; the y axis spans the data."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 480, 300, 56, 16, 28, 36
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black")
    if xs:
        lo_x, hi_x = min(xs), max(xs)
        lo_y, hi_y = min(ys), max(ys)
        span_x, span_y = (hi_x - lo_x) or 1.0, (hi_y - lo_y) or 1.0

        def at(x: float, y: float) -> tuple[float, float]:
            return x0 + (x - lo_x) / span_x * (x1 - x0), y0 - (y - lo_y) / span_y * (y0 - y1)

        points = [at(x, y) for x, y in zip(xs, ys, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=(40, 90, 200), width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(40, 90, 200))
        draw.text((4, y1 - 6), f"{hi_y:.3g}", fill="black")
        draw.text((4, y0 - 6), f"{lo_y:.3g}", fill="black")
        draw.text((x0, y0 + 6), f"{lo_x:g}", fill="black")
        draw.text((x1 - 40, y0 + 6), f"{hi_x:g}", fill="black")
    draw.text(((x0 + x1) // 2 - 12, height - 16), xlabel, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
"""Line colours of `save_curves`, one per run, repeating after ten."""


def save_curves(panels: list[tuple[str, list[list[tuple[float, float]]]]], names: list[str],
                path: str | Path, xlabel: str = "step") -> Path:
    """One PNG (or .jpg, .webp) of line charts drawn with Pillow: a panel per (title, one list of (x, y) points
    per run), two panels a row, under a legend naming each run in its colour. Non-finite points are left out."""
    from PIL import Image, ImageDraw

    panel_w, panel_h, left, right, top, bottom = 480, 300, 64, 16, 28, 36
    legend_h = 16 * len(names) + 12
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, math.ceil(len(panels) / cols))
    image = Image.new("RGB", (panel_w * cols, legend_h + panel_h * rows), "white")
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(names):
        colour = PALETTE[i % len(PALETTE)]
        y = 6 + 16 * i
        draw.rectangle([8, y + 3, 28, y + 7], fill=colour)
        draw.text((36, y), name, fill="black")
    for p, (title, series) in enumerate(panels):
        ox, oy = panel_w * (p % cols), legend_h + panel_h * (p // cols)
        x0, x1, y0, y1 = ox + left, ox + panel_w - right, oy + panel_h - bottom, oy + top
        draw.text((x0, oy + 8), title, fill="black")
        draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black")
        points = [[(x, y) for x, y in s if math.isfinite(x) and math.isfinite(y)] for s in series]
        every = [pt for s in points for pt in s]
        if every:
            lo_x, hi_x = min(x for x, _ in every), max(x for x, _ in every)
            lo_y, hi_y = min(y for _, y in every), max(y for _, y in every)
            span_x, span_y = (hi_x - lo_x) or 1.0, (hi_y - lo_y) or 1.0
            for i, s in enumerate(points):
                colour = PALETTE[i % len(PALETTE)]
                xy = [(x0 + (x - lo_x) / span_x * (x1 - x0), y0 - (y - lo_y) / span_y * (y0 - y1)) for x, y in s]
                if len(xy) > 1:
                    draw.line(xy, fill=colour, width=2)
                for px, py in xy:
                    draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
            draw.text((ox + 4, y1 - 6), f"{hi_y:.4g}", fill="black")
            draw.text((ox + 4, y0 - 6), f"{lo_y:.4g}", fill="black")
            draw.text((x0, y0 + 6), f"{lo_x:g}", fill="black")
            draw.text((x1 - 48, y0 + 6), f"{hi_x:g}", fill="black")
        draw.text(((x0 + x1) // 2 - 12, oy + panel_h - 16), xlabel, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
