"""The state of one training run (`Run`), in its own module so that the modules the training loop calls
(checkpoints, sampling, evaluation, FID) can name it without importing the code that builds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from ctcore.data import ImageData
from ctcore.distributed import SINGLE, World
from ctcore.files import FileLock
from ctcore.recipe import Recipe, dump_recipe
from ctcore.registry import Registry


class FlooredCurriculum:
    """The run's curriculum as its objective sees it: N(k) = max(floor, the curriculum's N(k)).

    The floor is 1 (no effect) until a resume changes training.total_steps, the K that iCT's and CT's curricula
    plan with: it then becomes the N(k) the run had reached, so an extended run never moves its curriculum backwards
    and follows the new plan once that passes it (docs/recipes.md, extending a run). Checkpoints keep it
    (`num_scales_floor`); the curriculum's other attributes read through."""

    def __init__(self, curriculum: Any, floor: int = 1) -> None:
        self.curriculum, self.floor = curriculum, floor

    def num_scales(self, step: int) -> int:
        return max(self.floor, self.curriculum.num_scales(step))

    def __getattr__(self, name: str) -> Any:
        if name == "curriculum":  # not yet set (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.curriculum, name)


@attrs.define(eq=False)
class Run:
    """Everything a training run holds; `build_run` makes it, `train` advances it."""

    recipe: Recipe
    registry: Registry
    out_dir: Path
    device: torch.device
    data: ImageData
    student: nn.Module
    eval_ema: nn.Module
    objective: Any
    """The training objective: the loss of a step, and the model function (`denoiser`) it trains."""
    sampler: Any
    """The recipe's sampler: sample grids, FID and `ctcore sample` make images with it."""
    teacher: Any
    """The objective's parts (OBJECTIVE_PARTS): None when the objective does not use that kind."""
    metric: nn.Module | None
    noise_schedule: Any
    curriculum: FlooredCurriculum | None
    """The recipe's curriculum in its floor (None without one): N(k) as the objective, its teacher and the logs
    see it."""
    optimizer: torch.optim.Optimizer
    index_generator: torch.Generator
    """Generator on the training device for batch indices, flips and pair indices."""
    noise_generator: torch.Generator
    """Generator on the training device for the noise z."""
    provenance: dict[str, Any]
    precision: str
    student_forward: nn.Module
    """The student as called in the loss: the student itself, or its torch.compile wrapper."""
    teacher_forward: nn.Module | None = None
    """With training.compile: the teacher's network as its no-grad pass calls it, compiled apart from the student's
    grad pass (devices.compile_pass); None: the teacher's network itself."""
    ddp: nn.parallel.DistributedDataParallel | None = None
    """Under torchrun the DDP wrapper of the student (inside student_forward, which may compile it): the training
    step runs every micro-batch but the last under its no_sync(). None in a single process."""
    step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    initial_distance: float | None = None
    world: World = SINGLE
    """This process among the torchrun processes (a single process by default)."""
    nonfinite_run: int = 0
    """Consecutive skipped (non-finite) steps up to run.step."""
    last_good_step: int = 0
    """run.step after the last step whose update was applied."""
    nonfinite_flag: torch.Tensor | None = None
    """While `train` defers the non-finite check: a boolean on the device, set by any step since train's rollback
    point whose loss or gradient was not finite (that update was applied; train goes back and redoes the steps
    before anything reads the weights). None: train_step checks each step itself."""
    lock: FileLock | None = None
    """The run directory's lock, held by start_run / resume_run (rank 0) until `close`."""
    restarted: bool = False
    """resume_run found no checkpoint and started the run again from step 0."""
    recipe_changes: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    """resume_run changed these settings (EXTENSIBLE_KEYS): {section.key: (old, new)} as TOML text."""
    extended_num_scales: tuple[int, int] | None = None
    """resume_run changed the recipe (EXTENSIBLE_KEYS): N(k) at the resume step under the old and the new one,
    each with the curriculum's floor (None without a curriculum); after >= before."""

    def close(self) -> None:
        """Release the run directory (the OS also releases it when the process ends, however it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def recipe_text(self) -> str:
        return dump_recipe(self.recipe)

    def denoiser(self, network: nn.Module):
        """The objective's model function (x, sigma, labels) -> tensor for sampling with `network` (normally the
        eval EMA): f for a consistency model, D for a diffusion model."""
        return model_function(self.objective, network, self.recipe.consistency)


def model_function(objective: Any, network: nn.Module, constants: Any):
    """(x, sigma, labels) -> objective.denoise(network, x, sigma, labels, constants). For an objective with the
    optional `jump(network, x, sigma, sigma_to, labels, constants)` (a flow map: the model's own trajectory from
    sigma down to sigma_to, MeanFlow's), the function also has `.jump(x, sigma, sigma_to, labels)`, which samplers
    may use (`ctcore.sampling.finite_outputs` keeps it)."""

    def f(x: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return objective.denoise(network, x, s, y, constants)

    jump = getattr(objective, "jump", None)
    if callable(jump):
        f.jump = lambda x, s, s_to, y: jump(network, x, s, s_to, y, constants)
    return f
