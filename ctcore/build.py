"""A run from a recipe: device, components, data, optimizer and provenance; starting a fresh run or resuming one.

`build_run` instantiates everything and writes nothing; `start_run` also claims an empty run directory (its lock)
and writes recipe.toml and provenance.json with a new run id; `resume_run` claims a run directory, checks that its
newest checkpoint is sound and belongs to it, and restores it (or restarts a run killed before its first one).
"""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

import ctcore
from ctcore.checkpoints import (
    RUN_LOCK,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    lock_run_directory,
    restore,
    validate_checkpoint,
)
from ctcore.components import KINDS, LOGGER
from ctcore.consistency import denoise
from ctcore.data import ImageData, check_data_file, load_data
from ctcore.devices import compile_enabled, fast_optimizer_options, resolve_device, use_threads
from ctcore.distributed import SINGLE, World, rank_seed
from ctcore.errors import CtcoreError, RunError, UsageError
from ctcore.files import FileLock
from ctcore.preflight import build_components, preflight
from ctcore.recipe import Recipe, dump_recipe, read_recipe
from ctcore.registry import Registry
from ctcore.reporting import build_loggers


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
    lock: FileLock | None = None
    """The run directory's lock, held by start_run / resume_run (rank 0) until `close`."""
    restarted: bool = False
    """resume_run found no checkpoint and started the run again from step 0."""

    def close(self) -> None:
        """Release the run directory (the OS also releases it when the process ends, however it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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
    loggers = {}
    for name in recipe.logging.backends:
        p = registry.provider(LOGGER, name)
        loggers[name] = {"distribution": p.distribution, "version": p.version}
    return {
        "ctcore": ctcore.__version__,
        "torch": str(torch.__version__),  # TorchVersion is not a plain str and would not load weights_only
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),  # CPU results depend on it (run.threads)
        "components": components,
        "loggers": loggers,
        "data_shape": list(data.shape),
        "num_classes": data.num_classes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
    }


# ------------------------------------------------------------------------------- starting and resuming


def start_run(recipe: Recipe, registry: Registry, out_dir: str | Path | None = None) -> Run:
    """A fresh run in an empty (or new) directory; refuses a directory that holds a run or that another process
    holds. The returned run holds the directory's lock until `Run.close` (or the process ends).

    Under torchrun, joins the process group first; rank 0 claims the directory and every rank learns the outcome.
    """
    from ctcore.distributed import raise_together, setup

    build_loggers(recipe, registry)  # a logger that cannot work here (a missing package) is refused before any write
    world, device = setup(resolve_device(recipe.run.device))
    target = output_dir_for(recipe, out_dir)
    lock, failure, created = None, None, []
    if world.is_main:
        try:
            lock, created = claim_new_run_directory(target)
        except CtcoreError as exc:
            failure = exc
    raise_together(world, failure)  # no rank goes on when rank 0 refused the directory
    try:
        run = build_run(recipe, registry, target, world=world, device=device)
        if world.is_main:
            run.provenance["run_id"] = uuid.uuid4().hex  # in provenance.json and every checkpoint of this run
            (target / "recipe.toml").write_text(run.recipe_text, encoding="utf-8")
            (target / "provenance.json").write_text(json.dumps(run.provenance, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        if lock is not None:
            lock.release()
        _remove_created(created)  # a run that could not start leaves no directory behind
        raise
    run.lock = lock
    return run


def _remove_created(created: list[Path]) -> None:
    """Remove the (still empty) directories a refused or failed start created, innermost first."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def holds_a_run(folder: Path) -> bool:
    """Whether a directory holds anything besides its lock file (a directory of an earlier run, or other files)."""
    return folder.is_dir() and any(p.name != RUN_LOCK for p in folder.iterdir())


def claim_new_run_directory(target: Path) -> tuple[FileLock, list[Path]]:
    """Create (if needed) and lock an empty run directory; (the lock, the directories created, outermost first).

    The emptiness check runs under the lock, so of two runs started at once one trains and the other is refused.
    """
    if target.exists() and not target.is_dir():
        raise RunError(f"output directory {str(target)!r} is a file; choose another directory with --output-dir")
    created = [p for p in (target, *target.parents) if not p.exists()][::-1]
    target.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_run_directory(target)
    except RunError:
        _remove_created(created)
        raise
    if holds_a_run(target):
        lock.release()
        resumable = list_checkpoints(target) or (target / "recipe.toml").is_file()
        hint = "pass --resume to continue it, or " if resumable else ""
        raise RunError(
            f"output directory {str(target)!r} is not empty (it holds an earlier run); {hint}choose another "
            "directory with --output-dir (or run.output_dir), or delete it"
        )
    return lock, created


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


def checkpoint_fits_run(checkpoint_recipe: Recipe, run_recipe: Recipe) -> list[str]:
    """The one rule for which checkpoints a run directory resumes: the checkpoint's resolved recipe must equal the
    directory's recipe.toml. Returns the differences (`section.key: checkpoint -> recipe.toml`), empty when it
    fits. (Allowed extensions of a recipe, a later issue, belong here.)"""
    return recipe_differences(checkpoint_recipe, run_recipe)


def read_provenance(out_dir: Path) -> dict[str, Any]:
    """A run directory's provenance.json ({} when absent); a damaged one is one RunError."""
    path = Path(out_dir) / "provenance.json"
    if not path.is_file():
        return {}
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        prov = exc
    if not isinstance(prov, dict):
        raise RunError(f"{str(path)!r} is damaged ({prov}); it records the run's id: put it back, or delete it to "
                       "resume with the recipe check alone")
    return prov


def resume_run(recipe: Recipe | None, registry: Registry, out_dir: str | Path) -> Run:
    """Continue the run in `out_dir` from its newest checkpoint; a given recipe must match its recipe.toml.

    Claims the directory first (rank 0 under torchrun; all ranks refuse together). The newest checkpoint is
    validated completely and must belong to the directory (its recipe equals recipe.toml, and its run id, when
    both have one, equals provenance.json's); a run killed before its first checkpoint restarts from step 0.
    """
    from ctcore.distributed import world_from_env

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise RunError(f"nothing to resume: {str(checkpoint_dir(out_dir))!r} holds no checkpoint (ckpt-*.pt)")
    world = world_from_env()
    lock, failure = None, None
    if world.is_main:
        try:
            lock = lock_run_directory(out_dir)
        except RunError as exc:
            if not world.distributed:
                raise
            failure = exc  # raised on every rank once they meet
    try:
        run = _resume_claimed(recipe, registry, out_dir, world, failure)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def _resume_claimed(recipe: Recipe | None, registry: Registry, out_dir: Path, world: World,
                    failure: CtcoreError | None) -> Run:
    from ctcore.distributed import raise_together, setup

    ckpts = list_checkpoints(out_dir)
    recipe_path = out_dir / "recipe.toml"
    if not ckpts and not recipe_path.is_file():
        raise RunError(f"nothing to resume: {str(checkpoint_dir(out_dir))!r} holds no checkpoint (ckpt-*.pt)")
    state = stored = None
    if ckpts:
        try:
            state = load_checkpoint(ckpts[-1])
        except RunError as exc:
            earlier = f" to resume from {ckpts[-2].name}" if len(ckpts) > 1 else ""
            defect = exc.message.split("; use an earlier")[0]
            raise RunError(f"{defect}; move it out of checkpoints/{earlier}") from None
        stored = validate_checkpoint(state, ckpts[-1], registry, use="resume")
    if not recipe_path.is_file():
        raise RunError(f"run directory {str(out_dir)!r} has no recipe.toml, so its checkpoints cannot be checked "
                       "against its recipe; put the run's recipe.toml back, or start a new run")
    run_recipe = attrs.evolve(read_recipe(recipe_path, registry), source=str(recipe_path))
    if recipe is not None:
        changed = recipe_differences(run_recipe, recipe)
        if changed:
            raise UsageError(
                f"{recipe.source} differs from the recipe of the run in {str(out_dir)!r}, so it cannot resume it:\n"
                + "\n".join(changed) + "\nresume with the run directory instead of a recipe, or start a new run"
            )
    build_loggers(run_recipe, registry)  # a logger that cannot work here is refused before anything changes
    run_id = read_provenance(out_dir).get("run_id")
    if state is not None:
        _refuse_foreign(state, stored, run_recipe, run_id, ckpts, out_dir)
        run_id = run_id or state["provenance"].get("run_id")
    world, device = setup(resolve_device(run_recipe.run.device))
    raise_together(world, failure)
    if world.is_main:  # a checkpoint that was being written when the run was killed: its partial temporary file
        for debris in checkpoint_dir(out_dir).glob(".ckpt-*.tmp"):
            debris.unlink(missing_ok=True)
    run = build_run(run_recipe, registry, out_dir, world=world, device=device)
    if state is not None:
        restore(run, state)
    else:  # killed before its first checkpoint: the same run again from step 0, its stats begun anew
        run.restarted = True
        if world.is_main:
            (out_dir / "stats.jsonl").unlink(missing_ok=True)
            if not (out_dir / "provenance.json").is_file():
                run_id = uuid.uuid4().hex
                run.provenance["run_id"] = run_id
                (out_dir / "provenance.json").write_text(json.dumps(run.provenance, indent=2) + "\n",
                                                         encoding="utf-8")
    if run_id is not None:
        run.provenance["run_id"] = run_id
    return run


def _refuse_foreign(state: dict[str, Any], stored: Recipe, run_recipe: Recipe, run_id: str | None,
                    ckpts: list[Path], out_dir: Path) -> None:
    """Refuse a newest checkpoint that another run wrote (copied in): another run id, or another recipe."""
    newest = ckpts[-1]
    fix = (f"move it out of checkpoints/ to resume from {ckpts[-2].name}" if len(ckpts) > 1 else
           "move it out of checkpoints/ (--resume then restarts the run from step 0)")
    theirs = state["provenance"].get("run_id")
    if run_id is not None and theirs is not None and theirs != run_id:
        raise RunError(f"checkpoint {str(newest)!r} belongs to another run (run id {theirs}; the run in "
                       f"{str(out_dir)!r} is {run_id}); {fix}")
    changed = checkpoint_fits_run(stored, run_recipe)
    if changed:
        shown = "; ".join(c.strip() for c in changed[:3]) + (f"; {len(changed) - 3} more" if len(changed) > 3 else "")
        raise RunError(f"checkpoint {str(newest)!r} was written under another recipe than "
                       f"{str(out_dir / 'recipe.toml')!r} ({shown}), so it belongs to another run; {fix}")
