"""One-step and multistep consistency sampling with per-sample seeds, and the HDF5 sample store.

Sample j draws all its noise (and its class label, for conditional models) from its own generator seeded
with seeds[j], so any subset of a sample set can be regenerated exactly. Labels chosen instead (`ctcore sample
--labels`, `--class-balanced`) replace the drawn label and leave the noise as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ctcore.components import BuildContext, NoiseLevels
from ctcore.data import to_uint8
from ctcore.files import file_digest

if TYPE_CHECKING:
    from torch import nn

    from ctcore.recipe import Recipe
    from ctcore.runstate import Run

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""f(x, sigma per sample, labels) -> denoised x."""


class NonFiniteOutputs(Exception):
    """A network evaluation gave non-finite outputs (an overflow, a NaN): at which sigma, for how many of the
    batch's samples, and (where known) their seeds. Commands turn it into one line naming the checkpoint; a
    training run logs it as a warning."""

    def __init__(self, sigma: float, rows: Sequence[int], total: int, seeds: Sequence[int] | None = None) -> None:
        self.sigma, self.rows, self.total = float(sigma), list(rows), int(total)
        self.seeds = None if seeds is None else [int(s) for s in seeds]
        super().__init__(self.describe())

    def describe(self) -> str:
        """`non-finite outputs at sigma 80 for 3 of 64 samples of a batch (seeds 5, 9, 12)`."""
        text = f"non-finite outputs at sigma {self.sigma:g} for {len(self.rows):,} of {self.total:,} samples of a batch"
        if self.seeds:
            shown = ", ".join(map(str, self.seeds[:3])) + (", ..." if len(self.seeds) > 3 else "")
            text += f" (seed{'s' if len(self.seeds) > 1 else ''} {shown})"
        return text

    def with_seeds(self, seeds: Sequence[int]) -> NonFiniteOutputs:
        """The same failure with the seeds of its rows, for a batch made from `seeds` (one per row)."""
        return NonFiniteOutputs(self.sigma, self.rows, self.total, [seeds[i] for i in self.rows])


def finite_outputs(denoiser: Denoiser) -> Denoiser:
    """The model function, raising NonFiniteOutputs as soon as an output holds a NaN or an infinity (before any clamp
    could turn an overflow into a white pixel). One scalar is read from the device per network evaluation."""

    def check(out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        bad = ~torch.isfinite(out).flatten(1).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise NonFiniteOutputs(float(sigma.flatten()[rows[0]]), rows, len(bad))
        return out

    def checked(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return check(denoiser(x, sigma, labels), sigma)

    jump = getattr(denoiser, "jump", None)
    if jump is not None:  # a flow map's jump between noise levels (ctcore.runstate.model_function)
        checked.jump = lambda x, s, s_to, y: check(jump(x, s, s_to, y), s)
    return checked


def nonfinite_error(failure: NonFiniteOutputs, checkpoint: str | Path) -> Exception:
    """The one line a command stops with (exit 1) when a checkpoint's network gives non-finite outputs."""
    from ctcore.errors import RunError

    return RunError(f"checkpoint {str(checkpoint)!r} gives {failure.describe()}: its weights are finite, but its "
                    "network overflows or returns NaN there; nothing was written. Try another checkpoint of the run "
                    "(or --weights student), or other --sigmas")


def raise_nonfinite_together(world: Any, failure: NonFiniteOutputs | None) -> None:
    """Under torchrun, raise on every rank the first rank's NonFiniteOutputs (so no rank waits in a collective for
    one that stopped); a single process raises its own. Returns when no rank failed."""
    from ctcore.distributed import gather_objects

    found = [failure] if not world.distributed else [
        None if f is None else NonFiniteOutputs(*f) for f in gather_objects(
            world, None if failure is None else (failure.sigma, failure.rows, failure.total, failure.seeds))]
    first = next((f for f in found if f is not None), None)
    if first is not None:
        raise first


def sample_noise(seed: int, shape: Sequence[int], num_steps: int, num_classes: int) -> tuple[torch.Tensor, int]:
    """The noise of one sample: (num_steps, *shape) standard normals and a label (-1 if unconditional)."""
    g = torch.Generator().manual_seed(int(seed))
    label = int(torch.randint(0, num_classes, (1,), generator=g)) if num_classes > 0 else -1
    return torch.randn((num_steps, *shape), generator=g), label


@torch.no_grad()
def multistep_sample(
    denoiser: Denoiser,
    z: torch.Tensor,
    sigmas: Sequence[float],
    labels: torch.Tensor | None = None,
    *,
    sigma_min: float = 0.002,
    clip: bool = True,
    start: torch.Tensor | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """x = f(sigma_0 z_0, sigma_0); then for each next sigma: x = f(x + sqrt(sigma^2 - sigma_min^2) z_k, sigma).

    `z` is (num_steps, B, ...) noise; `sigmas` starts at sigma_max ([sigma_max] is one-step sampling,
    [sigma_max, sigma_mid] two-step). Outputs are clamped to [-1, 1] after every step when `clip`. Editing
    (ctcore.editing) starts from `start` + sigma_0 z_0 and applies `project` after every step's clamp.
    """
    if len(sigmas) != z.shape[0]:
        raise ValueError(f"need one noise draw per step: {len(sigmas)} sigmas, {z.shape[0]} draws")
    batch = z.shape[1]
    x = None
    for k, sigma in enumerate(sigmas):
        if k == 0:
            x_in = sigma * z[0] if start is None else start + sigma * z[0]
        else:
            x_in = x + (sigma**2 - sigma_min**2) ** 0.5 * z[k]
        x = denoiser(x_in, torch.full((batch,), float(sigma), device=z.device), labels)
        if clip:
            x = x.clamp(-1.0, 1.0)
        if project is not None:
            x = project(x)
    return x


def generate(
    denoiser: Denoiser,
    shape: Sequence[int],
    seeds: Sequence[int],
    sigmas: Sequence[float],
    *,
    num_classes: int = 0,
    sigma_min: float = 0.002,
    clip: bool = True,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    class_labels: Sequence[int] | None = None,
    sampler: Any = None,
    levels: NoiseLevels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples for the given seeds, batch by batch: uint8 images (N, C, H, W) and labels (N,), -1 if none.

    `sampler` (a sampler component, with the recipe's noise `levels`) makes each batch from its noise; without one,
    consistency multistep sampling. A conditional model's labels are drawn from each sample's seed, or given as
    `class_labels`, cycled over the samples (sample j gets class_labels[j % len]); the noise is the same either
    way."""
    if class_labels is not None and (num_classes == 0 or not class_labels):
        raise ValueError("class_labels need a conditional model (num_classes > 0) and at least one label")
    images, labels = [], []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        num_draws = len(sigmas) if sampler is None else sampler.noise_draws(list(sigmas))
        draws = [sample_noise(s, shape, num_draws, num_classes) for s in chunk]
        z = torch.stack([d[0] for d in draws], dim=1).to(device)
        lab = torch.tensor([d[1] for d in draws], dtype=torch.long)
        if class_labels is not None:
            lab = torch.tensor([class_labels[j % len(class_labels)] for j in range(start, start + len(chunk))],
                               dtype=torch.long)
        y = lab.to(device) if num_classes > 0 else None
        try:
            images.append(images_from_noise(denoiser, z, sigmas, y, sampler=sampler, levels=levels, clip=clip,
                                            sigma_min=sigma_min))
        except NonFiniteOutputs as failure:
            raise failure.with_seeds(chunk) from None
        labels.append(lab)
        if progress is not None:
            progress(len(chunk))
    return torch.cat(images), torch.cat(labels)


def images_from_noise(denoiser: Denoiser, z: torch.Tensor, sigmas: Sequence[float], labels: torch.Tensor | None, *,
                      sampler: Any = None, levels: NoiseLevels | None = None, clip: bool = True,
                      sigma_min: float = 0.002) -> torch.Tensor:
    """uint8 images (on CPU) of one batch of noise `z` (noise_draws, B, ...): the sampler's `sample` (without one,
    consistency multistep sampling). `ctcore sample`, eval, the sigma search, the run's grids and `ctcore edit
    interpolate` all make images here, so one noise gives one image whichever command asks. Every network output
    is checked (`finite_outputs`): NonFiniteOutputs rather than black or white images."""
    denoiser = finite_outputs(denoiser)
    if sampler is None:
        x = multistep_sample(denoiser, z, sigmas, labels, sigma_min=sigma_min, clip=clip)
    else:
        x = sampler.sample(denoiser, z, list(sigmas), labels, levels, clip)
    return to_uint8(x).cpu()


def write_sample_store(path: str | Path, images: torch.Tensor, seeds: Sequence[int], labels: torch.Tensor | None,
                       attrs: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write samples to HDF5 atomically: `images` uint8 (N, C, H, W), `seeds`, `labels` (left out when None),
    the `extra` datasets (an edit store's inputs and masks; a (data, attributes) pair gives a dataset its own
    attributes) and attrs."""
    import h5py
    import numpy as np

    from ctcore.files import atomic_write

    path = Path(path)
    # built in memory (the images already are) and written out on close: HDF5 2.0 can crash the process when a
    # write to disk fails mid-file (a full disk), while a failed write of the finished image is a clean OSError
    with atomic_write(path) as tmp, h5py.File(tmp, "w", driver="core", backing_store=True, block_size=1 << 20) as f:
        f.create_dataset("images", data=images.numpy(), chunks=(min(len(images), 256), *images.shape[1:]))
        f.create_dataset("seeds", data=np.asarray(list(seeds), dtype=np.int64))
        if labels is not None:
            f.create_dataset("labels", data=labels.numpy().astype(np.int64))
        for name, data in (extra or {}).items():
            data, dataset_attrs = data if isinstance(data, tuple) else (data, {})  # (data, its own attributes)
            ds = f.create_dataset(name, data=data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data))
            for k, v in dataset_attrs.items():
                ds.attrs[k] = v
        f.attrs["layout"] = "NCHW"
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


def read_sample_store(path: str | Path) -> dict[str, Any]:
    """Read a sample store back: images, seeds, labels (None in an edit store of an unconditional model) as
    tensors and attrs as a dict."""
    import h5py

    with h5py.File(path, "r") as f:
        return {
            "images": torch.from_numpy(f["images"][...]),
            "seeds": torch.from_numpy(f["seeds"][...]),
            "labels": torch.from_numpy(f["labels"][...]) if "labels" in f else None,
            "attrs": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f.attrs.items()},
        }


def load_sampling_plan(
    checkpoint: str | Path, registry, *, steps: int | None = None, sigmas: Sequence[float] | None = None,
    weights: str = "eval-ema", sampler: str | None = None,
) -> tuple[Path, dict[str, Any], Any, list[float], Any]:
    """(checkpoint file, its state, its recipe, the sigmas to sample at, the sampler) for a checkpoint or a run
    directory.

    A directory means its latest checkpoint. The sampler is the recipe's, or the installed `sampler` named (with
    its default options), which must sample the kind of model the checkpoint holds; it makes the plan from
    `steps` or checks the given `sigmas` (consistency sampling: sigma_max then the first steps - 1 values of
    sampling.sigma_mid). The checkpoint is validated for sampling its `weights` (eval-ema or student): it needs
    its step, recipe, provenance and those weights, finite; optimizer and RNG states are not read. Bad requests
    raise UsageError, bad files RunError.
    """
    from ctcore.checkpoints import load_checkpoint, validate_checkpoint
    from ctcore.errors import UsageError

    checkpoint = checkpoint_file(checkpoint)
    state = load_checkpoint(checkpoint)
    recipe = validate_checkpoint(state, checkpoint, registry, use=weights)
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    chosen = recipe_sampler(recipe, registry, sampler, checkpoint)
    try:
        plan = chosen.plan(steps, None if sigmas is None else [float(s) for s in sigmas], recipe.levels)
    except ValueError as exc:
        if steps is not None and sigmas is None:
            raise UsageError(f"--steps {steps}: {exc}; pass --sigmas explicitly, e.g. --sigmas 80,0.821") from None
        raise UsageError(str(exc)) from None
    return checkpoint, state, recipe, plan, chosen


def checkpoint_file(checkpoint: str | Path) -> Path:
    """The checkpoint a CHECKPOINT argument names: the file itself, or a run directory's latest checkpoint."""
    from ctcore.checkpoints import list_checkpoints
    from ctcore.errors import RunError

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        found = list_checkpoints(checkpoint)
        if not found:
            raise RunError(f"{str(checkpoint)!r} holds no checkpoint (checkpoints/ckpt-*.pt)")
        checkpoint = found[-1]
    return checkpoint


def checkpoint_inputs(checkpoint: str | Path) -> list[tuple[str, Path]]:
    """The files a CHECKPOINT argument may name, as (option, path) for `refuse_writing_inputs`: the file itself, or
    every checkpoint of a run directory."""
    from ctcore.checkpoints import list_checkpoints

    checkpoint = Path(checkpoint)
    return [("CHECKPOINT", p) for p in (list_checkpoints(checkpoint) if checkpoint.is_dir() else [checkpoint])]


def recipe_sampler(recipe: Any, registry, name: str | None = None, checkpoint: Path | None = None) -> Any:
    """The recipe's sampler, or the installed sampler `name` with its default options (`--sampler`), which must
    sample the kind of model the recipe's objective trains; UsageError otherwise."""
    from ctcore.errors import UsageError, unknown_name_message
    from ctcore.recipe import samplers_for

    if name is None:
        spec = recipe.components["sampler"]
        return registry.get("sampler", spec.name)(spec.options, BuildContext())
    if name not in registry.names("sampler"):
        raise UsageError(f"--sampler: {unknown_name_message('sampler', name, registry.names('sampler'))}")
    cls = registry.get("sampler", name)
    objective = registry.get("objective", recipe.components["objective"].name)
    if cls.model != objective.model:
        what = f"checkpoint {str(checkpoint)!r}" if checkpoint is not None else recipe.source
        raise UsageError(f"--sampler {name}: it samples {cls.model} models, but {what} holds a {objective.model} "
                         f"model (objective {objective.name!r}); use one of: "
                         f"{', '.join(samplers_for(registry, objective.model))}")
    return cls(cls.Options(), BuildContext())


def recipe_objective(recipe: Any, registry) -> Any:
    """The recipe's objective, built: its `denoise` is the model function of the recipe's network."""
    spec = recipe.components["objective"]
    return registry.get("objective", spec.name)(spec.options, BuildContext())


def recipe_model_function(recipe: Any, registry, network: nn.Module) -> Denoiser:
    """(x, sigma, labels) -> the recipe's objective's denoise of `network`: f of a consistency model, D of a
    diffusion model (what sample, eval and the sigma search sample with)."""
    from ctcore.runstate import model_function

    return model_function(recipe_objective(recipe, registry), network, recipe.consistency)


def require_consistency_model(recipe: Any, registry, checkpoint: Path, command: str) -> None:
    """UsageError unless the checkpoint holds a consistency model: editing (CM Algorithm 4) and the sigma search
    re-noise and jump back with the consistency function, which a diffusion denoiser is not."""
    from ctcore.errors import UsageError

    objective = registry.get("objective", recipe.components["objective"].name)
    if objective.model != "consistency":
        raise UsageError(f"{command} works on consistency models, but checkpoint {str(checkpoint)!r} holds a "
                         f"{objective.model} model (objective {objective.name!r}); sample it with `ctcore sample`, "
                         "or distil it into a consistency model first")


def load_sampling_network(
    checkpoint: Path, state: dict[str, Any], recipe, registry, *, weights: str = "eval-ema", device: str | None = None
) -> tuple[torch.nn.Module, torch.device]:
    """The checkpoint's network rebuilt through the registry with its `weights` ("eval-ema" or "student"),
    in eval mode on `device` (default: the recipe's run.device), and that device. Sets torch's CPU thread
    count from the recipe's run.threads."""
    from ctcore.components import BuildContext
    from ctcore.devices import resolve_device, use_threads
    from ctcore.errors import RunError

    use_threads(recipe.run.threads)
    prov = state["provenance"]
    spec = recipe.components["network"]
    network = registry.get("network", spec.name)(
        spec.options, BuildContext(tuple(prov["data_shape"]), prov["num_classes"], recipe.training.total_steps)
    )
    key = "eval_ema" if weights == "eval-ema" else "student"
    try:
        network.load_state_dict(state[key])
    except RuntimeError as exc:
        raise RunError(f"checkpoint {str(checkpoint)!r}: weights do not fit network {spec.name!r} ({exc})") from None
    dev = resolve_device(device or recipe.run.device)
    return network.to(dev).eval(), dev


def sample_from_checkpoint(
    checkpoint: str | Path,
    registry,
    *,
    num_samples: int | None = None,
    steps: int | None = None,
    sigmas: Sequence[float] | None = None,
    seed: int | None = None,
    out: str | Path | None = None,
    grid: str | Path | None = None,
    weights: str = "eval-ema",
    batch_size: int = 256,
    overwrite: bool = False,
    device: str | None = None,
    labels: Sequence[int] | None = None,
    class_balanced: bool = False,
    sampler: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Rebuild the network of a checkpoint through the registry, sample with the recipe's sampler (or the one
    named `sampler`) on `device` (default: the recipe's run.device), write the store and a PNG grid; `progress`
    counts the samples on stderr (`ctcore.reporting.stderr_progress`).

    A class-conditional model samples the given `labels` (cycled), or with `class_balanced` sample j gets class
    j mod num_classes, or by default a label drawn from each seed; the grid shows each image's label. The
    store's lock (`.<store name>.lock` beside it, removed afterwards) keeps two samplers from writing it."""
    from ctcore.errors import UsageError
    from ctcore.files import output_lock, refuse_writing_inputs
    from ctcore.images import save_grid

    checkpoint, state, recipe, sigmas, chosen = load_sampling_plan(checkpoint, registry, steps=steps, sigmas=sigmas,
                                                                   weights=weights, sampler=sampler)
    num_classes = state["provenance"]["num_classes"]
    class_labels, label_choice = choose_labels(checkpoint, num_classes, labels, class_balanced)
    c = recipe.consistency
    draws = chosen.noise_draws(sigmas)
    asked = num_samples
    num_samples = recipe.sampling.num_samples if num_samples is None else num_samples
    seed = recipe.sampling.seed if seed is None else seed
    # inside a run directory samples go to its samples/ folder, otherwise next to the checkpoint
    in_run = checkpoint.parent.name == "checkpoints"
    folder = checkpoint.parent.parent / "samples" if in_run else checkpoint.parent
    out = Path(out) if out is not None else folder / f"{checkpoint.stem}-{len(sigmas)}step-{num_samples}.h5"
    grid = Path(grid) if grid is not None else out.with_suffix(".png")
    refuse_writing_inputs([("--out", out), ("--grid", grid)], checkpoint_inputs(checkpoint))
    if out.exists() and not overwrite:  # before any work; checked again under the store's lock
        raise UsageError(f"{str(out)!r} exists; pass --overwrite to replace it, or choose --out")
    prov = state["provenance"]
    from ctcore.devices import resolve_device
    from ctcore.preflight import require_buffers, sample_buffers

    option = "--num-samples" if asked is not None else f"sampling.num_samples of {checkpoint} (pass --num-samples)"
    require_buffers(sample_buffers(num_samples, tuple(prov["data_shape"]), draws, batch_size),
                    resolve_device(device or recipe.run.device), f"making {num_samples:,} samples",
                    f"choose a smaller {option}, or a smaller --batch-size; several smaller stores (--seed) "
                    "make the same samples")
    network, dev = load_sampling_network(checkpoint, state, recipe, registry, weights=weights, device=device)
    seeds = list(range(seed, seed + num_samples))
    with output_lock(out, "sample store", "ctcore sample"):  # one process at a time checks and writes it
        if out.exists() and not overwrite:
            raise UsageError(f"{str(out)!r} exists; pass --overwrite to replace it, or choose --out")
        from ctcore.reporting import stderr_progress

        plan = plan_text(chosen.name, sigmas, chosen.evaluations(sigmas), draws, levels=False)
        bar, task = stderr_progress(progress, f"sample {plan}", num_samples)
        try:
            with bar:
                images, drawn = generate(
                    recipe_model_function(recipe, registry, network),
                    tuple(prov["data_shape"]), seeds, sigmas, num_classes=prov["num_classes"],
                    sigma_min=c.sigma_min, clip=recipe.sampling.clip, batch_size=batch_size, device=dev,
                    class_labels=class_labels, sampler=chosen, levels=recipe.levels,
                    progress=lambda n: bar.advance(task, n),
                )
        except NonFiniteOutputs as failure:
            raise nonfinite_error(failure, checkpoint) from None
        attrs = {
            "recipe": state["recipe"],
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_digest(checkpoint),
            "step": int(state["step"]),
            "sigmas": sigmas,
            "sampler": chosen.name,
            "evaluations": chosen.evaluations(sigmas),
            "weights": weights,
            "ctcore_version": prov.get("ctcore", "?"),
        }
        if num_classes:
            attrs["label_choice"] = label_choice
        write_sample_store(out, images, seeds, drawn, attrs)
        if num_classes:  # each image captioned with its class label
            save_grid(images[:256], grid, captions=[str(v) for v in drawn[:256].tolist()])
        else:
            save_grid(images[:256], grid)
    return {"store": out, "grid": grid, "num_samples": num_samples,
            "plan": plan_text(chosen.name, sigmas, chosen.evaluations(sigmas), draws), "seed": seed,
            "sigmas": sigmas, "sampler": chosen.name, "weights": weights, "checkpoint": checkpoint,
            "step": int(state["step"]), "device": str(dev)}


def plan_text(sampler: str, sigmas: list[float], evaluations: int, draws: int, *, levels: bool = True) -> str:
    """`2-step [80.0, 0.821]` for consistency sampling (one evaluation and one noise draw per level), else e.g.
    `18-level heun (35 network evaluations) [80.0, 57.586, 40.7856, ..., 0.002]`; without the list if not
    `levels`."""
    if evaluations == len(sigmas) == draws:
        plan = f"{len(sigmas)}-step"
    else:
        plan = f"{len(sigmas)}-level {sampler} ({evaluations} network evaluations)"
    if not levels:
        return plan
    shown = sigmas if len(sigmas) <= 6 else [*(round(s, 4) for s in sigmas[:3]), "...", sigmas[-1]]
    return f"{plan} [" + ", ".join(map(str, shown)) + "]"


def choose_labels(checkpoint: Path, num_classes: int, labels: Sequence[int] | None,
                  class_balanced: bool) -> tuple[list[int] | None, str]:
    """The class labels `ctcore sample` cycles over (None: drawn from each seed) and how they were chosen, as
    the sample store records it; labels for a model that takes none, or outside 0..num_classes-1, are a
    UsageError."""
    from ctcore.errors import UsageError

    if labels is not None and class_balanced:
        raise UsageError("--labels and --class-balanced both choose the class labels: give one of them")
    option = "--labels" if labels is not None else "--class-balanced" if class_balanced else None
    if option is None:
        return None, "drawn from each seed"
    if num_classes == 0:
        raise UsageError(f"{option}: checkpoint {str(checkpoint)!r} is of an unconditional model (num_classes 0), "
                         f"which takes no class labels; leave out {option}")
    if class_balanced:
        return list(range(num_classes)), f"class-balanced: sample j has class j mod {num_classes}"
    if not labels:
        raise UsageError('--labels needs at least one class label, e.g. "0,3,7"')
    bad = next((v for v in labels if not 0 <= v < num_classes), None)
    if bad is not None:
        raise UsageError(f"--labels {bad}: checkpoint {str(checkpoint)!r} has {num_classes} classes, so a label "
                         f"lies in 0..{num_classes - 1}")
    return list(labels), "cycled: " + ",".join(map(str, labels))


# ----------------------------------------------------------------------- sample grids during training


def sampling_plans(run: Run) -> dict[str, list[float]]:
    """File tag -> sigma list of the grids drawn during training: the sampler's preview plans (consistency
    sampling: one-step, plus multistep when sampling.sigma_mid is set)."""
    return run.sampler.preview_plans(run.recipe.levels)


def sampling_batch(recipe: Recipe) -> int:
    """The batch evaluation images are sampled in during training (`ctcore eval` uses it to make the same ones)."""
    return max(64, min(1024, recipe.training.batch_size))


def sample_with(run: Run, network: nn.Module, sigmas: list[float], seeds: list[int]) -> torch.Tensor:
    """uint8 samples for `seeds` (on CPU); under torchrun each rank makes its share and all ranks get all.
    Non-finite network outputs on any rank raise NonFiniteOutputs on every rank."""
    from ctcore.distributed import gather_rows

    mine = seeds[run.world.share(len(seeds))]
    images = torch.zeros((0, *run.data.shape), dtype=torch.uint8)
    failure = None
    if mine:
        try:
            images, _ = generate(run.denoiser(network), run.data.shape, mine, sigmas,
                                 num_classes=run.data.num_classes, sigma_min=run.recipe.consistency.sigma_min,
                                 clip=run.recipe.sampling.clip, device=run.device,
                                 batch_size=sampling_batch(run.recipe), sampler=run.sampler, levels=run.recipe.levels)
        except NonFiniteOutputs as exc:
            failure = exc
    raise_nonfinite_together(run.world, failure)  # every rank raises, or none: then all gather
    return gather_rows(run.world, images, len(seeds))


def save_samples(run: Run) -> Path:
    """A PNG per sampling plan: eval-EMA samples (fixed seeds) next to training images."""
    from ctcore.images import save_side_by_side

    s = run.recipe.sampling
    seeds = list(range(s.seed, s.seed + s.num_samples))
    data = to_uint8(run.data.batch(s.num_samples, torch.Generator().manual_seed(s.seed))[0])
    path = None
    for plan, sigmas in sampling_plans(run).items():
        images = sample_with(run, run.eval_ema, sigmas, seeds)
        path = run.out_dir / "samples" / f"step-{run.step:07d}-{plan}.png"
        if run.world.is_main:
            save_side_by_side(images, data, path, title=f"step {run.step}, {plan}")
    return path
