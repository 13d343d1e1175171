"""Built-in noise schedules: iCT's discretized lognormal over grid pairs, CT's uniform grid pairs, and ECT's
continuous pairs (t, r) (Geng et al. 2024, "Consistency Models Made Easy")."""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

from ctcore import hookimpl
from ctcore.components import BuildContext, NoiseScheduleBase, PairDraw, within


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
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        """(grid, its probabilities) of the last call: the consistency objective passes one grid tensor per N(k)."""

    def probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Computed once per grid tensor (the same tensor again returns the same result), so a training step
        neither recomputes them nor, on CPU, reads their sum."""
        if self._last is None or self._last[0] is not sigmas:
            self._last = (sigmas, self._probabilities(sigmas))
        return self._last[1]

    def _probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
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


MAX_STAGE_BITS = 20
"""ECT's q^a stops growing at 2^20: (t - r) / t of 1e-6 is still above float32's resolution of 6e-8."""


class Ect:
    """ECT: t = exp(P_mean + P_std n), n ~ N(0, 1); r = max(t (1 - n(t) / q^a), 0), n(t) = 1 + k sigmoid(-b t),
    stage a = 1 + floor((step - 1) / d): the pair shrinks by q every d steps towards the continuous-time limit."""

    name: ClassVar[str] = "ect"
    summary: ClassVar[str] = "ECT continuous pairs: t lognormal, r = t (1 - n(t)/q^a), a grows every d steps"
    grid: ClassVar[bool] = False

    @attrs.frozen
    class Options:
        p_mean: float = attrs.field(default=-1.1, validator=within(
            -5.0, 5.0, "mean of ln t; ECT -1.1, a median t of 0.33"))
        p_std: float = attrs.field(default=2.0, validator=within(
            0.01, 10.0, "std of ln t; ECT 2.0; wider draws t past float32 (ln t beyond 88) in a long run"))
        q: float = attrs.field(default=2.0, validator=within(
            1.0, 1000.0, "t - r shrinks by q each stage; ECT CIFAR-10 2, ImageNet 4", open_lo=True))
        k: float = attrs.field(default=8.0, validator=within(
            0.0, 1000.0, "n(t) = 1 + k sigmoid(-b t): larger gaps at small t; ECT 8"))
        b: float = attrs.field(default=1.0, validator=within(
            0.0, 1000.0, "n(t) = 1 + k sigmoid(-b t); ECT 1"))
        d: int = attrs.field(default=25_000, validator=within(
            1, 10**9, "steps per stage; ECT CIFAR-10 3.2 Mimg at batch 128 = 25,000"))

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options

    def stage(self, step: int) -> int:
        """a = 1 + floor((step - 1) / d) for step k >= 1 (k counted from 0), 1 at k = 0: ECT's stages. Its code
        divides by q^(stage + 1) with the stage counted from 0, and its first tick is a single iteration, so each
        stage begins one iteration after a multiple of d (k = 25,001 is the first of stage 2 for d = 25,000)."""
        return 1 + max(step - 1, 0) // self.options.d

    def ratio(self, t: torch.Tensor, step: int) -> torch.Tensor:
        """(t - r) / t before the clamp at r = 0: n(t) / q^a, with q^a at most 2^20 (past that t and r would
        round to one float32 noise level, and the pair would stop being a pair)."""
        o = self.options
        divisor = 2.0 ** min(self.stage(step) * math.log2(o.q), MAX_STAGE_BITS)
        return (1.0 + o.k * torch.sigmoid(-o.b * t)) / divisor

    def pairs(self, draw: PairDraw) -> tuple[torch.Tensor, torch.Tensor]:
        o, gen = self.options, draw.noise_generator
        n = torch.randn((draw.batch_size,), generator=gen, device=gen.device, dtype=torch.float64)
        t = torch.exp(n * o.p_std + o.p_mean)
        r = (t * (1.0 - self.ratio(t, draw.step))).clamp(min=0.0)
        return r, t

    def log_fields(self, step: int) -> dict[str, float]:
        return {"ect_stage": self.stage(step)}


@hookimpl
def ctcore_register_noise_schedules() -> list[type]:
    return [Lognormal, Uniform, Ect]
