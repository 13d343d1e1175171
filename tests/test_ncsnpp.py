"""The `ncsnpp` network plugin: contract, iCT parameter counts, FIR resampling, options and conditioning."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ctcore.components import BuildContext
from ctcore.testing import check_component, check_network

try:
    import ctcore_ncsnpp
except ImportError:  # the editable install maps only the packages it knew when it was installed
    sys.path.insert(0, str(Path(__file__).parents[1] / "plugins"))
    import ctcore_ncsnpp

from ctcore_ncsnpp import NCSNpp
from ctcore_ncsnpp.layers import FIRConv2d, fir_downsample, fir_kernel_2d, fir_upsample

SMALL = {"nf": 16, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,)}
"""A reduced NCSN++ for 8 x 8 inputs: two resolutions, attention at 4 x 4, everything else at the defaults."""


def build(data_shape: tuple[int, ...] = (3, 8, 8), num_classes: int = 0, device: str = "cpu", **options) -> NCSNpp:
    with torch.device(device):
        return NCSNpp(NCSNpp.Options(**options), BuildContext(data_shape=data_shape, num_classes=num_classes))


def trainable(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def inputs(batch: int = 2, shape: tuple[int, ...] = (3, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sigma = torch.exp(torch.randn(batch, generator=g) * 1.5)
    return torch.randn(batch, *shape, generator=g), 0.25 * torch.log(sigma)


# ------------------------------------------------------------------------------------------ contract


def test_registration_hook_returns_the_class() -> None:
    assert ctcore_ncsnpp.ctcore_register_networks() == [NCSNpp]
    assert NCSNpp.name == "ncsnpp" and NCSNpp.noise_conditioning == "fourier"


def test_defaults_are_the_ict_cifar10_configuration() -> None:
    o = NCSNpp.Options()
    assert (o.nf, o.ch_mult, o.num_res_blocks, o.attn_resolutions) == (128, (2, 2, 2), 4, (16,))
    assert (o.resblock_type, o.fir, o.fir_kernel, o.resamp_with_conv, o.skip_rescale) == (
        "biggan", True, (1, 3, 3, 1), True, True)
    assert (o.progressive, o.progressive_input, o.progressive_combine) == ("none", "residual", "sum")
    assert (o.init_scale, o.embedding_type, o.fourier_scale, o.dropout) == (0.0, "fourier", 0.02, 0.3)


def test_meets_the_network_contract_reduced() -> None:
    check_component("network", NCSNpp, data_shape=(3, 8, 8), **SMALL)


def test_meets_the_network_contract_with_class_labels() -> None:
    check_network(NCSNpp, data_shape=(3, 8, 8), num_classes=10, **SMALL)


@pytest.mark.parametrize("variant", [
    {"resblock_type": "ddpm"},
    {"resblock_type": "ddpm", "fir": False, "resamp_with_conv": False},
    {"fir": False, "skip_rescale": False},
    {"progressive": "output_skip", "progressive_input": "input_skip", "progressive_combine": "cat"},
    {"progressive": "residual", "progressive_input": "none"},
    {"ch_mult": (1, 2, 1), "fir_kernel": (1.0, 1.0)},
], ids=lambda v: ",".join(f"{k}={val}" for k, val in v.items()))
def test_architecture_variants_meet_the_contract(variant: dict) -> None:
    check_network(NCSNpp, data_shape=(2, 8, 8), **{**SMALL, "nf": 8, **variant})


# ------------------------------------------------------------------------------------------ parameter counts


def test_ict_cifar10_parameter_count_is_56_4m() -> None:
    net = build((3, 32, 32), device="meta")
    n = trainable(net)
    assert abs(n / 56.4e6 - 1) < 0.02, n
    assert n == 56_395_523  # regression pin: nf 128, ch_mult (2, 2, 2), 4 blocks, attention at 16 and the middle
    assert "fourier.freqs" in dict(net.named_buffers())  # frozen frequencies: a buffer, not a parameter
    assert not any("freqs" in name for name, _ in net.named_parameters())


def test_ict_deep_doubles_the_blocks() -> None:
    """iCT-deep = num_res_blocks 8 on the same widths: 97.6M. The ECT README's "> 100M" for "NCSN++ (2x depth)"
    matches score SDE's deep NCSN++ (ch_mult (1, 2, 2, 2), 8 blocks: 107.6M), the second count here."""
    deep = trainable(build((3, 32, 32), device="meta", num_res_blocks=8))
    assert deep == 97_610_499
    assert deep > 1.7 * 56.4e6
    score_sde_deep = trainable(build((3, 32, 32), device="meta", num_res_blocks=8, ch_mult=(1, 2, 2, 2)))
    assert score_sde_deep > 100e6


def test_full_ict_network_builds_for_real() -> None:
    torch.manual_seed(0)
    net = build((3, 32, 32))
    assert trainable(net) == 56_395_523
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("size", [32, 64])
def test_output_shape_equals_input_shape(size: int) -> None:
    torch.manual_seed(0)
    net = build((3, size, size), nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,)).eval()
    x, c = inputs(2, (3, size, size))
    with torch.no_grad():
        assert net(x, c, None).shape == x.shape


def test_non_square_images() -> None:
    net = build((1, 8, 12), nf=8, ch_mult=(1, 2, 2), num_res_blocks=1).eval()
    x, c = inputs(2, (1, 8, 12))
    with torch.no_grad():
        assert net(x, c, None).shape == x.shape


def test_init_scale_zero_starts_the_output_near_zero() -> None:
    """init_scale 0 is DDPM's default_init(0), which stands for a scale of 1e-10: the output convolution starts
    near zero (about 1e-5 here), not exactly at zero, so gradients reach every layer from the first step."""
    torch.manual_seed(0)
    x, c = inputs()
    with torch.no_grad():
        near_zero = build(**SMALL).eval()(x, c, None)
        torch.manual_seed(0)
        unscaled = build(**SMALL, init_scale=1.0).eval()(x, c, None)
    assert near_zero.abs().max() < 1e-4
    assert unscaled.std() > 0.05


def test_dropout_is_active_in_train_mode_and_reproducible_from_the_rng_state() -> None:
    torch.manual_seed(0)
    net = build(**SMALL, init_scale=1.0, dropout=0.3)
    x, c = inputs()
    with torch.no_grad():
        net.train()
        state = torch.get_rng_state()
        first = net(x, c, None)
        torch.set_rng_state(state)
        again = net(x, c, None)
        other = net(x, c, None)
        net.eval()
        clean, clean_again = net(x, c, None), net(x, c, None)
    assert torch.equal(first, again)  # the teacher replays the student's mask
    assert not torch.equal(first, other)
    assert not torch.equal(first, clean)
    assert torch.equal(clean, clean_again)


def test_class_labels_change_the_output() -> None:
    torch.manual_seed(0)
    net = build(num_classes=10, **SMALL, init_scale=1.0).eval()
    x, c = inputs()
    with torch.no_grad():
        a = net(x, c, torch.tensor([0, 1]))
        b = net(x, c, torch.tensor([3, 7]))
        a_again = net(x, c, torch.tensor([0, 1]))
        unlabelled = net(x, c, None)
    assert not torch.allclose(a, b)
    assert torch.equal(a, a_again)
    assert unlabelled.shape == x.shape
    assert net.label_emb is not None and net.label_emb.num_embeddings == 10
    assert build(**SMALL).label_emb is None


def test_noise_level_changes_the_output() -> None:
    torch.manual_seed(0)
    net = build(**SMALL, init_scale=1.0, fourier_scale=16.0).eval()
    x, _ = inputs()
    with torch.no_grad():
        lo = net(x, 0.25 * torch.log(torch.tensor([0.01, 0.01])), None)
        hi = net(x, 0.25 * torch.log(torch.tensor([50.0, 50.0])), None)
    assert not torch.allclose(lo, hi)


def test_fourier_scale_sets_the_frozen_frequency_std() -> None:
    stds = {}
    for scale in (0.02, 16.0):
        torch.manual_seed(0)
        freqs = build((1, 4, 4), nf=256, ch_mult=(1,), num_res_blocks=1, fourier_scale=scale).fourier.freqs
        assert freqs.shape == (256,) and not freqs.requires_grad
        stds[scale] = freqs.std().item()
        assert abs(stds[scale] / scale - 1) < 0.15
    assert stds[16.0] / stds[0.02] == pytest.approx(16.0 / 0.02, rel=1e-4)  # same draws, scaled
    assert "fourier.freqs" in build(**SMALL).state_dict()  # random and frozen: checkpoints must keep it


# ------------------------------------------------------------------------------------------ FIR resampling


def test_fir_box_kernel_is_nearest_upsampling_and_average_pooling() -> None:
    x = torch.randn(2, 3, 6, 6)
    box = fir_kernel_2d((1, 1))
    assert torch.allclose(fir_upsample(x, box), F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert torch.allclose(fir_downsample(x, box), F.avg_pool2d(x, 2))


def test_fir_resampling_keeps_constants_away_from_the_border() -> None:
    k = fir_kernel_2d((1, 3, 3, 1))
    ones = torch.ones(1, 1, 8, 8)
    up, down = fir_upsample(ones, k), fir_downsample(ones, k)
    assert up.shape[-2:] == (16, 16) and down.shape[-2:] == (4, 4)
    assert torch.allclose(up[..., 1:-1, 1:-1], torch.ones(14, 14))
    assert torch.allclose(down[..., 1:-1, 1:-1], torch.ones(2, 2))
    assert torch.allclose(up, up.flip(-1)) and torch.allclose(down, down.flip(-2))  # centred, no shift


@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
def test_fused_fir_convolution_matches_resample_then_convolve(up: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    conv = FIRConv2d(3, 5, up=up, down=not up)
    k = fir_kernel_2d((1, 3, 3, 1))
    with torch.no_grad():
        fused = conv(x)
        if up:
            ref = F.conv2d(fir_upsample(x, k), conv.weight, conv.bias, padding=1)
        else:
            ref = fir_downsample(F.conv2d(x, conv.weight, conv.bias, padding=1), k)
    assert fused.shape == ref.shape
    assert torch.allclose(fused[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)  # borders pad differently


# ------------------------------------------------------------------------------------------ bad options


@pytest.mark.parametrize(("options", "key"), [
    ({"ch_mult": ()}, "ch_mult"),
    ({"ch_mult": (2, 0)}, "ch_mult"),
    ({"nf": 2}, "nf"),
    ({"num_res_blocks": 0}, "num_res_blocks"),
    ({"attn_resolutions": (0,)}, "attn_resolutions"),
    ({"dropout": 1.0}, "dropout"),
    ({"resblock_type": "unet"}, "resblock_type"),
    ({"progressive": "skip"}, "progressive"),
    ({"progressive_input": "output_skip"}, "progressive_input"),
    ({"progressive_combine": "mean"}, "progressive_combine"),
    ({"fir_kernel": ()}, "fir_kernel"),
    ({"init_scale": -1.0}, "init_scale"),
    ({"embedding_type": "sinusoidal"}, "embedding_type"),
    ({"fourier_scale": 0.0}, "fourier_scale"),
    ({"channel_mult_noise": 0}, "channel_mult_noise"),
    ({"nf": 5, "channel_mult_noise": 1}, "channel_mult_noise"),
    ({"max_positions": 0}, "max_positions"),
    ({"label_input": "one-hot"}, "label_input"),
    ({"augment_dim": 65}, "augment_dim"),
])
def test_bad_options_raise_key_messages(options: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key}(\[\d+\])?: "):
        NCSNpp.Options(**options)


def test_resolution_not_divisible_raises() -> None:
    with pytest.raises(ValueError, match=r"^ch_mult: .*divisible by 4; got 30 x 30"):
        build((3, 30, 30), device="meta")


def test_group_norm_incompatible_width_raises() -> None:
    with pytest.raises(ValueError, match=r"^nf: GroupNorm"):
        build((3, 8, 8), nf=18, ch_mult=(1,), device="meta")


def test_needs_image_shaped_data() -> None:
    with pytest.raises(ValueError, match="data shape"):
        NCSNpp(NCSNpp.Options(), BuildContext(data_shape=None))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        NCSNpp(NCSNpp.Options(), BuildContext(data_shape=(3, 32)))


# ------------------------------------------------------------------------------------------ engine integration


def test_trains_in_the_engine_from_a_recipe(tmp_path: Path) -> None:
    from helpers import tiny_recipe_text

    from ctcore.build import build_run
    from ctcore.recipe import parse_recipe
    from ctcore.registry import Provider, load_registry
    from ctcore.training import train_step

    registry = load_registry()
    if "ncsnpp" not in registry.names("network"):
        registry.add("network", NCSNpp, Provider("ctcore", "0.1.0", "ncsnpp", "ctcore_ncsnpp"))
    network = {"name": "ncsnpp", "nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [2]}
    recipe = parse_recipe(tiny_recipe_text(tmp_path, network=network), registry)
    run = build_run(recipe, registry, tmp_path)
    before = [p.detach().clone() for p in run.student.parameters()]
    losses = [train_step(run)[0].item() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, p) for a, p in zip(before, run.student.parameters(), strict=True))

    bad = tiny_recipe_text(tmp_path, network={**network, "ch_mult": []})
    with pytest.raises(Exception, match=r"network\.ch_mult: "):
        parse_recipe(bad, registry)
