"""Zero-shot image editing with a consistency model (Song et al. 2023, Algorithm 4) and noise interpolation.

Editing works in the space of an orthogonal linear transform A: the components of A(reference) that the mask
Omega marks known (1) are kept, the others generated. Algorithm 4 (mask 1 = known here, as in the stores):
    y = A^-1[Omega * A y]                              the reference's known components alone
    x = f(y + sigma_1 z_1, sigma_1);  x = A^-1[Omega * A y + (1 - Omega) * A x]
    for n = 2..N:  x = f(x + sqrt(sigma_n^2 - sigma_min^2) z_n, sigma_n);  x = A^-1[Omega * A y + (1 - Omega) * A x]
As in the paper's reference code, every f(.) output is clamped to [-1, 1] before its known components are put
back. The result is then brought into [-1, 1] without changing its known components (`Transform.fit`), so the
guarantees hold in uint8: inpainting keeps the known pixels exactly, super-resolution every FxF patch mean and
colorization every pixel's luminance within one grey level.

Write your own task as a `Transform`: an orthogonal `forward` (B, C, H, W) -> components of the same shape, its
`inverse` (the transpose) and a `mask` broadcastable to the components; `check_orthogonal` tests it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ctcore.checkpoints import EARLIER_CHECKPOINT
from ctcore.data import to_uint8
from ctcore.sampling import Denoiser, NonFiniteOutputs, finite_outputs, multistep_sample, sample_noise

LUMINANCE = (0.2989, 0.5870, 0.1140)
"""ITU-R 601 luma weights of R, G, B, as the CM paper's colorization uses them."""

EDIT_GRID_POINTS = 40
EDIT_LEVELS = (0, 10, 20, 30)
"""The default editing schedule: sigma_max (level 0), then levels 10, 20 and 30 of the 40-point Karras grid
counted from sigma_max (16.78, 2.240 and 0.1312 for sigma 0.002..80, rho 7): four steps, so that what is
generated settles around what is kept."""

STROKE_LEVELS = (20, 30)
"""Stroke editing (SDEdit) starts at level 20 (2.240 for sigma 0.002..80) and takes one more step at level 30."""

MASK_KINDS = ("box", "half", "random-pixels", "strokes")
MASK_SEED_OFFSET = 2**63
"""A random mask of sample j is drawn from seed_j + 2^63, so it is not the stream its noise comes from."""


def _clamp(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-1.0, 1.0)


@dataclass(frozen=True)
class Transform:
    """An orthogonal linear map A of images (B, C, H, W) to components of the same shape, its inverse A^T, and
    which components edit() keeps from the reference (`mask` 1, broadcastable to the components).

    `fit` brings a result into [-1, 1] without changing its known components (the default clamp is exact when
    the known components are pixels); `anchor`, when given, is the in-range image made of a reference's known
    components alone (what the grid shows as degraded)."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]
    mask: torch.Tensor
    fit: Callable[[torch.Tensor], torch.Tensor] = _clamp
    anchor: Callable[[torch.Tensor], torch.Tensor] | None = None

    def known_only(self, reference: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """A^-1[Omega * A y]: the reference with its unknown components set to 0 (Algorithm 4, line 2)."""
        m = (self.mask if mask is None else mask).to(reference.device) > 0.5
        return self.inverse(torch.where(m, self.forward(reference), torch.zeros((), device=reference.device)))

    def replace(self, x: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """A^-1[Omega * A y + (1 - Omega) * A x]: x with the reference's known components put back."""
        m = (self.mask if mask is None else mask).to(x.device) > 0.5
        return self.inverse(torch.where(m, self.forward(reference), self.forward(x)))

    def degraded(self, reference: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """What edit() knows of the reference, as a picture in [-1, 1]."""
        return self.anchor(reference) if self.anchor is not None else _clamp(self.known_only(reference, mask))


def _pull(x: torch.Tensor, anchor: torch.Tensor, group_min: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """anchor + t (x - anchor) with the largest t in [0, 1], one per group, that keeps the group in [-1, 1].

    x and anchor share their known components, so every point of the segment has them too."""
    anchor = anchor.clamp(-1.0, 1.0)
    d = x - anchor
    inf = torch.full_like(d, math.inf)
    t = torch.where(d > 0, (1.0 - anchor) / d, torch.where(d < 0, (-1.0 - anchor) / d, inf))
    t = group_min(t.clamp(0.0, 1.0))
    return (anchor + t * d).clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------------- inpainting


def inpaint(mask: torch.Tensor) -> Transform:
    """Inpainting: A is the identity and the mask (N or 1, 1, H, W) marks the known pixels (1)."""
    return Transform("inpaint", forward=lambda x: x, inverse=lambda y: y, mask=mask.float())


# ------------------------------------------------------------------------------------------ colorization


def luminance_matrix() -> torch.Tensor:
    """The orthogonal 3x3 matrix (float64) whose first row is the normalised luminance direction."""
    w = torch.tensor(LUMINANCE, dtype=torch.float64)
    basis = torch.eye(3, dtype=torch.float64)
    basis[:, 0] = w / w.norm()
    q, _ = torch.linalg.qr(basis)  # q[:, 0] = +-w / |w|; the other columns complete an orthonormal basis
    if q[:, 0].sum() < 0:
        q = -q
    return q.T.contiguous()


def colorize() -> Transform:
    """Colorization: per pixel, component 0 is the luminance direction (kept), 1 and 2 the colour (generated).

    The result is brought into [-1, 1] by moving each out-of-range pixel toward the grey of its luminance."""
    t64 = luminance_matrix()
    t = t64.float()
    w = torch.tensor(LUMINANCE, dtype=torch.float64)
    grey_per_component = float(w.norm() / w.sum())  # grey g has component 0 equal to g * sum(w) / |w|

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("dc,bchw->bdhw", t.to(x.device), x)

    def inverse(y: torch.Tensor) -> torch.Tensor:
        return torch.einsum("dc,bdhw->bchw", t.to(y.device), y)

    def anchor(x: torch.Tensor) -> torch.Tensor:
        grey = forward(x)[:, :1] * grey_per_component
        return grey.expand(-1, 3, -1, -1)

    def fit(x: torch.Tensor) -> torch.Tensor:
        return _pull(x, anchor(x), lambda t_: t_.amin(dim=1, keepdim=True))

    mask = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    return Transform("colorize", forward, inverse, mask, fit=fit, anchor=anchor)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """Luminance 0.2989 R + 0.5870 G + 0.1140 B of images (N, 3, H, W), in their own units (float64)."""
    w = torch.tensor(LUMINANCE, dtype=torch.float64).reshape(1, 3, 1, 1)
    return (images.double() * w).sum(dim=1)


# ------------------------------------------------------------------------------------- super-resolution


def patch_matrix(factor: int) -> torch.Tensor:
    """The orthogonal F^2 x F^2 matrix (float64) whose first row is the patch mean direction (all 1/F)."""
    n = factor * factor
    basis = torch.eye(n, dtype=torch.float64)
    basis[:, 0] = 1.0 / factor
    q, _ = torch.linalg.qr(basis)
    if q[:, 0].sum() < 0:
        q = -q
    return q.T.contiguous()


def superres(factor: int, resolution: int) -> Transform:
    """Super-resolution by `factor`: per FxF patch of each channel, component 0 is the patch mean direction
    (kept, at the patch's top-left position), the other F^2 - 1 are generated. F must divide the resolution.

    The result is brought into [-1, 1] by moving each out-of-range patch toward its mean."""
    if factor < 1 or resolution % factor:
        raise ValueError(f"the factor {factor} does not divide the resolution {resolution}")
    f = factor
    t = patch_matrix(f).float()

    def to_patches(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, c, h // f, f, w // f, f).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // f, w // f, f * f)

    def from_patches(p: torch.Tensor) -> torch.Tensor:
        b, c, hp, wp, _ = p.shape
        return p.reshape(b, c, hp, wp, f, f).permute(0, 1, 2, 4, 3, 5).reshape(b, c, hp * f, wp * f)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return from_patches(to_patches(x) @ t.to(x.device).T)

    def inverse(y: torch.Tensor) -> torch.Tensor:
        return from_patches(to_patches(y) @ t.to(y.device))

    def per_patch(values: torch.Tensor, reduce: str) -> torch.Tensor:
        p = to_patches(values)
        r = p.mean(dim=-1, keepdim=True) if reduce == "mean" else p.amin(dim=-1, keepdim=True)
        return from_patches(r.expand_as(p))

    def anchor(x: torch.Tensor) -> torch.Tensor:
        return per_patch(x, "mean")

    def fit(x: torch.Tensor) -> torch.Tensor:
        return _pull(x, anchor(x), lambda t_: per_patch(t_, "min"))

    mask = torch.zeros(1, 1, resolution, resolution)
    mask[..., ::f, ::f] = 1.0
    return Transform("superres", forward, inverse, mask, fit=fit, anchor=anchor)


def patch_means(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The mean of every FxF patch of every channel (float64), for checking super-resolution results."""
    n, c, h, w = images.shape
    return images.double().reshape(n, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))


# ------------------------------------------------------------------------------------------------- checks


def transform_matrix(transform: Transform, shape: Sequence[int]) -> torch.Tensor:
    """The dense matrix of `transform.forward` on images of `shape` (C, H, W), one row per component."""
    n = math.prod(shape)
    basis = torch.eye(n).reshape(n, *shape)
    return transform.forward(basis).reshape(n, n).T


def check_orthogonal(transform: Transform, shape: Sequence[int], atol: float = 1e-5) -> None:
    """Raise ValueError unless forward is orthogonal (A A^T = I) and inverse is its transpose, on `shape`."""
    a = transform_matrix(transform, shape)
    n = a.shape[0]
    error = float((a @ a.T - torch.eye(n)).abs().max())
    if error > atol:
        raise ValueError(f"transform {transform.name!r} is not orthogonal: max |A A^T - I| = {error:.3g}")
    basis = torch.eye(n).reshape(n, *shape)
    back = float((transform.inverse(transform.forward(basis)) - basis).abs().max())
    if back > atol:
        raise ValueError(f"transform {transform.name!r}: inverse(forward(x)) differs from x by {back:.3g}")


# -------------------------------------------------------------------------------------------------- edit


@torch.no_grad()
def edit(
    denoiser: Denoiser,
    reference: torch.Tensor,
    transform: Transform,
    mask: torch.Tensor | None,
    sigmas: Sequence[float],
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    sigma_min: float = 0.002,
    clip: bool = True,
) -> torch.Tensor:
    """Algorithm 4: edit references (B, C, H, W) in [-1, 1], keeping the components `mask` marks (1; None: the
    transform's mask); returns results in [-1, 1] whose known components are the reference's.

    The noise is (len(sigmas), B, C, H, W) standard normals drawn from `generator`, or `noise` as given (the CLI
    passes each sample's seeded draws, as `ctcore sample` makes them). The first step noises `init` (default:
    the reference's known components alone, line 2; stroke editing passes the whole painting). A non-finite network
    output raises NonFiniteOutputs."""
    if noise is None:
        noise = torch.randn((len(sigmas), *reference.shape), generator=generator).to(reference.device)
    mask = transform.mask if mask is None else mask
    start = transform.known_only(reference, mask) if init is None else init
    x = multistep_sample(finite_outputs(denoiser), noise, sigmas, labels, sigma_min=sigma_min, clip=clip,
                         start=start, project=lambda x: transform.replace(x, reference, mask))
    return transform.fit(x)


def edit_images(
    denoiser: Denoiser,
    references: torch.Tensor,
    transform: Transform,
    masks: torch.Tensor | None,
    sigmas: Sequence[float],
    seeds: Sequence[int],
    *,
    num_classes: int = 0,
    labels: torch.Tensor | None = None,
    from_reference: bool = False,
    sigma_min: float = 0.002,
    clip: bool = True,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit uint8 references (N, C, H, W) batch by batch, sample j with the noise of seeds[j] exactly as `ctcore
    sample` draws it; uint8 results (N, C, H, W) and the labels used (N,; -1 if unconditional): `labels`, or for
    a conditional model without them the label drawn from each seed. `from_reference`: SDEdit, the first step
    noises the whole reference (stroke editing) instead of its known components. `progress(n)` is called after
    each batch of n images."""
    shape = tuple(references.shape[1:])
    out, used = [], []
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start : start + batch_size])
        draws = [sample_noise(s, shape, len(sigmas), num_classes) for s in chunk]
        z = torch.stack([d[0] for d in draws], dim=1).to(device)
        lab = torch.tensor([d[1] for d in draws], dtype=torch.long)
        if labels is not None:
            lab = labels[start : start + len(chunk)].long()
        ref = references[start : start + len(chunk)].to(device).float().div(127.5).sub(1.0)
        mask = None if masks is None else masks[start : start + len(chunk)].to(device).float()
        try:
            x = edit(denoiser, ref, transform, mask, sigmas, noise=z, labels=lab.to(device) if num_classes else None,
                     init=ref if from_reference else None, sigma_min=sigma_min, clip=clip)
        except NonFiniteOutputs as failure:
            raise failure.with_seeds(chunk) from None
        out.append(to_uint8(x).cpu())
        used.append(lab)
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out), torch.cat(used)


def make_masks(kind: str, seeds: Sequence[int], resolution: int) -> torch.Tensor:
    """uint8 masks (N, 1, R, R), 1 = known: `box` hides a centred square of half the side, `half` the right
    half, `random-pixels` each pixel with probability 1/2 and `strokes` three brush strokes, drawn per sample
    from seed_j + 2^63."""
    r = resolution
    masks = torch.ones((len(seeds), 1, r, r), dtype=torch.uint8)
    if kind == "box":
        lo, hi = r // 4, r - r // 4
        masks[..., lo:hi, lo:hi] = 0
    elif kind == "half":
        masks[..., r // 2 :] = 0
    elif kind in ("random-pixels", "strokes"):
        for j, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed) + MASK_SEED_OFFSET)
            if kind == "random-pixels":
                masks[j, 0] = (torch.rand((r, r), generator=g) < 0.5).to(torch.uint8)
            else:
                masks[j, 0] = _strokes(r, g)
    else:
        raise ValueError(f"unknown mask kind {kind!r}: use one of {', '.join(MASK_KINDS)}")
    return masks


def _strokes(r: int, g: torch.Generator) -> torch.Tensor:
    """1 everywhere but three thick random line strokes (0)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (r, r), 1)
    draw = ImageDraw.Draw(canvas)
    for _ in range(3):
        a, b, c, d = (torch.rand(4, generator=g) * (r - 1)).tolist()
        draw.line([(a, b), (c, d)], fill=0, width=max(1, r // 6))
    import numpy as np

    return torch.from_numpy(np.asarray(canvas, dtype=np.uint8).copy())


# ------------------------------------------------------------------------------------------ interpolation


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation of two noise draws: z0 at alpha 0 and z1 at alpha 1, exactly."""
    if alpha == 0.0:
        return z0.clone()
    if alpha == 1.0:
        return z1.clone()
    a, b = z0.double().flatten(), z1.double().flatten()
    cos = float((a @ b) / (a.norm() * b.norm()))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    if theta < 1e-8:
        return ((1 - alpha) * z0.double() + alpha * z1.double()).to(z0.dtype)
    w0, w1 = math.sin((1 - alpha) * theta) / math.sin(theta), math.sin(alpha * theta) / math.sin(theta)
    return (w0 * z0.double() + w1 * z1.double()).to(z0.dtype)


def interpolation_noise(seed_a: int, seed_b: int, num: int, shape: Sequence[int], num_steps: int,
                        num_classes: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Noise (num_steps, num, C, H, W) from seed A's draws to seed B's, each step's draw interpolated
    spherically; labels (num,): seed A's drawn label up to alpha 1/2, B's after (-1 if unconditional); alphas."""
    za, la = sample_noise(seed_a, shape, num_steps, num_classes)
    zb, lb = sample_noise(seed_b, shape, num_steps, num_classes)
    alphas = [k / (num - 1) for k in range(num)] if num > 1 else [0.0]
    z = torch.stack([torch.stack([slerp(za[s], zb[s], a) for a in alphas]) for s in range(num_steps)])
    labels = torch.tensor([la if a <= 0.5 else lb for a in alphas], dtype=torch.long)
    return z, labels, alphas


def karras_levels(sigma_min: float, sigma_max: float, rho: float, levels: Sequence[int]) -> list[float]:
    """The given levels of the EDIT_GRID_POINTS-point Karras grid, counted from sigma_max (level 0)."""
    from ctcore.consistency import karras_sigmas

    grid = karras_sigmas(EDIT_GRID_POINTS, sigma_min, sigma_max, rho).flip(0)
    return [float(grid[i]) for i in levels]


# ------------------------------------------------------------------------------------- `ctcore edit`

TASKS = ("inpaint", "colorize", "superres", "stroke", "interpolate")
GRID_COLUMNS: dict[str, tuple[str, str, str]] = {
    "inpaint": ("source", "masked", "result"), "colorize": ("source", "grayscale", "result"),
    "superres": ("source", "low-res", "result"), "stroke": ("painting", "input", "result")}
"""The column captions of an edit grid: the reference, what the model is given of it, the result (interpolate:
each column's alpha)."""
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_SOURCE_COUNT = 64


MAX_EDIT_IMAGES = 1_000_000
"""The most references one `ctcore edit` takes (--indices, or the image files of a --images folder): they are
listed and read before the memory check of the edit, and editing is evaluated on 50,000 images (FID); a larger
count is a typo such as --indices 0:999999999999, refused before any list is made."""


def _too_many_images(what: str) -> str:
    return (f"{what}; ctcore edit takes at most {MAX_EDIT_IMAGES:,} images at once (all are read into memory before "
            "it starts): edit them in parts")


def parse_indices(text: str | None, count: int, where: str) -> list[int]:
    """--indices: `START:STOP` (Python slice, STOP may be omitted) or `i,j,k`; default the first 64 images. The
    range and the number picked (at most MAX_EDIT_IMAGES) are checked before the list is made."""
    from ctcore.errors import UsageError

    if text is None:
        return list(range(min(count, DEFAULT_SOURCE_COUNT)))
    outside = UsageError(f"--indices {text}: {where} holds {count:,} images, so an index lies in 0..{count - 1}")
    try:
        if ":" in text:
            lo, _, hi = text.partition(":")
            start, stop = int(lo or 0), int(hi) if hi.strip() else count
            if not 0 <= start < stop <= count:
                raise outside
            if stop - start > MAX_EDIT_IMAGES:
                raise UsageError(_too_many_images(f"--indices {text} picks {stop - start:,} images"))
            return list(range(start, stop))
        if text.count(",") >= MAX_EDIT_IMAGES:
            raise UsageError(_too_many_images(f"--indices picks {text.count(',') + 1:,} images"))
        picked = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f'--indices must be START:STOP or comma-separated numbers like "0:64" or "3,5,8", '
                         f"got {text!r}") from None
    if any(not 0 <= i < count for i in picked):
        raise outside
    return picked


def _fit_image(img, resolution: int, where: str):
    """A PIL image resized (short side) and center-cropped to resolution x resolution; never enlarged."""
    from ctcore.errors import UsageError
    from ctcore.importers import _fit

    w, h = img.size
    if min(w, h) < resolution:
        raise UsageError(f"{where} is {w}x{h} pixels, smaller than the model's {resolution}x{resolution} images: "
                         f"give images at least {resolution} pixels on their short side")
    return _fit(img, resolution)


def read_source(source: str | Path, shape: Sequence[int], indices: str | None = None) -> tuple[
        torch.Tensor, torch.Tensor | None, list[str]]:
    """References for editing: uint8 (N, C, H, W) fitted to `shape`, labels (N,) or None, and a name for each:
    a ctcore HDF5 dataset (--indices), a PNG (or .jpg, .webp) or a folder of them (sorted by name)."""
    import numpy as np
    from PIL import Image

    from ctcore.data import check_complete, hdf5_summary, open_hdf5
    from ctcore.errors import UsageError
    from ctcore.images import MAX_IMAGE_PIXELS, read_image

    c, r = shape[0], shape[1]
    source = Path(source)
    where = f"--images {str(source)!r}"
    if not source.exists():
        from ctcore.errors import path_not_found

        raise UsageError(path_not_found(where, source, "give a ctcore HDF5 dataset, an image file or a folder of "
                                        "images"))
    mode = {1: "L", 3: "RGB"}.get(c)
    if source.suffix.lower() in (".h5", ".hdf5"):
        info = hdf5_summary(source)
        if info["shape"][0] != c:
            raise UsageError(f"{where} holds {info['shape'][0]}-channel images but the model makes {c}-channel "
                             f"ones: give images with {c} channels")
        picked = parse_indices(indices, info["count"], where)
        check_complete(source, info)  # unwritten chunks would read as black images
        with open_hdf5(source) as f:
            order = sorted(set(picked))
            stored = f["images"][order]
            rows = {i: k for k, i in enumerate(order)}
            images = np.stack([stored[rows[i]] for i in picked])
            labels = None
            if info["has_labels"]:
                stored_labels = f["labels"][order]
                labels = torch.tensor([int(stored_labels[rows[i]]) for i in picked], dtype=torch.long)
        if images.shape[2:] != (r, r):
            if mode is None:
                raise UsageError(f"{where} holds {c}-channel images of {images.shape[2]}x{images.shape[3]} pixels; "
                                 f"only 1- or 3-channel images can be resized to the model's {r}x{r}")
            fitted = [_fit_image(Image.fromarray(im.transpose(1, 2, 0).squeeze(-1) if c == 1 else
                                                 im.transpose(1, 2, 0)), r, f"{where} image {i}")
                      for i, im in zip(picked, images, strict=True)]
            images = np.stack([np.asarray(im).reshape(r, r, c).transpose(2, 0, 1) for im in fitted])
        return torch.from_numpy(np.ascontiguousarray(images)), labels, [f"{source.name}[{i}]" for i in picked]
    if indices is not None:
        raise UsageError(f"--indices selects images of an HDF5 dataset; {where} is not one: drop --indices")
    if mode is None:
        raise UsageError(f"{where}: the model makes {c}-channel images, which no image file holds: give an HDF5 "
                         "dataset with them")
    files = [source]
    if source.is_dir():
        files = []
        for path in source.iterdir():  # counted as they are listed: a folder of millions is refused early
            if path.suffix.lower() in IMAGE_FILES:
                files.append(path)
                if len(files) > MAX_EDIT_IMAGES:
                    raise UsageError(_too_many_images(f"{where} holds more than {MAX_EDIT_IMAGES:,} image files"))
        files.sort()
    if not files:
        raise UsageError(f"{where} holds no image files (.png, .jpg, .webp)")
    out = []
    for path in files:
        img = read_image(path, f"--images {str(path)!r}", UsageError, "give a PNG, JPEG or WebP image of at most "
                         f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels", mode=mode)
        out.append(np.asarray(_fit_image(img, r, f"--images {str(path)!r}")).reshape(r, r, c).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)), None, [p.name for p in files]


def read_mask(path: str | Path, resolution: int) -> torch.Tensor:
    """A mask PNG (white = keep) as uint8 (1, 1, R, R), 1 = known; its size must be the model's resolution."""
    import numpy as np

    from ctcore.errors import UsageError, path_not_found
    from ctcore.images import read_image

    if not Path(path).exists():
        raise UsageError(path_not_found(f"--mask {str(path)!r}", path, f"give an image of {resolution}x{resolution} "
                                        "pixels (white = keep), or a generated mask with --mask-kind"))
    grey = read_image(path, f"--mask {str(path)!r}", UsageError, f"give a PNG mask of the model's {resolution}x"
                      f"{resolution} pixels (white = keep)", mode="L")
    if grey.size != (resolution, resolution):
        raise UsageError(f"--mask {str(path)!r} is {grey.size[0]}x{grey.size[1]} pixels but the model's images are "
                         f"{resolution}x{resolution}: give a mask of that size (white = keep)")
    return torch.from_numpy((np.asarray(grey) >= 128).astype(np.uint8))[None, None]


def edit_inputs(checkpoint: str | Path, images: str | Path | None, mask: str | Path | None) -> list[tuple[str, Path]]:
    """The files `ctcore edit` reads, as (option, path): the checkpoint (a run directory's checkpoints), the SOURCE
    (a folder's image files) and the mask."""
    from ctcore.sampling import checkpoint_inputs

    found = checkpoint_inputs(checkpoint)
    if images is not None:
        source = Path(images)
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_FILES) if source.is_dir() else [source]
        found += [("--images", p) for p in files]
    return found + ([("--mask", Path(mask))] if mask is not None else [])


_FOREIGN = ("is not a ctcore checkpoint", "which is not installed or is disabled")
"""RunErrors of a checkpoint that is not of a model ctcore can edit with (a diffusion model's file, a network
whose plugin is missing): `ctcore edit` reports them as usage errors, exit 2."""


def edit_from_checkpoint(
    task: str,
    checkpoint: str | Path,
    registry,
    *,
    out: str | Path,
    grid: str | Path | None = None,
    images: str | Path | None = None,
    indices: str | None = None,
    mask: str | Path | None = None,
    mask_kind: str | None = None,
    factor: int | None = None,
    start_sigma: float | None = None,
    seeds: tuple[int, int] | None = None,
    num: int = 8,
    sigmas: Sequence[float] | None = None,
    seed: int | None = None,
    labels: Sequence[int] | None = None,
    weights: str = "eval-ema",
    batch_size: int = 256,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = False,
) -> dict[str, object]:
    """`ctcore edit`: check every input, edit (or interpolate) on `device` (default: the recipe's run.device),
    then write the store atomically under its lock and a grid (reference | degraded | result per row; interpolate:
    one row); `progress` counts the images on stderr. Bad input raises UsageError, nothing written."""
    from ctcore.errors import RunError, UsageError
    from ctcore.files import output_lock, refuse_writing_inputs
    from ctcore.images import save_grid
    from ctcore.sampling import (
        choose_labels,
        file_digest,
        images_from_noise,
        load_sampling_network,
        load_sampling_plan,
        nonfinite_error,
        recipe_model_function,
        require_consistency_model,
        write_sample_store,
    )

    if task not in TASKS:
        from ctcore.errors import unknown_name_message

        raise UsageError(unknown_name_message("task", task, TASKS))
    out = Path(out)
    grid = Path(grid) if grid is not None else out.with_suffix(".png")
    given = {"--images": images, "--indices": indices, "--mask": mask, "--mask-kind": mask_kind,
             "--factor": factor, "--start-sigma": start_sigma, "--seeds": seeds, "--seed": seed}
    allowed = {"inpaint": {"--images", "--indices", "--mask", "--mask-kind", "--seed"},
               "colorize": {"--images", "--indices", "--seed"}, "superres": {"--images", "--indices", "--factor",
                                                                             "--seed"},
               "stroke": {"--images", "--indices", "--start-sigma", "--seed"}, "interpolate": {"--seeds"}}[task]
    extra = next((k for k, v in given.items() if v is not None and k not in allowed), None)
    if extra is not None:
        raise UsageError(f"{extra} is not an option of `ctcore edit {task}` (it takes {', '.join(sorted(allowed))}): "
                         f"drop {extra}")
    if task == "interpolate" and seeds is None:
        raise UsageError('`ctcore edit interpolate` needs --seeds A,B, e.g. --seeds 0,1')
    if task != "interpolate" and images is None:
        raise UsageError(f"`ctcore edit {task}` needs --images SOURCE: a ctcore HDF5 dataset, an image file or a "
                         "folder of images")
    if task == "inpaint" and (mask is None) == (mask_kind is None):
        raise UsageError("`ctcore edit inpaint` needs one of --mask MASK.png (white = keep) or --mask-kind "
                         f"{'|'.join(MASK_KINDS)}")
    if task == "superres" and factor is None:
        raise UsageError("`ctcore edit superres` needs --factor F (F x F patches keep their mean)")
    if task == "stroke" and start_sigma is not None and sigmas is not None:
        raise UsageError("--start-sigma and --sigmas both set the schedule of stroke editing: give one of them")
    refuse_writing_inputs([("-o", out), ("--grid", grid)], edit_inputs(checkpoint, images, mask))
    if out.exists() and not overwrite:
        raise UsageError(f"{str(out)!r} exists; pass --overwrite to replace it, or choose -o")

    explicit_sigmas = sigmas is not None
    try:
        checkpoint, state, recipe, sigmas, sampler = load_sampling_plan(checkpoint, registry, sigmas=sigmas,
                                                                        weights=weights)
    except RunError as exc:
        if _FOREIGN[0] in exc.message:
            defect = exc.message.removesuffix(f"; {EARLIER_CHECKPOINT}")
            raise UsageError(f"{defect}; ctcore edit needs a consistency model trained by ctcore run") from None
        if _FOREIGN[1] in exc.message:
            raise UsageError(exc.message) from None
        raise
    require_consistency_model(recipe, registry, checkpoint, "ctcore edit")
    prov = state["provenance"]
    shape, num_classes, c = tuple(prov["data_shape"]), prov["num_classes"], recipe.consistency
    if task == "stroke":
        if start_sigma is not None:
            if not c.sigma_min < start_sigma <= c.sigma_max:
                raise UsageError(f"--start-sigma must lie in (sigma_min, sigma_max] = ({c.sigma_min}, "
                                 f"{c.sigma_max}], got {start_sigma}")
            below = [s for s in karras_levels(c.sigma_min, c.sigma_max, c.rho, EDIT_LEVELS) if s < start_sigma]
            sigmas = [float(start_sigma), *below]
        elif not explicit_sigmas:
            sigmas = karras_levels(c.sigma_min, c.sigma_max, c.rho, STROKE_LEVELS)
    elif task != "interpolate" and not explicit_sigmas:
        sigmas = karras_levels(c.sigma_min, c.sigma_max, c.rho, EDIT_LEVELS)
    class_labels, _ = choose_labels(checkpoint, num_classes, labels, False)
    seed = recipe.sampling.seed if seed is None else seed
    r = shape[1]

    inputs = source_labels = masks = None
    if task == "interpolate":
        z, drawn, alphas = interpolation_noise(seeds[0], seeds[1], num, shape, sampler.noise_draws(sigmas),
                                               num_classes)
        lab = drawn if class_labels is None else torch.tensor([class_labels[j % len(class_labels)]
                                                               for j in range(num)], dtype=torch.long)
    else:
        inputs, source_labels, _ = read_source(images, shape, indices)
        n = len(inputs)
        if task == "colorize" and shape[0] != 3:
            raise UsageError(f"colorize needs a model of RGB images; checkpoint {str(checkpoint)!r} makes "
                             f"{shape[0]}-channel images")
        if task == "superres" and (factor < 1 or r % factor):
            divisors = ", ".join(str(d) for d in range(2, r + 1) if r % d == 0)
            raise UsageError(f"--factor {factor} does not divide the model's resolution {r}: use one of {divisors}")
        if task == "inpaint":
            masks = read_mask(mask, r).expand(n, 1, r, r).clone() if mask is not None else None
        if class_labels is not None:
            lab = torch.tensor([class_labels[j % len(class_labels)] for j in range(n)], dtype=torch.long)
        elif num_classes and source_labels is not None:
            bad = next((v for v in source_labels.tolist() if not 0 <= v < num_classes), None)
            if bad is not None:
                raise UsageError(f"--images {str(images)!r} has label {bad}, outside the model's classes "
                                 f"0..{num_classes - 1}; choose labels with --labels")
            lab = source_labels
        else:
            lab = None

    from ctcore.devices import resolve_device
    from ctcore.preflight import require_buffers, sample_buffers

    count = num if task == "interpolate" else len(inputs)
    parts = sample_buffers(count, shape, len(sigmas), batch_size)
    parts["host_inputs_and_masks"] = 0 if inputs is None else count * (math.prod(shape) + r * r) * 3
    require_buffers(parts, resolve_device(device or recipe.run.device), f"editing {count:,} images",
                    "choose fewer images (--indices, --num), or a smaller --batch-size")
    network, dev = load_sampling_network(checkpoint, state, recipe, registry, weights=weights, device=device)
    denoiser = recipe_model_function(recipe, registry, network)  # the objective's f, as sample and eval use it

    attrs: dict[str, object] = {"task": task, "checkpoint": str(checkpoint),
                                "checkpoint_sha256": file_digest(checkpoint), "step": int(state["step"]),
                                "sigmas": [float(s) for s in sigmas], "weights": weights,
                                "recipe": state["recipe"], "ctcore_version": prov.get("ctcore", "?")}
    from ctcore.reporting import stderr_progress

    bar, bar_task = stderr_progress(progress, f"edit {task}", count)
    facts = {"task": task, "checkpoint": checkpoint, "step": int(state["step"]), "sigmas": attrs["sigmas"],
             "device": str(dev)}
    with output_lock(out, "edit store", "ctcore edit"), bar:
        if out.exists() and not overwrite:
            raise UsageError(f"{str(out)!r} exists; pass --overwrite to replace it, or choose -o")
        if task == "interpolate":  # the recipe's sampler on the interpolated noise, exactly as `ctcore sample`
            try:
                results = images_from_noise(denoiser, z.to(dev), sigmas, lab.to(dev) if num_classes else None,
                                            sampler=sampler, levels=recipe.levels, clip=recipe.sampling.clip)
            except NonFiniteOutputs as failure:
                raise nonfinite_error(failure, checkpoint) from None
            bar.advance(bar_task, len(results))
            attrs.update(seeds_interpolated=list(seeds), num=num)
            extra = {"alphas": torch.tensor(alphas, dtype=torch.float64)}
            write_sample_store(out, results, list(seeds), lab if num_classes else None, attrs, extra)
            save_grid(results, grid, ncol=len(results), column_captions=[f"alpha {a:.2g}" for a in alphas])
            return {"store": out, "grid": grid, "count": len(results), "plan": _plan(sigmas), **facts}
        sample_seeds = list(range(seed, seed + len(inputs)))
        if task == "inpaint":
            if masks is None:
                masks = make_masks(mask_kind, sample_seeds, r)
            transform, step_masks = inpaint(masks.float()), masks
        elif task == "colorize":
            transform, step_masks = colorize(), None
        elif task == "superres":
            transform, step_masks = superres(factor, r), None
        else:
            transform, step_masks = inpaint(torch.zeros(1, 1, r, r)), None
        try:
            results, used = edit_images(denoiser, inputs, transform, step_masks, sigmas, sample_seeds,
                                        num_classes=num_classes, labels=lab, from_reference=task == "stroke",
                                        sigma_min=c.sigma_min, clip=recipe.sampling.clip, batch_size=batch_size,
                                        device=dev, progress=lambda n: bar.advance(bar_task, n))
        except NonFiniteOutputs as failure:
            raise nonfinite_error(failure, checkpoint) from None
        stored_masks = masks if masks is not None else torch.zeros((len(inputs), 1, r, r), dtype=torch.uint8)
        attrs.update(transform={"inpaint": "identity", "colorize": "luminance", "superres": "patch-mean",
                                "stroke": "identity"}[task], factor=int(factor or 1),
                     source=str(images), mask=str(mask) if mask is not None else (mask_kind or "none"))
        if task == "stroke":
            attrs["start_sigma"] = float(sigmas[0])
        mask_attrs = {"transform": attrs["transform"], "factor": attrs["factor"]}  # also on the masks they qualify
        write_sample_store(out, results, sample_seeds, used if num_classes else None, attrs,
                           {"inputs": inputs, "masks": (stored_masks, mask_attrs)})
        ref = inputs.float() / 127.5 - 1
        shown = to_uint8(ref) if task == "stroke" else to_uint8(transform.degraded(
            ref, None if step_masks is None else step_masks.float()))
        rows = torch.stack([inputs, shown, results], dim=1).reshape(-1, *shape)[: 3 * 64]
        save_grid(rows, grid, ncol=3, column_captions=GRID_COLUMNS[task])
    return {"store": out, "grid": grid, "count": len(inputs), "plan": _plan(sigmas), **facts}


def _plan(sigmas: Sequence[float]) -> str:
    """'4-step 80, 16.78, 2.24, 0.1312' for messages (the store keeps the exact values)."""
    return f"{len(sigmas)}-step " + ", ".join(f"{s:.4g}" for s in sigmas)

