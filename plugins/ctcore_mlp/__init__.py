"""A small residual MLP network for CPU work: the quickstart, tests, and toy data of any shape."""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch
from torch import nn

from ctcore import hookimpl
from ctcore.components import DROPOUT_REASON, FOURIER_SCALE_REASON, BuildContext, split_times, within
from ctcore.trigflow import LogvarHead, head_logvar


class FourierEmbedding(nn.Module):
    """[sin(2 pi W c), cos(2 pi W c)] with frozen W ~ N(0, scale^2) (NCSN++'s Gaussian Fourier features), in float32
    or, for a network in float64 (ctcore.jvp's checks), in float64."""

    def __init__(self, num_features: int, scale: float) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_features) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = 2 * math.pi * c.to(torch.promote_types(self.freqs.dtype, torch.float32))[:, None] * self.freqs[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, emb_width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_width, width)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = self.fc1(nn.functional.silu(self.norm(h))) + self.emb(emb)
        y = self.fc2(self.dropout(nn.functional.silu(y)))
        return h + y


class MLP(nn.Module):
    """Flatten, residual SiLU blocks conditioned on a Fourier noise embedding (and class), unflatten."""

    name: ClassVar[str] = "mlp"
    summary: ClassVar[str] = "small residual MLP with Fourier noise embedding, for CPU and toy data"
    noise_conditioning: ClassVar[str] = "fourier"

    @attrs.frozen
    class Options:
        width: int = attrs.field(default=256, validator=within(1, 65_536, "hidden units of every block"))
        num_blocks: int = attrs.field(default=3, validator=within(1, 1000, "residual blocks"))
        embedding_features: int = attrs.field(default=64, validator=within(1, 65_536, "Fourier frequencies"))
        fourier_scale: float = attrs.field(default=0.02, validator=within(0.0, 1000.0, FOURIER_SCALE_REASON))
        """Std of the Fourier frequencies: iCT uses 0.02, the original CM 16."""
        dropout: float = attrs.field(default=0.0, validator=within(0.0, 0.99, DROPOUT_REASON))
        zero_init_output: bool = True
        time_inputs: int = attrs.field(default=1, validator=within(
            1, 2, "1: c_noise of one value per sample; 2: a second time input (MeanFlow's t - r)"))
        """2: c_noise may hold (B, 2), a second time input (MeanFlow's t - r) embedded by its own Fourier features
        and MLP, added to the first's embedding; a (B,) c_noise then means a second input of 0."""
        logvar_head: bool = False
        """A learned log-variance head logvar(c) (`ctcore.trigflow.LogvarHead`) for sCM's adaptive weighting."""

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        if context.data_shape is None:
            raise ValueError("network 'mlp' needs the data shape")
        self.options = options
        self.data_shape = tuple(context.data_shape)
        dim = math.prod(self.data_shape)
        w, e = options.width, 4 * options.embedding_features
        self.fourier = FourierEmbedding(options.embedding_features, options.fourier_scale)
        self.embed = nn.Sequential(nn.Linear(2 * options.embedding_features, e), nn.SiLU(), nn.Linear(e, e))
        self.label_embed = nn.Embedding(context.num_classes, e) if context.num_classes > 0 else None
        self.inp = nn.Linear(dim, w)
        self.blocks = nn.ModuleList(ResidualBlock(w, e, options.dropout) for _ in range(options.num_blocks))
        self.out_norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, dim)
        if options.zero_init_output:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.time_inputs = options.time_inputs
        if options.time_inputs == 2:  # built last: a one-input network draws the same initial weights as before
            self.fourier_2 = FourierEmbedding(options.embedding_features, options.fourier_scale)
            self.embed_2 = nn.Sequential(nn.Linear(2 * options.embedding_features, e), nn.SiLU(), nn.Linear(e, e))
        self.logvar_head = LogvarHead() if options.logvar_head else None

    def logvar(self, c: torch.Tensor) -> torch.Tensor:
        """sCM's learned log-variance of each sample, from one time value per sample (option logvar_head)."""
        return head_logvar(self, c)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        c_noise, c_second = split_times(c_noise, self.time_inputs, "mlp")
        emb = self.embed(self.fourier(c_noise))
        if c_second is not None:
            emb = emb + self.embed_2(self.fourier_2(c_second))
        if self.label_embed is not None and labels is not None:
            emb = emb + self.label_embed(labels)
        emb = nn.functional.silu(emb)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h))).view(x.shape)


@hookimpl
def ctcore_register_networks() -> list[type]:
    return [MLP]
