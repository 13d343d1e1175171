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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

import ctcore
from ctcore.checkpoints import (
    RUN_LOCK,
    WarmStart,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    lock_run_directory,
    read_warm_start,
    restore,
    validate_checkpoint,
)
from ctcore.components import KINDS, LOGGER, MEMORY_ONLY, OBJECTIVE_PARTS
from ctcore.data import ImageData, check_data_file, load_data
from ctcore.devices import compile_enabled, compile_pass, fast_optimizer_options, resolve_device, use_threads
from ctcore.distributed import SINGLE, World, rank_seed
from ctcore.errors import CtcoreError, RunError, UsageError, path_not_found
from ctcore.files import FileLock, atomic_write
from ctcore.preflight import build_components, preflight
from ctcore.recipe import Recipe, dump_recipe, micro_batch_problem, read_recipe
from ctcore.registry import Registry
from ctcore.reporting import build_loggers
from ctcore.runstate import FlooredCurriculum, Run


def output_dir_for(recipe: Recipe, override: str | Path | None = None) -> Path:
    return Path(override or recipe.run.output_dir or Path("runs") / recipe.run.name)


def build_run(recipe: Recipe, registry: Registry, out_dir: str | Path | None = None,
              data: ImageData | None = None, world: World = SINGLE, device: torch.device | None = None,
              warm_start: WarmStart | None = None) -> Run:
    """Instantiate every component of a recipe (data, networks, teacher, optimizer); writes nothing.

    `data` replaces the recipe's data (the benchmark trains on random images of the declared shape). With a
    distributed `world` (and its rank's `device`), the student is wrapped in DistributedDataParallel. Sets
    torch's CPU thread count from run.threads first (process-wide; the CLI restores it afterwards). A
    `warm_start` sets the student's weights before the eval EMA and the teacher are made from it, so all three
    start equal (as in a fresh run); it must fit the recipe's network tensor for tensor.
    """
    use_threads(recipe.run.threads)
    device = device or resolve_device(recipe.run.device)
    if recipe.training.batch_size % world.world_size:
        raise UsageError(f"{recipe.source}: training.batch_size {recipe.training.batch_size} is the global batch "
                         f"and must split evenly over {world.world_size} processes; change one of them")
    problem = micro_batch_problem(recipe.training.batch_size, world.world_size, recipe.training.micro_batch_size)
    if problem is not None:
        raise UsageError(f"{recipe.source}: {problem}")
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
    if warm_start is not None:  # before the data is loaded: a checkpoint that does not fit stops here
        warm_start.load_into(built["network"], recipe)
    data = data if data is not None else load_data(recipe.data, recipe.run.seed, device)
    student = built["network"].to(device)
    student.train()
    eval_ema = copy.deepcopy(student).eval().requires_grad_(False)
    teacher = built.get("teacher")
    if teacher is not None:
        teacher.bind(student)
        teacher.network.train()  # the teacher runs with dropout active, sharing the student's mask
    if "metric" in built:
        built["metric"] = built["metric"].to(device)
    if "curriculum" in built:  # N(k) never below the floor a resume that changed K sets (FlooredCurriculum)
        built["curriculum"] = FlooredCurriculum(built["curriculum"])
    objective = built["objective"]
    objective.bind(student, {kind: built[kind] for kind in OBJECTIVE_PARTS if kind in built})
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
    compiled, teacher_forward = forward, None
    if compile_enabled(t.compile, device):
        # the teacher's no-grad pass compiles too (an eager teacher would not draw the compiled student's dropout
        # mask), in a wrapper of its own (through the student's it would fail its grad-mode guard and recompile it)
        compiled = compile_pass(forward)
        teacher_forward = compile_pass(teacher.network) if teacher is not None else None
    index_gen = torch.Generator(device=device).manual_seed(recipe.run.seed + 1)
    noise_gen = torch.Generator(device=device).manual_seed(recipe.run.seed + 2)
    provenance = make_provenance(recipe, registry, device, data)
    if warm_start is not None:
        provenance["init_from"] = warm_start.record()
    return Run(recipe=recipe, registry=registry, out_dir=output_dir_for(recipe, out_dir), device=device, data=data,
               student=student, eval_ema=eval_ema, objective=objective, sampler=built["sampler"], teacher=teacher,
               metric=built.get("metric"), noise_schedule=built.get("noise_schedule"),
               curriculum=built.get("curriculum"), optimizer=optimizer, index_generator=index_gen,
               noise_generator=noise_gen, provenance=provenance, precision=precision, student_forward=compiled,
               teacher_forward=teacher_forward, world=world, ddp=forward if world.distributed else None)


def make_provenance(recipe: Recipe, registry: Registry, device: torch.device, data: ImageData) -> dict[str, Any]:
    """Versions and the distribution that provided each component, so a checkpoint names what it needs."""
    components = {}
    for kind in (k for k in KINDS if k in recipe.components):
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


def start_run(recipe: Recipe, registry: Registry, out_dir: str | Path | None = None,
              init_from: str | Path | None = None, init_weights: str = "eval-ema") -> Run:
    """A fresh run in an empty (or new) directory; refuses a directory that holds a run or that another process
    holds. The returned run holds the directory's lock until `Run.close` (or the process ends).

    `init_from` (a checkpoint, or a run directory: its newest; default the recipe's run.init_from) gives the
    network its `init_weights` (eval-ema or student), checked before the directory is claimed; optimizer, step,
    curriculum and RNG streams start fresh.
    Under torchrun, joins the process group first; rank 0 claims the directory and every rank learns the outcome.
    """
    from ctcore.distributed import raise_together, setup

    build_loggers(recipe, registry)  # a logger that cannot work here (a missing package) is refused before any write
    warm_start = recipe_warm_start(recipe, registry, init_from, init_weights)
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
        run = build_run(recipe, registry, target, world=world, device=device, warm_start=warm_start)
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


def recipe_warm_start(recipe: Recipe, registry: Registry, init_from: str | Path | None = None,
                      init_weights: str = "eval-ema") -> WarmStart | None:
    """The weights a new run starts from: `init_from` (--init-from) when given, else the recipe's run.init_from
    with run.init_weights, else None; read and validated (one RunError naming the option)."""
    if init_from is not None:
        return read_warm_start(init_from, init_weights, registry)
    if recipe.run.init_from:
        return read_warm_start(recipe.run.init_from, recipe.run.init_weights, registry, option="run.init_from")
    return None


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
        ckpts = list_checkpoints(target)
        resumable = ckpts or (target / "recipe.toml").is_file()
        hint = "pass --resume to continue it, or " if resumable else ""
        finished = _finished_at(target, ckpts)
        if finished is not None:
            hint = (f"it finished at step {finished:,}: extend it with `ctcore run {target} --resume --set "
                    "training.total_steps=...`, or ")
        raise RunError(
            f"output directory {str(target)!r} is not empty (it holds an earlier run); {hint}choose another "
            "directory with --output-dir (or run.output_dir), or delete it"
        )
    return lock, created


EXTENSIBLE_KEYS: frozenset[str] = frozenset({
    "training.total_steps", "training.log_every", "training.checkpoint_every", "training.sample_every",
    "training.keep_checkpoints",
    "evaluation.distance", "evaluation.distance_every", "evaluation.num_samples", "evaluation.num_projections",
    "evaluation.fid_every",
    "evaluation.fid_num_samples", "evaluation.fid_steps", "evaluation.fid_batch_size", "evaluation.inception",
    "evaluation.fid_reference", "evaluation.fid_protocol", "evaluation.fid_reference_protocol", "evaluation.is_split",
    "evaluation.is_split_seed",
})
"""The settings a resumed run may change (`ctcore run RUN_DIR --resume --set training.total_steps=...`): none of
them changes a step already trained, because logging, sampling, checkpointing and evaluation use their own random
generators. Everything else would make the run disagree with its own past and is refused. training.total_steps
is K of curricula such as iCT's exponential one: after a resume that changes it, N(k) of the later steps is the
larger of the N the run had reached (N(k0) of the old plan) and the new plan's N(k), so a curriculum never moves
backwards (FlooredCurriculum; the floor is kept in the checkpoints). The memory knobs (memory_knobs: training.
micro_batch_size, component options marked MEMORY_ONLY such as [network] checkpoint_blocks) may change too: they
change how later steps are computed in memory, not what they compute (up to floating-point summation order)."""


EXTENSIBLE_TEXT = ("training.total_steps, log_every, checkpoint_every, sample_every, keep_checkpoints, the "
                   "[evaluation] settings, [logging] and the memory knobs (training.micro_batch_size, and component "
                   "options such as [network] checkpoint_blocks)")

MEMORY_KEYS: frozenset[str] = frozenset({"training.micro_batch_size"})
"""Core settings that change how much memory a step takes, not what it computes (up to floating-point summation
order): a resumed run may change them, e.g. to continue on a smaller GPU."""

def memory_knobs(recipe: Recipe) -> frozenset[str]:
    """The `section.key`s of a recipe that change only memory and speed: MEMORY_KEYS and every component option
    whose attrs field carries MEMORY_ONLY metadata."""
    options = {f"{kind}.{field.name}" for kind, spec in recipe.components.items()
               if attrs.has(type(spec.options))
               for field in attrs.fields(type(spec.options)) if field.metadata.get(MEMORY_ONLY)}
    return MEMORY_KEYS | options


def extensible(key: str, recipe: Recipe | None = None) -> bool:
    """Whether a resumed run may change this `section.key`: EXTENSIBLE_KEYS, every [logging] setting (the
    backends a run's records also go to, and their options), which no trained step depends on, and the memory
    knobs of `recipe` (memory_knobs), which change no trained step and only the summation order of later ones."""
    return (key in EXTENSIBLE_KEYS or key.startswith("logging.")
            or (recipe is not None and key in memory_knobs(recipe)))


def recipe_changes(old: Recipe, new: Recipe) -> dict[str, tuple[str, str]]:
    """{section.key: (old, new)} as TOML text for every setting that differs between two resolved recipes."""
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
    return {k: (a.get(k, "(unset)"), b.get(k, "(unset)")) for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)}


def _finished_at(run_dir: Path, ckpts: list[Path]) -> int | None:
    """The step of a run directory's newest checkpoint when it reached its recipe.toml's total_steps, else None
    (read from the file names and the TOML alone: a message hint, never a check)."""
    import tomllib

    try:
        step = int(ckpts[-1].stem.removeprefix("ckpt-"))
        total = tomllib.loads((run_dir / "recipe.toml").read_text(encoding="utf-8"))["training"]["total_steps"]
    except (IndexError, ValueError, OSError, KeyError, TypeError, RecursionError):  # ValueError: bad UTF-8, TOML
        return None
    return step if isinstance(total, int) and step >= total else None


def recipe_differences(old: Recipe, new: Recipe) -> list[str]:
    """`  section.key: old -> new` for every setting that differs between two recipes."""
    return [f"  {k}: {a} -> {b}" for k, (a, b) in recipe_changes(old, new).items()]


def checkpoint_fits_run(checkpoint_recipe: Recipe, run_recipe: Recipe) -> list[str]:
    """The one rule for which checkpoints a run directory resumes: the checkpoint's resolved recipe must equal the
    directory's recipe.toml except in EXTENSIBLE_KEYS (a run extended after it). Returns the other differences
    (`section.key: checkpoint -> recipe.toml`), empty when it fits."""
    return [f"  {k}: {a} -> {b}" for k, (a, b) in recipe_changes(checkpoint_recipe, run_recipe).items()
            if not extensible(k, run_recipe)]


def _extend(run: Run, recipe_path: Path) -> None:
    """Record the allowed changes of a resumed run (run.recipe_changes): recipe.toml rewritten atomically, a
    `recipe_changed` event in stats.jsonl with each key's old and new value (rank 0 only)."""
    from ctcore.reporting import log_record, open_stats

    if not run.world.is_main:
        return
    with atomic_write(recipe_path) as tmp:
        tmp.write_text(run.recipe_text, encoding="utf-8")
    stats = open_stats(run.out_dir)
    try:
        log_record(stats, {"event": "recipe_changed", "step": run.step, "source": run.recipe.source,
                           "changes": {k: [_toml_scalar(a), _toml_scalar(b)] for k, (a, b) in
                                       run.recipe_changes.items()},
                           "num_scales": list(run.extended_num_scales or ())})
    finally:
        stats.close()


def _toml_scalar(text: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _num_scales_planned(run: Run, recipe: Recipe) -> int:
    """N(k) at run.step under the plan of `recipe`'s curriculum (its training.total_steps as K), with the run's
    floor."""
    from ctcore.components import BuildContext
    from ctcore.data import data_shape

    spec = recipe.components["curriculum"]
    context = BuildContext(data_shape(recipe.data), recipe.data.num_classes, recipe.training.total_steps)
    planned = type(run.curriculum.curriculum)(spec.options, context)
    return max(run.curriculum.floor, int(planned.num_scales(run.step)))


def _keep_the_curriculum(run: Run, trained: Recipe) -> None:
    """When the run resumes at k0 > 0 with another training.total_steps (K) than the checkpoint's recipe
    `trained`, raise the curriculum's floor to the N(k0) it had reached under that plan: N(k) of the later steps is
    max(that N, the new plan's N(k)), so a curriculum never moves backwards, also when the run was killed right
    after an extension and resumes from a checkpoint written before it."""
    if run.curriculum is not None and run.step > 0 and trained.training.total_steps != run.recipe.training.total_steps:
        run.curriculum.floor = _num_scales_planned(run, trained)


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}
"""What a parsed JSON value is, in JSON's words, for messages about a damaged file."""


def read_provenance(out_dir: Path) -> dict[str, Any]:
    """A run directory's provenance.json ({} when absent); a damaged one is one RunError."""
    path = Path(out_dir) / "provenance.json"
    if not path.is_file():
        return {}
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8, bad JSON, a number of over 4,300 digits
        problem = str(exc).split("; use sys.")[0]  # not Python's advice to raise its limit on integer digits
    except RecursionError:
        problem = "nested too deeply to read"
    else:
        problem = (f"it holds {_JSON_KINDS[type(prov)]}, not an object" if not isinstance(prov, dict) else
                   f"its run_id is {_JSON_KINDS[type(prov['run_id'])]}, not a string"
                   if not isinstance(prov.get("run_id", ""), str) else None)
    if problem is not None:
        raise RunError(f"{str(path)!r} is damaged ({problem}); it records the run's id: put it back, or delete it "
                       "to resume with the recipe check alone")
    return prov


def resume_run(recipe: Recipe | None, registry: Registry, out_dir: str | Path, sets: Sequence[str] = ()) -> Run:
    """Continue the run in `out_dir` from its newest checkpoint; a given recipe (or recipe.toml with `sets`, the
    command line's --set overrides) must match its recipe.toml except in EXTENSIBLE_KEYS, whose changes extend
    the run: recipe.toml is rewritten and stats.jsonl records a `recipe_changed` event.

    Claims the directory first (rank 0 under torchrun; all ranks refuse together). The newest checkpoint is
    validated completely and must belong to the directory (its recipe equals recipe.toml, and its run id, when
    both have one, equals provenance.json's); a run killed before its first checkpoint restarts from step 0.
    """
    from ctcore.distributed import world_from_env

    out_dir = Path(out_dir)
    if not out_dir.exists():
        raise RunError(path_not_found(f"nothing to resume: run directory {str(out_dir)!r}", out_dir))
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
        run = _resume_claimed(recipe, registry, out_dir, world, failure, sets)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def _resume_claimed(recipe: Recipe | None, registry: Registry, out_dir: Path, world: World,
                    failure: CtcoreError | None, sets: Sequence[str] = ()) -> Run:
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
    if sets:
        recipe = read_recipe(recipe_path, registry, sets)
    new_recipe = run_recipe
    if recipe is not None:
        changes = recipe_changes(run_recipe, recipe)
        refused = [k for k in changes if not extensible(k, recipe)]
        if refused and sets:
            blame = {s.partition("=")[0].strip(): s for s in sets}
            k = refused[0]
            cause = f"--set {blame[k]}: " if k in blame else f"{recipe.source}: "
            raise UsageError(
                f"{cause}{k} cannot change when the run in {str(out_dir)!r} resumes ({changes[k][0]} -> "
                f"{changes[k][1]}): its past steps were trained with it; on resume only {EXTENSIBLE_TEXT} may "
                "change; start a new run instead"
            )
        if refused:
            raise UsageError(
                f"{recipe.source} differs from the recipe of the run in {str(out_dir)!r}, so it cannot resume it:\n"
                + "\n".join(f"  {k}: {changes[k][0]} -> {changes[k][1]}" for k in refused)
                + "\nresume with the run directory instead of a recipe, or start a new run"
            )
        reached = int(state["step"]) if state is not None else 0
        if recipe.training.total_steps < reached:  # a shorter run than the one already trained is no extension
            given = next((s for s in sets if s.partition("=")[0].strip() == "training.total_steps"), None)
            cause = f"--set {given}: " if given else f"{recipe.source}: "
            raise UsageError(
                f"{cause}the run in {str(out_dir)!r} has already trained {reached:,} steps, so training.total_steps "
                f"cannot become {recipe.training.total_steps:,} on resume; give at least {reached:,}, or start a new "
                "run (a checkpoint of an earlier step can seed one with --init-from)"
            )
        if changes:
            new_recipe = recipe
    provenance = read_provenance(out_dir)
    run_id = provenance.get("run_id")
    init_record = provenance.get("init_from")
    build_loggers(new_recipe, registry)  # a logger that cannot work here is refused before anything changes
    if state is not None:
        _refuse_foreign(state, stored, run_recipe, run_id, ckpts, out_dir)
        run_id = run_id or state["provenance"].get("run_id")
        init_record = init_record or state["provenance"].get("init_from")
    world, device = setup(resolve_device(run_recipe.run.device))
    raise_together(world, failure)
    if world.is_main:  # a checkpoint that was being written when the run was killed: its partial temporary file
        for debris in checkpoint_dir(out_dir).glob(".ckpt-*.tmp"):
            debris.unlink(missing_ok=True)
    # a warm-started run killed before its first checkpoint starts again from the same weights
    warm_start = _recorded_warm_start(init_record, registry, out_dir) if state is None and init_record else None
    run = build_run(new_recipe, registry, out_dir, world=world, device=device, warm_start=warm_start)
    if init_record:
        run.provenance["init_from"] = init_record
    if state is not None:
        restore(run, state)
        _keep_the_curriculum(run, stored)
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
    if new_recipe is not run_recipe:
        run.recipe_changes = recipe_changes(run_recipe, new_recipe)
        run.extended_num_scales = (None if run.curriculum is None else
                                   (_num_scales_planned(run, run_recipe), int(run.curriculum.num_scales(run.step))))
        _extend(run, recipe_path)
    return run


def _recorded_warm_start(record: Any, registry: Registry, out_dir: Path) -> WarmStart:
    """The warm start provenance.json records, read again for a restart; refused if the file changed."""
    where = str(out_dir / "provenance.json")
    if not (isinstance(record, dict) and isinstance(record.get("checkpoint"), str)
            and record.get("weights") in ("eval-ema", "student")):
        raise RunError(f"{where!r} has a damaged `init_from` record ({record!r}); put the run's provenance.json back, "
                       "or start a new run")
    path = record["checkpoint"]
    if not Path(path).is_file():
        raise RunError(f"the run in {str(out_dir)!r} was started with --init-from {path!r}, which is gone, so it "
                       "cannot restart from step 0; put the checkpoint back, or start a new run")
    warm_start = read_warm_start(path, record["weights"], registry)
    if warm_start.sha256 != record.get("sha256"):
        raise RunError(f"the run in {str(out_dir)!r} was started with --init-from {path!r}, which has changed since "
                       f"(sha256 {warm_start.sha256}, recorded {record.get('sha256')}), so it cannot restart from "
                       "step 0; put the original checkpoint back, or start a new run")
    return warm_start


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
