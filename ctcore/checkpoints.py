"""Checkpoints: write, validate, load, list and restore; the only module that knows their layout.

A checkpoint is a dict of state_dicts (student, eval EMA, teacher, optimizer), the step, every RNG state, the
resolved recipe text and provenance (with the run's id), written atomically and loaded with
`torch.load(weights_only=True)`. `validate_checkpoint` checks one completely before anything is restored; the
run-directory lock keeps a second writer out of a run.

A .safetensors file that `ctcore export safetensors` wrote (one network's weights; the step, the recipe and the
provenance as metadata) loads as a checkpoint too: `load_checkpoint` recognises it by its header and returns it as
a checkpoint without optimizer or RNG state, so every reader accepts it and `--resume` refuses it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from ctcore.components import KINDS, MAX_NUM_SCALES, BuildContext, WeightsUnavailable
from ctcore.data import data_shape
from ctcore.distributed import gather_objects, rank_seed
from ctcore.errors import RunError, path_not_found
from ctcore.files import FileLock, acquire_lock, atomic_write, file_digest
from ctcore.recipe import Recipe, parse_recipe

if TYPE_CHECKING:
    from ctcore.registry import Registry
    from ctcore.runstate import Run

CHECKPOINT_FORMAT = "ctcore-checkpoint-1"
REQUIRED_COMPONENTS = ("network",)
"""provenance['components'] always names these; the others (KINDS) as the recipe has them: checkpoints from
before objectives and samplers existed name neither, those of a diffusion run no teacher or curriculum."""
RUN_LOCK = ".lock"
"""The lock file of a run directory (ignored when deciding whether a directory is empty)."""
OPTIMIZER_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
"""What Adam and RAdam keep per parameter (torch 2.13), all needed by their next step."""
PARAM_GROUP_KEYS = ("params", "lr", "betas", "eps", "weight_decay")
"""What their param groups must hold; torch fills in the other keys (foreach, fused, ...) when they are absent."""


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoints of a run directory, oldest first."""
    return sorted(checkpoint_dir(out_dir).glob("ckpt-*.pt"))


def lock_run_directory(out_dir: Path) -> FileLock:
    """Claim a run directory for this process (rank 0 under torchrun) for the life of its run, or raise one line
    naming the process that trains it; the OS releases the lock however the process ends."""
    return acquire_lock(Path(out_dir) / RUN_LOCK, f"run directory {str(out_dir)!r}", "ctcore run")


# ------------------------------------------------------------------------------------------ writing


def save_checkpoint(run: Run) -> Path:
    """Write checkpoints/ckpt-<step>.pt atomically (temporary file, fsync, rename); keep this run's last K.

    Weights or optimizer state that are not finite are never written (every rank checks, so under torchrun all
    ranks stop together): a RunError names the first bad tensor and the previous checkpoints stay. Under torchrun
    every rank must call this (their dropout RNG states are gathered); rank 0 writes.
    """
    folder = checkpoint_dir(run.out_dir)
    state = training_state(run)
    bad = first_nonfinite(_trained_tensors(state["student"], state["eval_ema"], state["teacher"], state["optimizer"]))
    if bad is not None:
        latest = list_checkpoints(run.out_dir)
        kept = f"the latest, {str(latest[-1])!r}, is kept" if latest else "there is no earlier one"
        guard = (" and set training.max_nonfinite_steps above 0 (0 switches off the guard that skips non-finite "
                 "steps)" if run.recipe.training.max_nonfinite_steps == 0 else "")
        raise RunError(
            f"training produced non-finite values in {bad} by step {run.step:,}, so its checkpoint was not written "
            f"({kept}): start a new run with a lower training.lr or a training.grad_clip{guard}"
        )
    if run.world.distributed:  # torchrun: each rank's dropout RNG states, in rank order
        state["rng"]["ranks"] = gather_objects(run.world, {k: state["rng"][k] for k in ("torch", "cuda")})
    path = folder / f"ckpt-{run.step:09d}.pt"
    if not run.world.is_main:
        return path
    state = {
        "format": CHECKPOINT_FORMAT,
        **state,
        "world_size": run.world.world_size,
        "recipe": run.recipe_text,
        "provenance": run.provenance,  # holds the run's id (run_id) from its start
    }
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    run_id, body = run.provenance.get("run_id"), _recipe_body(run.recipe_text)
    ours = [p for p in list_checkpoints(run.out_dir) if p == path or written_by(p, run_id, body)]
    for old in ours[: -run.recipe.training.keep_checkpoints]:
        old.unlink()
    return path


def training_state(run: Run) -> dict[str, Any]:
    """What a checkpoint holds of the training and `restore` puts back: weights, eval EMA, teacher, optimizer,
    step, every RNG state (`ranks`, each rank's dropout RNG under torchrun, is None here), the loss sums, the
    non-finite counters and the curriculum's floor (runstate.FlooredCurriculum; 1 without a curriculum). The
    tensors are the run's own, not copies."""
    return {
        "step": run.step,
        "student": run.student.state_dict(),
        "eval_ema": run.eval_ema.state_dict(),
        "teacher": run.teacher.state_dict() if run.teacher is not None else {},  # {}: the student, or no teacher
        "optimizer": run.optimizer.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
            "index": run.index_generator.get_state(),
            "noise": run.noise_generator.get_state(),
            "ranks": None,
        },
        "loss_sum": run.loss_sum,
        "loss_count": run.loss_count,
        "initial_distance": run.initial_distance,
        "last_good_step": run.last_good_step,
        "nonfinite_run": run.nonfinite_run,
        "num_scales_floor": run.curriculum.floor if run.curriculum is not None else 1,
    }


def _recipe_body(text: str) -> str:
    """A resolved recipe without its `# resolved from` line (which names the file it was read from)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def written_by(path: Path, run_id: str | None, recipe_body: str) -> bool:
    """Whether the checkpoint at `path` belongs to the run with this id, so retention may delete it.

    Reads only the pickled metadata (mmap: no tensor data is read). Checkpoints of runs from before run ids
    belong to an id-less run with the same recipe; an unreadable file belongs to no run and is never deleted.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        theirs = state["provenance"].get("run_id")
        return theirs == run_id and (run_id is not None or _recipe_body(state["recipe"]) == recipe_body)
    except Exception:  # noqa: BLE001 - any unreadable or foreign file is simply not ours
        return False


def _trained_tensors(student: dict, eval_ema: dict, teacher: dict, optimizer: dict) -> dict[str, Any]:
    """Label -> tensor of everything training changes, labelled as messages name them (eval_ema['fc.weight'])."""
    out: dict[str, Any] = {}
    for name, sd in (("student", student), ("eval_ema", eval_ema), ("teacher", teacher)):
        out |= {f"{name}[{k!r}]": v for k, v in sd.items()}
    for pid, st in optimizer.get("state", {}).items():
        out |= {f"optimizer['state'][{pid!r}][{k!r}]": v for k, v in st.items()}
    return out


def first_nonfinite(tensors: dict[str, Any]) -> str | None:
    """The label of the first floating-point tensor holding a NaN or infinity, or None (one device sync)."""
    floats = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not floats:
        return None
    flags = torch.stack([torch.isfinite(v).all() for _, v in floats])
    if bool(flags.all()):
        return None
    return floats[int((~flags).nonzero()[0])][0]


# ------------------------------------------------------------------------------------------ reading


EARLIER_CHECKPOINT = "use an earlier file in its checkpoints/ folder"
"""load_checkpoint's default advice for a file it cannot use (callers with a better one pass their own)."""


def load_checkpoint(path: str | Path, fix: str = EARLIER_CHECKPOINT) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True), or an exported .safetensors file (read_safetensors); a
    missing, corrupt or foreign file gives one RunError ending in `fix` (what the caller's user should do
    instead; for a .safetensors file the default is advice for such a file)."""
    path = Path(path)
    if not path.is_file():
        if not path.exists():
            raise RunError(path_not_found(f"checkpoint {str(path)!r}", path))
        raise RunError(f"checkpoint {str(path)!r} is not a file; {fix}")
    if is_safetensors(path):
        return read_safetensors(path, None if fix == EARLIER_CHECKPOINT else fix)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)  # torch's refusals bury the reason after "WeightsUnpickler error:" in a long advice text
        reason = text.split("WeightsUnpickler error:", 1)[-1]
        lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
        detail = lines[0] if lines else ("the file is empty" if path.stat().st_size == 0 else "no detail")
        raise RunError(
            f"checkpoint {str(path)!r} is corrupt or not a ctcore checkpoint ({type(exc).__name__}: "
            f"{detail[:200]}); {fix}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"checkpoint {str(path)!r} is not a ctcore checkpoint (format {CHECKPOINT_FORMAT}); {fix}")
    return state


# ------------------------------------------------------------------------------------------ safetensors

SAFETENSORS_FORMAT = "ctcore-safetensors-1"
"""The `ctcore.format` metadata of the .safetensors files `ctcore export safetensors` writes."""
SAFETENSORS_MAX_HEADER = 100_000_000
"""The longest safetensors header read, in bytes: the safetensors parser's own limit (its MAX_HEADER_SIZE)."""
EXPORT_AGAIN = "export it again from its checkpoint (ctcore export safetensors CHECKPOINT OUT.safetensors)"
"""The fix for an exported file that is damaged."""
NOT_EXPORTED = "give a .safetensors file that `ctcore export safetensors` wrote, or a ctcore checkpoint"
"""The fix for a safetensors file that ctcore did not write."""


def is_safetensors(path: Path) -> bool:
    """Whether a file begins as every safetensors file does, whatever its name: an 8-byte little-endian header
    length, then the header's `{` (torch's zip and pickle files have other bytes there)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` (names -> tensors, on any device) with string `metadata` as a safetensors file at `path`
    (a temporary file of atomic_write). Tensors that share memory are stored apart; a failed write (a full disk)
    is the OSError atomic_write turns into one line."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    plain = {}
    for name, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
        plain[name] = value.clone() if key in seen and value.numel() else value
        seen.add(key)
    try:
        save_file(plain, str(path), metadata=metadata)
    except SafetensorError as exc:  # its I/O errors carry the OS error only in the text: "... (os error 28)"
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def save_safetensors(path: Path, state: dict[str, Any], weights: str, source: Path, sha256: str) -> int:
    """Write the `weights` (eval-ema or student) of a validated checkpoint `state` read from `source` as an exported
    .safetensors file: metadata ctcore.format, ctcore.step, ctcore.weights, ctcore.recipe (the checkpoint's
    resolved recipe, verbatim) and ctcore.provenance (JSON: the checkpoint's, with `exported_from`), and `format`
    "pt" for other safetensors readers. Returns the number of tensors."""
    tensors = state["eval_ema" if weights == "eval-ema" else "student"]
    provenance = {**state["provenance"], "exported_from": {
        "file": str(source), "sha256": sha256, "weights": weights, "step": int(state["step"])}}
    metadata = {"format": "pt", "ctcore.format": SAFETENSORS_FORMAT, "ctcore.step": str(int(state["step"])),
                "ctcore.weights": weights, "ctcore.recipe": state["recipe"],
                "ctcore.provenance": json.dumps(provenance, default=str)}
    write_safetensors(path, tensors, metadata)
    return len(tensors)


def read_safetensors(path: Path, fix: str | None = None) -> dict[str, Any]:
    """An exported .safetensors file as a checkpoint: its tensors as eval EMA, student and teacher (one network),
    its metadata's step, recipe and provenance, no optimizer or RNG state, and `exported` (which weights it holds).

    Read by the safetensors parser (it never runs code), after a header-length check against the file's size. A
    truncated or damaged file, one without ctcore's metadata, or with metadata of the wrong type is one RunError
    ending in `fix` (default: advice for such a file); `validate_checkpoint` checks the rest (recipe, plugins,
    tensor names, shapes, dtypes, finiteness)."""
    from safetensors import safe_open

    where = f"checkpoint {str(path)!r}"
    damaged, foreign = fix or EXPORT_AGAIN, fix or NOT_EXPORTED
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
    if length > SAFETENSORS_MAX_HEADER:
        raise RunError(f"{where} is a damaged safetensors file: its header length says {length:,} bytes, more than "
                       f"the {SAFETENSORS_MAX_HEADER:,} safetensors allows; {damaged}")
    if 8 + length > size:
        raise RunError(f"{where} is a truncated safetensors file: its header length says {length:,} bytes, but only "
                       f"{size - 8:,} follow; {damaged}")

    def parsed(read_tensors: bool) -> Any:
        """The file's metadata, or its tensors; the parser's refusal as one RunError."""
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if not read_tensors:
                    return f.metadata() or {}
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is no dict
        except Exception as exc:  # noqa: BLE001 - the parser's refusals (SafetensorError), unsupported dtypes
            reason = str(exc).removeprefix("Error while deserializing header: ").strip().splitlines()
            raise RunError(f"{where} is a damaged safetensors file "
                           f"({reason[0][:200] if reason else type(exc).__name__}); {damaged}") from None

    metadata = parsed(read_tensors=False)  # checked before any tensor is read: a foreign file may be large
    found = metadata.get("ctcore.format")
    if found is None:
        raise RunError(f"{where} is a safetensors file without ctcore's metadata (no ctcore.format), so its network "
                       f"and recipe are unknown; {foreign}")
    if found != SAFETENSORS_FORMAT:
        raise RunError(f"{where} has ctcore.format {found[:100]!r}, but this ctcore reads {SAFETENSORS_FORMAT!r}; "
                       f"{damaged}")
    step = metadata.get("ctcore.step")
    if step is None or not re.fullmatch(r"[0-9]{1,18}", step):
        raise RunError(f"{where} has ctcore.step {step if step is None else step[:100]!r}, but a step is a whole "
                       f"number >= 0; {damaged}")
    weights = metadata.get("ctcore.weights")
    if weights not in INIT_WEIGHTS:
        raise RunError(f"{where} has ctcore.weights {weights if weights is None else weights[:100]!r}, but it must "
                       f"be one of {', '.join(INIT_WEIGHTS)}; {damaged}")
    if "ctcore.recipe" not in metadata:
        raise RunError(f"{where} has no ctcore.recipe (the resolved recipe it was trained with); {damaged}")
    try:
        provenance = json.loads(metadata.get("ctcore.provenance", ""))
    except (ValueError, RecursionError):
        provenance = None
    if not isinstance(provenance, dict):
        raise RunError(f"{where} has no ctcore.provenance holding a JSON object; {damaged}")
    tensors = parsed(read_tensors=True)
    return {"format": CHECKPOINT_FORMAT, "step": int(step), "recipe": metadata["ctcore.recipe"],
            "provenance": provenance, "eval_ema": tensors, "student": tensors, "teacher": tensors,
            "exported": weights}


def check_plugins(state: dict[str, Any], registry: Registry, path: Path) -> None:
    """Every component a checkpoint was trained with must be installed; name the missing distribution."""
    for kind, info in state["provenance"]["components"].items():
        if info["name"] not in registry.names(kind):
            raise RunError(
                f"checkpoint {str(path)!r} needs {kind} {info['name']!r} from the distribution "
                f"{info['distribution']!r} (version {info['version']}), which is not installed or is disabled; "
                f"install it (pip install {info['distribution']}) and try again"
            )


def recipe_from_checkpoint(state: dict[str, Any], registry: Registry, path: Path) -> Recipe:
    check_plugins(state, registry, path)
    return parse_recipe(state["recipe"], registry, source=f"{path} (embedded recipe)")


# ------------------------------------------------------------------------------------------ validating

USES = ("resume", "eval-ema", "student")
"""What a caller needs of a checkpoint: `ctcore run --resume` everything; `ctcore sample` and `ctcore eval` the
format, step, recipe, provenance and the weights they sample (eval-ema by default, or student), nothing else."""


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shape(value: Any) -> str:
    return str(tuple(value.shape))


def validate_checkpoint(state: Any, path: str | Path, registry: Registry, *, use: str = "resume",
                        device: torch.device | None = None) -> Recipe:
    """Check a loaded checkpoint completely before anything is restored; returns its recipe.

    Every part `use` needs (see USES) must be present with the right type; tensors must match, by name, shape
    and dtype, the networks rebuilt from the checkpoint's own recipe on the meta device (no memory, no time);
    weights and optimizer state must be finite; RNG states must be accepted by scratch generators of `device`'s
    type (default: the recipe's run.device). The first defect raises one RunError naming the file, the defect
    and the fix; so do values nested too deeply to compare or show (a hostile file).
    """
    if use not in USES:
        raise ValueError(f"use must be one of {USES}, got {use!r}")
    try:
        return _validated(state, Path(path), registry, use, device)
    except RecursionError:
        raise RunError(f"checkpoint {str(path)!r} holds values nested too deeply to check; {_damaged(use)}") from None


def _damaged(use: str) -> str:
    """The fix for a checkpoint with a defect, by what the caller needs of it (see USES)."""
    if use == "resume":
        return ("it is damaged or was not written by ctcore run: resume from an earlier checkpoint (move this one "
                "out of checkpoints/)")
    return "it is damaged or was not written by ctcore run: use an earlier checkpoint from its checkpoints/ folder"


def _validated(state: Any, path: Path, registry: Registry, use: str, device: torch.device | None) -> Recipe:
    """validate_checkpoint's checks."""
    where = f"checkpoint {str(path)!r}"
    resume = use == "resume"
    exported = isinstance(state, dict) and "exported" in state  # an exported .safetensors file (read_safetensors)
    damaged = EXPORT_AGAIN if exported and not resume else _damaged(use)
    resume_only = ("it was not written by ctcore run, or is damaged: resume from an earlier checkpoint (move this "
                   "one out of checkpoints/) or sample from it with ctcore sample")
    diverged = ("the run had diverged when it was written: resume from an earlier checkpoint (move this one out of "
                "checkpoints/), or start a new run with a lower training.lr or a training.grad_clip" if resume else
                EXPORT_AGAIN if exported else
                "the run had diverged when it was written: use an earlier checkpoint from its checkpoints/ folder")

    def fail(defect: str, fix: str = damaged) -> None:
        raise RunError(f"{where} {defect}; {fix}")

    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        fail(f"is not a ctcore checkpoint (format {CHECKPOINT_FORMAT})")
    if exported and resume:
        fail("is an exported .safetensors file: one network's weights, without the optimizer and RNG states a resume "
             "needs", "move it out of checkpoints/ to resume from an earlier checkpoint, or start a new run from its "
             "weights with --init-from")
    # --- what every use needs: step, recipe, provenance
    if "step" not in state:
        fail("has no step (key `step`)")
    if not _is_int(state["step"]):
        fail(f"has step {state['step']!r}, but a step is a whole number >= 0")
    if not isinstance(state.get("recipe"), str):
        fail("has no recipe (key `recipe`, the resolved recipe as text)")
    prov = state.get("provenance")
    if not isinstance(prov, dict):
        fail("has no provenance (key `provenance`)")
    components = prov.get("components")
    if not isinstance(components, dict) or not set(REQUIRED_COMPONENTS) <= set(components) <= set(KINDS) or not all(
            isinstance(c, dict) and all(isinstance(c.get(k), str) for k in ("name", "distribution", "version"))
            for c in components.values()):
        fail(f"has no valid provenance['components'] (the name, distribution and version of each of its "
             f"components: {', '.join(REQUIRED_COMPONENTS)}, and those of {', '.join(KINDS[1:])} it has)")
    shape = prov.get("data_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(d, 1) for d in shape)):
        fail(f"has provenance['data_shape'] {shape!r}, but it must be the image shape [C, H, W]")
    if not _is_int(prov.get("num_classes")):
        fail(f"has provenance['num_classes'] {prov.get('num_classes')!r}, but it must be a whole number >= 0")
    if not isinstance(prov.get("run_id", ""), str):
        fail(f"has provenance['run_id'] of type {type(prov['run_id']).__name__}, but a run id is a string")
    check_plugins(state, registry, path)
    recipe = parse_recipe(state["recipe"], registry, source=f"{path} (embedded recipe)")
    if tuple(shape) != data_shape(recipe.data) or prov["num_classes"] != recipe.data.num_classes:
        fail(f"has provenance data_shape {shape} and num_classes {prov['num_classes']}, but its recipe declares "
             f"{list(data_shape(recipe.data))} and {recipe.data.num_classes}")
    network, teacher = _meta_networks(recipe, registry, BuildContext(tuple(shape), prov["num_classes"],
                                                                     recipe.training.total_steps), fail, resume)
    expected = network.state_dict()
    net = f"network {recipe.components['network'].name!r} of its recipe"

    def check_weights(key: str, want: dict[str, Any], what: str, fix: str) -> None:
        found = state.get(key)
        if not isinstance(found, dict):
            fail(f"has no {key} weights (key `{key}`)", fix)

        def label(name: str) -> str:  # an exported file holds one network: its tensors by name
            return f"tensor {name!r}" if exported else f"{key}[{name!r}]"

        for name in want:
            if name not in found:
                fail(f"lacks {label(name)}, which {what} has", fix)
        for name, value in found.items():
            if name not in want:
                fail(f"has {label(name)}, which {what} does not have", fix)
            w = want[name]
            if isinstance(w, torch.Tensor):
                if not isinstance(value, torch.Tensor):
                    fail(f"has {label(name)} of type {type(value).__name__}, but {what} expects a tensor", fix)
                if value.shape != w.shape:
                    fail(f"has {label(name)} of the wrong shape: {what} expects {_shape(w)}, found "
                         f"{_shape(value)}", fix)
                if value.dtype != w.dtype:
                    fail(f"has {label(name)} of the wrong dtype: {what} expects {w.dtype}, found {value.dtype}",
                         fix)
            elif type(value) is not type(w):
                fail(f"has {label(name)} of type {type(value).__name__}, but {what} expects "
                     f"{type(w).__name__}", fix)
        bad = first_nonfinite({label(k): v for k, v in found.items()})
        if bad is not None:
            fail(f"holds non-finite values in {bad}", diverged)

    if resume or use == "eval-ema":
        check_weights("eval_ema", expected, net, damaged)
    if not resume:
        if use == "student":
            check_weights("student", expected, net, damaged)
        return recipe
    # --- what only resuming needs: student, teacher, optimizer, RNG states, loss and step counters
    check_weights("student", expected, net, resume_only)
    if teacher is not None:
        check_weights("teacher", teacher.state_dict(),
                      f"teacher {recipe.components['teacher'].name!r} of its recipe", resume_only)
    elif state.get("teacher") != {}:
        fail(f"has teacher weights, but objective {recipe.components['objective'].name!r} of its recipe trains "
             "without a teacher", resume_only)
    _check_optimizer(state.get("optimizer"), list(network.parameters()), lambda d: fail(d, resume_only),
                     lambda d: fail(d, diverged))
    from ctcore.devices import resolve_device

    device = device or resolve_device(recipe.run.device)
    _check_rng(state.get("rng"), device, lambda d: fail(d, resume_only))
    for key, ok, rule in (("loss_sum", _is_number, "a number"), ("loss_count", _is_int, "a whole number >= 0"),
                          ("initial_distance", lambda v: v is None or _is_number(v), "a number or None")):
        if key not in state:
            fail(f"has no `{key}`", resume_only)
        if not ok(state[key]):
            fail(f"has {key} {state[key]!r}, but it must be {rule}", resume_only)
    for key, low in (("last_good_step", 0), ("nonfinite_run", 0), ("world_size", 1)):  # absent in older files
        if key in state and not _is_int(state[key], low):
            fail(f"has {key} {state[key]!r}, but it must be a whole number >= {low}", resume_only)
    floor = state.get("num_scales_floor", 1)  # absent in older files: no floor
    if not (_is_int(floor, 1) and floor <= MAX_NUM_SCALES):
        fail(f"has num_scales_floor {floor!r}, but it must be a whole number from 1 to {MAX_NUM_SCALES:,} (the "
             "N(k) the curriculum keeps after an extension)", resume_only)
    return recipe


def _meta_networks(recipe: Recipe, registry: Registry, context: BuildContext, fail,
                   with_teacher: bool) -> tuple[Any, Any]:
    """The recipe's network and, `with_teacher` (to resume), its teacher bound to it (None without one), built on
    the meta device: shapes only. Sampling builds no teacher: a distilled model samples without the diffusion
    checkpoint its cd teacher reads."""
    kind = "network"
    try:
        with torch.device("meta"):
            spec = recipe.components[kind]
            network = registry.get(kind, spec.name)(spec.options, context)
            teacher = None
            if with_teacher and "teacher" in recipe.components:
                kind = "teacher"
                spec = recipe.components[kind]
                teacher = registry.get(kind, spec.name)(spec.options, context)
                teacher.bind(network)
    except WeightsUnavailable as exc:  # a file the component reads is gone (cd: its diffusion checkpoint)
        fail(f"has a recipe whose {kind} {spec.name!r} needs a file that is missing ({exc})",
             "restore that file, then resume")
    except Exception as exc:  # noqa: BLE001 - a plugin may raise anything; it is one line either way
        fail(f"has a recipe whose {kind} {spec.name!r} cannot be built ({type(exc).__name__}: {exc})")
    return network, teacher


def _check_optimizer(opt: Any, params: list[torch.Tensor], fail, fail_nonfinite) -> None:
    """An Adam / RAdam state_dict for `params` (one param group): group keys, sizes and per-parameter state."""
    if not isinstance(opt, dict):
        fail("has no optimizer state (key `optimizer`)")
    groups, states = opt.get("param_groups"), opt.get("state")
    if not isinstance(groups, list) or not isinstance(states, dict):
        fail("has an optimizer state without `state` and `param_groups`")
    if len(groups) != 1:
        fail(f"has {len(groups)} optimizer param groups, but ctcore's optimizer has 1")
    group = groups[0]
    if not isinstance(group, dict) or any(k not in group for k in PARAM_GROUP_KEYS):
        missing = [k for k in PARAM_GROUP_KEYS if not isinstance(group, dict) or k not in group]
        fail(f"has an optimizer param group without {', '.join(f'`{k}`' for k in missing)}")
    ids = group["params"]
    if not isinstance(ids, list) or len(ids) != len(params) or not all(_is_int(i) for i in ids) \
            or len(set(ids)) != len(ids):
        fail(f"has an optimizer param group for {len(ids) if isinstance(ids, list) else '?'} parameters, but the "
             f"network of its recipe has {len(params)}")
    for key in ("lr", "eps", "weight_decay"):
        if not (_is_number(group[key]) or isinstance(group[key], torch.Tensor)):
            fail(f"has optimizer param group {key} {group[key]!r}, but it must be a number")
    betas = group["betas"]
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_number(b) for b in betas)):
        fail(f"has optimizer betas {betas!r}, but they must be two numbers")
    shapes = dict(zip(ids, (p.shape for p in params), strict=True))
    for pid, st in states.items():
        if pid not in shapes:
            fail(f"has optimizer state for parameter {pid!r}, which its param group does not list")
        if not isinstance(st, dict):
            fail(f"has optimizer['state'][{pid!r}] of type {type(st).__name__}, but it must be a dict")
        for key in OPTIMIZER_STATE_KEYS:
            if key not in st:
                fail(f"lacks optimizer['state'][{pid!r}][{key!r}] (the optimizer keeps "
                     f"{', '.join(OPTIMIZER_STATE_KEYS)} for each parameter)")
        step = st["step"]
        if not (_is_number(step) or isinstance(step, torch.Tensor) and step.numel() == 1):
            fail(f"has optimizer['state'][{pid!r}]['step'] {step!r}, but it must be one number")
        for key in OPTIMIZER_STATE_KEYS[1:]:
            value = st[key]
            if not isinstance(value, torch.Tensor) or value.shape != shapes[pid]:
                found = _shape(value) if isinstance(value, torch.Tensor) else type(value).__name__
                fail(f"has optimizer['state'][{pid!r}][{key!r}] of the wrong shape: its parameter has "
                     f"{tuple(shapes[pid])}, found {found}")
    bad = first_nonfinite({f"optimizer['state'][{pid!r}][{k!r}]": v for pid, st in states.items()
                           for k, v in st.items()})
    if bad is not None:
        fail_nonfinite(f"holds non-finite values in {bad}")


def _check_rng(rng: Any, device: torch.device, fail) -> None:
    """Every RNG state a resume restores, tried on a scratch generator of the device it will be restored on."""
    if not isinstance(rng, dict):
        fail("has no RNG states (key `rng`)")

    def accepted(label: str, value: Any, dev: torch.device) -> None:
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
            found = f"of dtype {value.dtype}" if isinstance(value, torch.Tensor) else f"of type {type(value).__name__}"
            fail(f"has {label} {found}, but an RNG state is a torch.ByteTensor (uint8)")
        if dev.type == "cuda" and not torch.cuda.is_available():
            return  # the run itself cannot start here: resolving its device says so
        try:
            torch.Generator(device=dev).set_state(value)
        except (RuntimeError, TypeError, ValueError) as exc:
            fail(f"has {label} that a {dev.type} random generator does not accept ({str(exc).splitlines()[0]})")

    def dropout(label: str, value: Any) -> None:
        if not isinstance(value, dict) or "torch" not in value:
            fail(f"has no {label}['torch'] (the dropout RNG state)")
        accepted(f"{label}['torch']", value["torch"], torch.device("cpu"))
        if value.get("cuda") is not None:
            accepted(f"{label}['cuda']", value["cuda"], torch.device("cuda"))

    dropout("rng", rng)
    for key in ("index", "noise"):
        if key not in rng:
            fail(f"has no rng[{key!r}]")
        accepted(f"rng[{key!r}]", rng[key], device)
    ranks = rng.get("ranks")
    if ranks is not None:
        if not isinstance(ranks, list):
            fail(f"has rng['ranks'] of type {type(ranks).__name__}, but it must be a list (one per process)")
        for r, value in enumerate(ranks):
            dropout(f"rng['ranks'][{r}]", value)


# ------------------------------------------------------------------------------------------ restoring


def restore(run: Run, state: dict[str, Any]) -> None:
    """Put a run exactly where the checkpoint left it: weights, optimizer, step, every RNG state.

    `state` must have passed validate_checkpoint (use="resume"), or be training.rollback_point's copy of
    training_state (the optimizer then holds the copy's tensors)."""
    run.student.load_state_dict(state["student"])
    run.eval_ema.load_state_dict(state["eval_ema"])
    if run.teacher is not None:
        run.teacher.load_state_dict(state["teacher"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.step = int(state["step"])
    rng, world = state["rng"], run.world
    dropout_rng = rng  # the global generators (dropout): this rank's own under torchrun
    if world.distributed:
        same_world = rng.get("ranks") is not None and len(rng["ranks"]) == world.world_size
        dropout_rng = rng["ranks"][world.rank] if same_world else None
    if dropout_rng is None:  # another number of processes wrote it: fresh per-rank dropout streams (CPU and CUDA)
        torch.manual_seed(rank_seed(run.recipe.run.seed + run.step, world.rank))
    else:
        torch.set_rng_state(dropout_rng["torch"])
        if dropout_rng.get("cuda") is not None and run.device.type == "cuda":
            torch.cuda.set_rng_state(dropout_rng["cuda"], run.device)
    run.index_generator.set_state(rng["index"])
    run.noise_generator.set_state(rng["noise"])
    run.loss_sum = float(state["loss_sum"])
    run.loss_count = int(state["loss_count"])
    run.initial_distance = state["initial_distance"]
    run.last_good_step = int(state.get("last_good_step", run.step))
    run.nonfinite_run = int(state.get("nonfinite_run", 0))
    if run.curriculum is not None:
        run.curriculum.floor = int(state.get("num_scales_floor", 1))


# ------------------------------------------------------------------------------------------ warm starts

INIT_WEIGHTS = ("eval-ema", "student")
"""Which weights of another run `ctcore run --init-from` starts a network from (eval-ema by default)."""


@attrs.frozen
class WarmStart:
    """The weights a new run starts from (`--init-from`), read and validated, and where they came from."""

    checkpoint: Path
    weights: str
    """eval-ema or student: which of the checkpoint's networks."""
    state_dict: dict[str, Any]
    sha256: str
    step: int
    run_id: str | None
    option: str = "--init-from"
    """What set it, as messages name it: --init-from or the recipe key run.init_from."""

    def record(self) -> dict[str, Any]:
        """What provenance.json (and every checkpoint of the new run) keeps under `init_from`."""
        return {"checkpoint": str(self.checkpoint), "sha256": self.sha256, "weights": self.weights,
                "step": self.step, "run_id": self.run_id}

    def load_into(self, network: nn.Module, recipe: Recipe, *, load: bool = True) -> None:
        """Copy the weights into the recipe's freshly built network; the first tensor that does not fit it (by
        name, shape or dtype) is one RunError naming both shapes, and nothing is loaded. `load=False` only checks
        (`ctcore check`, on the meta-device network)."""
        key = "eval_ema" if self.weights == "eval-ema" else "student"
        found, expected = self.state_dict, network.state_dict()
        theirs, ours = f"the checkpoint's {key}", "the recipe's network"

        def describe(value: Any) -> str:
            return _shape(value) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"

        defect = None
        for name, want in expected.items():
            if name not in found:
                defect = f"tensor {name!r}: {ours} has it, {theirs} does not"
            elif isinstance(want, torch.Tensor) != isinstance(found[name], torch.Tensor) or (
                    isinstance(want, torch.Tensor) and want.shape != found[name].shape):
                defect = f"tensor {name!r}: {ours} expects shape {describe(want)}, {theirs} has {describe(found[name])}"
            elif isinstance(want, torch.Tensor) and want.dtype != found[name].dtype:
                defect = f"tensor {name!r}: {ours} expects dtype {want.dtype}, {theirs} has {found[name].dtype}"
            if defect:
                break
        extra = [name for name in found if name not in expected]
        if defect is None and extra:
            defect = f"tensor {extra[0]!r}: {theirs} has it, {ours} does not"
        if defect is not None:
            raise RunError(
                f"{_named(self.option, self.checkpoint)} does not fit network {recipe.components['network'].name!r} "
                f"of {recipe.source}: {defect}; initialise from a run of the same network (options, image shape, "
                "num_classes), or change the recipe to match it")
        if load:
            network.load_state_dict(found)


def _named(option: str, path: str | Path) -> str:
    """How a message names the source of a warm start: `--init-from 'x'` for the flag, `run.init_from: 'x'` for
    the recipe key (as recipe errors name keys)."""
    return f"{option} {str(path)!r}" if option.startswith("--") else f"{option}: {str(path)!r}"


def read_warm_start(source: str | Path, weights: str, registry: Registry, option: str = "--init-from") -> WarmStart:
    """The `weights` of a checkpoint, or of a run directory's newest checkpoint, validated as `ctcore sample`
    validates them (present, of its own recipe's shapes, finite); bad files raise one RunError."""
    if weights not in INIT_WEIGHTS:
        raise ValueError(f"weights must be one of {INIT_WEIGHTS}, got {weights!r}")
    path = Path(source)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # a name too long for the file system, say
        raise RunError(f"{_named(option, path)} cannot be looked up ({exc.strerror}); give {option} the checkpoint "
                       "file or run directory of an existing run") from None
    if not exists:
        raise RunError(path_not_found(_named(option, path), path, f"train that run (or convert that model) "
                                      f"first, or give {option} the checkpoint file or run directory of an "
                                      "existing run"))
    if is_dir:
        found = list_checkpoints(path)
        if not found:
            raise RunError(f"{_named(option, path)} holds no checkpoint (checkpoints/ckpt-*.pt); give a checkpoint "
                           "file, or a run directory that has written one")
        path = found[-1]
    state = load_checkpoint(path, fix=f"give {option} a checkpoint that ctcore wrote (checkpoints/ckpt-*.pt), "
                                      "or its run directory")
    validate_checkpoint(state, path, registry, use=weights)
    return WarmStart(checkpoint=path, weights=weights, state_dict=state["eval_ema" if weights == "eval-ema" else
                     "student"], sha256=file_digest(path), step=int(state["step"]),
                     run_id=state["provenance"].get("run_id"), option=option)
