"""PNG pictures: image grids, and samples shown next to training data; and `read_image`, the one reader of the
image files a user gives ctcore (edit sources and masks, imported folders and archives)."""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

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
              captions: Sequence[str] | None = None, column_captions: Sequence[str] | None = None) -> Path:
    """Write uint8 images (N, C, H, W) as one PNG grid; `captions` (one per image, e.g. class labels) are
    written in black under each image, `column_captions` (one per column, e.g. "source", "result") in a band
    above the grid, as the training grids caption "samples" and "data"."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = _auto_scale(images.shape[2])
    n, _, h, w = images.shape
    h, w, pad, line = h * scale, w * scale, 1, _TEXT_HEIGHT + 2
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = max(1, math.ceil(n / ncol))
    if captions is None:
        grid = Image.fromarray(grid_array(images, ncol, scale=scale).numpy())
    else:
        if len(captions) != len(images):
            raise ValueError(f"need one caption per image: {len(captions)} captions, {len(images)} images")
        grid = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + line + pad) + pad), "white")
        draw = ImageDraw.Draw(grid)
        for k in range(n):
            r, col = divmod(k, ncol)
            x, y = pad + col * (w + pad), pad + r * (h + line + pad)
            grid.paste(Image.fromarray(grid_array(images[k : k + 1], 1, pad=0, scale=scale).numpy()), (x, y))
            width = draw.textlength(captions[k])
            draw.text((x + max(0.0, (w - width) / 2), y + h + 1), captions[k], fill="black")
    if column_captions is not None:
        if len(column_captions) != ncol:
            raise ValueError(f"need one caption per column: {len(column_captions)} captions, {ncol} columns")
        canvas = Image.new("RGB", (grid.width, grid.height + CAPTION_BAND), "white")
        canvas.paste(grid, (0, CAPTION_BAND))
        draw = ImageDraw.Draw(canvas)
        for col, caption in enumerate(column_captions):
            width = draw.textlength(caption)
            draw.text((pad + col * (w + pad) + max(0.0, (w - width) / 2), 3), caption, fill="black")
        grid = canvas
    grid.save(path)
    return path


CAPTION_BAND = 18
"""Pixel height of the band above a grid that holds its captions ("samples" and "data" of the training grids,
the columns of an edit grid)."""


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
    gap, top = 12, CAPTION_BAND
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


PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
"""Line colours of `save_curves`, one per run, repeating after ten."""


# ---------------------------------------------------------------------------------------------------- charts

PANEL_SIZE = (480, 300)
"""Pixel width and height of one chart of `save_curves` (and of `save_line_plot`'s whole picture)."""
_MARGINS = (64, 16, 28, 36)
"""Left (the y tick labels), right, top (the title) and bottom (the x tick labels and the axis name) of a chart."""
_INSET = 6
"""Pixels between an axis line and the nearest data point, so that no point sits on an axis."""
MAX_TICKS = 8
"""The most ticks an axis gets: enough to read a value off, few enough that every label stays readable."""
_GRID = (225, 225, 225)


def _plottable(v: float, log: bool) -> bool:
    return math.isfinite(v) and (v > 0 or not log)


@attrs.frozen
class Mark:
    """A vertical dashed line at `x` across a chart, in `colour`, named in the chart's own legend."""

    x: float
    label: str
    colour: tuple[int, int, int]


@attrs.frozen
class Panel:
    """One chart of `save_curves`: a title, one list of (x, y) points per run (in PALETTE order, as the figure's
    legend names them), the scale and number format of each axis ("count": 500, 10k, 1.5M; "number": 0.5, 20,
    1e-3), whether every point gets a marker (a series of one point always does) and vertical marks."""

    title: str
    series: list[list[tuple[float, float]]]
    log_x: bool = False
    log_y: bool = False
    x_format: Literal["count", "number"] = "count"
    y_format: Literal["count", "number"] = "number"
    markers: bool = False
    marks: list[Mark] = attrs.Factory(list)


@attrs.frozen
class Axis:
    """The data range an axis spans (lo < hi, both positive on a log axis) and its (value, label) ticks."""

    lo: float
    hi: float
    log: bool
    ticks: list[tuple[float, str]]

    def fraction(self, v: float) -> float:
        """Where `v` lies between lo (0) and hi (1)."""
        if self.log:
            return (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        return (v - self.lo) / (self.hi - self.lo)


@attrs.frozen
class Layout:
    """What a chart draws: its axes (None when no point can be drawn) and each series' drawable points (finite,
    and positive on a log axis: the others are left out, so they cannot break the scale)."""

    x: Axis | None
    y: Axis | None
    series: list[list[tuple[float, float]]]


def plot_area(size: tuple[int, int] = PANEL_SIZE) -> tuple[int, int]:
    """Pixel width and height between a chart's first and last possible data points."""
    left, right, top, bottom = _MARGINS
    return size[0] - left - right - 2 * _INSET, size[1] - top - bottom - 2 * _INSET


@functools.cache
def _measure() -> Any:
    from PIL import Image, ImageDraw

    return ImageDraw.Draw(Image.new("RGB", (1, 1)))


def text_width(text: str) -> float:
    """Pixel width of `text` in Pillow's default font, as the charts and grids write it."""
    return _measure().textlength(text)


def _clean(v: float) -> float:
    """A tick value without the float noise of k * step (0.30000000000000004 -> 0.3)."""
    return float(f"{v:.12g}")


def tick_labels(values: Sequence[float], number_format: str) -> list[str]:
    """Labels of an axis's ticks, in one style per axis: counts as 500, 10k, 1.5M; numbers as 0.002, 20, 5000
    when all lie in [0.001, 10000), else as 2e-5, 1e6."""
    def scaled(v: float) -> str:
        for unit, size in (("M", 1e6), ("k", 1e3)):
            if abs(v) >= size:
                return f"{_clean(v / size):.12g}{unit}"
        return f"{v:g}"

    def exponent(v: float) -> str:
        if v == 0:
            return "0"
        e = math.floor(math.log10(abs(v)))
        m = float(f"{v / 10.0**e:.6g}")
        if abs(m) >= 10:
            m, e = m / 10, e + 1
        return f"{m:g}e{e}"

    if number_format == "count" and all(v == int(v) for v in values):
        return [scaled(v) for v in values]
    if all(v == 0 or 1e-3 <= abs(v) < 1e4 for v in values):
        return [f"{v:g}" for v in values]
    return [exponent(v) for v in values]


def _linear_candidates(lo: float, hi: float, integer: bool) -> list[list[float]]:
    """Tick sets at multiples of 5, 2, 1 x 10^e, coarse to fine (steps from about the span to a hundredth of it)."""
    top = math.floor(math.log10(hi - lo))
    found = []
    for e in range(top, top - 3, -1):
        for m in (5, 2, 1):
            step = m * 10.0**e
            if integer and step < 1:
                continue
            first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
            if last - first < 64:
                found.append([_clean(k * step) for k in range(first, last + 1)])
    return found


def _log_candidates(lo: float, hi: float) -> list[list[float]]:
    """Tick sets of a log axis, coarse to fine: every 5th, 3rd, 2nd decade, every decade, then 1, 2, 5 and 1 ... 9
    times each decade."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)

    def inside(v: float) -> bool:
        return lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)

    found = [[10.0**e for e in decades if e % every == 0 and inside(10.0**e)] for every in (5, 3, 2, 1)]
    for mantissas in ((1, 2, 5), range(1, 10)):
        found.append([v for e in decades for m in mantissas if inside(v := _clean(m * 10.0**e))])
    return found


def _readable(axis: Axis, labels: list[str], length: float, along_x: bool) -> bool:
    """Whether no two tick labels overlap: side by side (x) with 6 pixels between them, stacked (y) 3 pixels."""
    at = [axis.fraction(v) * length for v, _ in axis.ticks]
    if along_x:
        widths = [text_width(label) for label in labels]
        return all(b - a >= (wa + wb) / 2 + 6 for a, b, wa, wb in zip(at, at[1:], widths, widths[1:], strict=False))
    return all(b - a >= _TEXT_HEIGHT + 3 for a, b in zip(at, at[1:], strict=False))


def axis_for(lo: float, hi: float, log: bool, number_format: str, length: float, along_x: bool) -> Axis:
    """The axis spanning the data from lo to hi (a single value gets a range with it in the middle) with the most
    ticks, at most MAX_TICKS, whose labels do not overlap over `length` pixels; a log axis prefers decades (then 1,
    2, 5 and 1 ... 9 per decade) and takes evenly spaced ticks only when the range holds fewer than two of those."""
    signed = lo < 0
    if lo == hi:
        d = abs(lo) / 2 or 1.0
        lo, hi = (lo / 3, hi * 3) if log else (lo - d, hi + d)
    groups = [_log_candidates(lo, hi)] if log else []
    groups.append(_linear_candidates(lo, hi, number_format == "count"))
    for group in groups:
        chosen = None
        for values in group:  # coarse to fine: the finest readable one wins
            values = [v for v in values if signed or v >= 0]  # no tick at a negative step around step 0
            axis = Axis(lo, hi, log, [(v, "") for v in values])
            labels = tick_labels(values, number_format)
            if 2 <= len(values) <= MAX_TICKS and _readable(axis, labels, length, along_x):
                chosen = list(zip(values, labels, strict=True))
        if chosen is not None:
            return Axis(lo, hi, log, chosen)
    return Axis(lo, hi, log, list(zip([lo], tick_labels([lo], number_format), strict=True)))


def panel_layout(panel: Panel, size: tuple[int, int] = PANEL_SIZE) -> Layout:
    """The axes and drawable points of a chart: the x axis spans the points and the marks, the y axis the points."""
    series = [[(x, y) for x, y in s if _plottable(x, panel.log_x) and _plottable(y, panel.log_y)]
              for s in panel.series]
    ys = [y for s in series for _, y in s]
    xs = [x for s in series for x, _ in s] + [m.x for m in panel.marks if _plottable(m.x, panel.log_x)]
    if not ys:
        return Layout(None, None, series)
    width, height = plot_area(size)
    return Layout(axis_for(min(xs), max(xs), panel.log_x, panel.x_format, width, True),
                  axis_for(min(ys), max(ys), panel.log_y, panel.y_format, height, False), series)


def chart_pixel(layout: Layout, x: float, y: float, origin: tuple[int, int] = (0, 0),
                size: tuple[int, int] = PANEL_SIZE) -> tuple[float, float]:
    """Where the point (x, y) of a chart laid out as `layout` is drawn, for a chart whose corner is at `origin`."""
    assert layout.x is not None and layout.y is not None
    left, right, top, bottom = _MARGINS
    width, height = plot_area(size)
    return (origin[0] + left + _INSET + layout.x.fraction(x) * width,
            origin[1] + size[1] - bottom - _INSET - layout.y.fraction(y) * height)


def _dashed(draw: Any, x: float, top: float, bottom: float, colour: tuple[int, int, int]) -> None:
    y = top
    while y < bottom:
        draw.line([(x, y), (x, min(y + 5, bottom))], fill=colour, width=2)
        y += 9


def _draw_panel(draw: Any, panel: Panel, ox: int, oy: int, xlabel: str, size: tuple[int, int] = PANEL_SIZE) -> None:
    """One chart at (ox, oy): title, grid lines at the ticks, tick labels, lines (and markers), marks and their
    legend, the axes and the x axis's name."""
    left, right, top, bottom = _MARGINS
    x0, x1, y0, y1 = ox + left, ox + size[0] - right, oy + size[1] - bottom, oy + top
    draw.text((x0, oy + 8), panel.title, fill="black")
    layout = panel_layout(panel, size)
    if layout.x is None or layout.y is None:
        positive = " (finite and positive, on a log scale)" if panel.log_y else " (finite)"
        draw.text((x0 + 8, (y0 + y1) // 2), "no value to draw" + positive, fill="black")
    else:
        x_axis, y_axis = layout.x, layout.y

        def px(x: float) -> float:
            return chart_pixel(layout, x, y_axis.lo, (ox, oy), size)[0]

        def py(y: float) -> float:
            return chart_pixel(layout, x_axis.lo, y, (ox, oy), size)[1]

        for value, label in y_axis.ticks:
            y = py(value)
            draw.line([(x0 + 1, y), (x1, y)], fill=_GRID)
            draw.line([(x0 - 4, y), (x0, y)], fill="black")
            draw.text((x0 - 6 - text_width(label), y - _TEXT_HEIGHT / 2 - 1), label, fill="black")
        for value, label in x_axis.ticks:
            x = px(value)
            draw.line([(x, y1), (x, y0 - 1)], fill=_GRID)
            draw.line([(x, y0), (x, y0 + 4)], fill="black")
            draw.text((x - text_width(label) / 2, y0 + 6), label, fill="black")
        for mark in panel.marks:
            if _plottable(mark.x, panel.log_x):
                _dashed(draw, px(mark.x), y1, y0, mark.colour)
        for i, s in enumerate(layout.series):
            colour = PALETTE[i % len(PALETTE)]
            xy = [(px(x), py(y)) for x, y in s]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            if panel.markers or len(xy) == 1:
                for a, b in xy:
                    draw.ellipse([a - 3, b - 3, a + 3, b + 3], fill=colour)
        if panel.marks:
            width = max(text_width(m.label) for m in panel.marks)
            for i, mark in enumerate(panel.marks):
                lx, ly = x1 - 8 - width - 22, y1 + 4 + 14 * i
                draw.rectangle([lx - 2, ly - 1, x1 - 4, ly + 13], fill="white")
                draw.line([(lx, ly + 6), (lx + 16, ly + 6)], fill=mark.colour, width=2)
                draw.text((lx + 22, ly), mark.label, fill="black")
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black")
    draw.text(((x0 + x1) / 2 - text_width(xlabel) / 2, oy + size[1] - 16), xlabel, fill="black")


def save_line_plot(xs: list[float], ys: list[float], path: str | Path, title: str, xlabel: str = "step") -> Path:
    """A small PNG line chart (e.g. FID over training) drawn with Pillow, a marker at every point."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", PANEL_SIZE, "white")
    _draw_panel(ImageDraw.Draw(image), Panel(title, [list(zip(xs, ys, strict=True))], markers=True), 0, 0, xlabel)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def save_curves(panels: list[Panel], names: list[str], path: str | Path, xlabel: str = "step") -> Path:
    """One PNG (or .jpg, .webp) of line charts drawn with Pillow: a chart per Panel, two a row, under a legend
    naming each run in its colour."""
    from PIL import Image, ImageDraw

    panel_w, panel_h = PANEL_SIZE
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
    for p, panel in enumerate(panels):
        _draw_panel(draw, panel, panel_w * (p % cols), legend_h + panel_h * (p // cols), xlabel)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
