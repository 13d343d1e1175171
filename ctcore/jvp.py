"""Jacobian-vector products through a network, for continuous-time consistency objectives (issue 26).

`jvp(function, primals, tangents)` returns (function(*primals), d/de function(*(primals + e tangents)) at e = 0):
by forward-mode AD (torch.func.jvp) or, chosen by `method`, by a central finite difference in float64. Every pass
starts from the RNG state on entry, which is restored on exit (`shared_rng`), so a network in train mode draws the
same dropout mask in the JVP as in the step's other passes (the student/teacher sharing of consistency_loss).

PyTorch's scaled_dot_product_attention has no forward-mode derivative where it picks a fused kernel (flash and
memory-efficient on GPU, flash on CPU): torch.func.jvp raises there. Networks therefore call `attention` below, which
is that kernel everywhere except while `jvp` runs forward-mode AD, where it is the same product spelled out. The
switch is a flag `jvp` sets for the duration of its call and restores after it (`under_forward_ad()` reads it):
explicit, public torch API only (no interpreter-stack inspection), and a plain global torch.compile can guard on.
Outside `jvp` nothing changes: the fused kernels stay, and a bare torch.func.jvp still meets SDPA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch.nn import functional as F

from ctcore.consistency import shared_rng

Method = Literal["forward-ad", "finite-difference"]

FD_STEP = 1e-6
"""Step h of the finite-difference JVP (f(x + h v) - f(x - h v)) / 2h, in float64. Truncation h^2 |f'''| / 6 and
rounding about eps |f| / h (eps = 2.2e-16) balance near eps^(1/3) = 6e-6, but on the small networks of
tests/test_jvp.py truncation still dominates at 1e-5 (1e-9 to 2e-8 of max |JVP|); 1e-6 gives 2e-10 to 5e-10."""

_forward_ad = False


def under_forward_ad() -> bool:
    """True while `jvp` runs a function under forward-mode AD; then attention takes its math path."""
    return _forward_ad


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (..., tokens, d), spelled out so forward-mode AD differentiates it; the
    softmax runs in at least float32 (float64 stays float64)."""
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return weights.to(v.dtype) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (..., tokens, d): torch's scaled_dot_product_attention (fused kernels), or
    `math_attention` while `jvp` runs forward-mode AD (SDPA has no JVP)."""
    if _forward_ad:
        return math_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def jvp(
    function: Callable[..., torch.Tensor],
    primals: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    *,
    method: Method = "forward-ad",
    step: float = FD_STEP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(function(*primals), its derivative along `tangents`), each pass under the entry RNG state (same dropout mask).

    "forward-ad": torch.func.jvp, attention on its math path; the output keeps autograd's graph to the parameters.
    "finite-difference": (f(p + h t) - f(p - h t)) / 2h with h = `step`, primals and tangents in float64 (the
    function must compute in float64, e.g. a network after .double()); the first output is f(p) in float64.
    """
    global _forward_ad
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    device = primals[0].device
    if method == "forward-ad":
        previous, _forward_ad = _forward_ad, True
        try:
            with shared_rng(device):
                return torch.func.jvp(function, primals, tangents)
        finally:
            _forward_ad = previous
    if method == "finite-difference":
        p64 = [p.to(torch.float64) for p in primals]
        t64 = [t.to(torch.float64) for t in tangents]

        def at(sign: float) -> torch.Tensor:
            with shared_rng(device):
                return function(*(p + sign * step * t for p, t in zip(p64, t64, strict=True))).to(torch.float64)

        with shared_rng(device):
            value = function(*p64).to(torch.float64)
        return value, (at(1.0) - at(-1.0)) / (2 * step)
    raise ValueError(f"jvp: unknown method {method!r}: use 'forward-ad' or 'finite-difference'")
