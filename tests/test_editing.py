"""Zero-shot editing (ctcore.editing, `ctcore edit`): the transforms are orthogonal, and the results keep what
they promise to keep, exactly, for any model (an untrained toy MLP here)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ctcore.consistency import denoise
from ctcore.editing import (
    EDIT_LEVELS,
    colorize,
    edit,
    edit_images,
    inpaint,
    interpolation_noise,
    karras_levels,
    luminance,
    luminance_matrix,
    make_masks,
    patch_matrix,
    patch_means,
    superres,
    transform_matrix,
)
from ctcore.registry import load_registry
from ctcore.sampling import generate, sample_noise

SHAPE = (3, 8, 8)
SIGMAS = karras_levels(0.002, 80.0, 7.0, EDIT_LEVELS)


@pytest.fixture(scope="module")
def denoiser():
    """An untrained toy MLP whose output layer is random (not zero), so results are far from the references."""
    torch.manual_seed(0)
    net = load_registry().create("network", "mlp", data_shape=SHAPE, num_classes=0, total_steps=10, width=64,
                                 num_blocks=1, embedding_features=16, zero_init_output=False).eval()
    return lambda x, s, y: denoise(net, x, s, y) * 3.0  # pushed hard against [-1, 1]


def references(n: int = 6) -> torch.Tensor:
    """uint8 references with saturated colours and extremes (0 and 255), where clamping would break exactness."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    images[0] = 255
    images[1] = 0
    images[2, 0], images[2, 1:] = 255, 0
    return images


def test_the_transforms_are_orthogonal_to_float_precision() -> None:
    for m in (luminance_matrix(), patch_matrix(2), patch_matrix(4)):
        assert torch.allclose(m @ m.T, torch.eye(len(m), dtype=torch.float64), atol=1e-12)
    lum = luminance_matrix()[0]
    w = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float64)
    assert torch.allclose(lum, w / w.norm(), atol=1e-12)
    assert torch.allclose(patch_matrix(2)[0], torch.full((4,), 0.5, dtype=torch.float64), atol=1e-12)
    for transform in (colorize(), superres(2, 8), superres(4, 8), inpaint(torch.ones(1, 1, 8, 8))):
        a = transform_matrix(transform, SHAPE)
        assert (a @ a.T - torch.eye(len(a))).abs().max() < 1e-6, transform.name
        x = torch.randn(2, *SHAPE)
        assert (transform.inverse(transform.forward(x)) - x).abs().max() < 1e-5


def test_inpainting_keeps_every_known_pixel_exactly(denoiser) -> None:
    inputs = references()
    seeds = list(range(len(inputs)))
    for kind in ("box", "half", "random-pixels", "strokes"):
        masks = make_masks(kind, seeds, 8)
        assert 0 < int(masks.sum()) < masks.numel(), kind
        images, _ = edit_images(denoiser, inputs, inpaint(masks.float()), masks, SIGMAS, seeds)
        known = masks.bool().expand_as(inputs)
        assert torch.equal(images[known], inputs[known]), kind
        assert not torch.equal(images[~known], inputs[~known]), kind


def test_superres_keeps_every_patch_mean_within_one_grey_level(denoiser) -> None:
    inputs = references()
    for factor in (2, 4):
        transform = superres(factor, 8)
        images, _ = edit_images(denoiser, inputs, transform, None, SIGMAS, list(range(len(inputs))))
        gap = (patch_means(images, factor) - patch_means(inputs, factor)).abs().max()
        assert gap <= 1.0, (factor, gap)
        assert not torch.equal(images, inputs)


def test_colorize_keeps_every_pixel_luminance_within_one_grey_level(denoiser) -> None:
    inputs = references()
    images, _ = edit_images(denoiser, inputs, colorize(), None, SIGMAS, list(range(len(inputs))))
    assert (luminance(images) - luminance(inputs)).abs().max() <= 1.0
    assert (images.int() - inputs.int()).abs().max() > 20  # the colour is generated, not copied


def test_without_the_fit_clamping_would_break_the_luminance(denoiser) -> None:
    """The references and model above push results out of [-1, 1]: the guarantee needs Transform.fit."""
    inputs = references()
    clamped = dataclasses.replace(colorize(), fit=lambda x: x.clamp(-1.0, 1.0))
    images, _ = edit_images(denoiser, inputs, clamped, None, SIGMAS, list(range(len(inputs))))
    assert (luminance(images) - luminance(inputs)).abs().max() > 5.0


def test_edit_with_nothing_known_is_sampling_and_draws_from_the_generator(denoiser) -> None:
    seeds = [3, 4]
    sampled, _ = generate(denoiser, SHAPE, seeds, SIGMAS)
    nothing = torch.zeros((2, 1, 8, 8), dtype=torch.uint8)
    edited, _ = edit_images(denoiser, references(3)[:2], inpaint(nothing.float()), nothing, SIGMAS, seeds)
    assert torch.equal(edited, sampled)
    ref = references(3)[:2].float() / 127.5 - 1
    a = edit(denoiser, ref, colorize(), None, SIGMAS, torch.Generator().manual_seed(5))
    b = edit(denoiser, ref, colorize(), None, SIGMAS, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_interpolation_endpoints_are_the_seeds_noise_exactly() -> None:
    z, labels, alphas = interpolation_noise(7, 9, 5, SHAPE, 2, num_classes=4)
    assert alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    za, la = sample_noise(7, SHAPE, 2, 4)
    zb, lb = sample_noise(9, SHAPE, 2, 4)
    assert torch.equal(z[:, 0], za) and torch.equal(z[:, -1], zb)
    assert labels.tolist() == [la, la, la, lb, lb]
    norms = z[0].flatten(1).norm(dim=1)
    assert (norms - za[0].norm()).abs().max() < 0.2 * za[0].norm()  # on the sphere, not through its inside
