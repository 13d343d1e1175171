"""The ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs"), the network of the CM and iCT
papers on class-conditional ImageNet 64x64. The default options are that configuration (about 296M parameters
with 1000 classes); iCT-deep doubles `num_res_blocks` to 6.

Layout, for a data shape (C, H, W) and L = len(channel_mult) levels at resolutions H, H/2, ..., H/2^(L-1):

- embedding: sinusoidal features of c_noise (width model_channels) -> Linear(model_channels, E) -> SiLU ->
  Linear(E, E), E = 4 * model_channels; plus a learned class embedding (num_classes x E) when the run has
  classes. SiLU of the sum conditions every residual block.
- encoder: a 3x3 input conv to model_channels * channel_mult[0]; per level, `num_res_blocks` residual blocks
  to model_channels * mult (each followed by attention when the level's resolution is in
  `attention_resolutions`), then, except at the last level, a 2x down-sampling (a residual block with average
  pooling when `resblock_updown`, else a strided conv). Every encoder output is kept for a skip connection.
- middle: residual block, attention, residual block (attention here always, whatever the resolution).
- decoder: per level from the last, `num_res_blocks + 1` residual blocks, each fed the concatenation of the
  running features and one stored encoder output (popped in reverse), each followed by attention at the
  attention resolutions; after the last block of every level but the first, a 2x up-sampling (residual
  block with nearest-neighbour upsampling, or upsample + conv).
- output: GroupNorm, SiLU, zero-initialised 3x3 conv back to C channels, so F_theta starts at exactly zero.

EDM's DhariwalUNet (NVlabs/edm training/networks.py) is this network with `noise_embedding = "edm"`, dropout in
every block and `augment_dim`; ctcore.convert_edm maps its weights.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import nn
from torch.nn import functional as F

from ctcore import hookimpl
from ctcore.components import (
    DROPOUT_REASON,
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

from .layers import AttentionBlock, Downsample, ResBlock, Upsample, sinusoidal_embedding, zero_module

__all__ = ["ADM", "ctcore_register_networks"]


def _as_tuple(value: object) -> object:
    """Lists (from Python callers) become tuples; anything else is left for the validator to reject."""
    return tuple(value) if isinstance(value, list | tuple) else value


_ints = requirement(
    lambda v: isinstance(v, tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in v),
    "must be a list of integers",
)
MAX_LEVELS = 12
"""Resolution levels: 12 halve a 4096-pixel image (the largest data.resolution) down to 2 pixels."""
_attention_backend = requirement(lambda v: v in ("math", "sdpa"), "must be 'math' or 'sdpa'")


class _Stage(nn.ModuleList):
    """A run of layers applied in order; residual blocks also receive the embedding."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class ADM(nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021) with sinusoidal noise embedding, AdaGN and multi-head attention."""

    name: ClassVar[str] = "adm"
    summary: ClassVar[str] = "ADM U-Net of Dhariwal & Nichol (CM / iCT ImageNet 64x64 network, ~296M parameters)"
    noise_conditioning: ClassVar[str] = "positional"

    @attrs.frozen
    class Options:
        """Defaults: the CM / iCT ImageNet 64x64 configuration (CM `scripts/launch.sh`, EDM `--arch=adm`)."""

        model_channels: int = attrs.field(default=192, validator=within(1, 4096, "base width; CM / iCT 192"))
        """Base width; level i has model_channels * channel_mult[i] channels, the embedding 4x this."""
        channel_mult: tuple[int, ...] = attrs.field(
            default=(1, 2, 3, 4), converter=_as_tuple,
            validator=[_ints, entries(1, MAX_LEVELS, "one per resolution level"),
                       each_within(1, 64, "width multipliers")],
        )
        """Width multiplier per resolution level; len(channel_mult) - 1 down-samplings."""
        num_res_blocks: int = attrs.field(default=3, validator=within(1, 64, "blocks per level; iCT-deep 6"))
        """Residual blocks per level in the encoder (the decoder has one more). iCT-deep: 6 (UNVERIFIED)."""
        attention_resolutions: tuple[int, ...] = attrs.field(
            default=(32, 16, 8), converter=_as_tuple,
            validator=[_ints, entries(0, 16, "feature-map sizes"),
                       each_within(1, 4096, "a feature-map size in pixels")],
        )
        """Feature-map resolutions (side lengths) that get attention after each residual block. For a 64x64
        input, (32, 16, 8) are ADM's downsample factors ds = 64 // res = (2, 4, 8), i.e. levels 1, 2, 3, not
        the 64x64 level. A resolution no level has at this data size is unused (as in ADM); the middle block
        always has attention. For non-square data the resolution is the feature map's height."""
        num_head_channels: int = attrs.field(default=64, validator=within(1, 65_536, "channels per attention head"))
        """Channels per attention head; heads = channels // num_head_channels (must divide evenly)."""
        resblock_updown: bool = True
        """Down/up-sample with residual blocks (avg-pool / nearest inside); False: strided conv / upsample+conv."""
        use_scale_shift_norm: bool = True
        """AdaGN: the embedding gives a per-channel scale and shift after the second GroupNorm (CM config: on).
        iCT probably turned it off for stability (sCM, Sec. 4.1: AdaGN made CM training diverge; UNVERIFIED)."""
        dropout: float = attrs.field(default=0.2, validator=within(0.0, 0.99, DROPOUT_REASON))
        """Dropout rate inside residual blocks whose output resolution is <= dropout_max_resolution. iCT uses
        dropout only at resolutions <= 16 on ImageNet 64 (per sCM App. G.2); the rate 0.2 is UNVERIFIED."""
        dropout_max_resolution: int = attrs.field(default=16, validator=within(
            1, 4096, "a feature-map size; 4096, the largest data.resolution, means everywhere"))
        """Largest feature resolution that gets dropout; set it >= the image size for dropout everywhere."""
        attention: Literal["math", "sdpa"] = attrs.field(default="sdpa", validator=_attention_backend)
        """Attention kernel: "sdpa" = torch's scaled_dot_product_attention (fused, memory-efficient on GPU),
        "math" = the same computation spelled out (reference / debugging)."""
        num_groups: int = attrs.field(default=32, validator=within(1, 1024, "GroupNorm groups; ADM 32"))
        """GroupNorm groups (ADM: 32); every level width must be divisible by it."""
        noise_embedding: Literal["adm", "edm"] = attrs.field(default="adm", validator=one_of("adm", "edm"))
        """The sinusoidal features' arithmetic: "adm", frequencies exp(-ln(10000) j / half) and products in float32
        (guided-diffusion, the released CM models); "edm", EDM's DhariwalUNet: frequencies (1 / 10000)^(j / half)
        (a few float32 ulps apart) and products in c_noise's dtype. Converted EDM networks use "edm" so they compute
        exactly what EDM computes. "edm" also takes EDM's c_noise = 0.25 ln sigma (the network's noise_conditioning
        is "fourier"), as EDMPrecond feeds its DhariwalUNet; "adm" takes 1000 * 0.25 ln sigma as the CM models do."""
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
        """2: c_noise may hold (B, 2), a second time input (MeanFlow's t - r) embedded by its own sinusoidal
        features (same noise_embedding) and time MLP, added to the first's embedding before the class embedding; a
        (B,) c_noise then means a second input of 0."""
        logvar_head: bool = False
        """A learned log-variance head logvar(c) (`ctcore.trigflow.LogvarHead`) for sCM's adaptive weighting."""

        def __attrs_post_init__(self) -> None:
            widths = [self.model_channels * m for m in self.channel_mult]
            bad = [w for w in widths if w % self.num_groups]
            if bad:
                raise ValueError(
                    f"num_groups: must divide every level width model_channels * channel_mult = {widths}, "
                    f"got {self.num_groups}"
                )
            if self.noise_embedding == "edm" and self.model_channels % 2:
                raise ValueError(f"noise_embedding: \"edm\" has half cosines, half sines, so model_channels must be "
                                 f"even, got {self.model_channels}")

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        shape = context.data_shape
        if shape is None or len(shape) != 3:
            raise ValueError(f"network 'adm' needs image data of shape (C, H, W), got data shape {shape}")
        in_channels, height, width = (int(s) for s in shape)
        o = options
        factor = 2 ** (len(o.channel_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"channel_mult: {len(o.channel_mult)} levels halve the image {len(o.channel_mult) - 1} times, "
                f"so H and W must be divisible by {factor}; got data shape {tuple(shape)}"
            )
        self.options = o
        if o.noise_embedding == "edm":  # EDMPrecond's c_noise = ln(sigma) / 4, not ADM's 1000x
            self.noise_conditioning = "fourier"
        self.data_shape = (in_channels, height, width)
        self.num_classes = int(context.num_classes)

        mc, emb_ch = o.model_channels, 4 * o.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_embed = nn.Embedding(self.num_classes, emb_ch) if self.num_classes > 0 else None
        if o.augment_dim:
            self.register_buffer("augment_weight", torch.zeros(mc, o.augment_dim))

        def res_block(cin: int, cout: int, resolution: int, resample: str = "none") -> ResBlock:
            rate = o.dropout if resolution <= o.dropout_max_resolution else 0.0
            return ResBlock(cin, cout, emb_ch, dropout=rate, groups=o.num_groups, scale_shift=o.use_scale_shift_norm,
                            resample=resample, resolution=resolution, checkpoint=o.checkpoint_blocks)

        def attention(channels: int, resolution: int) -> AttentionBlock:
            if channels % o.num_head_channels:
                raise ValueError(
                    f"num_head_channels: must divide the width {channels} of the attention at resolution "
                    f"{resolution}, got {o.num_head_channels}"
                )
            return AttentionBlock(channels, o.num_head_channels, o.num_groups, o.attention, o.checkpoint_blocks)

        # Encoder: track the width of every stored output for the decoder's skip concatenations.
        ch = mc * o.channel_mult[0]
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        skips = [ch]
        self.encoder = nn.ModuleList()
        res = height
        for level, mult in enumerate(o.channel_mult):
            for _ in range(o.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mc * mult, res)]
                ch = mc * mult
                if res in o.attention_resolutions:
                    layers.append(attention(ch, res))
                self.encoder.append(_Stage(layers))
                skips.append(ch)
            if level < len(o.channel_mult) - 1:
                res //= 2
                down = res_block(ch, ch, res, "down") if o.resblock_updown else Downsample(ch)
                self.encoder.append(_Stage([down]))
                skips.append(ch)

        self.middle = _Stage([res_block(ch, ch, res), attention(ch, res), res_block(ch, ch, res)])

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(o.channel_mult))):
            for i in range(o.num_res_blocks + 1):
                layers = [res_block(ch + skips.pop(), mc * mult, res)]
                ch = mc * mult
                if res in o.attention_resolutions:
                    layers.append(attention(ch, res))
                if level > 0 and i == o.num_res_blocks:
                    res *= 2
                    layers.append(res_block(ch, ch, res, "up") if o.resblock_updown else Upsample(ch))
                self.decoder.append(_Stage(layers))
        assert not skips

        self.out_norm = nn.GroupNorm(o.num_groups, ch)
        self.out_conv = zero_module(nn.Conv2d(ch, in_channels, 3, padding=1))

        self.time_inputs = o.time_inputs
        if o.time_inputs == 2:  # built last: a one-input network draws the same initial weights as before
            self.time_embed_2 = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.logvar_head = LogvarHead() if o.logvar_head else None

    def logvar(self, c: torch.Tensor) -> torch.Tensor:
        """sCM's learned log-variance of each sample, from one time value per sample (option logvar_head)."""
        return head_logvar(self, c)

    def _noise_features(self, c: torch.Tensor) -> torch.Tensor:
        """The sinusoidal features of one time value per sample, in the time MLP's dtype."""
        if self.options.noise_embedding == "edm":
            features = positional_features(c, self.options.model_channels)
        else:
            features = sinusoidal_embedding(c, self.options.model_channels)
        return features.to(self.time_embed[0].weight.dtype)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Raw F_theta(x, c_noise, labels), shaped like x; c_noise = 1000 * 0.25 * ln(sigma), one per sample
        (with time_inputs 2 also (batch, 2): the second column is the second time input).

        A network built with classes needs `labels` (int64, one per sample); one built without ignores them.
        """
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(x.shape[0])
        c_noise, c_second = split_times(c_noise, self.time_inputs, "adm")
        emb = self.time_embed(self._noise_features(c_noise))
        if c_second is not None:
            emb = emb + self.time_embed_2(self._noise_features(c_second))
        if self.label_embed is not None:
            if labels is None:
                raise ValueError(f"network 'adm' was built for {self.num_classes} classes and needs labels")
            emb = emb + self.label_embed(labels)
        emb = F.silu(emb)  # every residual block's embedding projection starts with SiLU: apply it once

        h = self.input_conv(x)
        stored = [h]
        for stage in self.encoder:
            h = stage(h, emb)
            stored.append(h)
        h = self.middle(h, emb)
        for stage in self.decoder:
            h = stage(torch.cat([h, stored.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))

    def to_diffusers(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """This network as diffusers' UNet2DModel: its config (with `_class_name`) and a state dict of this network's
        weights under UNet2DModel's names, computing the same F(x, c_noise, labels) when fed c_noise as the timestep.

        Facts from huggingface/diffusers (src/diffusers/models/unets/unet_2d.py, unet_2d_blocks.py, resnet.py,
        embeddings.py; scripts/convert_consistency_to_diffusers.py): a level with attention is AttnDownBlock2D /
        AttnUpBlock2D, one without ResnetDownsampleBlock2D / ResnetUpsampleBlock2D (resampling residual blocks) or
        DownBlock2D / UpBlock2D (strided conv, upsample + conv); the time features are [cos, sin] with
        flip_sin_to_cos and freq_shift 0, as wide as block_out_channels[0]; `scale_shift` is AdaGN; q, k, v are
        three Linear layers and the attention's group norm needs attn_norm_num_groups under scale_shift. Dropout is
        0 (diffusers applies one rate at every resolution; evaluation uses none). ValueError, one line, when an
        option has no diffusers equivalent.
        """
        o = self.options
        if o.time_inputs != 1:
            raise ValueError(f"time_inputs is {o.time_inputs}, but UNet2DModel takes one timestep; only time_inputs 1 "
                             "maps")
        if o.logvar_head:
            raise ValueError("logvar_head is true, but UNet2DModel has no log-variance head (a training-time weight, "
                             "not part of sampling); only logvar_head false maps")
        if o.noise_embedding != "adm":
            raise ValueError(f"noise_embedding is {o.noise_embedding!r} (EDM's frequencies, of c_noise = 0.25 ln "
                             "sigma), but UNet2DModel's positional embedding is ADM's, of the timestep 1000 * 0.25 ln "
                             "sigma the consistency scheduler passes; only noise_embedding 'adm' maps")
        if o.channel_mult[0] != 1:
            raise ValueError(f"channel_mult[0] is {o.channel_mult[0]}, but UNet2DModel's time features are as wide as "
                             "its first level, so it must be 1 (adm's are model_channels wide)")
        channels, height, width = self.data_shape
        levels = len(o.channel_mult)
        attends = [height // 2**level in o.attention_resolutions for level in range(levels)]
        down = ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" if o.resblock_updown else "DownBlock2D"
                for a in attends]
        up = ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" if o.resblock_updown else "UpBlock2D"
              for a in reversed(attends)]
        resample = "resnet" if o.resblock_updown else "conv"
        config = {
            "_class_name": "UNet2DModel", "sample_size": height if height == width else [height, width],
            "in_channels": channels, "out_channels": channels, "center_input_sample": False,
            "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0,
            "down_block_types": down, "mid_block_type": "UNetMidBlock2D", "up_block_types": up,
            "block_out_channels": [o.model_channels * m for m in o.channel_mult], "layers_per_block": o.num_res_blocks,
            "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": resample,
            "upsample_type": resample, "dropout": 0.0, "act_fn": "silu", "attention_head_dim": o.num_head_channels,
            "norm_num_groups": o.num_groups, "attn_norm_num_groups": o.num_groups, "norm_eps": 1e-5,
            "resnet_time_scale_shift": "scale_shift" if o.use_scale_shift_norm else "default", "add_attention": True,
            "class_embed_type": None, "num_class_embeds": self.num_classes or None,
        }
        out: dict[str, torch.Tensor] = {}  # every tensor of the computation; augment_weight (EDM's) never enters it

        def put(prefix: str, module: nn.Module, names: dict[str, str]) -> None:
            """Each tensor of `module` under `prefix`, its layer renamed by `names`."""
            for key, value in module.state_dict().items():
                layer, leaf = key.rsplit(".", 1)
                out[f"{prefix}.{names[layer]}.{leaf}"] = value

        def linear(weight: torch.Tensor) -> torch.Tensor:
            """A 1x1 conv's weight (out, in, 1, 1) as a Linear layer's (out, in); a bias as it is."""
            return weight.reshape(weight.shape[0], -1) if weight.ndim == 4 else weight

        def block(prefix: str, layer: nn.Module) -> None:
            """A residual block, attention block or resampling conv of this network under diffusers' `prefix`."""
            if isinstance(layer, ResBlock):
                put(prefix, layer, {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
                                    "conv2": "conv2", "skip": "conv_shortcut"})
            elif isinstance(layer, AttentionBlock):  # one 1x1 conv [q | k | v] -> three Linear layers
                for leaf in ("weight", "bias"):
                    out[f"{prefix}.group_norm.{leaf}"] = getattr(layer.norm, leaf)
                    for part, value in zip(("to_q", "to_k", "to_v"), linear(getattr(layer.qkv, leaf)).chunk(3),
                                           strict=True):
                        out[f"{prefix}.{part}.{leaf}"] = value
                    out[f"{prefix}.to_out.0.{leaf}"] = linear(getattr(layer.proj, leaf))
            else:  # Downsample, Upsample: one conv
                put(prefix, layer, {"conv": "conv"})

        put("time_embedding", self.time_embed, {"0": "linear_1", "2": "linear_2"})
        if self.label_embed is not None:
            out["class_embedding.weight"] = self.label_embed.weight
        for ours, theirs in ((self.input_conv, "conv_in"), (self.out_norm, "conv_norm_out"),
                             (self.out_conv, "conv_out")):
            out |= {f"{theirs}.{leaf}": value for leaf, value in ours.state_dict().items()}
        stages = iter(self.encoder)
        for level in range(levels):
            for j in range(o.num_res_blocks):
                for layer in next(stages):
                    block(f"down_blocks.{level}.{'resnets' if isinstance(layer, ResBlock) else 'attentions'}.{j}",
                          layer)
            if level < levels - 1:
                block(f"down_blocks.{level}.downsamplers.0", next(stages)[0])
        for i, layer in enumerate(self.middle):  # resnet, attention, resnet
            block("mid_block.attentions.0" if i == 1 else f"mid_block.resnets.{i // 2}", layer)
        stages = iter(self.decoder)
        for u in range(levels):  # from the last level to the first
            for j in range(o.num_res_blocks + 1):
                for k, layer in enumerate(next(stages)):  # resnet, attention (if any), then an up-sampling (if any)
                    kind = "resnets" if k == 0 else "attentions" if isinstance(layer, AttentionBlock) else "upsamplers"
                    block(f"up_blocks.{u}.{kind}.{0 if kind == 'upsamplers' else j}", layer)
        return config, {k: v.detach() for k, v in out.items()}


@hookimpl
def ctcore_register_networks() -> list[type]:
    return [ADM]
