"""Building blocks of the ADM U-Net: the sinusoidal noise embedding, residual blocks (optionally resampling),
plain resampling layers and multi-head self-attention over the pixels of a feature map."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from ctcore.components import checkpointed
from ctcore.jvp import attention

Resample = Literal["none", "up", "down"]


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it (output layers start as the zero map)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def sinusoidal_embedding(c: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style position features of a real-valued input, ADM's timestep embedding.

    Frequencies w_j = max_period^(-j / half) for j < half = dim // 2; the output is [cos(c w), sin(c w)]
    (cosines first, as in ADM), with one zero column appended when `dim` is odd. Computed in float32.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=c.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    arg = c.to(torch.float32)[:, None] * freqs[None, :]
    out = torch.cat([arg.cos(), arg.sin()], dim=1)
    return F.pad(out, (0, 1)) if dim % 2 else out


def _resample(x: torch.Tensor, mode: Resample) -> torch.Tensor:
    """Parameter-free 2x resampling used inside residual up/down blocks: nearest-neighbour up, 2x2 mean down."""
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


class ResBlock(nn.Module):
    """GroupNorm-SiLU-(resample)-conv3x3, embedding injection, GroupNorm-SiLU-dropout-conv3x3 (zero init),
    plus a skip path (identity, or a 1x1 conv when the width changes; resampled like the main path).

    The embedding enters through one linear layer: with `scale_shift` (AdaGN) it gives 2*out channels
    (scale, shift) applied as norm(h) * (1 + scale) + shift; without, out channels added before the norm.
    `emb` arrives already passed through SiLU (the network applies it once for all blocks). `checkpoint`
    recomputes its activations in backward instead of keeping them (ctcore.components.checkpointed).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        dropout: float,
        groups: int,
        scale_shift: bool,
        resample: Resample = "none",
        resolution: int = 0,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.resample: Resample = resample
        self.checkpoint = checkpoint
        self.scale_shift = scale_shift
        self.resolution = resolution
        """Feature resolution of the block's output, where its dropout acts (informational)."""
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpointed(self._forward, x, emb, enabled=self.checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(_resample(h, self.resample))
        x = _resample(x, self.resample)
        e = self.emb_proj(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x3 convolution (the down path when `resblock_updown` is off)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution (the up path when `resblock_updown` is off)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_resample(x, "up"))


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q^T k / sqrt(d)) applied to v, spelled out; inputs and output are (batch, heads, d, tokens).

    q and k are each scaled by d^(-1/4) before the product (kinder to half precision than dividing after)
    and the softmax runs in at least float32 (float64 stays float64, for ctcore.jvp's float64 checks).
    """
    scale = q.shape[-2] ** -0.25
    logits = torch.einsum("bhdt,bhds->bhts", q * scale, k * scale)
    weights = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).to(v.dtype)
    return torch.einsum("bhts,bhds->bhdt", weights, v)


class AttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention over all H*W positions with a residual connection.

    One 1x1 conv makes q, k and v; its 3*C output channels are ordered [q | k | v], each split into heads of
    `head_channels` (ADM's "new" attention order, also the layout of the CM flash-attention path). The output
    projection is zero-initialised, so the block starts as the identity. `backend` "sdpa" calls
    torch.nn.functional.scaled_dot_product_attention (fused / memory-efficient kernels on GPU), except under
    ctcore.jvp.jvp's forward-mode AD, which SDPA lacks (its math path there); "math" computes the same attention
    explicitly. `checkpoint` as in ResBlock.
    """

    def __init__(self, channels: int, head_channels: int, groups: int, backend: Literal["math", "sdpa"],
                 checkpoint: bool = False) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.heads = channels // head_channels
        self.head_channels = head_channels
        self.backend = backend
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpointed(self._forward, x, enabled=self.checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        tokens = height * width
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, self.head_channels, tokens)
        if self.backend == "sdpa":
            # (b, 3, heads, tokens, d) with unit stride along d, the layout the fused kernels read
            q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)
            out = attention(q, k, v).transpose(-1, -2)  # SDPA; its math path under ctcore.jvp.jvp
        else:
            q, k, v = qkv.unbind(1)  # each (b, heads, d, tokens)
            out = math_attention(q, k, v)
        return x + self.proj(out.reshape(b, c, height, width))
