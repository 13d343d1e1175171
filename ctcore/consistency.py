"""The paper's maths: Karras sigma grid, the consistency parameterization, pair weights and the loss.

Notation follows iCT (Song & Dhariwal, 2023): an increasing grid sigma_1 < ... < sigma_N; the student sees
sigma_{i+1}, the teacher sigma_i, both with the same noise z and the same dropout mask;
f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import nn

from ctcore.components import NOISE_CONVENTIONS

Weighting = Literal["uniform", "inverse-delta"]


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, i = 1..N.

    Increasing; `n` counts points (N-1 pairs), so n >= 2.
    """
    if n < 2:
        raise ValueError(f"a sigma grid needs at least 2 points, got n={n}")
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max  # exact ends despite rounding
    return sigmas.to(dtype)


def consistency_scalings(
    sigma: torch.Tensor | float, sigma_min: float = 0.002, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) with the sigma_min shift of the CM/iCT parameterization.

    c_skip = sd^2 / ((s - s_min)^2 + sd^2); c_out = (s - s_min) sd / sqrt(s^2 + sd^2) (the shift is in the
    numerator only); c_in = 1 / sqrt(s^2 + sd^2). At sigma_min: c_skip = 1, c_out = 0, so f(x, sigma_min) = x.
    """
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.float64)
    sd2 = sigma_data**2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = (sigma - sigma_min) * sigma_data / torch.sqrt(sigma**2 + sd2)
    c_in = 1.0 / torch.sqrt(sigma**2 + sd2)
    return c_skip, c_out, c_in


def c_noise(sigma: torch.Tensor, convention: str) -> torch.Tensor:
    """The network's noise input: 0.25 ln sigma (Fourier) or 1000 * 0.25 ln sigma (ADM positional)."""
    return NOISE_CONVENTIONS[convention] * torch.log(sigma)


def noise_convention(network: nn.Module) -> str:
    """The c_noise convention a network declares, looking through torch.compile and DDP wrappers; an instance may
    set its own (adm with noise_embedding "edm" takes EDM's 0.25 ln sigma)."""
    inner = network
    while not hasattr(type(inner), "noise_conditioning"):
        inner = getattr(inner, "_orig_mod", None) or getattr(inner, "module", None)
        if inner is None:
            raise TypeError(f"{type(network).__name__} declares no noise_conditioning convention")
    return inner.noise_conditioning


def per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample (B,) tensor shaped (B, 1, ..., 1) and cast to x's dtype, to broadcast against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def denoise(
    network: nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    sigma_min: float = 0.002,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """The consistency function f(x, sigma) for a raw network F; `sigma` holds one value per sample."""
    sigma = sigma.to(device=x.device, dtype=torch.float32)
    c_skip, c_out, c_in = consistency_scalings(sigma, sigma_min, sigma_data)
    raw = network(per_sample(c_in, x) * x, c_noise(sigma, noise_convention(network)), labels)
    return per_sample(c_skip, x) * x + per_sample(c_out, x) * raw.to(x.dtype)


def pair_weights(sigmas: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """lambda for each pair (sigma_i, sigma_{i+1}) of a grid: 1 (CT) or 1 / (sigma_{i+1} - sigma_i) (iCT)."""
    return pair_weight(sigmas[:-1], sigmas[1:], weighting)


def pair_weight(sigma_lo: torch.Tensor, sigma_hi: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """lambda of each pair (sigma_lo, sigma_hi): 1 (CT, CD) or 1 / (sigma_hi - sigma_lo) (iCT; ECT's 1 / (t - r))."""
    if weighting == "uniform":
        return torch.ones_like(sigma_hi)
    if weighting == "inverse-delta":
        return 1.0 / (sigma_hi - sigma_lo)
    raise ValueError(f"unknown weighting {weighting!r}: use 'uniform' or 'inverse-delta'")


def noised(x: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x + sigma z with one sigma per example: the point of the forward process that shares the noise z."""
    return x + per_sample(sigma, x) * z


def pf_ode_step(
    D: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    solver: Literal["heun", "euler"] = "heun",
) -> torch.Tensor:
    """One step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from sigma to sigma_next > 0,
    one level per example: Euler, or Heun's second-order correction (EDM Algorithm 1; CM's CD target)."""
    h = per_sample(sigma_next - sigma, x)
    slope = (x - D(x, sigma)) / per_sample(sigma, x)
    euler = x + h * slope
    if solver == "euler":
        return euler
    slope_next = (euler - D(euler, sigma_next)) / per_sample(sigma_next, x)
    return x + h * (slope + slope_next) / 2


@contextlib.contextmanager
def shared_rng(device: torch.device) -> Iterator[None]:
    """Run a block twice with identical randomness: the state is saved on entry and restored on exit.

    Used so the teacher's dropout mask equals the student's. The CPU generator and, on CUDA, the
    generator of `device` are both saved and restored.
    """
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


ModelFunction = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""(network, x, sigma per example, labels) -> the consistency function f(x, sigma) of that network."""


def consistency_loss(
    student: nn.Module,
    teacher: nn.Module,
    metric: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    sigma_lo: torch.Tensor,
    sigma_hi: torch.Tensor,
    z: torch.Tensor,
    *,
    weighting: Weighting,
    f: ModelFunction,
    teacher_input: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean_b lambda(sigma_lo, sigma_hi) d(f_theta(x + sigma_hi z, sigma_hi), f_theta-(x_lo, sigma_lo)).

    x_lo is `teacher_input(x, z, sigma_lo, sigma_hi, labels)` (default x + sigma_lo z, consistency training).
    The teacher runs under no_grad with the same dropout mask as the student; where sigma_lo = 0 the target is x
    itself (the boundary f(x, 0) = x; ECT's pairs reach it). Returns (loss, per-example weighted distances).
    """
    weights = pair_weight(sigma_lo, sigma_hi, weighting)
    with shared_rng(x.device):
        student_out = f(student, noised(x, z, sigma_hi), sigma_hi, labels)
    with torch.no_grad():
        at_zero = sigma_lo <= 0
        # the teacher never sees sigma = 0 (ln 0 in c_noise): those examples take x below instead
        sigma_teacher = torch.where(at_zero, sigma_hi, sigma_lo)
        x_lo = noised(x, z, sigma_lo) if teacher_input is None else teacher_input(x, z, sigma_teacher, sigma_hi,
                                                                                 labels)
        teacher_out = f(teacher, x_lo, sigma_teacher, labels)
        teacher_out = torch.where(per_sample(at_zero, x).bool(), x.to(teacher_out.dtype), teacher_out)
    distances = metric(student_out.float(), teacher_out.float()) * weights.to(torch.float32)
    return distances.mean(), distances.detach()
