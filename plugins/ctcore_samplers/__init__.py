"""Built-in samplers: consistency multistep sampling (CM Algorithm 1) for consistency models, and EDM's
deterministic Heun and Euler solvers of the probability-flow ODE for diffusion models (Karras et al. 2022)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import attrs
import torch

from ctcore import hookimpl
from ctcore.components import BuildContext, NoiseLevels, within
from ctcore.consistency import karras_sigmas


def _check_levels(sigmas: list[float], low: float, high: float, interval: str) -> None:
    outside = [s for s in sigmas if not low < s <= high]
    if not sigmas or outside:
        raise ValueError(f"sigmas must lie in {interval}, got {sigmas}")
    if any(b >= a for a, b in zip(sigmas, sigmas[1:], strict=False)):
        raise ValueError(f"sigmas must decrease (e.g. 80,0.821), got {sigmas}")


class Consistency:
    """x = f(sigma_0 z_0, sigma_0); for each next sigma: x = f(x + sqrt(sigma^2 - sigma_min^2) z_k, sigma)."""

    name: ClassVar[str] = "consistency"
    summary: ClassVar[str] = "consistency sampling: one step at sigma_max, then sampling.sigma_mid (CM Algorithm 1)"
    model: ClassVar[str] = "consistency"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options

    def plan(self, steps: int | None, sigmas: list[float] | None, levels: NoiseLevels) -> list[float]:
        if sigmas is None:
            n = 1 if steps is None else steps
            mids = list(levels.sigma_mid)
            if n - 1 > len(mids):
                raise ValueError(f"{n} steps need {n - 1} intermediate sigmas but the recipe's sampling.sigma_mid "
                                 f"has {mids}")
            sigmas = [levels.sigma_max, *mids[: n - 1]]
        sigmas = [float(s) for s in sigmas]
        _check_levels(sigmas, levels.sigma_min, levels.sigma_max,
                      f"(sigma_min, sigma_max] = ({levels.sigma_min}, {levels.sigma_max}]")
        return sigmas

    def preview_plans(self, levels: NoiseLevels) -> dict[str, list[float]]:
        plans = {"1step": [levels.sigma_max]}
        if levels.sigma_mid:
            plans[f"{1 + len(levels.sigma_mid)}step"] = [levels.sigma_max, *levels.sigma_mid]
        return plans

    def noise_draws(self, sigmas: list[float]) -> int:
        return len(sigmas)

    def evaluations(self, sigmas: list[float]) -> int:
        return len(sigmas)

    def sample(self, denoiser: Callable[..., torch.Tensor], noise: torch.Tensor, sigmas: list[float],
               labels: torch.Tensor | None, levels: NoiseLevels, clip: bool) -> torch.Tensor:
        from ctcore.sampling import multistep_sample

        return multistep_sample(denoiser, noise, sigmas, labels, sigma_min=levels.sigma_min, clip=clip)


@attrs.frozen
class OdeOptions:
    steps: int = attrs.field(default=18, validator=within(1, 10_000, "noise levels visited; EDM CIFAR-10 uses 18"))
    """Noise levels of the default plan: the Karras grid from sigma_max down to sigma_min, then sigma = 0."""
    rho: float = attrs.field(default=7.0, validator=within(
        0.1, 1000.0, "the grid's sigma^(1/rho) spacing; EDM 7"))


class _OdeSampler:
    """Deterministic solvers of dx/dsigma = (x - D(x, sigma)) / sigma from sigma_0 z down to sigma = 0."""

    model: ClassVar[str] = "diffusion"
    Options = OdeOptions
    second_order: ClassVar[bool] = False

    def __init__(self, options: OdeOptions, context: BuildContext) -> None:
        self.options = options

    def plan(self, steps: int | None, sigmas: list[float] | None, levels: NoiseLevels) -> list[float]:
        if sigmas is None:
            n = self.options.steps if steps is None else steps
            if n == 1:
                sigmas = [levels.sigma_max]
            else:
                grid = karras_sigmas(n, levels.sigma_min, levels.sigma_max, self.options.rho)
                sigmas = grid.flip(0).tolist()
        sigmas = [float(s) for s in sigmas]
        _check_levels(sigmas, 0.0, levels.sigma_max, f"(0, sigma_max] = (0, {levels.sigma_max}]")
        return sigmas

    def preview_plans(self, levels: NoiseLevels) -> dict[str, list[float]]:
        return {f"{self.name}{self.options.steps}": self.plan(None, None, levels)}

    def noise_draws(self, sigmas: list[float]) -> int:
        return 1

    def evaluations(self, sigmas: list[float]) -> int:
        return 2 * len(sigmas) - 1 if self.second_order else len(sigmas)

    @torch.no_grad()
    def sample(self, denoiser: Callable[..., torch.Tensor], noise: torch.Tensor, sigmas: list[float],
               labels: torch.Tensor | None, levels: NoiseLevels, clip: bool) -> torch.Tensor:
        batch = noise.shape[1]
        x = noise[0].to(torch.float64) * sigmas[0]  # EDM integrates in float64; the network sees float32
        levels_to = [*sigmas[1:], 0.0]

        def slope(x: torch.Tensor, sigma: float) -> torch.Tensor:
            d = denoiser(x.to(noise.dtype), torch.full((batch,), sigma, device=noise.device), labels)
            return (x - d.to(torch.float64)) / sigma

        for sigma, nxt in zip(sigmas, levels_to, strict=True):
            d = slope(x, sigma)
            x_next = x + (nxt - sigma) * d
            if self.second_order and nxt > 0:  # Heun's correction; the last step, to sigma = 0, is Euler's
                x_next = x + (nxt - sigma) * 0.5 * (d + slope(x_next, nxt))
            x = x_next
        x = x.to(noise.dtype)
        return x.clamp(-1.0, 1.0) if clip else x


class Heun(_OdeSampler):
    """EDM Algorithm 1 with S_churn = 0: Heun steps between the levels, Euler to 0 (2 N - 1 evaluations)."""

    name: ClassVar[str] = "heun"
    summary: ClassVar[str] = "EDM's deterministic Heun sampler: 18 steps, rho 7, 35 network evaluations"
    second_order: ClassVar[bool] = True


class Euler(_OdeSampler):
    """First-order steps of the probability-flow ODE between the levels and to 0 (N evaluations)."""

    name: ClassVar[str] = "euler"
    summary: ClassVar[str] = "Euler steps of the probability-flow ODE on the Karras grid (N network evaluations)"


@hookimpl
def ctcore_register_samplers() -> list[type]:
    return [Consistency, Heun, Euler]
