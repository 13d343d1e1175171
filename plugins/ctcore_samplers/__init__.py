"""Built-in samplers: consistency multistep sampling (CM Algorithm 1) for consistency models, its sCM and MeanFlow
forms (one jump from sigma_max, a second through the paper's intermediate time), and EDM's deterministic Heun and
Euler solvers of the probability-flow ODE for diffusion models (Karras et al. 2022)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

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


class _TimeSampler:
    """One jump from sigma_max to the clean estimate x = f(sigma_max z_0, sigma_max); for a second step the estimate
    is re-noised to the intermediate level, x + sigma_mid z_1 (the exact noise of that level: no sigma_min term, the
    function is a consistency function down to sigma = 0), and jumped again. The intermediate level comes from the
    paper's intermediate time `t_mid` (`sigma_of`)."""

    model: ClassVar[str] = "consistency"

    def __init__(self, options: Any, context: BuildContext) -> None:
        self.options = options

    def sigma_of(self, t: float, levels: NoiseLevels) -> float:
        """EDM's noise level of the paper's time t."""
        raise NotImplementedError

    def plan(self, steps: int | None, sigmas: list[float] | None, levels: NoiseLevels) -> list[float]:
        if sigmas is None:
            n = 1 if steps is None else steps
            if n not in (1, 2):
                raise ValueError(f"{self.name} samples in 1 or 2 steps by itself (t_mid = {self.options.t_mid}); "
                                 f"for {n} steps give the levels, e.g. --sigmas 80,2,0.5")
            mid = self.sigma_of(self.options.t_mid, levels)
            if n == 2 and not mid < levels.sigma_max:
                raise ValueError(f"{self.name}: t_mid = {self.options.t_mid} is sigma {mid:g}, not below sigma_max "
                                 f"{levels.sigma_max:g}; lower sampler.t_mid")
            sigmas = [levels.sigma_max, mid][:n]
        sigmas = [float(s) for s in sigmas]
        _check_levels(sigmas, 0.0, levels.sigma_max, f"(0, sigma_max] = (0, {levels.sigma_max}]")
        return sigmas

    def preview_plans(self, levels: NoiseLevels) -> dict[str, list[float]]:
        plans = {"1step": self.plan(1, None, levels)}
        if self.sigma_of(self.options.t_mid, levels) < levels.sigma_max:
            plans["2step"] = self.plan(2, None, levels)
        return plans

    def noise_draws(self, sigmas: list[float]) -> int:
        return len(sigmas)

    def evaluations(self, sigmas: list[float]) -> int:
        return len(sigmas)

    @torch.no_grad()
    def sample(self, denoiser: Callable[..., torch.Tensor], noise: torch.Tensor, sigmas: list[float],
               labels: torch.Tensor | None, levels: NoiseLevels, clip: bool) -> torch.Tensor:
        batch = noise.shape[1]
        x = None
        for k, sigma in enumerate(sigmas):
            noisy = sigma * noise[k] if x is None else x + sigma * noise[k]
            x = denoiser(noisy, torch.full((batch,), float(sigma), device=noise.device), labels)
        return x.clamp(-1.0, 1.0) if clip else x


class Scm(_TimeSampler):
    """sCM's sampler (Lu & Song 2024): one step from T = arctan(sigma_max / sigma_d) (1.5645 at 80 and 0.5), a
    second through TrigFlow's t_mid, sigma = sigma_d tan(t_mid)."""

    name: ClassVar[str] = "scm"
    summary: ClassVar[str] = "sCM sampling: one step from sigma_max, two through TrigFlow's t_mid = 1.1"

    @attrs.frozen
    class Options:
        t_mid: float = attrs.field(default=1.1, validator=within(
            1e-6, math.pi / 2, "TrigFlow's intermediate time of 2-step sampling, in (0, pi/2); sCM 1.1",
            open_hi=True))
        """The intermediate TrigFlow time of 2-step sampling (sCM: 1.1), sigma = sigma_d tan(t_mid)."""

    def sigma_of(self, t: float, levels: NoiseLevels) -> float:
        return levels.sigma_data * math.tan(t)


class MeanFlowSampler(_TimeSampler):
    """MeanFlow's few-step generation (eq. 12): from sigma_max (flow time t = sigma_max / (1 + sigma_max), 0.988 at
    80; the paper starts at t = 1) each level is reached by the model's own jump z_r = z_t - (t - r) u(z_t, r, t),
    the last one to t = 0; one noise draw. With `deterministic = false`, or for a model without a jump (only
    `meanflow` has one), each level re-noises the clean estimate instead, as `scm` does."""

    name: ClassVar[str] = "meanflow"
    summary: ClassVar[str] = "MeanFlow sampling: one jump from sigma_max, two through flow time t_mid = 0.5"

    @attrs.frozen
    class Options:
        t_mid: float = attrs.field(default=0.5, validator=within(
            1e-6, 1.0, "the flow's intermediate time of 2-step sampling, in (0, 1)", open_hi=True))
        """The intermediate flow time of 2-step sampling, sigma = t_mid / (1 - t_mid) (UNVERIFIED: the paper states
        none; NVlabs/FastGen uses 0.5)."""
        deterministic: bool = True
        """True: the paper's deterministic jumps between levels with u(z, r, t); false: re-noise at each level."""

    def sigma_of(self, t: float, levels: NoiseLevels) -> float:
        return t / (1 - t)

    @torch.no_grad()
    def sample(self, denoiser: Callable[..., torch.Tensor], noise: torch.Tensor, sigmas: list[float],
               labels: torch.Tensor | None, levels: NoiseLevels, clip: bool) -> torch.Tensor:
        jump = getattr(denoiser, "jump", None)
        if not self.options.deterministic or jump is None:
            return super().sample(denoiser, noise, sigmas, labels, levels, clip)
        batch = noise.shape[1]

        def level(sigma: float) -> torch.Tensor:
            return torch.full((batch,), float(sigma), device=noise.device)

        x = sigmas[0] * noise[0]
        for sigma, nxt in zip(sigmas, sigmas[1:], strict=False):
            x = jump(x, level(sigma), level(nxt), labels)
        x = denoiser(x, level(sigmas[-1]), labels)
        return x.clamp(-1.0, 1.0) if clip else x


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
    return [Consistency, Heun, Euler, Scm, MeanFlowSampler]
