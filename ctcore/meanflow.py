"""MeanFlow's maths (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447; issue 26).

The path z_t = (1 - t) x + t e (e ~ N(0, I)) has the conditional velocity v = e - x. A network models the average
velocity u(z_t, r, t) = (z_t - z_r) / (t - r) over [r, t]; the MeanFlow identity u = v - (t - r) du/dt, with the total
derivative du/dt = v . d_z u + d_t u (a JVP along the tangents (v, 0, 1) over (z, r, t)), gives the regression target
u_tgt = v - (t - r) stopgrad(du/dt). The loss is ||u - stopgrad(u_tgt)||^2 per sample, weighted adaptively by
stopgrad(1 / (||u - u_tgt||^2 + c)^p). Sampling in one step: x = z_1 - u(z_1, 0, 1).

Paper values (its ImageNet 256 ablations, Table 1, and defaults): (r, t) from two logit-normal draws with P_mean -0.4,
P_std 1.0, t the larger, r the smaller; r != t for 25% of samples; p = 1, c = 1e-3. Stated from the paper as recalled,
not re-read here, and agreeing with a third-party summary (kylevedder/DenoisingZoo, EXPERIMENT_LOG.md); the table
number is UNVERIFIED. The paper's CIFAR-10 settings differ (UNVERIFIED, same summary: logit-normal (-2.0, 2.0), r != t
75%, p 0.75).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ctcore.consistency import per_sample
from ctcore.jvp import FD_STEP, Method, jvp

AverageVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(z, r, t) -> u(z, r, t), r and t of shape (batch,)."""

P_MEAN = -0.4
"""Mean of the logit-normal time draws (paper: the ablations' best, its ImageNet default)."""
P_STD = 1.0
"""Standard deviation of the logit-normal time draws (paper, as P_MEAN)."""
RATIO_R_NEQ_T = 0.25
"""Share of samples with r != t (paper: the ablations' best, 25%); the others take r = t (flow matching)."""
ADAPTIVE_P = 1.0
"""Power p of the adaptive weight 1 / (||delta||^2 + c)^p (paper, section 4: p = 1 its default)."""
ADAPTIVE_C = 1e-3
"""Constant c of the adaptive weight (paper: "a small constant, e.g. 1e-3")."""


def sample_r_t(
    n: int,
    generator: torch.Generator,
    *,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    ratio: float = RATIO_R_NEQ_T,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t), each (n,): two logit-normal draws sigmoid(N(p_mean, p_std^2)), t the larger, r the smaller; then
    r = t for exactly n - round(ratio n) samples, at random positions; drawn on the generator's device (an exact
    count per batch: UNVERIFIED whether the paper's code uses a count or a per-sample coin; the expected share is
    the same)."""
    where = generator.device
    draws = torch.sigmoid(p_mean + p_std * torch.randn(2, n, generator=generator, dtype=torch.float64, device=where))
    t, r = draws.max(dim=0).values, draws.min(dim=0).values
    equal = torch.randperm(n, generator=generator, device=where)[: n - round(ratio * n)]
    r[equal] = t[equal]
    return r.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device)


def interpolate(x: torch.Tensor, e: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, v): the point z_t = (1 - t) x + t e of the linear path and its conditional velocity v = e - x."""
    tt = per_sample(t, x)
    return (1 - tt) * x + tt * e, e - x


def target(
    u: AverageVelocity,
    z: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    *,
    method: Method = "forward-ad",
    step: float = FD_STEP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u(z, r, t) with its graph to the parameters, u_tgt = v - (t - r) du/dt detached), du/dt the JVP of u along
    (v, 0, 1) by ctcore.jvp.jvp (one pass, the step's dropout mask)."""
    value, dudt = jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)), method=method, step=step)
    u_tgt = v.to(dudt.dtype) - per_sample(t - r, dudt) * dudt
    return value, u_tgt.detach()


def adaptive_weight(delta_sq: torch.Tensor, p: float = ADAPTIVE_P, c: float = ADAPTIVE_C) -> torch.Tensor:
    """stopgrad(1 / (delta_sq + c)^p) per sample: with p = 1 the loss's gradient is that of log(delta_sq + c), with
    p = 0 that of the plain squared L2."""
    return 1 / (delta_sq.detach() + c) ** p


def loss(
    u: torch.Tensor, u_tgt: torch.Tensor, p: float = ADAPTIVE_P, c: float = ADAPTIVE_C
) -> torch.Tensor:
    """Per-sample adaptively weighted loss w ||u - stopgrad(u_tgt)||^2 (squared L2 norm summed over the sample's
    entries; UNVERIFIED whether the paper's code sums or averages them, which rescales c), shape (batch,)."""
    delta_sq = (u - u_tgt.detach()).flatten(1).square().sum(dim=1)
    return adaptive_weight(delta_sq, p, c) * delta_sq


def step(u: AverageVelocity, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_r = z_t - (t - r) u(z_t, r, t): the exact jump from t to r when u is the true average velocity."""
    return z - per_sample(t - r, z) * u(z, r, t)


def sample_one_step(u: AverageVelocity, e: torch.Tensor) -> torch.Tensor:
    """One-step generation x = z_1 - u(z_1, 0, 1) from noise e = z_1."""
    ones = torch.ones(e.shape[0], dtype=e.dtype, device=e.device)
    return step(u, e, torch.zeros_like(ones), ones)
