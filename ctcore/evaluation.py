"""Distribution distances between samples and data: sliced Wasserstein in pixel space (FID / IS: ctcore.fid)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ctcore.data import to_uint8

if TYPE_CHECKING:
    from ctcore.build import Run


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


def evaluate_distance(run: Run) -> float | None:
    """Sliced Wasserstein distance between one-step eval-EMA samples and training data (None if disabled)."""
    from ctcore.sampling import sample_with

    e = run.recipe.evaluation
    if e.distance == "none":
        return None
    seeds = list(range(10_000_000, 10_000_000 + e.num_samples))
    samples = sample_with(run, run.eval_ema, [run.recipe.consistency.sigma_max], seeds)
    data = to_uint8(run.data.batch(e.num_samples, torch.Generator().manual_seed(12345))[0])
    return sliced_wasserstein(samples.float() / 127.5 - 1, data.float() / 127.5 - 1, e.num_projections)
