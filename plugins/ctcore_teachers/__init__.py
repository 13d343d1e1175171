"""Built-in teacher-update rules: iCT's stop-gradient student (no EMA) and CT's EMA teacher."""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import nn

from ctcore import hookimpl
from ctcore.components import BuildContext, within


class NoEma:
    """iCT: theta^- = stopgrad(theta), the student itself evaluated under no_grad (mu = 0)."""

    name: ClassVar[str] = "no-ema"
    summary: ClassVar[str] = "iCT teacher: the student under stop-gradient (mu = 0)"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options
        self.network: nn.Module | None = None

    def bind(self, student: nn.Module) -> None:
        self.network = student

    def decay(self, step: int, num_scales: int) -> float:
        return 0.0

    def update(self, student: nn.Module, step: int, num_scales: int) -> None:
        self.network = student

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError("the no-ema teacher keeps no state, but the checkpoint holds teacher weights")






class Ema:
    """CT: theta^- <- mu(k) theta^- + (1 - mu(k)) theta after every optimizer step.

    schedule "adaptive": mu(k) = exp(s0 ln mu0 / N(k)) (CM paper form, mu(0) = mu0);
    "adaptive-code": the released CM code's N(k) - 1 denominator (mu(0) = mu0^2 for s0 = 2);
    "fixed": mu(k) = mu0.
    """

    name: ClassVar[str] = "ema"
    summary: ClassVar[str] = "CT teacher: EMA of the student, fixed or adaptive mu(k) = exp(s0 ln mu0 / N(k))"

    @attrs.frozen
    class Options:
        mu0: float = attrs.field(default=0.9, validator=within(
            0.0, 1.0, "the teacher must keep learning, 1 - mu > 0; CT 0.9 and 0.95", open_hi=True))
        schedule: Literal["adaptive", "adaptive-code", "fixed"] = "adaptive"
        s0: int = attrs.field(default=2, validator=within(1, 1_000_000, "the curriculum's s0, at most 1,000,000"))
        """The curriculum's initial s0 in mu(k); CT uses 2."""

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options
        self.network: nn.Module | None = None

    def bind(self, student: nn.Module) -> None:
        self.network = copy.deepcopy(student)
        self.network.requires_grad_(False)
        self.network.train()  # CT runs the target in train mode: dropout active, mask shared

    def decay(self, step: int, num_scales: int) -> float:
        o = self.options
        if o.schedule == "fixed":
            return o.mu0
        denominator = num_scales - 1 if o.schedule == "adaptive-code" else num_scales
        return math.exp(o.s0 * math.log(o.mu0) / max(denominator, 1)) if o.mu0 > 0 else 0.0

    @torch.no_grad()
    def update(self, student: nn.Module, step: int, num_scales: int) -> None:
        mu = self.decay(step, num_scales)
        t_params = list(self.network.parameters())
        s_params = [p.detach() for p in student.parameters()]
        torch._foreach_lerp_(t_params, s_params, 1.0 - mu)
        for tb, sb in zip(self.network.buffers(), student.buffers(), strict=True):
            tb.copy_(sb)

    def state_dict(self) -> dict[str, Any]:
        return self.network.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state)


@hookimpl
def ctcore_register_teachers() -> list[type]:
    return [NoEma, Ema]
