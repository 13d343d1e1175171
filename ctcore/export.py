"""Use ctcore models elsewhere: `ctcore export safetensors` and `ctcore export diffusers`.

`export_safetensors` writes one network's weights (eval EMA or student) as a .safetensors file whose metadata holds
the step, the resolved recipe and the provenance; ctcore reads such a file back as a checkpoint
(`ctcore.checkpoints.read_safetensors`), so sample, eval, edit, search-sigmas, load_denoiser, --init-from and a cd
teacher take it. `export_diffusers` writes a consistency model as a diffusers ConsistencyModelPipeline folder
(UNet2DModel + CMStochasticIterativeScheduler, safetensors weights, model_index.json) that
`ConsistencyModelPipeline.from_pretrained(OUT_DIR)` loads; diffusers itself is not needed to write it. The network
maps itself (its `to_diffusers`) and the objective says which CM scalings its model function computes (its
`boundary_scalings`); what the pipeline cannot compute exactly is refused in one line and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

DIFFUSERS_VERSION = "0.42.1"
"""The `_diffusers_version` the folder's JSON files name: the diffusers release its layout was checked against
(tests/test_export.py loads it and compares samples)."""
SCHEDULER_GRID = 40
"""CMStochasticIterativeScheduler's num_train_timesteps: the Karras grid its multistep sampling picks timesteps
from (OpenAI's CD setting, huggingface/diffusers scripts/convert_consistency_to_diffusers.py); one-step sampling
uses only sigma_max."""
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
"""The file name diffusers loads a model's weights from (in unet/)."""
EXPORT_RECORD = "ctcore_export.json"
"""The folder's record of what it was exported from: checkpoint, SHA-256, weights, step, recipe and provenance."""
INSTEAD = "export its weights with `ctcore export safetensors` instead"


def _read(checkpoint: str | Path, registry: Any, weights: str) -> tuple[Path, dict[str, Any], Any]:
    """(checkpoint file, its state, its recipe) of a CHECKPOINT argument (a file or a run directory: its newest),
    validated for reading its `weights`."""
    from ctcore.checkpoints import load_checkpoint, validate_checkpoint
    from ctcore.sampling import checkpoint_file

    path = checkpoint_file(checkpoint)
    state = load_checkpoint(path)
    return path, state, validate_checkpoint(state, path, registry, use=weights)


def _check_weights(weights: str) -> None:
    from ctcore.checkpoints import INIT_WEIGHTS
    from ctcore.errors import UsageError

    if weights not in INIT_WEIGHTS:
        raise UsageError(f"--weights must be one of {', '.join(INIT_WEIGHTS)}, got {weights!r}")


def export_safetensors(checkpoint: str | Path, out: str | Path, registry: Any, *, weights: str = "eval-ema",
                       overwrite: bool = False) -> dict[str, Any]:
    """Write the `weights` (eval-ema or student) of a checkpoint, or of a run directory's newest, to `out`
    (.safetensors) with its step, recipe and provenance as metadata; returns what was written.

    `out` is written atomically, never over the checkpoint read and never over an existing file without
    `overwrite` (UsageError); a bad checkpoint is one RunError, and nothing is written then."""
    from ctcore.checkpoints import save_safetensors
    from ctcore.errors import UsageError
    from ctcore.files import atomic_write, check_suffix, file_digest, output_lock, refuse_writing_inputs
    from ctcore.sampling import checkpoint_inputs

    _check_weights(weights)
    out = Path(out)
    check_suffix(out, "OUT.safetensors", (".safetensors",), "a .safetensors")
    refuse_writing_inputs([("OUT.safetensors", out)], checkpoint_inputs(checkpoint))
    exists = f"{str(out)!r} exists; pass --overwrite to replace it, or choose another OUT.safetensors"
    if out.exists() and not overwrite:
        raise UsageError(exists)
    path, state, _ = _read(checkpoint, registry, weights)
    tensors = state["eval_ema" if weights == "eval-ema" else "student"]
    digest = file_digest(path)
    with output_lock(out, "safetensors file", "ctcore export"):  # one writer; a killed one's temporary file removed
        if out.exists() and not overwrite:
            raise UsageError(exists)
        with atomic_write(out) as tmp:
            count = save_safetensors(tmp, state, weights, path, digest)
    return {"out": out, "checkpoint": path, "weights": weights, "step": int(state["step"]), "tensors": count,
            "parameters": sum(v.numel() for v in tensors.values()), "sha256": file_digest(out)}


def _check_out_dir(out_dir: Path, overwrite: bool, inputs: list[tuple[str, Path]]) -> None:
    """UsageError, before any work, when OUT_DIR may not be written: it holds the checkpoint read, it is a file, it
    exists without --overwrite, or it is a folder that is not a diffusers pipeline (--overwrite replaces only an
    earlier export, never some other folder)."""
    from ctcore.errors import UsageError

    if not os.path.lexists(out_dir):
        return
    if out_dir.is_dir():
        inside = os.path.join(os.path.realpath(out_dir), "")
        for option, source in inputs:
            if os.path.realpath(source).startswith(inside):
                raise UsageError(f"OUT_DIR {str(out_dir)!r} holds {option} {str(source)!r}: replacing it would destroy "
                                 "what this command reads, with or without --overwrite; choose another OUT_DIR")
    if not out_dir.is_dir():
        raise UsageError(f"OUT_DIR {str(out_dir)!r} exists and is not a folder; choose another OUT_DIR")
    if not overwrite:
        raise UsageError(f"{str(out_dir)!r} exists; pass --overwrite to replace it, or choose another OUT_DIR")
    if not (out_dir / "model_index.json").is_file():
        raise UsageError(f"OUT_DIR {str(out_dir)!r} is not a diffusers pipeline folder (it has no model_index.json), "
                         "and --overwrite replaces only such a folder; choose another OUT_DIR")


def _refuse(path: Path, reason: str, fix: str = INSTEAD) -> NoReturn:
    from ctcore.errors import RunError

    raise RunError(f"cannot export checkpoint {str(path)!r} to diffusers: {reason}; {fix}")


def diffusers_pipeline(path: Path, state: dict[str, Any], recipe: Any, registry: Any,
                       weights: str) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """The JSON files (relative name -> content) and the UNet2DModel weights of a ConsistencyModelPipeline that
    computes this checkpoint's consistency function, or one RunError saying what has no exact equivalent."""
    from ctcore.components import NOISE_CONVENTIONS
    from ctcore.consistency import noise_convention
    from ctcore.sampling import load_sampling_network, recipe_objective

    objective = recipe_objective(recipe, registry)
    name = recipe.components["objective"].name
    model = type(objective).model
    if model != "consistency":
        _refuse(path, f"it holds a {model} model (objective {name!r}), and ConsistencyModelPipeline samples "
                      "consistency models", "distil it into a consistency model first (README: Distillation and "
                      "tuning), or export its weights with `ctcore export safetensors`")
    scalings = getattr(objective, "boundary_scalings", None)
    if scalings is None:
        _refuse(path, f"objective {name!r} does not say whether its model function is CM's boundary-condition "
                      "parameterisation (it has no boundary_scalings), the one CMStochasticIterativeScheduler computes")
    c = recipe.consistency
    shift, sigma_data = scalings(c)
    if shift != c.sigma_min:
        _refuse(path, f"objective {name!r} evaluates c_skip and c_out shifted by sigma_min {shift:g}, but its "
                      f"sampling re-noises with consistency.sigma_min {c.sigma_min:g}, and "
                      "CMStochasticIterativeScheduler has one sigma_min for both")
    network, _ = load_sampling_network(path, state, recipe, registry, weights=weights, device="cpu")
    net = recipe.components["network"].name
    to_diffusers = getattr(network, "to_diffusers", None)
    if to_diffusers is None:
        _refuse(path, f"network {net!r} has no diffusers equivalent (it defines no to_diffusers)")
    try:
        config, tensors = to_diffusers()
    except ValueError as exc:
        _refuse(path, f"network {net!r} has no exact diffusers UNet2DModel: {exc}")
    factor = NOISE_CONVENTIONS[noise_convention(network)]
    if factor != NOISE_CONVENTIONS["positional"]:  # what the scheduler feeds the unet as its timestep
        _refuse(path, f"network {net!r} takes c_noise = {factor:g} ln sigma, but CMStochasticIterativeScheduler "
                      "passes the timestep 1000 * 0.25 ln sigma")
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    scheduler = {"_class_name": "CMStochasticIterativeScheduler", **version, "num_train_timesteps": SCHEDULER_GRID,
                 "sigma_min": c.sigma_min, "sigma_max": c.sigma_max, "sigma_data": sigma_data, "s_noise": 1.0,
                 "rho": c.rho, "clip_denoised": recipe.sampling.clip}
    index = {"_class_name": "ConsistencyModelPipeline", **version,
             "scheduler": ["diffusers", "CMStochasticIterativeScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    unet = {"_class_name": config.pop("_class_name"), **version, **config}
    return {"model_index.json": index, "unet/config.json": unet, "scheduler/scheduler_config.json": scheduler}, tensors


def _write_part(tmp: Path, out_dir: Path, name: str, write: Callable[[Path], object]) -> None:
    """Write file `name` of the folder being made in `tmp` and fsync it; a failed write (a full disk) is one RunError
    naming the file as OUT_DIR will hold it (the folder is renamed into place only once complete)."""
    from ctcore.errors import RunError
    from ctcore.files import failed_write_message

    part = tmp / name
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(part)
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as exc:
        raise RunError(failed_write_message(out_dir / name, exc.errno or 0)) from exc


def export_diffusers(checkpoint: str | Path, out_dir: str | Path, registry: Any, *, weights: str = "eval-ema",
                     overwrite: bool = False) -> dict[str, Any]:
    """Write a consistency model's checkpoint (or a run directory's newest) as a ConsistencyModelPipeline folder:
    model_index.json, unet/config.json, unet/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json
    and ctcore_export.json (where it came from, with its recipe and provenance); returns what was written.

    The folder is written beside OUT_DIR under a temporary name and renamed into place; with `overwrite` it
    replaces only an earlier diffusers pipeline folder. A model the pipeline cannot compute exactly (a diffusion
    model, another parameterisation, a network without an exact UNet2DModel) is one RunError, nothing written."""
    from ctcore.checkpoints import write_safetensors
    from ctcore.files import file_digest, output_lock
    from ctcore.sampling import checkpoint_inputs

    _check_weights(weights)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite, checkpoint_inputs(checkpoint))
    path, state, recipe = _read(checkpoint, registry, weights)
    files, tensors = diffusers_pipeline(path, state, recipe, registry, weights)
    digest = file_digest(path)
    files[EXPORT_RECORD] = {"checkpoint": str(path), "sha256": digest, "weights": weights, "step": int(state["step"]),
                            "recipe": state["recipe"], "provenance": state["provenance"]}
    target = Path(os.path.realpath(out_dir))  # a link to a folder: the folder it names is replaced, the link stays
    with output_lock(out_dir, "diffusers folder", "ctcore export"):
        _check_out_dir(out_dir, overwrite, checkpoint_inputs(checkpoint))
        for debris in target.parent.glob(f".{target.name}.*.partial"):  # what a killed export left
            shutil.rmtree(debris, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
        try:
            for name, content in files.items():
                _write_part(tmp, out_dir, name, lambda part, content=content: part.write_text(
                    json.dumps(content, indent=2, default=str) + "\n", encoding="utf-8"))
            _write_part(tmp, out_dir, f"unet/{UNET_WEIGHTS}", lambda part: write_safetensors(part, tensors,
                                                                                            {"format": "pt"}))
            os.chmod(tmp, 0o755)  # mkdtemp's folder is private; the others are made with the usual mode
            if os.path.lexists(target):
                old = tmp.with_name(tmp.name.removesuffix(".partial") + "-replaced.partial")
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    c = recipe.consistency
    return {"out_dir": out_dir, "checkpoint": path, "weights": weights, "step": int(state["step"]),
            "parameters": sum(v.numel() for v in tensors.values()), "sigma_min": c.sigma_min,
            "sigma_max": c.sigma_max, "sigma_data": files["scheduler/scheduler_config.json"]["sigma_data"],
            "files": sorted([*files, f"unet/{UNET_WEIGHTS}"])}
