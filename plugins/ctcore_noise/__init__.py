"""Built-in noise schedules: iCT's discretized lognormal over pairs, and CT's uniform pairs."""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

from ctcore import hookimpl
from ctcore.components import BuildContext, NoiseScheduleBase, within


class Lognormal(NoiseScheduleBase):
    """p(i) proportional to erf((ln s_{i+1} - P_mean)/(sqrt2 P_std)) - erf((ln s_i - P_mean)/(sqrt2 P_std))."""

    name: ClassVar[str] = "lognormal"
    summary: ClassVar[str] = "iCT pair sampling: lognormal mass on [sigma_i, sigma_{i+1}]"

    @attrs.frozen
    class Options:
        p_mean: float = attrs.field(default=-1.1, validator=within(
            -20.0, 20.0, "ln sigma of any grid lies within [-11.6, 9.3]; iCT -1.1"))
        p_std: float = attrs.field(default=2.0, validator=within(
            0.01, 100.0, "the spread of ln sigma: iCT 2.0; narrower is one noise level, wider is flat over any grid"))

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options

    def probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        s = sigmas.to(torch.float64)
        cdf = torch.erf((torch.log(s) - self.options.p_mean) / (math.sqrt(2.0) * self.options.p_std))
        mass = cdf[1:] - cdf[:-1]
        total = mass.sum()
        # When the lognormal lies so far off the grid that every erf rounds to +-1, the masses are all 0: take
        # them in log space instead; the plain result stays bit-identical wherever it is usable. Reading the sum
        # is free on CPU; on a GPU torch.where decides on the device instead of waiting for it.
        if total.device.type == "cpu":
            return mass / total if total > 0 else self._far_off_grid(s)
        return torch.where(total > 0, mass / total, self._far_off_grid(s))

    def _far_off_grid(self, s: torch.Tensor) -> torch.Tensor:
        return _log_space_masses((torch.log(s) - self.options.p_mean) / self.options.p_std)


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d <= 0, accurate at both ends."""
    d = d.clamp(max=0.0)
    return torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def _log_space_masses(x: torch.Tensor) -> torch.Tensor:
    """Normalised Phi(x[i+1]) - Phi(x[i]) for increasing standardised x, from log Phi (lower tail) or
    log(1 - Phi) (upper tail), whichever the pair lies in: no underflow however far out the pairs are."""
    lower = torch.special.log_ndtr(x)
    upper = torch.special.log_ndtr(-x)
    log_lower = lower[1:] + _log1mexp(lower[:-1] - lower[1:])
    log_upper = upper[:-1] + _log1mexp(upper[1:] - upper[:-1])
    return torch.softmax(torch.where(x[:-1] > 0, log_upper, log_lower), dim=0)


class Uniform(NoiseScheduleBase):
    """Every pair equally likely (original CT)."""

    name: ClassVar[str] = "uniform"
    summary: ClassVar[str] = "CT pair sampling: every adjacent pair equally likely"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options

    def probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        n = sigmas.shape[0] - 1
        return torch.full((n,), 1.0 / n, dtype=torch.float64)

    def sample(self, sigmas: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, sigmas.shape[0] - 1, (batch_size,), generator=generator, device=generator.device)


@hookimpl
def ctcore_register_noise_schedules() -> list[type]:
    return [Lognormal, Uniform]
