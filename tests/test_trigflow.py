"""ctcore.trigflow: TrigFlow <-> EDM conversions exact both ways, the sCM tangent and loss gradient against closed
forms on a linear network F(x, t) = A x + b t (computed in numpy, no autograd), the normalisation, warm-up and
proposal exactly as stated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctcore import trigflow
from ctcore.consistency import consistency_scalings
from ctcore.trigflow import (
    consistency_function,
    edm_x_from_trigflow,
    interpolate,
    normalize,
    proposal,
    scm_loss,
    sigma_from_t,
    t_from_sigma,
    tangent,
    trigflow_x_from_edm,
    velocity_from_denoised,
    warmup,
)

SIGMA_D = 0.5
T = torch.tensor([1e-3, 0.1, 0.5, 1.0, 1.4, 1.55], dtype=torch.float64)
"""Times across (0, pi/2): sigma = 0.5 tan t from 5e-4 to 24."""
N = 5
"""Elements per sample of the linear network's input and output."""


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_0, z of std sigma_d, an arbitrary dx_t/dt as sCD's teacher gives one), one row per time of T, float64."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(len(T), N, generator=g, dtype=torch.float64)  # noqa: E731
    return draw(), SIGMA_D * draw(), draw()


def linear(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) of the linear network F(x, t) = A x + b t."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, N)), rng.standard_normal(N)


def network(A: np.ndarray, b: np.ndarray, requires_grad: bool = False):
    """F(x, t) = A x + b t in torch over (B, N) and (B,), with its parameters."""
    At, bt = torch.tensor(A, requires_grad=requires_grad), torch.tensor(b, requires_grad=requires_grad)
    return (lambda x, t: x @ At.T + t[:, None] * bt), At, bt


def col(v: torch.Tensor | np.ndarray) -> np.ndarray:
    """A per-sample vector as a numpy column, to scale the rows of a (B, N) array."""
    return np.asarray(v, dtype=np.float64).reshape(-1, 1)


def closed_form(A: np.ndarray, b: np.ndarray, x_t: np.ndarray, t: np.ndarray, v: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(F^-, cos t df^-/dt, sin t cos t (x_t + sigma_d dF^-/dt)) for F(x, t) = A x + b t, from the definitions alone:
    f(x_t, t) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t) differentiated in t along dx_t/dt = v with theta
    fixed, dF/dt = A v / sigma_d + b."""
    c, s = col(np.cos(t)), col(np.sin(t))
    F = (x_t / SIGMA_D) @ A.T + col(t) * b
    dF = v @ A.T / SIGMA_D + b
    df = -s * x_t + c * v - SIGMA_D * (c * F + s * dF)
    return F, c * df, s * c * (x_t + SIGMA_D * dF)


def test_trigflow_and_edm_convert_exactly_both_ways() -> None:
    """sigma = sigma_d tan t and back, x_sigma = x_t / cos t and back, to 1e-14 (relative) at six t in (0, pi/2);
    the TrigFlow x_t of (x_0, z) is EDM's x_0 + sigma n (z = sigma_d n); with an EDM-preconditioned F_edm (c_skip,
    c_out, c_in of ctcore.consistency without the sigma_min shift), x_t / sigma_d = c_in x_sigma, F = -F_edm makes
    f equal EDM's denoiser D, and `velocity_from_denoised` inverts it."""
    sigma = sigma_from_t(T, SIGMA_D)
    np.testing.assert_allclose(sigma.numpy(), SIGMA_D * np.tan(T.numpy()), rtol=1e-15, atol=0)
    torch.testing.assert_close(t_from_sigma(sigma, SIGMA_D), T, rtol=1e-14, atol=0)
    torch.testing.assert_close(sigma_from_t(t_from_sigma(sigma, SIGMA_D), SIGMA_D), sigma, rtol=1e-14, atol=0)
    assert t_from_sigma(torch.tensor([float("inf")], dtype=torch.float64), SIGMA_D).item() == np.pi / 2

    x_0, z, _ = batch()
    x_t, v = interpolate(x_0, z, T)
    cos, sin = col(np.cos(T.numpy())), col(np.sin(T.numpy()))
    np.testing.assert_allclose(x_t.numpy(), cos * x_0.numpy() + sin * z.numpy(), rtol=1e-15)
    np.testing.assert_allclose(v.numpy(), cos * z.numpy() - sin * x_0.numpy(), rtol=1e-15)
    x_sigma = edm_x_from_trigflow(x_t, T)
    torch.testing.assert_close(x_sigma, x_0 + sigma[:, None] * z / SIGMA_D, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(trigflow_x_from_edm(x_sigma, sigma, SIGMA_D), x_t, rtol=1e-14, atol=1e-15)

    W = torch.tensor(linear(3)[0])
    F_edm = lambda x, c_noise: torch.tanh(x @ W.T) + c_noise[:, None]  # noqa: E731  (any raw network)
    c_skip, c_out, c_in = consistency_scalings(sigma, sigma_min=0.0, sigma_data=SIGMA_D)
    torch.testing.assert_close(c_in[:, None] * x_sigma, x_t / SIGMA_D, rtol=1e-14, atol=1e-15)
    c_noise = 0.25 * torch.log(sigma)
    D = c_skip[:, None] * x_sigma + c_out[:, None] * F_edm(c_in[:, None] * x_sigma, c_noise)
    F_trig = -F_edm(x_t / SIGMA_D, c_noise)
    torch.testing.assert_close(consistency_function(x_t, T, F_trig, SIGMA_D), D, rtol=1e-14, atol=1e-14)
    # the inverse divides by sigma_d sin t (5e-4 at t = 1e-3), which scales D's rounding up by 2e3 there
    torch.testing.assert_close(velocity_from_denoised(x_t[1:], T[1:], D[1:], SIGMA_D), F_trig[1:], rtol=1e-14,
                               atol=1e-14)
    torch.testing.assert_close(velocity_from_denoised(x_t[:1], T[:1], D[:1], SIGMA_D), F_trig[:1], rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("method", ["forward-ad", "finite-difference"])
def test_tangent_equals_the_closed_form_on_a_linear_network(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without normalisation and warm-up (c None, r 1), g = cos t df^-/dt of the closed form from f's definition,
    to 1e-13 of max |g| (forward AD) or 1e-8 (the central difference, h = 1e-6, rounding about 1e-10); F^- is
    A x_t / sigma_d + b t; with r = 0.3 only the sin t cos t (x_t + sigma_d dF/dt) part is scaled; with c = 0.1 each
    sample is divided by its own ||g|| + 0.1. The JVP goes through ctcore.jvp.jvp with the method asked for."""
    methods = []
    real_jvp = trigflow.jvp
    monkeypatch.setattr(trigflow, "jvp", lambda *a, **k: methods.append(k["method"]) or real_jvp(*a, **k))
    A, b = linear()
    F, _, _ = network(A, b)
    x_0, z, v = batch()
    x_t = interpolate(x_0, z, T)[0]
    F_ref, g_ref, warm_part = closed_form(A, b, x_t.numpy(), T.numpy(), v.numpy())
    tol = 1e-13 if method == "forward-ad" else 1e-8
    scale = np.abs(g_ref).max()

    F_minus, g = tangent(F, x_t, T, v, sigma_d=SIGMA_D, r=1.0, c=None, method=method)
    assert F_minus.dtype == g.dtype == torch.float64 and not F_minus.requires_grad and not g.requires_grad
    np.testing.assert_allclose(F_minus.numpy(), F_ref, rtol=0, atol=tol * np.abs(F_ref).max())
    np.testing.assert_allclose(g.numpy(), g_ref, rtol=0, atol=tol * scale)

    g_warm = g_ref + 0.7 * warm_part  # r = 0.3: the warmed-up part enters 0.3 times instead of once
    _, g = tangent(F, x_t, T, v, sigma_d=SIGMA_D, r=0.3, c=None, method=method)
    np.testing.assert_allclose(g.numpy(), g_warm, rtol=0, atol=tol * np.abs(g_warm).max())

    _, g = tangent(F, x_t, T, v, sigma_d=SIGMA_D, r=0.3, method=method)
    expected = g_warm / (np.linalg.norm(g_warm, axis=1, keepdims=True) + 0.1)
    np.testing.assert_allclose(g.numpy(), expected, rtol=0, atol=tol)
    assert methods == [method] * 3


@pytest.mark.parametrize("adaptive", [True, False])
def test_scm_loss_gradient_equals_the_closed_form_on_a_linear_network(adaptive: bool) -> None:
    """The gradient of sum_i scm_loss (F^- and g from `tangent` with r = 0.7, c = 0.1, from the same parameters, so
    the residual is -g) with respect to A, b and the log-variance equals, to 1e-10, the closed form computed in
    numpy: dA = sum_i -2 exp(-w_i) / D g_i u_i^T, db = sum_i -2 exp(-w_i) / D g_i t_i (u_i = x_t / sigma_d),
    dw_i = 1 - exp(-w_i) ||g_i||^2 / D; without a log-variance, w = 0 and no + w term. The loss value too."""
    A, b = linear()
    F, At, bt = network(A, b, requires_grad=True)
    x_0, z, v = batch()
    x_t = interpolate(x_0, z, T)[0]
    w_np = np.linspace(-0.5, 0.8, len(T)) if adaptive else np.zeros(len(T))
    logvar = torch.tensor(w_np, requires_grad=True) if adaptive else None

    F_minus, g = tangent(F, x_t, T, v, sigma_d=SIGMA_D, r=0.7)
    loss = scm_loss(F(x_t / SIGMA_D, T), F_minus, g, logvar)
    loss.sum().backward()

    _, g_raw, warm_part = closed_form(A, b, x_t.numpy(), T.numpy(), v.numpy())
    g_raw = g_raw + 0.3 * warm_part
    g_np = g_raw / (np.linalg.norm(g_raw, axis=1, keepdims=True) + 0.1)
    u = x_t.numpy() / SIGMA_D
    weight = col(np.exp(-w_np)) * 2 / N
    np.testing.assert_allclose(At.grad.numpy(), (-weight * g_np).T @ u, rtol=0, atol=1e-10)
    np.testing.assert_allclose(bt.grad.numpy(), (-weight * g_np * col(T)).sum(0), rtol=0, atol=1e-10)
    mse = (g_np**2).sum(1) / N
    np.testing.assert_allclose(loss.detach().numpy(), np.exp(-w_np) * mse + (w_np if adaptive else 0), rtol=0,
                               atol=1e-12)
    if adaptive:
        np.testing.assert_allclose(logvar.grad.numpy(), 1 - np.exp(-w_np) * mse, rtol=0, atol=1e-10)


def test_normalisation_and_warmup_factors_are_exact() -> None:
    """normalize divides each sample by its own L2 norm + c (norms 5 and 13 here: exactly g / 5.1 and g / 13.1);
    warmup is min(1, step / H), 1 when H is 0."""
    g = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[0.0, -5.0], [12.0, 0.0]]], dtype=torch.float64)
    out = normalize(g, 0.1)
    assert torch.equal(out[0], g[0] / 5.1) and torch.equal(out[1], g[1] / 13.1)
    assert torch.equal(normalize(g, 0.0), g / torch.tensor([5.0, 13.0], dtype=torch.float64)[:, None, None])
    assert [warmup(k, 10_000) for k in (0, 2_500, 5_000, 10_000, 20_000)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert warmup(0, 0) == 1.0 and warmup(7, 0) == 1.0


def test_proposal_is_lognormal_sigma_from_the_generator() -> None:
    """t = arctan(exp(tau) / sigma_d), tau = p_mean + p_std n with n the generator's next normals (float64), so
    sigma_d tan t = exp(tau) to 1e-12 relative; in float32 by default; the generator alone decides the draw."""
    n = torch.randn(1000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = proposal(1000, torch.Generator().manual_seed(5), p_mean=-1.0, p_std=1.4, sigma_d=SIGMA_D,
                 dtype=torch.float64)
    torch.testing.assert_close(sigma_from_t(t, SIGMA_D), torch.exp(-1.0 + 1.4 * n), rtol=1e-12, atol=0)
    assert bool(((t > 0) & (t < np.pi / 2)).all())
    t32 = proposal(1000, torch.Generator().manual_seed(5), p_mean=-1.0, p_std=1.4, sigma_d=SIGMA_D)
    assert t32.dtype == torch.float32 and torch.equal(t32, t.float())


@pytest.mark.parametrize("method", ["forward-ad", "finite-difference"])
def test_tangent_leaves_the_dropout_mask_to_the_next_pass(method: str) -> None:
    """With dropout 0.5 inside F, F^- from `tangent` equals (1e-12) the plain F pass that follows it: the same mask,
    and the RNG state on return is as on entry; a fresh mask gives another output."""
    A, b = linear()
    F_lin, _, _ = network(A, b)
    F = lambda x, t: torch.nn.functional.dropout(F_lin(x, t), 0.5, training=True)  # noqa: E731
    x_0, z, v = batch()
    x_t = interpolate(x_0, z, T)[0]
    state = torch.get_rng_state()
    F_minus, _ = tangent(F, x_t, T, v, sigma_d=SIGMA_D, method=method)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(F_minus, F(x_t / SIGMA_D, T), rtol=0, atol=1e-12)
    assert not torch.equal(F_minus, F(x_t / SIGMA_D, T))
