"""Built-in discretization curricula N(k): iCT exponential doubling, CT's square-root schedule, constant."""

from __future__ import annotations

import math
from typing import ClassVar

import attrs

from ctcore import hookimpl
from ctcore.components import BuildContext, within

MAX_SCALES = 1_000_000
"""The largest s1 and num_scales: N(k) stays at most 1,000,001 grid points, far below torch.multinomial's limit of
2^24 categories, and a new grid of that size costs milliseconds."""
_SCALES_REASON = "pairs of the sigma grid: iCT ends at 1280; torch samples from at most 2^24"


def _total_steps(context: BuildContext) -> int:
    if context.total_steps is None or context.total_steps < 1:
        raise ValueError(f"needs total_steps >= 1 (K, the training length), got {context.total_steps}")
    return context.total_steps


class Exponential:
    """iCT: N(k) = min(s0 * 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1/s0) + 1))."""

    name: ClassVar[str] = "exponential"
    summary: ClassVar[str] = "iCT exponential doubling of N(k) from s0+1 to s1+1 points"

    @attrs.frozen
    class Options:
        s0: int = attrs.field(default=10, validator=within(1, MAX_SCALES, _SCALES_REASON))
        s1: int = attrs.field(default=1280, validator=within(1, MAX_SCALES, _SCALES_REASON))

        def __attrs_post_init__(self) -> None:
            if self.s1 < self.s0:
                raise ValueError(f"s1: must be >= s0 ({self.s0}), got {self.s1}")

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options
        self.total_steps = _total_steps(context)
        s0, s1 = options.s0, options.s1
        self.stage_steps = max(1, math.floor(self.total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
        """K', the length of one doubling stage (at least 1: tiny K would otherwise divide by zero)."""

    def num_scales(self, step: int) -> int:
        doublings = max(step, 0) // self.stage_steps
        return min(self.options.s0 * 2 ** min(doublings, 62), self.options.s1) + 1


class SquareRoot:
    """Original CT: N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1."""

    name: ClassVar[str] = "ct"
    summary: ClassVar[str] = "original CT square-root growth of N(k) from s0 to s1+1 points"

    @attrs.frozen
    class Options:
        s0: int = attrs.field(default=2, validator=within(1, MAX_SCALES, _SCALES_REASON))
        s1: int = attrs.field(default=150, validator=within(1, MAX_SCALES, _SCALES_REASON))

        def __attrs_post_init__(self) -> None:
            if self.s1 < self.s0:
                raise ValueError(f"s1: must be >= s0 ({self.s0}), got {self.s1}")

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options
        self.total_steps = _total_steps(context)

    def num_scales(self, step: int) -> int:
        s0, s1 = self.options.s0, self.options.s1
        frac = min(max(step, 0), self.total_steps) / self.total_steps
        inner = math.ceil(math.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)
        return max(inner, 1) + 1


class Constant:
    """A fixed grid of N points (debugging, or consistency distillation-style fixed N)."""

    name: ClassVar[str] = "constant"
    summary: ClassVar[str] = "fixed number of sigma-grid points N"

    @attrs.frozen
    class Options:
        num_scales: int = attrs.field(default=18, validator=within(
            2, MAX_SCALES, "points of the sigma grid; torch samples from at most 2^24"))

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options

    def num_scales(self, step: int) -> int:
        return self.options.num_scales


@hookimpl
def ctcore_register_curricula() -> list[type]:
    return [Exponential, SquareRoot, Constant]
