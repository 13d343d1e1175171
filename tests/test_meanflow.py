"""ctcore.meanflow: the MeanFlow target against closed forms (a linear u and the exact average velocity of Gaussian
data), the loss gradient against its closed form with the stop-gradients, the (r, t) draw, the adaptive weight and
one-step sampling; float64 throughout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ctcore import meanflow
from ctcore.jvp import jvp
from ctcore.meanflow import ADAPTIVE_C, ADAPTIVE_P, P_MEAN, P_STD, RATIO_R_NEQ_T

SHAPE = (2, 3)
"""Per-sample shape: two dimensions, so every per-sample (batch,) factor must broadcast."""


class Linear(nn.Module):
    """u(z, r, t) = A z + b r + c t over the flattened sample, float64: du/dt along (v, 0, 1) is A v + c."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        d = math.prod(SHAPE)
        self.A = nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5)
        self.b = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = z.flatten(1) @ self.A.T + r[:, None] * self.b + t[:, None] * self.c
        return out.reshape(z.shape)


def batch(n: int = 8) -> tuple[torch.Tensor, ...]:
    """(x, e, r, t, z_t, v) in float64, half the samples with r = t."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    e = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    r, t = meanflow.sample_r_t(n, g, ratio=0.5, dtype=torch.float64)
    z, v = meanflow.interpolate(x, e, t)
    return x, e, r, t, z, v


S = 0.5
"""Standard deviation of the Gaussian data N(0, S^2) whose average velocity is known in closed form."""


def sigma(t: torch.Tensor) -> torch.Tensor:
    """Standard deviation of z_t = (1 - t) x + t e for x ~ N(0, S^2), e ~ N(0, 1)."""
    return ((1 - t) ** 2 * S**2 + t**2).sqrt()


def gaussian_u(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact average velocity of data N(0, S^2): the flow map is z_r = (sigma_r / sigma_t) z_t, so
    u = (z_t - z_r) / (t - r) = z (1 - sigma_r / sigma_t) / (t - r) (r != t)."""
    return z * ((1 - sigma(r) / sigma(t)) / (t - r))[:, None, None]


def closed_form_target(net: Linear, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor
                       ) -> torch.Tensor:
    """v - (t - r)(A v + c), by hand."""
    with torch.no_grad():
        dudt = v.flatten(1) @ net.A.T + net.c
        return (v.flatten(1) - (t - r)[:, None] * dudt).reshape(v.shape)


def test_interpolate_is_the_linear_path_and_its_velocity() -> None:
    """z_t = (1 - t) x + t e and v = e - x, per sample."""
    x, e, _, t, z, v = batch()
    for i in range(x.shape[0]):
        torch.testing.assert_close(z[i], (1 - t[i]) * x[i] + t[i] * e[i], rtol=0, atol=1e-15)
    assert torch.equal(v, e - x)


@pytest.mark.parametrize(("method", "atol"), [("forward-ad", 1e-13), ("finite-difference", 1e-8)])
def test_target_on_a_linear_u_equals_its_closed_form(method: str, atol: float, monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    """u_tgt = v - (t - r)(A v + c) for u = A z + b r + c t, by forward-mode AD (1e-13) and by the float64 central
    difference (1e-8: rounding eps |u| / h), each by ctcore.jvp.jvp with that method; the first output is u(z, r, t)
    and keeps its graph; u_tgt is detached."""
    net = Linear()
    _, _, r, t, z, v = batch()
    methods = []

    def spy(*args, method: str, **kwargs):
        methods.append(method)
        return jvp(*args, method=method, **kwargs)

    monkeypatch.setattr(meanflow, "jvp", spy)
    value, u_tgt = meanflow.target(net, z, r, t, v, method=method)
    assert methods == [method]
    torch.testing.assert_close(value, net(z, r, t), rtol=0, atol=1e-13)
    assert value.requires_grad and not u_tgt.requires_grad
    expected = closed_form_target(net, z, r, t, v)
    assert (expected - v).abs().max() > 0.1  # the JVP term matters where r != t
    torch.testing.assert_close(u_tgt, expected, rtol=0, atol=atol)


def test_the_exact_average_velocity_of_gaussian_data_is_its_own_target() -> None:
    """Data N(0, S^2), its exact average velocity `gaussian_u` and marginal velocity v = z sigma_t' / sigma_t: along
    the tangent (v, 0, 1) the MeanFlow identity holds, target(u) = u to 1e-12 (r != t everywhere)."""
    g = torch.Generator().manual_seed(4)
    r, t = meanflow.sample_r_t(64, g, ratio=1.0, dtype=torch.float64)
    z = torch.randn(64, *SHAPE, generator=g, dtype=torch.float64)
    v = z * ((t - (1 - t) * S**2) / sigma(t) ** 2)[:, None, None]
    value, u_tgt = meanflow.target(gaussian_u, z, r, t, v)
    assert (u_tgt - v).abs().max() > 0.1
    torch.testing.assert_close(u_tgt, value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_loss_gradient_equals_its_closed_form_with_the_stop_gradients(p: float) -> None:
    """d/d(A, b, c) of mean_i w_i ||u_i - u_tgt_i||^2, with w_i = 1 / (||u_i - u_tgt_i||^2 + c)^p and u_tgt both held
    constant, is mean_i 2 w_i (u_i - u_tgt_i) (z_i, r_i, t_i)^T, to 1e-10; the per-sample loss is w ||delta||^2; the
    loss never differentiates through a target that requires grad."""
    net = Linear()
    _, _, r, t, z, v = batch()
    value, u_tgt = meanflow.target(net, z, r, t, v)
    per_sample = meanflow.loss(value, u_tgt, p=p, c=ADAPTIVE_C)
    per_sample.mean().backward()
    n = z.shape[0]
    with torch.no_grad():
        delta = (net(z, r, t) - closed_form_target(net, z, r, t, v)).flatten(1)
        sq = delta.square().sum(dim=1)
        w = 1 / (sq + ADAPTIVE_C) ** p
        torch.testing.assert_close(per_sample, w * sq, rtol=1e-14, atol=0)
        coefficient = 2 * w[:, None] * delta / n
        expected = {"A": coefficient.T @ z.flatten(1), "b": coefficient.T @ r, "c": coefficient.T @ t}
    for name, grad in expected.items():
        torch.testing.assert_close(getattr(net, name).grad, grad, rtol=0, atol=1e-10)
    # the loss holds any target constant, not only target()'s detached one
    assert not meanflow.loss(value.detach(), u_tgt.clone().requires_grad_(), p=p).requires_grad


def test_adaptive_weight_is_exact_and_carries_no_gradient() -> None:
    """1 / (delta_sq + c)^p for the paper's p = 1, c = 1e-3 and for p = 0.5; the weight is detached."""
    assert (ADAPTIVE_P, ADAPTIVE_C) == (1.0, 1e-3)
    delta_sq = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    w = meanflow.adaptive_weight(delta_sq)
    assert not w.requires_grad
    assert w.tolist() == [1 / 1e-3, 1 / 1.001, 1 / 3.001]
    assert meanflow.adaptive_weight(delta_sq, 0.5, 0.01).tolist() == [1 / 0.01**0.5, 1 / 1.01**0.5, 1 / 3.01**0.5]


def test_r_t_draw_orders_the_pair_and_sets_r_equal_t_for_the_stated_share() -> None:
    """r <= t in (0, 1); r = t for exactly n - round(ratio n) samples (25% r != t by default); the same generator
    seed gives the same draw; with ratio 1 the logits of r and t together are N(P_MEAN, P_STD^2) within 4 standard
    errors and t is the larger of the pair."""
    assert (P_MEAN, P_STD, RATIO_R_NEQ_T) == (-0.4, 1.0, 0.25)
    n = 4000
    r, t = meanflow.sample_r_t(n, torch.Generator().manual_seed(5))
    assert r.dtype == t.dtype == torch.float32
    assert bool((r <= t).all()) and bool((r > 0).all()) and bool((t < 1).all())
    assert int((r == t).sum()) == n - round(0.25 * n) == 3000
    again = meanflow.sample_r_t(n, torch.Generator().manual_seed(5))
    assert torch.equal(again[0], r) and torch.equal(again[1], t)
    for ratio, equal in [(0.0, n), (0.75, 1000), (1.0, 0)]:
        rr, tt = meanflow.sample_r_t(n, torch.Generator().manual_seed(6), ratio=ratio, dtype=torch.float64)
        assert int((rr == tt).sum()) == equal and bool((rr <= tt).all())
    logits = torch.logit(torch.cat([rr, tt]))
    assert abs(logits.mean().item() - P_MEAN) < 4 * P_STD / math.sqrt(2 * n)
    assert abs(logits.std().item() - P_STD) < 4 * P_STD / math.sqrt(4 * n)
    assert torch.logit(tt).mean() - torch.logit(rr).mean() > 1.0  # E[max - min] of two N(0, 1) draws: 2 / sqrt(pi)


def test_one_step_sampling_is_z1_minus_u_at_0_1() -> None:
    """x = e - u(e, 0, 1): on the linear u, e - (A e + c) (r = 0 drops b); on Gaussian data N(0, S^2) with its exact
    average velocity, the one step is the exact flow map e -> S e."""
    net = Linear()
    e = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        x = meanflow.sample_one_step(net, e)
        expected = e - (e.flatten(1) @ net.A.T + net.c).reshape(e.shape)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(meanflow.sample_one_step(gaussian_u, e), S * e, rtol=0, atol=1e-14)
