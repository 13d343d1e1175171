"""Built-in noise schedules: iCT's discretized lognormal over pairs, and CT's uniform pairs."""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

from ctcore import hookimpl
from ctcore.components import BuildContext, NoiseScheduleBase, positive


class Lognormal(NoiseScheduleBase):
    """p(i) proportional to erf((ln s_{i+1} - P_mean)/(sqrt2 P_std)) - erf((ln s_i - P_mean)/(sqrt2 P_std))."""

    name: ClassVar[str] = "lognormal"
    summary: ClassVar[str] = "iCT pair sampling: lognormal mass on [sigma_i, sigma_{i+1}]"

    @attrs.frozen
    class Options:
        p_mean: float = -1.1
        p_std: float = attrs.field(default=2.0, validator=positive)

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options

    def probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        s = sigmas.to(torch.float64)
        cdf = torch.erf((torch.log(s) - self.options.p_mean) / (math.sqrt(2.0) * self.options.p_std))
        mass = cdf[1:] - cdf[:-1]
        return mass / mass.sum()


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
