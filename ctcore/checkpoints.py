"""Checkpoints: write, load, list and restore; the only module that knows their layout.

A checkpoint is a dict of state_dicts (student, eval EMA, teacher, optimizer), the step, every RNG state, the
resolved recipe text and provenance, written atomically and loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ctcore.distributed import gather_objects, rank_seed
from ctcore.errors import RunError
from ctcore.files import atomic_write
from ctcore.recipe import Recipe, parse_recipe

if TYPE_CHECKING:
    from ctcore.build import Run
    from ctcore.registry import Registry

CHECKPOINT_FORMAT = "ctcore-checkpoint-1"


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoints of a run directory, oldest first."""
    return sorted(checkpoint_dir(out_dir).glob("ckpt-*.pt"))


def save_checkpoint(run: Run) -> Path:
    """Write checkpoints/ckpt-<step>.pt atomically (temporary file, fsync, rename); keep the last K.

    Under torchrun every rank must call this (their dropout RNG states are gathered); rank 0 writes.
    """
    dropout_rng = {"torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}
    per_rank = gather_objects(run.world, dropout_rng) if run.world.distributed else None
    folder = checkpoint_dir(run.out_dir)
    path = folder / f"ckpt-{run.step:09d}.pt"
    if not run.world.is_main:
        return path
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": run.step,
        "student": run.student.state_dict(),
        "eval_ema": run.eval_ema.state_dict(),
        "teacher": run.teacher.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rng": {
            **dropout_rng,
            "index": run.index_generator.get_state(),
            "noise": run.noise_generator.get_state(),
            "ranks": per_rank,  # torchrun: each rank's dropout RNG states, in rank order (None otherwise)
        },
        "loss_sum": run.loss_sum,
        "loss_count": run.loss_count,
        "initial_distance": run.initial_distance,
        "last_good_step": run.last_good_step,
        "nonfinite_run": run.nonfinite_run,
        "world_size": run.world.world_size,
        "recipe": run.recipe_text,
        "provenance": run.provenance,
    }
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    for old in list_checkpoints(run.out_dir)[: -run.recipe.training.keep_checkpoints]:
        old.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True); a corrupt or foreign file gives one clear RunError."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "error" in ln.lower() and ":" in ln), lines[0] if lines else "")
        raise RunError(
            f"checkpoint {str(path)!r} is corrupt or not a ctcore checkpoint ({type(exc).__name__}: "
            f"{detail[:200]}); use an earlier file in its checkpoints/ folder"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"checkpoint {str(path)!r} is not a ctcore checkpoint (format {CHECKPOINT_FORMAT})")
    return state


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


def restore(run: Run, state: dict[str, Any]) -> None:
    """Put a run exactly where the checkpoint left it: weights, optimizer, step, every RNG state."""
    run.student.load_state_dict(state["student"])
    run.eval_ema.load_state_dict(state["eval_ema"])
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
