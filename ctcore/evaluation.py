"""Distribution distances between samples and data (FID / IS come with the evaluation issue)."""

from __future__ import annotations

import torch


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
