"""Distribution distances between samples and data: sliced Wasserstein in pixel space (FID / IS: ctcore.fid),
during training and of a checkpoint (`ctcore eval --metric sliced-wasserstein`, no weights file needed)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ctcore.data import ImageData, to_uint8
from ctcore.errors import RunError, UsageError

if TYPE_CHECKING:
    from ctcore.runstate import Run


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two sets of samples, flattened; equal counts are used.

    Projects both sets on random unit directions and averages the 1-D W1 distances of the sorted projections.
    """
    n = min(a.shape[0], b.shape[0])
    a = a[:n].flatten(1).double().cpu()
    b = b[:n].flatten(1).double().cpu()
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, _ = (a @ dirs).sort(dim=0)
    pb, _ = (b @ dirs).sort(dim=0)
    return float((pa - pb).abs().mean())


DISTANCE_SEED = 10_000_000
"""Sample j of the distance uses seed DISTANCE_SEED + j: away from the seeds of the sample grids and FID."""
DATA_SEED = 12345
"""Seed of the draw of training images (with replacement, flipped as in training) the samples are compared with."""
MAX_DISTANCE_SAMPLES = 100_000
"""As evaluation.num_samples: both sets sit in memory in float64."""


def distance_to_data(samples: torch.Tensor, data: ImageData, num_projections: int) -> float:
    """Sliced Wasserstein distance in [-1, 1] pixel space between uint8 samples and as many training images."""
    n = samples.shape[0]
    real = to_uint8(data.batch(n, torch.Generator().manual_seed(DATA_SEED))[0])
    return sliced_wasserstein(samples.float() / 127.5 - 1, real.float() / 127.5 - 1, num_projections)


def evaluate_distance(run: Run) -> float | None:
    """Sliced Wasserstein distance between eval-EMA samples of the sampler's default plan (consistency sampling:
    one step) and training data (None if disabled)."""
    from ctcore.sampling import sample_with

    e = run.recipe.evaluation
    if e.distance == "none":
        return None
    seeds = list(range(DISTANCE_SEED, DISTANCE_SEED + e.num_samples))
    samples = sample_with(run, run.eval_ema, run.sampler.plan(None, None, run.recipe.levels), seeds)
    return distance_to_data(samples, run.data, e.num_projections)


def distance_evaluator(checkpoint: str | Path, registry, *, num_samples: int | None = None,
                       steps: int | None = None, sigmas: Sequence[float] | None = None, seed: int | None = None,
                       batch_size: int | None = None, device: str | None = None,
                       weights: str = "eval-ema", sampler: str | None = None,
                       ) -> tuple[dict[str, Any], Any, list[float], Callable[[Sequence[float]], float]]:
    """(facts of the evaluation, the checkpoint's recipe, the sigmas asked for, distance(sigmas)) for a checkpoint.

    The network and data are loaded once; distance(sigmas) samples the same seeds for any sigmas, so
    `ctcore eval --metric sliced-wasserstein` and `ctcore search-sigmas` score one plan identically.
    """
    from ctcore.data import load_data
    from ctcore.sampling import (
        NonFiniteOutputs,
        file_digest,
        generate,
        load_sampling_network,
        load_sampling_plan,
        nonfinite_error,
        recipe_model_function,
        sampling_batch,
    )

    checkpoint, state, recipe, sigmas, chosen = load_sampling_plan(checkpoint, registry, steps=steps, sigmas=sigmas,
                                                                   weights=weights, sampler=sampler)
    e, c = recipe.evaluation, recipe.consistency
    n = e.num_samples if num_samples is None else num_samples
    if not 1 <= n <= MAX_DISTANCE_SAMPLES:
        raise UsageError(f"--num-samples for the sliced Wasserstein distance must be 1 to {MAX_DISTANCE_SAMPLES:,} "
                         f"(the range of evaluation.num_samples), got {n:,}")
    seed = DISTANCE_SEED if seed is None else seed
    network, dev = load_sampling_network(checkpoint, state, recipe, registry, weights=weights, device=device)
    data = load_data(recipe.data, recipe.run.seed, dev)
    shape = tuple(state["provenance"]["data_shape"])
    if data.shape != shape:
        raise RunError(f"the training data of {str(checkpoint)!r} now holds images of shape {data.shape}, but the "
                       f"checkpoint was trained on {shape}")
    batch = sampling_batch(recipe) if batch_size is None else batch_size
    denoiser = recipe_model_function(recipe, registry, network)

    def distance(plan: Sequence[float], progress: bool = False) -> float:
        from ctcore.reporting import stderr_progress

        bar, task = stderr_progress(progress, f"sliced Wasserstein {len(plan)}-step", n)
        try:
            with bar:
                images, _ = generate(denoiser, shape, list(range(seed, seed + n)), [float(v) for v in plan],
                                     num_classes=state["provenance"]["num_classes"], sigma_min=c.sigma_min,
                                     clip=recipe.sampling.clip, batch_size=batch, device=dev, sampler=chosen,
                                     levels=recipe.levels, progress=lambda k: bar.advance(task, k))
        except NonFiniteOutputs as failure:
            raise nonfinite_error(failure, checkpoint) from None
        return distance_to_data(images, data, e.num_projections)

    d = recipe.data
    source = (f"synthetic ({d.num_images:,} images, run.seed {recipe.run.seed})" if d.source == "synthetic"
              else d.path)
    info = {"metric": "sliced-wasserstein", "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_digest(checkpoint), "step": int(state["step"]), "num_samples": n,
            "seed": seed, "data": source, "data_seed": DATA_SEED,
            "num_projections": e.num_projections, "weights": weights, "sampler": chosen.name,
            "network_evaluations": chosen.evaluations(sigmas), "noise_draws": chosen.noise_draws(sigmas)}
    return info, recipe, sigmas, distance


def evaluate_checkpoint_distance(checkpoint: str | Path, registry, *, num_samples: int | None = None,
                                 steps: int | None = None, sigmas: Sequence[float] | None = None,
                                 seed: int | None = None, batch_size: int | None = None,
                                 device: str | None = None, weights: str = "eval-ema",
                                 sampler: str | None = None, progress: bool = False) -> dict[str, Any]:
    """The sliced Wasserstein distance of a checkpoint's samples to its recipe's training data; no weights file.

    Defaults are the training loop's (the recipe's evaluation.num_samples and num_projections, the sampler's
    default plan (consistency sampling: one step; `sampler` names another installed sampler), seeds
    from DISTANCE_SEED, its sampling batch), so the final checkpoint of a run scores what its stats.jsonl logged
    at the end. The data is the recipe's: the synthetic set regenerated from run.seed, or its HDF5 file.
    `progress` counts the samples on stderr.
    """
    started = time.perf_counter()
    info, _, sigmas, distance = distance_evaluator(checkpoint, registry, num_samples=num_samples, steps=steps,
                                                   sigmas=sigmas, seed=seed, batch_size=batch_size, device=device,
                                                   weights=weights, sampler=sampler)
    value = distance(sigmas, progress)
    facts = {k: v for k, v in info.items() if k not in ("metric", "weights")}
    return {"metric": "sliced-wasserstein", "value": value, **facts, "steps": len(sigmas), "sigmas": sigmas,
            "weights": weights, "seconds": time.perf_counter() - started}
