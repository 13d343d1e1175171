"""Built-in metrics d(x, y): Pseudo-Huber (iCT), squared L2 (CT) and the L2 norm (ECT)."""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch
from torch import nn

from ctcore import hookimpl
from ctcore.components import BuildContext, within

PSEUDO_HUBER_C_PER_SQRT_DIM = 0.00054
"""iCT: c = 0.00054 * sqrt(d), d = C*H*W (0.0299 for 3x32x32, 0.0599 for 3x64x64)."""




class PseudoHuber(nn.Module):
    """d(x, y) = sqrt(||x - y||^2 + c^2) - c over all entries of one sample (not element-wise)."""

    name: ClassVar[str] = "pseudo-huber"
    summary: ClassVar[str] = "iCT Pseudo-Huber distance sqrt(||x-y||^2 + c^2) - c on the whole sample"

    @attrs.frozen
    class Options:
        c: float | None = attrs.field(default=None, validator=within(
            1e-8, 1000.0, "c^2 must stay a normal float32 so that d is smooth at x = y; iCT 0.03"))
        """Omit to use c = 0.00054 * sqrt(C*H*W)."""

        def computed_defaults(self, context: BuildContext) -> dict[str, tuple[float, str]]:
            """c when omitted, as `ctcore check` shows it: the value __init__ computes for the data shape."""
            if self.c is not None or context.data_shape is None:
                return {}
            shape = "*".join(map(str, context.data_shape))
            return {"c": (default_c(math.prod(context.data_shape)), f"{PSEUDO_HUBER_C_PER_SQRT_DIM} * sqrt({shape})")}

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        self.options = options
        self.c = options.c
        if self.c is None and context.data_shape is not None:
            self.c = default_c(math.prod(context.data_shape))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.c if self.c is not None else default_c(x[0].numel())
        sq = (x - y).flatten(1).square().sum(dim=1)
        return torch.sqrt(sq + c * c) - c


def default_c(dim: int) -> float:
    """The iCT Pseudo-Huber constant for a sample of `dim` entries."""
    return PSEUDO_HUBER_C_PER_SQRT_DIM * math.sqrt(dim)


class SquaredL2(nn.Module):
    """Squared L2 as in the CM code: mean over entries of (x - y)^2 per sample."""

    name: ClassVar[str] = "l2"
    summary: ClassVar[str] = "squared L2 distance, mean of (x-y)^2 per sample (original CT)"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        self.options = options

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).flatten(1).square().mean(dim=1)


class L2Norm(nn.Module):
    """ECT's distance: ||x - y||_2 over all entries of one sample (Pseudo-Huber with c = 0)."""

    name: ClassVar[str] = "l2-norm"
    summary: ClassVar[str] = "L2 norm ||x-y|| on the whole sample, ECT's loss (Pseudo-Huber with c = 0)"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        self.options = options

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # vector_norm's gradient at x == y is 0, where sqrt of the summed squares would give 0 / 0
        return torch.linalg.vector_norm((x - y).flatten(1), dim=1)


@hookimpl
def ctcore_register_metrics() -> list[type]:
    return [PseudoHuber, SquaredL2, L2Norm]
