"""LPIPS (Zhang et al. 2018) with the VGG16 trunk: the distance d(x, y) of the original consistency models.

The CM paper (Song, Dhariwal, Chen & Sutskever 2023) trains CT and CD with LPIPS on every dataset. This metric
computes, per sample,

    d(x, y) = sum over the taps l of  mean over (h, w) of  sum over c of  w_l[c] * (u_l(x) - u_l(y))[c, h, w]^2

where u_l is the VGG16 activation at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (64, 128, 256, 512, 512
channels), scaled to unit length along the channels at every position, u / (||u|| + 1e-10), and w_l >= 0 are the
learned LPIPS v0.1 "linear" heads (a 1x1 convolution without bias to one channel, then a spatial mean: applied here
as a per-channel mean followed by the weighted channel sum, which is the same linear map).

Sources for the constants and the order of operations (read, not copied):
richzhang/PerceptualSimilarity `lpips/lpips.py`, `lpips/pretrained_networks.py` (taps at torchvision indices
3, 8, 15, 22, 29; ScalingLayer; normalize_tensor; spatial_average), openai/consistency_models_cifar10
`jcm/losses.py` + `jcm/models/lpips.py` (CIFAR-10 CT/CD: bilinear resize to 224 x 224, then the VGG on (x + 1) / 2
with ImageNet mean/std, max pooling), openai/consistency_models `cm/karras_diffusion.py` (ImageNet 64 / LSUN:
`F.interpolate(..., size=224, mode="bilinear")` when the resolution is below 256, then
`piq.LPIPS(replace_pooling=True, reduction="none")` on (x + 1) / 2; piq turns the max pools into 2x2 average
pools), photosynthesis-team/piq `piq/perceptual.py`. piq downloads its own copy of the heads
(`lpips_weights.pt`); that it holds the same numbers as lpips' v0.1 `vgg.pth` is assumed, not checked.

The model's outputs are in [-1, 1]; the heads were trained on what lpips feeds its trunk, namely an image in
[-1, 1] passed through the ScalingLayer (x - shift) / scale with shift (-0.030, -0.088, -0.188) and scale
(0.458, 0.448, 0.450). This metric does exactly that. CM's code does it the other way round, mapping to [0, 1]
with (x + 1) / 2 and then normalising with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224,
0.225); that is the same affine map: (1 + shift) / 2 is the mean and scale / 2 the std, to every digit. Both
maps are affine, so they commute with the bilinear resize, and resizing first (as CM does) gives the same
result.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from ctcore import hookimpl
from ctcore.components import BuildContext, WeightsUnavailable, one_of, path_text, requirement, within

from .weights import (
    LPIPS_HEADS_HINT,
    VGG16_BACKBONE_HINT,
    installed_lpips_heads,
    load_state_dict,
    take,
)

__all__ = [
    "LPIPS",
    "LPIPS_SCALE",
    "LPIPS_SHIFT",
    "TAP_CHANNELS",
    "TAP_INDICES",
    "VGG16_CONV_INDICES",
    "ctcore_register_metrics",
    "head_keys",
    "vgg16_features",
]

VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                       512, 512, 512)
"""VGG16 configuration "D" up to conv5_3: output channels of each 3x3 convolution, "M" a 2x2 pool."""

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
"""lpips' ScalingLayer for [-1, 1] inputs, equal to ImageNet mean/std normalisation of (x + 1) / 2."""

NORM_EPS = 1e-10
"""Added to the channel norm before dividing (lpips' normalize_tensor)."""

MIN_SIZE = 16
"""relu5_3 comes after four 2x2 pools: an image needs at least 16 x 16 pixels."""


def vgg16_features(pooling: str = "max") -> nn.Sequential:
    """VGG16's `features` up to relu5_3 (indices 0-29), laid out as torchvision's so that a torchvision state dict
    `features.N.weight` / `features.N.bias` loads into it as `N.weight` / `N.bias`."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2) if pooling == "max" else nn.AvgPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU()]
            channels = int(item)
    return nn.Sequential(*layers)


VGG16_CONV_INDICES: tuple[int, ...] = tuple(i for i, m in enumerate(vgg16_features()) if isinstance(m, nn.Conv2d))
"""0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28."""
TAP_INDICES: tuple[int, ...] = (3, 8, 15, 22, 29)
"""relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features."""
TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)


def head_keys(variant: int = 1) -> list[str]:
    """State-dict keys of the five heads in lpips' vgg.pth: `lin{l}.model.1.weight` (its NetLinLayer puts a
    Dropout at model.0); `variant=0` gives the keys of heads saved without that dropout."""
    return [f"lin{layer}.model.{variant}.weight" for layer in range(len(TAP_CHANNELS))]



class LPIPS(nn.Module):
    """LPIPS-VGG16 distance of the CM paper on images in [-1, 1]; one value per sample.

    Built on a real device, it reads both weight files at construction (ValueError naming the option when one is
    missing or wrong). Built under `torch.device("meta")` (`ctcore check`), it reads nothing: the recipe
    validates before the files exist.

    Frozen: every weight has requires_grad False, so gradients reach the inputs only. The module stays in eval
    mode whatever `train()` is called with; nothing in it depends on the mode anyway (VGG16's `features` has no
    dropout or batch norm, and the heads are used without lpips' optional dropout), so the loss is deterministic.

    Under the engine's bf16 autocast the trunk's convolutions run in bf16; the unit normalisation, the squared
    differences and the heads run in float32. CM ran LPIPS in fp32: set `training.precision = "fp32"` to match.
    """

    name: ClassVar[str] = "lpips"
    summary: ClassVar[str] = "LPIPS-VGG16 perceptual distance of the original CM paper (frozen ImageNet VGG16)"

    @attrs.frozen
    class Options:
        backbone_weights: str = attrs.field(default="", validator=path_text)
        """torchvision's ImageNet VGG16 state dict (`features.N.weight` / `features.N.bias`)."""
        heads_weights: str = attrs.field(default="", validator=path_text)
        """LPIPS v0.1 VGG heads (`lin0.model.1.weight`, ...); empty: an installed lpips package's copy."""
        resize: int = attrs.field(default=224, validator=[
            within(0, 4096, "pixels of the bilinear resize; CM 224"),
            requirement(lambda v: v == 0 or v >= MIN_SIZE,
                        f"must be 0 (no resizing) or >= {MIN_SIZE} (VGG16 pools four times)"),
        ])
        """Bilinear resize (align_corners False) to resize x resize before the trunk; 0 keeps the input size.
        CM resizes to 224 always in its CIFAR-10 (JAX) code and below 256 px in its PyTorch code: use 0 there."""
        pooling: Literal["max", "average"] = attrs.field(default="max", validator=one_of("max", "average"))
        """VGG16's max pools ("max": lpips, CM CIFAR-10) or 2x2 average pools ("average": CM's PyTorch code)."""

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        self.options = options
        if context.data_shape is not None and context.data_shape[0] not in (1, 3):
            raise ValueError(f"lpips compares RGB (or greyscale) images, but the data has {context.data_shape[0]} "
                             f"channels (shape {tuple(context.data_shape)})")
        self.features = vgg16_features(options.pooling)
        self.heads = nn.ParameterList(torch.zeros(c) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.weight_files: dict[str, str] = {}
        """The files the weights came from (empty when built on the meta device)."""
        if torch.empty(0).device.type != "meta":
            self._load(options)
        super().train(False)

    # ------------------------------------------------------------------------------------------ loading

    def _load(self, options: Options) -> None:
        if not options.backbone_weights:
            raise WeightsUnavailable('backbone_weights: no VGG16 weights given; set [metric] backbone_weights = '
                                     f'"/path/vgg16.pth" ({VGG16_BACKBONE_HINT})', "backbone_weights")
        backbone = load_state_dict("backbone_weights", options.backbone_weights, VGG16_BACKBONE_HINT)
        # torchvision's full vgg16 state dict; a saved `vgg16().features` (keys "0.weight", ...) is taken too
        prefix = "" if "0.weight" in backbone and "features.0.weight" not in backbone else "features."
        convs = [self.features[i] for i in VGG16_CONV_INDICES]
        keys = [f"{prefix}{i}.{kind}" for i in VGG16_CONV_INDICES for kind in ("weight", "bias")]
        shapes = [tuple(getattr(conv, kind).shape) for conv in convs for kind in ("weight", "bias")]
        tensors = take("backbone_weights", options.backbone_weights, backbone, keys, shapes, VGG16_BACKBONE_HINT)

        heads_path: str | Path = options.heads_weights
        if not heads_path:
            heads_path = installed_lpips_heads() or ""
            if not heads_path:
                raise WeightsUnavailable('heads_weights: no LPIPS heads given and no installed lpips package '
                                         'ships weights/v0.1/vgg.pth; set [metric] heads_weights = "/path/vgg.pth" '
                                         f"({LPIPS_HEADS_HINT})", "heads_weights")

        heads = load_state_dict("heads_weights", heads_path, LPIPS_HEADS_HINT)
        variant = 1 if head_keys(1)[0] in heads or head_keys(0)[0] not in heads else 0
        head_shapes = [(1, c, 1, 1) for c in TAP_CHANNELS]
        head_tensors = take("heads_weights", heads_path, heads, head_keys(variant), head_shapes, LPIPS_HEADS_HINT)
        for key, tensor in zip(head_keys(variant), head_tensors, strict=True):
            if (tensor < 0).any():
                raise ValueError(f"heads_weights: {str(heads_path)!r}: {key} has negative entries; LPIPS heads are "
                                 f"non-negative (lpips clamps them at 0 while training), so this is not a head "
                                 f"file; expected {LPIPS_HEADS_HINT}")

        with torch.no_grad():
            params = [getattr(conv, kind) for conv in convs for kind in ("weight", "bias")]
            for param, tensor in zip(params, tensors, strict=True):
                param.copy_(tensor)
            for param, tensor in zip(self.heads, head_tensors, strict=True):
                param.copy_(tensor.flatten())
        self.weight_files = {"backbone_weights": str(options.backbone_weights), "heads_weights": str(heads_path)}

    # -------------------------------------------------------------------------------------------- modes

    def train(self, mode: bool = True) -> LPIPS:
        """Ignored: the metric always stays in eval mode (see the class docstring)."""
        return super().train(False)

    # -------------------------------------------------------------------------------------------- forward

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> what the trunk takes: resized (bilinear, as CM), then lpips' ScalingLayer."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"lpips takes images shaped (batch, 3, H, W) (or 1 channel), got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = self.options.resize
        if size and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"lpips needs images of at least {MIN_SIZE} x {MIN_SIZE} pixels (VGG16 pools four times "
                             f"before relu5_3), got {tuple(x.shape[-2:])}; set [metric] resize (CM: 224)")
        return (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised (along the channels, in float32) activations at the five taps."""
        out = []
        h = self.prepare(x)
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in TAP_INDICES:
                u = h.float()
                out.append(u / (torch.linalg.vector_norm(u, dim=1, keepdim=True) + NORM_EPS))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"lpips compares tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for head, ux, uy in zip(self.heads, self.taps(x), self.taps(y), strict=True):
            per_channel = (ux - uy).square().mean(dim=(2, 3))  # (batch, channels)
            total = total + (per_channel * head).sum(dim=1)
        return total


@hookimpl
def ctcore_register_metrics() -> list[type]:
    return [LPIPS]
