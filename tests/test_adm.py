"""The `adm` network plugin: contract, ImageNet-64 parameter counts, dropout placement, attention backends."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ctcore.components import BuildContext
from ctcore.testing import check_component

try:
    import ctcore_adm
except ImportError:  # not registered as an installed package yet: import it from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    import ctcore_adm

from ctcore_adm import ADM
from ctcore_adm.layers import AttentionBlock, ResBlock

SMALL = {
    "model_channels": 32,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "attention_resolutions": (8,),
    "num_head_channels": 16,
}
"""A CPU-sized ADM for 16x16 inputs: levels at 16 and 8, attention at 8 and in the middle."""

IMAGENET64 = BuildContext(data_shape=(3, 64, 64), num_classes=1000)

ADM_IMAGENET64_PARAMS = 295_899_267
"""Measured: the default options with 1000 classes. EDM (Karras et al. 2022, Table 7) lists ADM at 295.9M."""


def build(context: BuildContext, **options) -> ADM:
    return ADM(ADM.Options(**options), context)


def meta_count(context: BuildContext = IMAGENET64, **options) -> int:
    with torch.device("meta"):
        net = build(context, **options)
    return sum(p.numel() for p in net.parameters())


def perturbed(net: nn.Module, seed: int = 1) -> nn.Module:
    """Randomise every parameter a little, so zero-initialised layers no longer hide the rest of the net."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def inputs(shape=(3, 16, 16), batch: int = 2, num_classes: int = 0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g)
    c_noise = 250.0 * torch.log(torch.linspace(0.002, 80.0, batch))
    labels = torch.randint(0, num_classes, (batch,), generator=g) if num_classes else None
    return x, c_noise, labels


# ------------------------------------------------------------------------------------------- contract


def test_hook_registers_adm() -> None:
    assert ctcore_adm.ctcore_register_networks() == [ADM]
    assert ADM.name == "adm" and ADM.noise_conditioning == "positional"


@pytest.mark.parametrize(
    "variant",
    [{}, {"use_scale_shift_norm": False}, {"resblock_updown": False}, {"attention": "math"}],
    ids=["default", "no-adagn", "conv-resample", "math-attention"],
)
def test_meets_network_contract(variant: dict) -> None:
    # num_classes=0 also builds a 3-class network and checks dropout masks follow torch's global RNG
    check_component("network", ADM, data_shape=(3, 16, 16), **SMALL, **variant)


def test_meets_network_contract_with_classes() -> None:
    check_component("network", ADM, data_shape=(3, 16, 16), num_classes=10, **SMALL)


def test_output_shape_equals_input_shape_for_other_shapes() -> None:
    for shape in [(3, 16, 16), (1, 8, 16), (4, 32, 32)]:
        net = perturbed(build(BuildContext(data_shape=shape), **SMALL))
        x, c_noise, labels = inputs(shape)
        assert net(x, c_noise, labels).shape == x.shape


def test_initial_raw_output_is_exactly_zero() -> None:
    net = build(BuildContext(data_shape=(3, 16, 16), num_classes=5), **SMALL)
    out = net(*inputs(num_classes=5))
    assert torch.equal(out, torch.zeros_like(out))


def test_labels_change_the_output() -> None:
    net = perturbed(build(BuildContext(data_shape=(3, 16, 16), num_classes=5), **SMALL)).eval()
    x, c_noise, _ = inputs()
    a = net(x, c_noise, torch.tensor([0, 0]))
    b = net(x, c_noise, torch.tensor([3, 3]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="needs labels"):
        net(x, c_noise, None)


def test_noise_level_changes_the_output() -> None:
    net = perturbed(build(BuildContext(data_shape=(3, 16, 16)), **SMALL)).eval()
    x, _, _ = inputs()
    low = net(x, torch.full((2,), 250.0 * torch.log(torch.tensor(0.002)).item()), None)
    high = net(x, torch.full((2,), 250.0 * torch.log(torch.tensor(80.0)).item()), None)
    assert not torch.allclose(low, high)


# ------------------------------------------------------------------------------------ parameter counts


def test_defaults_are_the_imagenet64_configuration() -> None:
    o = ADM.Options()
    assert (o.model_channels, o.channel_mult, o.num_res_blocks) == (192, (1, 2, 3, 4), 3)
    assert (o.attention_resolutions, o.num_head_channels) == ((32, 16, 8), 64)
    assert o.resblock_updown and o.use_scale_shift_norm
    assert (o.dropout, o.dropout_max_resolution, o.attention) == (0.2, 16, "sdpa")


def test_imagenet64_parameter_count() -> None:
    n = meta_count()
    assert n == pytest.approx(ADM_IMAGENET64_PARAMS, rel=0.02)
    assert n == pytest.approx(296e6, rel=0.05)  # the ADM / CM ImageNet-64 network is quoted as ~296M
    # the class embedding is one E = 4 * 192 = 768 vector per class
    assert n - meta_count(BuildContext(data_shape=(3, 64, 64), num_classes=0)) == 1000 * 768


def test_ict_deep_is_larger() -> None:
    deep = meta_count(num_res_blocks=6)
    assert deep > meta_count()
    assert deep == pytest.approx(495.4e6, rel=0.02)


def test_scale_shift_norm_doubles_the_embedding_projections() -> None:
    with torch.device("meta"):
        net = build(IMAGENET64)
    # each residual block's embedding projection has out * (E + 1) parameters without AdaGN, twice that with
    expected = sum(m.norm2.num_channels * (768 + 1) for m in net.modules() if isinstance(m, ResBlock))
    assert expected == 13_731_264
    assert meta_count() - meta_count(use_scale_shift_norm=False) == expected


# ------------------------------------------------------------------------------------------- dropout


def test_dropout_only_acts_at_resolutions_up_to_16() -> None:
    net = build(BuildContext(data_shape=(3, 64, 64)), model_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1,
                attention_resolutions=(), num_head_channels=32, dropout=0.2)
    seen: dict[str, tuple[float, int]] = {}

    def record(name: str):
        def hook(module: nn.Dropout, args: tuple) -> None:
            seen[name] = (module.p, args[0].shape[-1])

        return hook

    dropouts = {name: m for name, m in net.named_modules() if isinstance(m, nn.Dropout)}
    for name, m in dropouts.items():
        m.register_forward_pre_hook(record(name))
    with torch.no_grad():
        net(*inputs((3, 64, 64), batch=1))
    assert seen.keys() == dropouts.keys()  # every residual block ran, one dropout each
    assert {res for _, res in seen.values()} == {64, 32, 16, 8}
    for name, (p, res) in seen.items():
        assert p == (0.2 if res <= 16 else 0.0), (name, p, res)
    # nothing else in the network drops out (no attention or output dropout)
    assert len(dropouts) == sum(isinstance(m, ResBlock) for m in net.modules())


def test_dropout_max_resolution_moves_the_threshold() -> None:
    net = build(BuildContext(data_shape=(3, 32, 32)), model_channels=32, channel_mult=(1, 1), num_res_blocks=1,
                attention_resolutions=(), num_head_channels=32, dropout=0.3, dropout_max_resolution=32)
    assert all(m.dropout.p == 0.3 for m in net.modules() if isinstance(m, ResBlock))


# ------------------------------------------------------------------------------------------- attention


def test_attention_placement_and_heads() -> None:
    with torch.device("meta"):
        net = build(IMAGENET64)
    blocks = [m for m in net.modules() if isinstance(m, AttentionBlock)]
    # encoder 3 per level at 32, 16, 8; middle 1; decoder 4 per level at 8, 16, 32
    assert len(blocks) == 3 * 3 + 1 + 3 * 4
    assert {m.heads for m in blocks} == {384 // 64, 576 // 64, 768 // 64}
    assert all(m.head_channels == 64 for m in blocks)


def test_math_and_sdpa_attention_agree() -> None:
    torch.manual_seed(0)
    block = perturbed(AttentionBlock(64, 16, 32, "math"))
    fused = AttentionBlock(64, 16, 32, "sdpa")
    fused.load_state_dict(block.state_dict())
    x = 3.0 * torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(fused(x), block(x), atol=1e-5, rtol=1e-5)

    context = BuildContext(data_shape=(3, 16, 16), num_classes=4)
    torch.manual_seed(0)
    slow = perturbed(build(context, **SMALL, attention="math")).eval()
    fast = build(context, **SMALL, attention="sdpa").eval()
    fast.load_state_dict(slow.state_dict())
    x, c_noise, labels = inputs(num_classes=4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, c_noise, labels), slow(x, c_noise, labels), atol=1e-5, rtol=1e-5)


def test_attention_uses_the_new_qkv_order() -> None:
    """The 3*C qkv channels are read as [q | k | v], each then split into heads of 16 channels (ADM's "new"
    order, CM's flash layout), not head-major [q1 k1 v1 | q2 k2 v2] (the legacy order)."""
    torch.manual_seed(0)
    block = perturbed(AttentionBlock(32, 16, 8, "math")).eval()
    x = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        qkv = block.qkv(block.norm(x)).reshape(1, 3, 2, 16, 16)
        q, k, v = qkv.unbind(1)
        w = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / 4.0, dim=-1)
        ref = torch.einsum("bhts,bhds->bhdt", w, v).reshape(1, 32, 4, 4)
        torch.testing.assert_close(block(x), x + block.proj(ref), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"model_channels": 0}, "model_channels"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"channel_mult": (1, 0)}, "channel_mult"),
        ({"channel_mult": 2}, "channel_mult"),
        ({"attention_resolutions": (16, -8)}, "attention_resolutions"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"num_head_channels": 0}, "num_head_channels"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout_max_resolution": 0}, "dropout_max_resolution"),
        ({"attention": "flash"}, "attention"),
        ({"model_channels": 48}, "num_groups"),
    ],
)
def test_bad_options_raise_value_error_naming_the_key(options: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key}(\[\d+\])?: "):
        ADM.Options(**options)


@pytest.mark.parametrize(
    ("shape", "options", "key"),
    [
        ((3, 12, 12), {"channel_mult": (1, 2, 2, 2)}, "channel_mult"),
        ((3, 16, 16), {"num_head_channels": 24}, "num_head_channels"),
    ],
)
def test_options_that_do_not_fit_the_data_raise_value_error(shape, options, key) -> None:
    with pytest.raises(ValueError, match=rf"^{key}(\[\d+\])?: "):
        build(BuildContext(data_shape=shape), **{**SMALL, **options})


def test_needs_image_data() -> None:
    for shape in (None, (3, 16)):
        with pytest.raises(ValueError, match="needs image data"):
            build(BuildContext(data_shape=shape), **SMALL)
