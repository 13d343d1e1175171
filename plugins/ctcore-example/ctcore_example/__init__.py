"""An example third-party plugin: registers the metric `l1` through the same hook the builtins use."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import nn

from ctcore import hookimpl
from ctcore.components import BuildContext


class L1(nn.Module):
    """d(x, y) = mean over the entries of one sample of |x - y|."""

    name: ClassVar[str] = "l1"
    summary: ClassVar[str] = "mean absolute difference per sample"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        self.options = options

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().flatten(1).mean(dim=1)


@hookimpl
def ctcore_register_metrics() -> list[type]:
    return [L1]
