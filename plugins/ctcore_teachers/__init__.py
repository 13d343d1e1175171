"""Built-in teachers: iCT's stop-gradient student (no EMA), CT's EMA teacher, and consistency distillation's
target from a frozen diffusion model (CM paper, Algorithm 2)."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import nn

from ctcore import hookimpl
from ctcore.components import BuildContext, WeightsUnavailable, path_text, within
from ctcore.consistency import noised, pf_ode_step
from ctcore.data import data_shape


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

    def teacher_input(self, x: torch.Tensor, z: torch.Tensor, sigma_lo: torch.Tensor, sigma_hi: torch.Tensor,
                      labels: torch.Tensor | None) -> torch.Tensor:
        return noised(x, z, sigma_lo)

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

    def teacher_input(self, x: torch.Tensor, z: torch.Tensor, sigma_lo: torch.Tensor, sigma_hi: torch.Tensor,
                      labels: torch.Tensor | None) -> torch.Tensor:
        return noised(x, z, sigma_lo)

    def update(self, student: nn.Module, step: int, num_scales: int) -> None:
        follow(self.network, student, self.decay(step, num_scales))

    def state_dict(self) -> dict[str, Any]:
        return self.network.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state)


class Distillation:
    """CD: x_lo = one Heun (or Euler) step of a frozen diffusion model's probability-flow ODE from x + sigma_hi z
    down to sigma_lo; the target is theta^- at x_lo, theta^- <- mu theta^- + (1 - mu) theta (CM CIFAR-10: mu 0)."""

    name: ClassVar[str] = "cd"
    summary: ClassVar[str] = ("CD teacher: one Heun/Euler PF-ODE step of a frozen diffusion model, then the "
                              "target network (EMA mu of the student) at sigma_lo")

    @attrs.frozen
    class Options:
        checkpoint: str = attrs.field(default="", validator=path_text)
        """The diffusion model distilled: a checkpoint, or a run directory (its newest), of a run whose objective
        trains a diffusion model (edm)."""
        weights: Literal["eval-ema", "student"] = "eval-ema"
        solver: Literal["heun", "euler"] = "heun"
        mu: float = attrs.field(default=0.0, validator=within(
            0.0, 1.0, "the target must keep learning, 1 - mu > 0; CM CD: CIFAR-10 0, ImageNet 64 0.95",
            open_hi=True))

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options
        self.network: nn.Module | None = None
        with torch.device("cpu"):  # also when built on the meta device (`ctcore check`): the file is read for real
            self.source, self.recipe, self.weights = read_diffusion_checkpoint(options, context)
        self.diffusion: nn.Module | None = None
        self.objective: Any = None

    def bind(self, student: nn.Module) -> None:
        self.network = copy.deepcopy(student)
        self.network.requires_grad_(False)
        self.network.train()  # as CM runs its target model; the mask is the student's
        self._build_diffusion(next(iter(student.parameters())).device)

    def _build_diffusion(self, device: torch.device) -> None:
        """The frozen diffusion model of the checkpoint's recipe on `device` (its weights unless on meta), in eval
        mode, and the objective whose denoise makes D(x, sigma) of it."""
        from ctcore.registry import load_registry

        registry, spec = load_registry(), self.recipe.components["network"]
        with torch.device(device):
            diffusion = registry.get("network", spec.name)(
                spec.options, BuildContext(data_shape(self.recipe.data), self.recipe.data.num_classes,
                                           self.recipe.training.total_steps))
        if device.type != "meta":
            diffusion.load_state_dict(self.weights)
        self.diffusion = diffusion.eval().requires_grad_(False)
        objective = self.recipe.components["objective"]
        self.objective = registry.get("objective", objective.name)(objective.options, BuildContext())

    @property
    def network_passes(self) -> int:
        """Forward passes of the diffusion model per training image (`ctcore bench` counts them)."""
        return 2 if self.options.solver == "heun" else 1

    def decay(self, step: int, num_scales: int) -> float:
        return self.options.mu

    def teacher_input(self, x: torch.Tensor, z: torch.Tensor, sigma_lo: torch.Tensor, sigma_hi: torch.Tensor,
                      labels: torch.Tensor | None) -> torch.Tensor:
        constants = self.recipe.consistency

        def D(noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return self.objective.denoise(self.diffusion, noisy, sigma, labels, constants).to(noisy.dtype)

        return pf_ode_step(D, noised(x, z, sigma_hi), sigma_hi, sigma_lo, self.options.solver)

    def diffusion_denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """D(x, sigma) of the frozen diffusion model, with its own objective's preconditioning and constants (what
        sCD's tangent converts to TrigFlow)."""
        return self.objective.denoise(self.diffusion, x, sigma, labels, self.recipe.consistency)

    def update(self, student: nn.Module, step: int, num_scales: int) -> None:
        follow(self.network, student, self.options.mu)

    @functools.cached_property
    def sha256(self) -> str:
        """The SHA-256 of the diffusion checkpoint file (read once, when a checkpoint first records it)."""
        from ctcore.files import file_digest

        return file_digest(self.source)

    def state_dict(self) -> dict[str, Any]:
        """The target network's weights, and which diffusion checkpoint file the run distils (its path and
        SHA-256): a resume distils that same file even after its run directory gained newer checkpoints."""
        return {**self.network.state_dict(), SOURCE_KEY: str(self.source), DIGEST_KEY: self.sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        source, digest = state.pop(SOURCE_KEY, None), state.pop(DIGEST_KEY, None)
        self.network.load_state_dict(state)
        if digest is None or digest == self.sha256:
            return
        from ctcore.errors import RunError
        from ctcore.files import file_digest

        recorded = Path(source)
        if not recorded.is_file() or file_digest(recorded) != digest:
            raise RunError(f"teacher.checkpoint: this run distils {source!r} (sha256 {digest[:12]}...), which is gone "
                           f"or has changed, and teacher.checkpoint now gives {str(self.source)!r}; put that file "
                           "back to resume the run")
        self.source, self.recipe, self.weights = read_diffusion_checkpoint(
            attrs.evolve(self.options, checkpoint=str(recorded)), BuildContext())
        self.__dict__["sha256"] = digest
        self._build_diffusion(next(iter(self.diffusion.parameters())).device)


SOURCE_KEY, DIGEST_KEY = "diffusion_checkpoint", "diffusion_sha256"
"""The cd teacher's state entries naming the diffusion checkpoint it distils, beside the target's weights."""


def read_diffusion_checkpoint(options: Distillation.Options, context: BuildContext) -> tuple[Path, Any, dict]:
    """(checkpoint file, its recipe, its `weights`) of the diffusion model a CD teacher distils; ValueError
    ("checkpoint: ...", one line) when it is missing, unreadable, not a diffusion model or of other images."""
    from ctcore.checkpoints import list_checkpoints, load_checkpoint, validate_checkpoint
    from ctcore.errors import CtcoreError, path_not_found
    from ctcore.registry import load_registry

    where = ("set teacher.checkpoint to the run directory or checkpoint file of a run with objective 'edm' or "
             "'trigflow'")
    if not options.checkpoint:
        raise WeightsUnavailable(f"checkpoint: name the diffusion model to distil; {where}, e.g. "
                                 f"\"runs/quickstart_diffusion\"", "checkpoint")
    path = Path(options.checkpoint)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # a name too long for the file system, say
        raise ValueError(f"checkpoint: {options.checkpoint!r} cannot be looked up ({exc.strerror}); {where}") from None
    if is_dir and list_checkpoints(path):
        path = list_checkpoints(path)[-1]
    elif is_dir:
        raise WeightsUnavailable(f"checkpoint: {options.checkpoint!r} holds no checkpoint (checkpoints/ckpt-*.pt) "
                                 f"yet; let its diffusion run write one, or {where}", "checkpoint")
    elif not exists:
        raise WeightsUnavailable(path_not_found(f"checkpoint: {options.checkpoint!r}", path, "train the diffusion "
                                                "model first (a recipe with objective 'edm' or 'trigflow' whose run "
                                                f"writes it), or {where}"), "checkpoint")
    registry = load_registry()
    try:
        state = load_checkpoint(path, fix="set teacher.checkpoint to a checkpoint that ctcore wrote "
                                          "(checkpoints/ckpt-*.pt), or its run directory")
        recipe = validate_checkpoint(state, path, registry, use=options.weights)
    except CtcoreError as exc:
        raise ValueError(f"checkpoint: {exc}") from None
    objective = registry.get("objective", recipe.components["objective"].name)
    if objective.model != "diffusion":
        raise ValueError(f"checkpoint: {str(path)!r} holds a {objective.model} model (objective "
                         f"{objective.name!r}); consistency distillation needs a diffusion model: {where}")
    d = recipe.data
    theirs = data_shape(d)
    if context.data_shape is not None and (tuple(context.data_shape) != theirs or
                                           context.num_classes != d.num_classes):
        raise ValueError(f"checkpoint: {str(path)!r} models images of shape {list(theirs)} with num_classes "
                         f"{d.num_classes}, but this run's data has shape {list(context.data_shape)} with "
                         f"num_classes {context.num_classes}; distil a model of the same data")
    return path, recipe, state["eval_ema" if options.weights == "eval-ema" else "student"]


@torch.no_grad()
def follow(target: nn.Module, student: nn.Module, mu: float) -> None:
    """theta^- <- mu theta^- + (1 - mu) theta, and the student's buffers copied."""
    t_params = list(target.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - mu)
    for tb, sb in zip(target.buffers(), student.buffers(), strict=True):
        tb.copy_(sb)


@hookimpl
def ctcore_register_teachers() -> list[type]:
    return [NoEma, Ema, Distillation]
