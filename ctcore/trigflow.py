"""TrigFlow and the continuous-time consistency loss of sCM (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models"), as plain maths for the sCT / sCD objectives of issue 26.

TrigFlow: x_0 from the data (std sigma_d), z ~ N(0, sigma_d^2 I), t in [0, pi/2];
x_t = cos(t) x_0 + sin(t) z, dx_t/dt = cos(t) z - sin(t) x_0 (sCT; sCD takes the teacher's sigma_d F_teacher instead).
The network F takes (x_t / sigma_d, t) and the consistency function is f(x_t, t) = cos(t) x_t - sin(t) sigma_d F.
EDM: sigma = sigma_d tan(t) and x_sigma = x_t / cos(t), so x_t / sigma_d = c_in(sigma) x_sigma, f = EDM's denoiser D,
and an EDM-preconditioned F_edm (c_skip = cos^2 t, c_out = sigma_d sin t, no sigma_min shift) is F = -F_edm.

The loss (the paper's Algorithm 1, with its prior weighting 1 / (sigma_d tan t) folded in, so the target is
cos(t) df^-/dt): g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r sin(t) cos(t) (x_t + sigma_d dF^-/dt), with r the tangent
warm-up; the JVP is taken along (cos t sin t dx_t/dt, cos t sin t sigma_d), which gives sigma_d sin t cos t dF^-/dt
directly (no 1 / sin t blow-up near t = 0 or pi/2); g <- g / (||g|| + c); per sample,
loss = exp(-logvar) / D ||F - F^- - g||^2 + logvar, D the elements of one sample (the paper writes
e^{w(t)} / D ||.||^2 - w(t): logvar = -w, a log-variance as in EDM2's learned uncertainty).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ctcore.consistency import per_sample
from ctcore.jvp import FD_STEP, Method, jvp


def sigma_from_t(t: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """EDM's noise level of TrigFlow time t: sigma = sigma_d tan(t)."""
    return sigma_d * torch.tan(t)


def t_from_sigma(sigma: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """TrigFlow time of EDM noise level sigma: t = arctan(sigma / sigma_d) (pi/2 at sigma = inf)."""
    return torch.atan2(sigma, torch.full_like(sigma, sigma_d))


def edm_x_from_trigflow(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """EDM's x_sigma = x_0 + sigma n of TrigFlow's x_t: x_t / cos(t)."""
    return x_t / per_sample(torch.cos(t), x_t)


def trigflow_x_from_edm(x: torch.Tensor, sigma: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """TrigFlow's x_t of EDM's x_sigma: x_sigma cos(t) = x_sigma sigma_d / sqrt(sigma^2 + sigma_d^2)."""
    return x * per_sample(sigma_d / torch.sqrt(sigma**2 + sigma_d**2), x)


def interpolate(x_0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, dx_t/dt) = (cos t x_0 + sin t z, cos t z - sin t x_0) for noise z of std sigma_d (sCT's tangent)."""
    c, s = per_sample(torch.cos(t), x_0), per_sample(torch.sin(t), x_0)
    return c * x_0 + s * z, c * z - s * x_0


def consistency_function(x_t: torch.Tensor, t: torch.Tensor, F_out: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F: the clean estimate (EDM's denoiser D at x_t / cos t)."""
    return per_sample(torch.cos(t), x_t) * x_t - per_sample(torch.sin(t), x_t) * sigma_d * F_out


def velocity_from_denoised(x_t: torch.Tensor, t: torch.Tensor, denoised: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """F = (cos(t) x_t - D) / (sigma_d sin t): the TrigFlow output of a denoiser's D(x_t / cos t, sigma_d tan t), the
    inverse of `consistency_function` (sCD's teacher: dx_t/dt = sigma_d F); t > 0."""
    return (per_sample(torch.cos(t), x_t) * x_t - denoised) / (sigma_d * per_sample(torch.sin(t), x_t))


def proposal(batch_size: int, generator: torch.Generator, *, p_mean: float, p_std: float, sigma_d: float,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """t = arctan(exp(tau) / sigma_d), tau ~ N(p_mean, p_std^2): sigma = sigma_d tan t is lognormal (the paper's
    proposal; CIFAR-10 p_mean -1.0, p_std 1.4, sCM App. G.2), drawn from `generator` on its device."""
    tau = p_mean + p_std * torch.randn(batch_size, generator=generator, device=generator.device, dtype=torch.float64)
    return torch.atan(torch.exp(tau) / sigma_d).to(dtype)


def warmup(step: int, steps: int) -> float:
    """The tangent warm-up r = min(1, step / H), H = `steps` (sCM: 10k iterations, App. G.2); 1 if H <= 0."""
    return 1.0 if steps <= 0 else min(1.0, step / steps)


def normalize(g: torch.Tensor, c: float) -> torch.Tensor:
    """g / (||g|| + c), ||g|| the L2 norm of each sample over all its elements (the paper's c = 0.1; per sample is
    UNVERIFIED: the paper states it for one sample)."""
    norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    return g / per_sample(norm + c, g)


def tangent(
    F: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    dxt_dt: torch.Tensor,
    *,
    sigma_d: float,
    r: float = 1.0,
    c: float | None = 0.1,
    method: Method = "forward-ad",
    step: float = FD_STEP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F^-, g): the stop-gradient output F(x_t / sigma_d, t) and the target tangent g of the module docstring.

    F(x, t) takes t itself (a network with another time input wraps it, and the JVP's chain rule follows); its dF/dt
    comes from `ctcore.jvp.jvp` (`method`; `step` the finite difference's h), under the entry RNG state, so the
    step's next pass of F draws the same dropout mask. r is the warm-up factor (`warmup`), c the normalisation
    constant (None: no normalisation, the paper's ablation). Both outputs carry no graph and come in x_t's dtype.
    """
    cos, sin = torch.cos(t), torch.sin(t)
    with torch.no_grad():
        F_minus, sd_dF = jvp(F, (x_t / sigma_d, t), (per_sample(cos * sin, x_t) * dxt_dt, cos * sin * sigma_d),
                             method=method, step=step)
        F_minus, sd_dF = F_minus.to(x_t.dtype), sd_dF.to(x_t.dtype)
        g = (-per_sample(cos**2, x_t) * (sigma_d * F_minus - dxt_dt)
             - r * (per_sample(sin * cos, x_t) * x_t + sd_dF))
        if c is not None:
            g = normalize(g, c)
    return F_minus, g


def scm_loss(F_out: torch.Tensor, F_minus: torch.Tensor, g: torch.Tensor,
             logvar: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample sCM loss: ||F - F^- - g||^2 / D, or exp(-logvar) ||F - F^- - g||^2 / D + logvar with a learned
    log-variance (B,) (the adaptive weighting); D = elements per sample. Its gradient at F = F^- is -2 g dF / D."""
    mse = (F_out - F_minus - g).square().flatten(1).mean(1)
    if logvar is None:
        return mse
    return torch.exp(-logvar) * mse + logvar


class LogvarHead(nn.Module):
    """sCM's adaptive weighting w(t) as a learned log-variance logvar(t) = -w(t): fixed random Fourier features
    sqrt(2) cos(2 pi (f_j c + p_j)), f_j ~ N(0, 1), p_j ~ U[0, 1) (EDM2's uncertainty head), then one linear layer
    initialised to zero (every weight 1 at the start). Networks build it under their `logvar_head` option."""

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels))
        self.register_buffer("phases", torch.rand(channels))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """logvar of each sample (B,) in float32 (float64 for a float64 head) from one time value per sample."""
        dtype = torch.promote_types(self.freqs.dtype, torch.float32)
        features = math.sqrt(2) * torch.cos(2 * math.pi * (c.to(dtype)[:, None] * self.freqs + self.phases))
        return self.linear(features.to(self.linear.weight.dtype)).squeeze(1).to(dtype)


def head_logvar(network: nn.Module, c: torch.Tensor) -> torch.Tensor:
    """logvar(c) of a network that keeps its LogvarHead (or None) as `logvar_head`, as mlp, ncsnpp and adm do;
    without the head, a ValueError naming the network and the option that adds it."""
    head = network.logvar_head
    if head is None:
        raise ValueError(f"network {network.name!r} has no log-variance head: set its option logvar_head = true")
    return head(c)
