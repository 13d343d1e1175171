"""PNG pictures: image grids, and samples shown next to training data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch


def grid_array(images: torch.Tensor, ncol: int | None = None, pad: int = 1, scale: int = 1) -> torch.Tensor:
    """Tile uint8 images (N, C, H, W) into one (H', W', 3) uint8 array; small images are upscaled."""
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
