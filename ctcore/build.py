"""A run from a recipe: device, components, data, optimizer and provenance; starting a fresh run or resuming one.

`build_run` instantiates everything and writes nothing; `start_run` also claims an empty run directory and writes
recipe.toml and provenance.json; `resume_run` rebuilds the run stored in a directory and restores its checkpoint.
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

import ctcore
from ctcore.checkpoints import checkpoint_dir, list_checkpoints, load_checkpoint, recipe_from_checkpoint, restore
from ctcore.components import KINDS
from ctcore.consistency import denoise
from ctcore.data import ImageData, check_data_file, load_data
from ctcore.devices import compile_enabled, fast_optimizer_options, resolve_device, use_threads
from ctcore.distributed import SINGLE, World, rank_seed
from ctcore.errors import RunError, UsageError
from ctcore.preflight import build_components, preflight
from ctcore.recipe import Recipe, dump_recipe
from ctcore.registry import Registry


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
    teacher: Any
    metric: nn.Module
    noise_schedule: Any
    curriculum: Any
    optimizer: torch.optim.Optimizer
    index_generator: torch.Generator
    """Generator on the training device for batch indices, flips and pair indices."""
    noise_generator: torch.Generator
    """Generator on the training device for the noise z."""
    provenance: dict[str, Any]
    precision: str
    student_forward: nn.Module
    """The student as called in the loss: the student itself, or its torch.compile wrapper."""
    step: int = 0
    sigma_grids: dict[int, torch.Tensor] = attrs.field(factory=dict)
    """Karras grids on the training device by N, made once per curriculum stage (no copy per step)."""
    loss_sum: float = 0.0
    loss_count: int = 0
    initial_distance: float | None = None
    world: World = SINGLE
    """This process among the torchrun processes (a single process by default)."""
    nonfinite_run: int = 0
    """Consecutive skipped (non-finite) steps up to run.step."""
    last_good_step: int = 0
    """run.step after the last step whose update was applied."""

    @property
    def recipe_text(self) -> str:
        return dump_recipe(self.recipe)

    def denoiser(self, network: nn.Module):
        """f(x, sigma, labels) for sampling with `network` (normally the eval EMA)."""
        c = self.recipe.consistency
        return lambda x, s, y: denoise(network, x, s, y, sigma_min=c.sigma_min, sigma_data=c.sigma_data)


def output_dir_for(recipe: Recipe, override: str | Path | None = None) -> Path:
    return Path(override or recipe.run.output_dir or Path("runs") / recipe.run.name)


def build_run(recipe: Recipe, registry: Registry, out_dir: str | Path | None = None,
              data: ImageData | None = None, world: World = SINGLE, device: torch.device | None = None) -> Run:
    """Instantiate every component of a recipe (data, networks, teacher, optimizer); writes nothing.

    `data` replaces the recipe's data (the benchmark trains on random images of the declared shape). With a
    distributed `world` (and its rank's `device`), the student is wrapped in DistributedDataParallel. Sets
    torch's CPU thread count from run.threads first (process-wide; the CLI restores it afterwards).
    """
    use_threads(recipe.run.threads)
    device = device or resolve_device(recipe.run.device)
    if recipe.training.batch_size % world.world_size:
        raise UsageError(f"{recipe.source}: training.batch_size {recipe.training.batch_size} is the global batch "
                         f"and must split evenly over {world.world_size} processes; change one of them")
    if data is None and recipe.data.source == "hdf5":  # the file alone first: its own defects name the file
        check_data_file(recipe.data, device)
    # every component on the meta device first: a broken contract or a run that cannot fit stops here, before
    # any real allocation (the data, the networks, the sample buffers)
    preflight(recipe, registry, device=device, world_size=world.world_size, data=data)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls and convs on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(recipe.run.seed)
    built = build_components(recipe, registry)
    data = data if data is not None else load_data(recipe.data, recipe.run.seed, device)
    student = built["network"].to(device)
    student.train()
    eval_ema = copy.deepcopy(student).eval().requires_grad_(False)
    teacher = built["teacher"]
    teacher.bind(student)
    teacher.network.train()  # the teacher runs with dropout active, sharing the student's mask
    t = recipe.training
    opt_cls = torch.optim.RAdam if t.optimizer == "radam" else torch.optim.Adam
    optimizer = opt_cls(student.parameters(), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
                        **fast_optimizer_options(opt_cls, device))
    precision = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    forward: nn.Module = student
    if world.distributed:
        # buffers are deterministic (none are trained), so they need no broadcast before each forward
        forward = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
        # identical weights everywhere (seeded above), but each rank its own dropout masks (CPU and CUDA)
        torch.manual_seed(rank_seed(recipe.run.seed, world.rank))
    compiled = torch.compile(forward) if compile_enabled(t.compile, device) else forward
    index_gen = torch.Generator(device=device).manual_seed(recipe.run.seed + 1)
    noise_gen = torch.Generator(device=device).manual_seed(recipe.run.seed + 2)
    provenance = make_provenance(recipe, registry, device, data)
    return Run(recipe=recipe, registry=registry, out_dir=output_dir_for(recipe, out_dir), device=device, data=data,
               student=student, eval_ema=eval_ema, teacher=teacher, metric=built["metric"].to(device),
               noise_schedule=built["noise_schedule"], curriculum=built["curriculum"], optimizer=optimizer,
               index_generator=index_gen, noise_generator=noise_gen, provenance=provenance, precision=precision,
               student_forward=compiled, world=world)


def make_provenance(recipe: Recipe, registry: Registry, device: torch.device, data: ImageData) -> dict[str, Any]:
    """Versions and the distribution that provided each component, so a checkpoint names what it needs."""
    components = {}
    for kind in KINDS:
        name = recipe.components[kind].name
        p = registry.provider(kind, name)
        components[kind] = {"name": name, "distribution": p.distribution, "version": p.version}
    return {
        "ctcore": ctcore.__version__,
        "torch": str(torch.__version__),  # TorchVersion is not a plain str and would not load weights_only
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),  # CPU results depend on it (run.threads)
        "components": components,
        "data_shape": list(data.shape),
        "num_classes": data.num_classes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
    }


# ------------------------------------------------------------------------------- starting and resuming


def start_run(recipe: Recipe, registry: Registry, out_dir: str | Path | None = None) -> Run:
    """A fresh run in an empty (or new) directory; refuses to touch a directory that holds a run.

    Under torchrun, joins the process group first; every rank checks the directory before rank 0 writes.
    """
    from ctcore.distributed import barrier, setup

    world, device = setup(resolve_device(recipe.run.device))
    target = output_dir_for(recipe, out_dir)
    if target.exists() and not target.is_dir():
        raise RunError(f"output directory {str(target)!r} is a file; choose another directory with --output-dir")
    if target.exists() and any(target.iterdir()):
        hint = ("pass --resume to continue it, or " if list_checkpoints(target) else "")
        raise RunError(
            f"output directory {str(target)!r} is not empty (it holds an earlier run); {hint}choose another "
            "directory with --output-dir (or run.output_dir), or delete it"
        )
    barrier(world)  # no rank may find the directory already written by rank 0
    run = build_run(recipe, registry, target, world=world, device=device)
    if world.is_main:
        target.mkdir(parents=True, exist_ok=True)
        (target / "recipe.toml").write_text(run.recipe_text, encoding="utf-8")
        (target / "provenance.json").write_text(json.dumps(run.provenance, indent=2) + "\n", encoding="utf-8")
    return run


def recipe_differences(old: Recipe, new: Recipe) -> list[str]:
    """`  section.key: old -> new` for every setting that differs between two recipes."""
    def flat(recipe: Recipe) -> dict[str, Any]:
        out = {}
        for line in dump_recipe(recipe).splitlines()[1:]:
            if line.startswith("["):
                section = line.strip("[]")
            elif " = " in line and not line.startswith("#"):
                key, value = line.split(" = ", 1)
                out[f"{section}.{key}"] = value
        return out

    a, b = flat(old), flat(new)
    return [f"  {k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in dict.fromkeys([*a, *b])
            if a.get(k) != b.get(k)]


def resume_run(recipe: Recipe | None, registry: Registry, out_dir: str | Path) -> Run:
    """Continue the run in `out_dir` from its latest checkpoint; a given recipe must match the stored one."""
    out_dir = Path(out_dir)
    ckpts = list_checkpoints(out_dir)
    if not ckpts:
        raise RunError(f"nothing to resume: {str(checkpoint_dir(out_dir))!r} holds no checkpoint (ckpt-*.pt)")
    try:
        state = load_checkpoint(ckpts[-1])
    except RunError as exc:
        earlier = f" to resume from {ckpts[-2].name}" if len(ckpts) > 1 else ""
        raise RunError(f"{exc.message.split('; use an earlier')[0]}; move it out of checkpoints/{earlier}") from None
    stored = recipe_from_checkpoint(state, registry, ckpts[-1])
    if recipe is not None:
        changed = recipe_differences(stored, recipe)
        if changed:
            raise UsageError(
                f"{recipe.source} differs from the recipe of the run in {str(out_dir)!r}, so it cannot resume it:\n"
                + "\n".join(changed) + "\nresume with the run directory instead of a recipe, or start a new run"
            )
    from ctcore.distributed import setup

    world, device = setup(resolve_device(stored.run.device))
    if world.is_main:  # a checkpoint that was being written when the run was killed: its partial temporary file
        for debris in checkpoint_dir(out_dir).glob(".ckpt-*.tmp"):
            debris.unlink(missing_ok=True)
    run = build_run(attrs.evolve(stored, source=str(out_dir / "recipe.toml")), registry, out_dir,
                    world=world, device=device)
    restore(run, state)
    return run
