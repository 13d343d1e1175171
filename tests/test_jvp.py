"""ctcore.jvp: forward-mode JVPs through mlp, ncsnpp and adm (attention, dropout) equal central differences in
float64; the finite-difference fallback; the math-path attention under a JVP and SDPA everywhere else."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import ctcore
from ctcore import jvp as jvp_module
from ctcore.jvp import FD_STEP, attention, jvp, math_attention, under_forward_ad

NETWORKS = {
    "mlp": {"data_shape": (2, 4, 4), "width": 32, "num_blocks": 2, "embedding_features": 8, "fourier_scale": 1.0,
            "zero_init_output": False},
    "ncsnpp": {"data_shape": (3, 8, 8), "nf": 16, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,),
               "init_scale": 1.0, "fourier_scale": 1.0},
    "adm": {"data_shape": (3, 8, 8), "model_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
            "attention_resolutions": (4,), "num_head_channels": 8, "num_groups": 8, "attention": "sdpa",
            "noise_embedding": "edm"},
    "adm-math": {"data_shape": (3, 8, 8), "model_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
                 "attention_resolutions": (4,), "num_head_channels": 8, "num_groups": 8, "attention": "math",
                 "noise_embedding": "edm"},
}
"""Small float64-sized networks; ncsnpp and adm with attention at 4x4 and in the middle (adm on its SDPA kernel).
adm takes EDM's noise embedding, computed in c_noise's dtype: its default "adm" one computes in float32 by design
(the released CM models), which would cap the central difference along c at float32 precision. "adm-math" is adm
on its own "math" attention backend, whose softmax must stay in float64 for a float64 network."""

ATTENTION_CALLS = {"mlp": 0, "ncsnpp": 3, "adm": 4, "adm-math": 0}
"""Attention blocks per forward: ncsnpp one at 4x4 in the encoder, the middle, one at 4x4 in the decoder; adm one
at 4x4 in the encoder, the middle, and two at 4x4 in the decoder (num_res_blocks + 1); adm-math none."""

def network(name: str, dropout: float = 0.3, **extra: object) -> torch.nn.Module:
    """A float64 network in train mode (dropout active), every parameter perturbed so no layer starts at zero;
    `extra` options on top of NETWORKS[name]'s."""
    options = {**NETWORKS[name], **extra}
    torch.manual_seed(0)
    net = ctcore.load_registry().create("network", name.split("-")[0], dropout=dropout, **options).double().train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def point(name: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(x, c_noise) and a tangent (v_x, v_c) of order one, float64."""
    g = torch.Generator().manual_seed(2)
    shape = NETWORKS[name]["data_shape"]
    x = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    c = 0.25 * torch.log(torch.tensor([0.3, 2.0], dtype=torch.float64))
    return (x, c), (torch.randn(x.shape, generator=g, dtype=torch.float64), torch.tensor([0.7, -1.1],
                                                                                        dtype=torch.float64))


def central_difference(f, primals, tangents, state: torch.Tensor, h: float = FD_STEP) -> torch.Tensor:
    """(f(p + h v) - f(p - h v)) / 2h, each pass from the RNG state `state` (the same dropout mask)."""
    outs = []
    for sign in (1.0, -1.0):
        torch.set_rng_state(state)
        outs.append(f(*(p + sign * h * t for p, t in zip(primals, tangents, strict=True))))
    return (outs[0] - outs[1]) / (2 * h)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_forward_ad_jvp_equals_the_central_difference_with_the_shared_dropout_mask(name: str) -> None:
    """JVP along (v_x, v_c) of a train-mode network with dropout 0.3 = the central difference (h = FD_STEP = 1e-6)
    of the same network under the same mask, to 1e-8 of its largest entry (measured 2e-10 to 5e-10); the JVP's
    primal is, to 1e-12, the plain forward that follows it (the same mask); the RNG state is as on entry."""
    net = network(name)
    f = lambda x, c: net(x, c, None)  # noqa: E731
    primals, tangents = point(name)
    state = torch.get_rng_state()
    value, derivative = jvp(f, primals, tangents)
    assert torch.equal(torch.get_rng_state(), state)
    # the step's next pass draws the JVP's mask (equal up to the math-path attention's rounding)
    torch.testing.assert_close(value, f(*primals), rtol=0, atol=1e-12)
    assert not torch.equal(value, f(*primals))  # ... and dropout is active: a fresh mask gives another output
    reference = central_difference(f, primals, tangents, state)
    scale = reference.abs().max().item()
    assert scale > 1e-2
    torch.testing.assert_close(derivative, reference, rtol=0, atol=1e-8 * scale)


def test_the_jvp_is_not_the_derivative_under_another_mask() -> None:
    """The check above can tell masks apart: the central difference under a fresh mask misses the JVP by far."""
    net = network("mlp")
    f = lambda x, c: net(x, c, None)  # noqa: E731
    primals, tangents = point("mlp")
    _, derivative = jvp(f, primals, tangents)
    f(*primals)
    other = central_difference(f, primals, tangents, torch.get_rng_state())
    assert (derivative - other).abs().max() > 1e-2 * other.abs().max()


def test_finite_difference_option_gives_the_float64_central_difference() -> None:
    """method="finite-difference" returns (f(p), (f(p + h v) - f(p - h v)) / 2h) in float64 with h = FD_STEP, every
    pass under the entry mask, bit for bit as computed by hand; float32 primals are promoted to float64."""
    net = network("adm")
    f = lambda x, c: net(x, c, None)  # noqa: E731
    primals, tangents = point("adm")
    state = torch.get_rng_state()
    value, derivative = jvp(f, [p.float() for p in primals], [t.float() for t in tangents],
                            method="finite-difference")
    assert torch.equal(torch.get_rng_state(), state)
    p64 = [p.float().double() for p in primals]
    t64 = [t.float().double() for t in tangents]
    assert value.dtype == derivative.dtype == torch.float64
    assert torch.equal(derivative, central_difference(f, p64, t64, state))
    torch.set_rng_state(state)
    assert torch.equal(value, f(*p64))
    assert FD_STEP == 1e-6
    with pytest.raises(ValueError, match=r"^jvp: unknown method 'backward': use 'forward-ad' or 'finite-difference'$"):
        jvp(f, primals, tangents, method="backward")


def test_the_primal_keeps_autograd_to_the_parameters() -> None:
    """The JVP's primal output backpropagates to the parameters as the plain forward does (same mask)."""
    net = network("ncsnpp")
    primals, tangents = point("ncsnpp")
    state = torch.get_rng_state()
    value, _ = jvp(lambda x, c: net(x, c, None), primals, tangents)
    grads = torch.autograd.grad(value.square().sum(), list(net.parameters()))
    torch.set_rng_state(state)
    plain = torch.autograd.grad(net(*primals, None).square().sum(), list(net.parameters()))
    for a, b in zip(grads, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_math_attention_equals_sdpa_in_float64() -> None:
    """softmax(q k^T / sqrt(d)) v spelled out = torch's SDPA to 1e-12 in float64, one head and several."""
    g = torch.Generator().manual_seed(3)
    for shape in [(2, 1, 16, 16), (2, 3, 16, 8)]:
        q, k, v = (3 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
        torch.testing.assert_close(math_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0,
                                   atol=1e-12)


@pytest.mark.parametrize("name", ["ncsnpp", "adm"])
def test_networks_on_the_math_path_equal_their_sdpa_outputs(name: str) -> None:
    """The network's output under the JVP (math-path attention) = its output on SDPA to 1e-12 in float64."""
    net = network(name).eval()
    primals, tangents = point(name)
    value, _ = jvp(lambda x, c: net(x, c, None), primals, tangents)
    torch.testing.assert_close(value, net(*primals, None), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_attention_runs_sdpa_outside_a_jvp_and_math_inside(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attention block calls torch's SDPA outside a JVP (before and after one, and after a JVP that raised);
    under `jvp` none does."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(under_forward_ad())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    net = network(name)
    f = lambda x, c: net(x, c, None)  # noqa: E731
    primals, tangents = point(name)
    f(*primals)
    assert calls == [False] * ATTENTION_CALLS[name]
    jvp(f, primals, tangents)
    assert calls == [False] * ATTENTION_CALLS[name]

    def failing(x, c):
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        jvp(failing, primals, tangents)
    assert not under_forward_ad() and not jvp_module._forward_ad
    f(*primals)
    assert calls == [False] * (2 * ATTENTION_CALLS[name])


def test_attention_is_sdpa_bit_for_bit_outside_a_jvp() -> None:
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g) for _ in range(3))
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
