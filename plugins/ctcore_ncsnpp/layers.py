"""Building blocks of NCSN++: DDPM initialisation, FIR resampling, residual and attention blocks.

Written from the descriptions in Song et al. 2021 ("Score-Based Generative Modeling through Stochastic
Differential Equations", App. H) and StyleGAN2's FIR up/down-sampling (Karras et al. 2020). Every tensor is NCHW.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ctcore.components import checkpointed
from ctcore.jvp import attention

SQRT_HALF = 1.0 / math.sqrt(2.0)

# ------------------------------------------------------------------------------------------ initialisation


def ddpm_init_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM's `default_init`: uniform variance scaling with variance scale / fan_avg, in place.

    A scale of 0 stands for 1e-10 (as in the DDPM / score-SDE code): the layer starts almost, not exactly, at zero,
    so that gradients still reach the layers before it from the first step.
    """
    scale = 1e-10 if scale == 0 else scale
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv2d(in_ch: int, out_ch: int, kernel: int = 3, init_scale: float = 1.0, **kwargs: int) -> nn.Conv2d:
    """A k x k convolution ('same' padding unless given) with DDPM initialisation and a zero bias."""
    kwargs.setdefault("padding", kernel // 2)
    conv = nn.Conv2d(in_ch, out_ch, kernel, **kwargs)
    ddpm_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def dense(in_features: int, out_features: int, init_scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    ddpm_init_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(C // 4, 32) groups, as NCSN++ uses everywhere."""
    groups = min(channels // 4, 32)
    if groups < 1 or channels % groups:
        raise ValueError(f"nf: GroupNorm with min(C // 4, 32) groups cannot split C = {channels} channels; "
                         "choose nf and ch_mult so that every channel count is >= 4 and divisible by its group count")
    return nn.GroupNorm(groups, channels, eps=1e-6)


# ------------------------------------------------------------------------------------------ FIR resampling


def fir_kernel_2d(taps: Sequence[float], gain: float = 1.0) -> torch.Tensor:
    """The separable 2-D FIR kernel outer(taps, taps), normalised to sum to `gain`."""
    k = torch.as_tensor(taps, dtype=torch.float32)
    k = torch.outer(k, k)
    return k * (gain / k.sum())


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Zero-insert `up`-fold, pad (before, after) on both spatial axes, convolve each channel with `kernel`
    (a true convolution: the kernel is flipped), then keep every `down`-th sample."""
    n, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(n, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(n, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = kernel.flip(0, 1).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def fir_upsample(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Upsample by `factor` with a FIR kernel normalised to sum 1 (gain factor**2 keeps constants constant)."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel * factor**2, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def fir_downsample(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Low-pass with a FIR kernel normalised to sum 1, then take every `factor`-th sample."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def naive_downsample(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    return F.avg_pool2d(x, factor)


class FIRConv2d(nn.Module):
    """A 3 x 3 convolution fused with FIR up- or down-sampling by 2 (StyleGAN2's fused resampling conv).

    Up: transposed convolution with stride 2 (zero insertion then the kernel), then the FIR low-pass.
    Down: the FIR low-pass, then a stride-2 convolution. Padding happens once, before the pair of operations.
    """

    def __init__(self, in_ch: int, out_ch: int, *, up: bool = False, down: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1), kernel: int = 3) -> None:
        super().__init__()
        if up == down:
            raise ValueError("FIRConv2d resamples: exactly one of up and down")
        self.up = up
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        ddpm_init_(self.weight)
        self.register_buffer("fir", fir_kernel_2d(fir_kernel), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, taps = self.weight.shape[-1], self.fir.shape[0]
        if self.up:
            # conv_transpose2d scatters with the kernel; flipping it and swapping in/out makes the result the
            # correlation of the zero-inserted input with `weight`, like an ordinary conv after upsampling.
            w = self.weight.flip(2, 3).transpose(0, 1)
            x = F.conv_transpose2d(x, w, stride=2)
            p = (taps - 2) - (k - 1)
            x = upfirdn2d(x, self.fir * 4, pad=((p + 1) // 2 + 1, p // 2 + 1))
        else:
            p = (taps - 2) + (k - 1)
            x = upfirdn2d(x, self.fir, pad=((p + 1) // 2, p // 2))
            x = F.conv2d(x, self.weight, stride=2)
        return x + self.bias.view(1, -1, 1, 1)


class Upsample(nn.Module):
    """x2 upsampling: FIR or nearest, optionally with a 3 x 3 convolution (fused with the FIR one)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, *, with_conv: bool, fir: bool,
                 fir_kernel: Sequence[float]) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        if not with_conv and out_ch != in_ch:
            raise ValueError("Upsample without a convolution keeps the channel count")
        self.fir, self.with_conv = fir, with_conv
        self.conv: nn.Module | None = None
        if with_conv:
            self.conv = FIRConv2d(in_ch, out_ch, up=True, fir_kernel=fir_kernel) if fir else conv2d(in_ch, out_ch)
        self.register_buffer("kernel", fir_kernel_2d(fir_kernel), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.conv(x) if self.conv is not None else fir_upsample(x, self.kernel)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class Downsample(nn.Module):
    """/2 downsampling: FIR or 2 x 2 average, or a stride-2 3 x 3 convolution (fused with the FIR one)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, *, with_conv: bool, fir: bool,
                 fir_kernel: Sequence[float]) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        if not with_conv and out_ch != in_ch:
            raise ValueError("Downsample without a convolution keeps the channel count")
        self.fir, self.with_conv = fir, with_conv
        self.conv: nn.Module | None = None
        if with_conv:
            self.conv = (FIRConv2d(in_ch, out_ch, down=True, fir_kernel=fir_kernel) if fir
                         else conv2d(in_ch, out_ch, stride=2, padding=0))
        self.register_buffer("kernel", fir_kernel_2d(fir_kernel), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.conv(x) if self.conv is not None else fir_downsample(x, self.kernel)
        if self.conv is not None:
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # TF 'SAME' padding for a stride-2 3 x 3 convolution
        return naive_downsample(x)


# ------------------------------------------------------------------------------------------ blocks


class ResnetBlock(nn.Module):
    """Pre-activation residual block conditioned on the (already activated) noise embedding.

    GroupNorm -> SiLU -> [resample] -> conv3x3 -> + Dense(emb) -> GroupNorm -> SiLU -> Dropout -> conv3x3
    (initialised at `init_scale`); the shortcut is resampled the same way and gets a 1 x 1 convolution when the
    channel count changes or the block resamples. `skip_rescale` divides the sum by sqrt(2).

    `biggan=True` is NCSN++'s ResnetBlockBigGAN (may resample with FIR or naive filters); `biggan=False` is the
    DDPM++ block (no resampling; a 1 x 1 shortcut only when the channels change). `checkpoint` recomputes its
    activations in backward instead of keeping them (ctcore.components.checkpointed).
    """

    def __init__(self, in_ch: int, out_ch: int | None, emb_dim: int, *, dropout: float, init_scale: float,
                 skip_rescale: bool, biggan: bool = True, up: bool = False, down: bool = False, fir: bool = True,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1), checkpoint: bool = False) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        if up and down:
            raise ValueError("a residual block resamples up or down, not both")
        if not biggan and (up or down):
            raise ValueError("only BigGAN-style blocks resample")
        self.up, self.down, self.fir, self.skip_rescale = up, down, fir, skip_rescale
        self.checkpoint = checkpoint
        self.norm0 = group_norm(in_ch)
        self.conv0 = conv2d(in_ch, out_ch)
        self.emb_proj = dense(emb_dim, out_ch)
        self.norm1 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv2d(out_ch, out_ch, init_scale=init_scale)
        self.shortcut = conv2d(in_ch, out_ch, kernel=1) if (in_ch != out_ch or up or down) else None
        if not biggan and self.shortcut is not None:
            ddpm_init_(self.shortcut.weight, 0.1)  # DDPM++ uses a NIN shortcut, initialised at scale 0.1
        self.register_buffer("kernel", fir_kernel_2d(fir_kernel), persistent=False)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return fir_upsample(x, self.kernel) if self.fir else naive_upsample(x)
        if self.down:
            return fir_downsample(x, self.kernel) if self.fir else naive_downsample(x)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpointed(self._forward, x, emb, enabled=self.checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm0(x))
        h = self.conv0(self._resample(h))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        x = self._resample(x)
        if self.shortcut is not None:
            x = self.shortcut(x)
        return (x + h) * SQRT_HALF if self.skip_rescale else x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (NCSN++'s AttnBlockpp): GroupNorm, 1 x 1 projections to q,
    k and v, softmax(q k^T / sqrt(C)) v, a 1 x 1 output projection at `init_scale`, residual sum. `checkpoint` as
    in ResnetBlock."""

    def __init__(self, channels: int, *, init_scale: float, skip_rescale: bool, checkpoint: bool = False) -> None:
        super().__init__()
        self.skip_rescale = skip_rescale
        self.checkpoint = checkpoint
        self.norm = group_norm(channels)
        self.q = conv2d(channels, channels, kernel=1, init_scale=0.1)
        self.k = conv2d(channels, channels, kernel=1, init_scale=0.1)
        self.v = conv2d(channels, channels, kernel=1, init_scale=0.1)
        self.out = conv2d(channels, channels, kernel=1, init_scale=init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpointed(self._forward, x, enabled=self.checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(b, 1, c, height * width).transpose(2, 3) for proj in (self.q, self.k, self.v))
        h = attention(q, k, v)  # SDPA (math under ctcore.jvp.jvp), scale 1 / sqrt(C): one head of width C
        h = self.out(h.transpose(2, 3).reshape(b, c, height, width))
        return (x + h) * SQRT_HALF if self.skip_rescale else x + h


class Combine(nn.Module):
    """Merge the input pyramid into the features: a 1 x 1 convolution, then sum or concatenation."""

    def __init__(self, in_ch: int, out_ch: int, method: str) -> None:
        super().__init__()
        self.method = method
        self.conv = conv2d(in_ch, out_ch, kernel=1)

    def forward(self, pyramid: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        p = self.conv(pyramid)
        return torch.cat([p, h], dim=1) if self.method == "cat" else p + h


class GaussianFourierFeatures(nn.Module):
    """[sin(2 pi W c), cos(2 pi W c)] with W ~ N(0, scale^2) drawn once and kept frozen (a buffer); computed in the
    buffer's dtype (the network's: float32 in training, float64 when a test runs the network in float64)."""

    def __init__(self, num_features: int, scale: float) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_features) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = (2 * math.pi) * c.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=1)
