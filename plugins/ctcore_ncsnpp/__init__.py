"""NCSN++ (Song et al. 2021, score SDE) in the configuration the consistency-model CIFAR-10 code uses.

The defaults are the iCT CIFAR-10 network (Song & Dhariwal 2023): nf 128, ch_mult (2, 2, 2), 4 residual blocks per
resolution, attention at 16 x 16 and in the middle, BigGAN-style residual blocks with FIR resampling, a residual
input pyramid, Gaussian Fourier noise features with scale 0.02 and dropout 0.3: 56,395,523 parameters at 3 x 32 x 32.
iCT-deep ("2x depth") is `num_res_blocks = 8`: 97,610,499 parameters.

EDM's SongUNet (NVlabs/edm training/networks.py; its DDPM++ and NCSN++ presets) is this network with the options
`embedding_type`, `channel_mult_noise`, `label_input` and `augment_dim`; ctcore.convert_edm maps its weights.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from ctcore import hookimpl
from ctcore.components import (
    DROPOUT_REASON,
    FOURIER_SCALE_REASON,
    MEMORY_ONLY,
    BuildContext,
    each_within,
    entries,
    one_of,
    positional_features,
    requirement,
    split_times,
    within,
)
from ctcore.trigflow import LogvarHead, head_logvar

from .layers import (
    SQRT_HALF,
    AttnBlock,
    Combine,
    Downsample,
    GaussianFourierFeatures,
    ResnetBlock,
    Upsample,
    conv2d,
    dense,
    group_norm,
)

__all__ = ["NCSNpp", "ctcore_register_networks"]



_ints = requirement(lambda v: isinstance(v, tuple) and all(isinstance(m, int) and not isinstance(m, bool) for m in v),
                    "must be a tuple of integers")
_fir_taps = requirement(
    lambda v: isinstance(v, tuple) and all(isinstance(t, int | float) and not isinstance(t, bool) for t in v),
    "must be a tuple of FIR taps (numbers)",
)
_positive_sum = requirement(lambda v: sum(v) > 0, "must have a positive sum (the taps are normalised by it)")
MAX_LEVELS = 12
"""Resolution levels: 12 halve a 4096-pixel image (the largest data.resolution) down to 2 pixels."""


class NCSNpp(nn.Module):
    """NCSN++ U-Net: F_theta(c_in x, c_noise, labels) with Gaussian Fourier features of c_noise = 0.25 ln sigma."""

    name: ClassVar[str] = "ncsnpp"
    summary: ClassVar[str] = "NCSN++ U-Net (score SDE), iCT CIFAR-10 configuration by default (~56M parameters)"
    noise_conditioning: ClassVar[str] = "fourier"

    @attrs.frozen
    class Options:
        nf: int = attrs.field(default=128, validator=within(4, 4096, "base channels; iCT 128"))
        """Base channel count; level i has nf * ch_mult[i] channels, the noise embedding 4 * nf."""
        ch_mult: tuple[int, ...] = attrs.field(default=(2, 2, 2), validator=[
            _ints, entries(1, MAX_LEVELS, "one per resolution level"), each_within(1, 64, "channel multipliers")])
        """Channel multiplier per resolution; len(ch_mult) - 1 halvings of the image size."""
        num_res_blocks: int = attrs.field(default=4, validator=within(1, 64, "blocks per level; iCT-deep 8"))
        """Residual blocks per resolution on the way down (the way up has one more). iCT-deep: 8."""
        attn_resolutions: tuple[int, ...] = attrs.field(default=(16,), validator=[
            _ints, entries(0, 16, "feature-map heights"), each_within(1, 4096, "a feature-map height in pixels")])
        """Feature-map heights that get self-attention (the middle of the U-Net always has one)."""
        dropout: float = attrs.field(default=0.3, validator=within(0.0, 0.99, DROPOUT_REASON))
        """iCT: 0.3 (the original CM CT: 0.0)."""
        resblock_type: Literal["biggan", "ddpm"] = attrs.field(default="biggan", validator=one_of("biggan", "ddpm"))
        """biggan: resample inside residual blocks; ddpm: separate (FIR) Upsample / Downsample layers."""
        fir: bool = True
        """FIR resampling filters (otherwise nearest / 2 x 2 average)."""
        fir_kernel: tuple[float, ...] = attrs.field(default=(1.0, 3.0, 3.0, 1.0), validator=[
            _fir_taps, entries(1, 16, "1-D FIR taps"),
            each_within(0.0, 1000.0, "non-negative taps keep the resampling gain at 1"), _positive_sum])
        """1-D FIR taps; the 2-D filter is their outer product, normalised (StyleGAN2's [1, 3, 3, 1])."""
        resamp_with_conv: bool = True
        """Resampling layers outside residual blocks (ddpm blocks, input pyramid) carry a 3 x 3 convolution."""
        skip_rescale: bool = True
        """Divide residual and skip sums by sqrt(2)."""
        progressive: Literal["none", "output_skip", "residual"] = attrs.field(
            default="none", validator=one_of("none", "output_skip", "residual"))
        """Output pyramid on the way up: none, output_skip (sum of per-level output convs) or residual."""
        progressive_input: Literal["none", "input_skip", "residual"] = attrs.field(
            default="residual", validator=one_of("none", "input_skip", "residual"))
        """Input pyramid on the way down: the image, downsampled, merged into the features at every level."""
        progressive_combine: Literal["sum", "cat"] = attrs.field(default="sum", validator=one_of("sum", "cat"))
        """How input_skip merges the pyramid (after a 1 x 1 convolution)."""
        init_scale: float = attrs.field(default=0.0, validator=within(
            0.0, 10.0, "DDPM variance scale of the last layers; DDPM uses at most 1"))
        """DDPM-init scale of the last layer of every block and of the output (0 means 1e-10: near-zero)."""
        embedding_type: Literal["fourier", "positional"] = attrs.field(
            default="fourier", validator=one_of("fourier", "positional"))
        """Noise features of c_noise, ordered [sines, cosines]: "fourier", frozen Gaussian Fourier frequencies
        (NCSN++); "positional", EDM's fixed frequencies (1 / max_positions)^(j / (half - endpoint)) (EDM's DDPM++).
        Either embeds c_noise as given (the network's noise conditioning stays c_noise = 0.25 ln sigma)."""
        fourier_scale: float = attrs.field(default=0.02, validator=within(
            0.0, 1000.0, FOURIER_SCALE_REASON, open_lo=True))
        """Std of the frozen Fourier frequencies: iCT 0.02, the original CM 16."""
        channel_mult_noise: int = attrs.field(default=2, validator=within(
            1, 16, "noise features per base channel; NCSN++ 2, EDM's DDPM++ 1"))
        """The noise features number nf * channel_mult_noise (half sines, half cosines): 2 is NCSN++'s 2 nf
        (nf Fourier frequencies); EDM's DDPM++ uses 1."""
        max_positions: int = attrs.field(default=10_000, validator=within(
            1, 1_000_000_000, "period scale of the slowest positional feature; EDM 10000"))
        """embedding_type "positional": the slowest frequency is 1 / max_positions (EDM: 10000)."""
        endpoint: bool = True
        """embedding_type "positional": the exponents j / (half - 1) reach 1, so the slowest frequency is exactly
        1 / max_positions (EDM's SongUNet); false: j / half."""
        label_input: Literal["embedding", "noise"] = attrs.field(
            default="embedding", validator=one_of("embedding", "noise"))
        """How class labels enter (with data.num_classes > 0): "embedding", a learned embedding added after the
        noise MLP (the CM code); "noise", a dense layer of the one-hot labels scaled by sqrt(num_classes) added to
        the noise features before the MLP (EDM's SongUNet; no labels count as the zero vector, as EDM feeds)."""
        augment_dim: int = attrs.field(default=0, validator=within(
            0, 64, "width of EDM's augmentation labels; EDM 9"))
        """Width of EDM's augmentation labels (0: none). Their bias-free dense weights are carried as a buffer so a
        converted EDM network keeps them; ctcore has no augmentation labels, which is what EDM feeds at sampling
        (the term is absent), so they never enter the computation."""
        checkpoint_blocks: bool = attrs.field(default=False, metadata={MEMORY_ONLY: True})
        """Each residual block and attention block runs under activation checkpointing: its activations are
        recomputed in backward instead of kept, trading about one more forward pass of compute for memory."""
        time_inputs: int = attrs.field(default=1, validator=within(
            1, 2, "1: c_noise of one value per sample; 2: a second time input (MeanFlow's t - r)"))
        """2: c_noise may hold (B, 2), a second time input (MeanFlow's t - r) embedded by its own noise features
        (same kind and scale) and noise MLP, added to the first's embedding before the class embedding; a (B,)
        c_noise then means a second input of 0."""
        logvar_head: bool = False
        """A learned log-variance head logvar(c) (`ctcore.trigflow.LogvarHead`) for sCM's adaptive weighting."""

        def __attrs_post_init__(self) -> None:
            if self.nf * self.channel_mult_noise % 2:
                raise ValueError(f"channel_mult_noise: nf * channel_mult_noise noise features are half sines, half "
                                 f"cosines, so their number must be even; got {self.nf} * {self.channel_mult_noise}")

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        o = options
        if context.data_shape is None:
            raise ValueError("network 'ncsnpp' needs the data shape")
        if len(context.data_shape) != 3:
            raise ValueError(f"network 'ncsnpp' needs image data (C, H, W), got data_shape {context.data_shape}")
        channels, height, width = (int(s) for s in context.data_shape)
        num_levels = len(o.ch_mult)
        factor = 2 ** (num_levels - 1)
        if height % factor or width % factor:
            raise ValueError(f"ch_mult: {num_levels} resolutions halve the image {num_levels - 1} times, so its "
                             f"size must be divisible by {factor}; got {height} x {width}")
        self.options = options
        self.data_shape = (channels, height, width)
        self.num_levels = num_levels
        resolutions = [height // 2**i for i in range(num_levels)]
        emb_dim = 4 * o.nf
        biggan = o.resblock_type == "biggan"

        def res_block(in_ch: int, out_ch: int | None = None, up: bool = False, down: bool = False) -> ResnetBlock:
            return ResnetBlock(in_ch, out_ch, emb_dim, dropout=o.dropout, init_scale=o.init_scale,
                               skip_rescale=o.skip_rescale, biggan=biggan, up=up, down=down, fir=o.fir,
                               fir_kernel=o.fir_kernel, checkpoint=o.checkpoint_blocks)

        def attn_block(ch: int) -> AttnBlock:
            return AttnBlock(ch, init_scale=o.init_scale, skip_rescale=o.skip_rescale, checkpoint=o.checkpoint_blocks)

        resample = {"with_conv": o.resamp_with_conv, "fir": o.fir, "fir_kernel": o.fir_kernel}

        # Noise (and class) embedding: noise features [+ dense(labels)] -> Dense(4 nf) -> SiLU -> Dense(4 nf)
        # [+ class embedding].
        noise_ch = o.nf * o.channel_mult_noise
        fourier = o.embedding_type == "fourier"
        self.fourier = GaussianFourierFeatures(noise_ch // 2, o.fourier_scale) if fourier else None
        self.emb0 = dense(noise_ch, emb_dim)
        self.emb1 = dense(emb_dim, emb_dim)
        classes = context.num_classes
        self.label_emb = nn.Embedding(classes, emb_dim) if classes > 0 and o.label_input == "embedding" else None
        self.label_proj = dense(classes, noise_ch) if classes > 0 and o.label_input == "noise" else None
        if o.augment_dim:
            self.register_buffer("augment_weight", torch.zeros(noise_ch, o.augment_dim))

        # Down path. `skips` tracks the channels of every tensor pushed for the up path.
        self.conv_in = conv2d(channels, o.nf)
        skips = [o.nf]
        ch, pyramid_ch = o.nf, channels
        self.down = nn.ModuleList()
        for level in range(num_levels):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            stage.attns = nn.ModuleList() if resolutions[level] in o.attn_resolutions else None
            for _ in range(o.num_res_blocks):
                stage.blocks.append(res_block(ch, o.nf * o.ch_mult[level]))
                ch = o.nf * o.ch_mult[level]
                if stage.attns is not None:
                    stage.attns.append(attn_block(ch))
                skips.append(ch)
            stage.resample = stage.pyramid = stage.combine = None
            if level != num_levels - 1:
                stage.resample = res_block(ch, down=True) if biggan else Downsample(ch, **resample)
                if o.progressive_input == "input_skip":
                    stage.pyramid = Downsample(pyramid_ch, with_conv=False, fir=o.fir, fir_kernel=o.fir_kernel)
                    stage.combine = Combine(pyramid_ch, ch, o.progressive_combine)
                    if o.progressive_combine == "cat":
                        ch *= 2
                elif o.progressive_input == "residual":
                    stage.pyramid = Downsample(pyramid_ch, ch, with_conv=True, fir=o.fir, fir_kernel=o.fir_kernel)
                    pyramid_ch = ch
                skips.append(ch)
            self.down.append(stage)

        # Middle: residual block, attention, residual block at the lowest resolution.
        self.mid = nn.ModuleList([res_block(ch), attn_block(ch), res_block(ch)])

        # Up path: num_res_blocks + 1 blocks per level, each fed the concatenation with one skip tensor.
        self.up = nn.ModuleList()
        pyramid_ch = 0
        for level in reversed(range(num_levels)):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            for _ in range(o.num_res_blocks + 1):
                stage.blocks.append(res_block(ch + skips.pop(), o.nf * o.ch_mult[level]))
                ch = o.nf * o.ch_mult[level]
            stage.attn = attn_block(ch) if resolutions[level] in o.attn_resolutions else None
            stage.pyramid_norm = stage.pyramid_conv = stage.pyramid_up = None
            if o.progressive == "output_skip":
                if level != num_levels - 1:
                    stage.pyramid_up = Upsample(pyramid_ch, with_conv=False, fir=o.fir, fir_kernel=o.fir_kernel)
                stage.pyramid_norm = group_norm(ch)
                stage.pyramid_conv = conv2d(ch, channels, init_scale=o.init_scale)
                pyramid_ch = channels
            elif o.progressive == "residual":
                if level == num_levels - 1:
                    if num_levels > 1:  # with one level nothing would read this pyramid
                        stage.pyramid_norm = group_norm(ch)
                        stage.pyramid_conv = conv2d(ch, ch)
                else:
                    stage.pyramid_up = Upsample(pyramid_ch, ch, with_conv=True, fir=o.fir, fir_kernel=o.fir_kernel)
                pyramid_ch = ch
            stage.resample = None
            if level != 0:
                stage.resample = res_block(ch, up=True) if biggan else Upsample(ch, **resample)
            self.up.append(stage)
        if skips:  # pragma: no cover - a construction bug, not a user error
            raise AssertionError(f"ncsnpp: {len(skips)} skip connections left unused")

        self.norm_out = self.conv_out = None
        if o.progressive != "output_skip":
            self.norm_out = group_norm(ch)
            self.conv_out = conv2d(ch, channels, init_scale=o.init_scale)

        self.time_inputs = o.time_inputs
        if o.time_inputs == 2:  # built last: a one-input network draws the same initial weights as before
            self.fourier_2 = GaussianFourierFeatures(noise_ch // 2, o.fourier_scale) if fourier else None
            self.emb0_2 = dense(noise_ch, emb_dim)
            self.emb1_2 = dense(emb_dim, emb_dim)
        self.logvar_head = LogvarHead() if o.logvar_head else None

    def logvar(self, c: torch.Tensor) -> torch.Tensor:
        """sCM's learned log-variance of each sample, from one time value per sample (option logvar_head)."""
        return head_logvar(self, c)

    def _noise_features(self, fourier: GaussianFourierFeatures | None, c: torch.Tensor) -> torch.Tensor:
        """The noise features of one time value per sample: Fourier (by `fourier`) or positional."""
        if fourier is not None:
            return fourier(c)
        # EDM's SongUNet swaps the [cos, sin] halves of its PositionalEmbedding to [sin, cos]
        o = self.options
        cos, sin = positional_features(c, self.emb0.in_features, o.max_positions, o.endpoint).chunk(2, 1)
        return torch.cat([sin, cos], dim=1).to(self.emb0.weight.dtype)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        o = self.options
        c_noise, c_second = split_times(c_noise, self.time_inputs, "ncsnpp")
        features = self._noise_features(self.fourier, c_noise)
        if self.label_proj is not None:
            classes = self.label_proj.in_features
            one_hot = (torch.zeros(len(features), classes, dtype=features.dtype, device=features.device)
                       if labels is None else F.one_hot(labels, classes).to(features.dtype))
            features = features + self.label_proj(one_hot * math.sqrt(classes))
        emb = self.emb1(F.silu(self.emb0(features)))
        if c_second is not None:
            emb = emb + self.emb1_2(F.silu(self.emb0_2(self._noise_features(self.fourier_2, c_second))))
        if self.label_emb is not None and labels is not None:
            emb = emb + self.label_emb(labels)
        emb = F.silu(emb)  # every residual block reads the embedding through a SiLU

        pyramid = x if o.progressive_input != "none" else None
        hs = [self.conv_in(x)]
        for stage in self.down:
            for i, block in enumerate(stage.blocks):
                h = block(hs[-1], emb)
                if stage.attns is not None:
                    h = stage.attns[i](h)
                hs.append(h)
            if stage.resample is not None:
                h = stage.resample(hs[-1], emb) if isinstance(stage.resample, ResnetBlock) else stage.resample(hs[-1])
                if stage.combine is not None:  # input_skip
                    pyramid = stage.pyramid(pyramid)
                    h = stage.combine(pyramid, h)
                elif stage.pyramid is not None:  # residual
                    pyramid = stage.pyramid(pyramid)
                    pyramid = (pyramid + h) * SQRT_HALF if o.skip_rescale else pyramid + h
                    h = pyramid
                hs.append(h)

        h = hs[-1]
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)

        pyramid = None
        for stage in self.up:
            for block in stage.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if stage.attn is not None:
                h = stage.attn(h)
            if o.progressive == "output_skip":
                out = stage.pyramid_conv(F.silu(stage.pyramid_norm(h)))
                pyramid = out if stage.pyramid_up is None else stage.pyramid_up(pyramid) + out
            elif o.progressive == "residual":
                if stage.pyramid_up is None:
                    if stage.pyramid_conv is not None:
                        pyramid = stage.pyramid_conv(F.silu(stage.pyramid_norm(h)))
                else:
                    pyramid = stage.pyramid_up(pyramid)
                    pyramid = (pyramid + h) * SQRT_HALF if o.skip_rescale else pyramid + h
                    h = pyramid
            if stage.resample is not None:
                h = stage.resample(h, emb) if isinstance(stage.resample, ResnetBlock) else stage.resample(h)

        if self.conv_out is None:
            return pyramid
        return self.conv_out(F.silu(self.norm_out(h)))

    def to_diffusers(self) -> tuple[dict, dict]:
        """No exact diffusers UNet2DModel exists (huggingface/diffusers unet_2d.py, embeddings.py, unet_2d_blocks.py):
        the consistency scheduler gives UNet2DModel the timestep 1000 * 0.25 ln sigma, which its positional embedding
        takes as it is and its Fourier embedding through a log (dividing the output by it), while NCSN++ embeds
        c_noise = 0.25 ln sigma; its Skip blocks are the input_skip / output_skip pyramids, not the residual one.
        Always raises ValueError saying why (`ctcore export diffusers` prints it)."""
        pyramid = (", and UNet2DModel has no block for the residual input pyramid (progressive_input 'residual')"
                   if self.options.progressive_input == "residual" else "")
        raise ValueError("NCSN++ embeds c_noise = 0.25 ln sigma, but the consistency scheduler gives UNet2DModel "
                         "the timestep 1000 * 0.25 ln sigma, which its positional embedding takes as it is and its "
                         f"Fourier embedding through a log, dividing its output by it{pyramid}")


@hookimpl
def ctcore_register_networks() -> list[type]:
    return [NCSNpp]
