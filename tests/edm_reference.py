"""An independent functional rendition of EDM's SongUNet and DhariwalUNet (NVlabs/edm, training/networks.py), for
tests: the networks' layouts (EDM's state-dict names and shapes) and forward passes in plain
torch.nn.functional on a dict of EDM-named tensors, written from a reading of that file, without ctcore's layers.

What EDM computes that this rendition follows (networks.py): GroupNorm with min(32, C // 4) groups (eps 1e-6 in
SongUNet, 1e-5 in DhariwalUNet); resampling by a normalised outer-product filter (a depthwise transposed
convolution with 4x the filter to go up, a depthwise stride-2 convolution to go down, padding (taps - 1) // 2),
before the block's 3x3 convolution, or, for SongUNet's residual encoder, after a 3x3 convolution at full
resolution padded by 1 + (taps - 1) // 2 ("fused"); attention whose qkv channels are grouped per head as
[channel][q, k, v], logits scaled by 1 / sqrt(channels per head); SongUNet's noise features flipped from
[cos, sin] to [sin, cos]. One deliberate difference: EDM's AttentionOp forms the attention weights in float32;
here they are formed in the input's dtype, which is the same for float32 networks (how EDM runs its released
models) and keeps float64 comparisons exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

SONG_DEFAULTS: dict[str, Any] = {
    "label_dim": 0, "augment_dim": 0, "model_channels": 128, "channel_mult": [1, 2, 2, 2], "channel_mult_emb": 4,
    "num_blocks": 4, "attn_resolutions": [16], "dropout": 0.10, "label_dropout": 0, "embedding_type": "positional",
    "channel_mult_noise": 1, "encoder_type": "standard", "decoder_type": "standard", "resample_filter": [1, 1],
}
"""SongUNet's constructor defaults besides img_resolution, in_channels and out_channels."""

DHARIWAL_DEFAULTS: dict[str, Any] = {
    "label_dim": 0, "augment_dim": 0, "model_channels": 192, "channel_mult": [1, 2, 3, 4], "channel_mult_emb": 4,
    "num_blocks": 3, "attn_resolutions": [32, 16, 8], "dropout": 0.10, "label_dropout": 0,
}
"""DhariwalUNet's constructor defaults besides img_resolution, in_channels and out_channels."""


# ------------------------------------------------------------------------------------------ layouts


@dataclass
class Conv:
    """EDM's Conv2d: kernel 0 means no weights (resampling only); up / down add a `resample_filter` buffer."""

    cin: int
    cout: int
    kernel: int
    up: bool = False
    down: bool = False
    fused: bool = False
    bias: bool = True


@dataclass
class Block:
    """EDM's UNetBlock."""

    cin: int
    cout: int
    up: bool = False
    down: bool = False
    attention: bool = False


@dataclass
class Norm:
    channels: int


@dataclass
class Net:
    """One network's layout: its kind, arguments (defaults filled in) and its encoder / decoder layers by name."""

    kind: str
    kw: dict[str, Any]
    enc: dict[str, Any]
    dec: dict[str, Any]

    @property
    def song(self) -> bool:
        return self.kind == "SongUNet"


def _arguments(model_class: str, init_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    defaults = {"SongUNet": SONG_DEFAULTS, "DhariwalUNet": DHARIWAL_DEFAULTS}[model_class]
    unknown = set(init_kwargs) - set(defaults) - {"img_resolution", "in_channels", "out_channels"}
    if unknown:
        raise TypeError(f"{model_class} has no argument(s) {sorted(unknown)}")
    return {**defaults, **init_kwargs}


def layout(model_class: str, init_kwargs: Mapping[str, Any]) -> Net:
    """The encoder and decoder layers EDM's constructor makes, in its order and with its names."""
    kw = _arguments(model_class, init_kwargs)
    song = model_class == "SongUNet"
    mc, mult, res0 = kw["model_channels"], kw["channel_mult"], kw["img_resolution"]
    enc: dict[str, Any] = {}
    cout = caux = kw["in_channels"]
    for level, m in enumerate(mult):
        r = res0 >> level
        if level == 0:
            cout, cin = (mc if song else mc * m), cout
            enc[f"{r}x{r}_conv"] = Conv(cin, cout, 3)
        else:
            enc[f"{r}x{r}_down"] = Block(cout, cout, down=True)
            if song and kw["encoder_type"] == "skip":
                enc[f"{r}x{r}_aux_down"] = Conv(caux, caux, 0, down=True)
                enc[f"{r}x{r}_aux_skip"] = Conv(caux, cout, 1)
            if song and kw["encoder_type"] == "residual":
                enc[f"{r}x{r}_aux_residual"] = Conv(caux, cout, 3, down=True, fused=True)
                caux = cout
        for i in range(kw["num_blocks"]):
            cin, cout = cout, mc * m
            enc[f"{r}x{r}_block{i}"] = Block(cin, cout, attention=r in kw["attn_resolutions"])
    skips = [layer.cout for name, layer in enc.items() if "aux" not in name]
    dec: dict[str, Any] = {}
    for level in reversed(range(len(mult))):
        r = res0 >> level
        if level == len(mult) - 1:
            dec[f"{r}x{r}_in0"] = Block(cout, cout, attention=True)
            dec[f"{r}x{r}_in1"] = Block(cout, cout)
        else:
            dec[f"{r}x{r}_up"] = Block(cout, cout, up=True)
        for i in range(kw["num_blocks"] + 1):
            cin, cout = cout + skips.pop(), mc * mult[level]
            last = i == kw["num_blocks"] or not song  # SongUNet: attention after a level's last block only
            dec[f"{r}x{r}_block{i}"] = Block(cin, cout, attention=last and r in kw["attn_resolutions"])
        if song and (kw["decoder_type"] == "skip" or level == 0):
            if kw["decoder_type"] == "skip" and level < len(mult) - 1:
                dec[f"{r}x{r}_aux_up"] = Conv(kw["out_channels"], kw["out_channels"], 0, up=True)
            dec[f"{r}x{r}_aux_norm"] = Norm(cout)
            dec[f"{r}x{r}_aux_conv"] = Conv(cout, kw["out_channels"], 3)
    if not song:
        dec["out_norm"] = Norm(cout)
        dec["out_conv"] = Conv(cout, kw["out_channels"], 3)
    return Net(model_class, kw, enc, dec)


def _conv_entries(name: str, c: Conv, taps: int) -> list[tuple[str, tuple[int, ...], str]]:
    out = []
    if c.kernel:
        out.append((f"{name}.weight", (c.cout, c.cin, c.kernel, c.kernel), "weight"))
        if c.bias:
            out.append((f"{name}.bias", (c.cout,), "bias"))
    if c.up or c.down:
        out.append((f"{name}.resample_filter", (1, 1, taps, taps), "filter"))
    return out


def _block_entries(net: Net, name: str, b: Block, taps: int) -> list[tuple[str, tuple[int, ...], str]]:
    emb = net.kw["model_channels"] * net.kw["channel_mult_emb"]
    adaptive = not net.song
    out = [(f"{name}.norm0.weight", (b.cin,), "gain"), (f"{name}.norm0.bias", (b.cin,), "bias")]
    out += _conv_entries(f"{name}.conv0", Conv(b.cin, b.cout, 3, up=b.up, down=b.down), taps)
    out += [(f"{name}.affine.weight", (b.cout * (2 if adaptive else 1), emb), "weight"),
            (f"{name}.affine.bias", (b.cout * (2 if adaptive else 1),), "bias"),
            (f"{name}.norm1.weight", (b.cout,), "gain"), (f"{name}.norm1.bias", (b.cout,), "bias")]
    out += _conv_entries(f"{name}.conv1", Conv(b.cout, b.cout, 3), taps)
    if b.cout != b.cin or b.up or b.down:
        kernel = 1 if net.song or b.cout != b.cin else 0  # SongUNet: resample_proj=True
        out += _conv_entries(f"{name}.skip", Conv(b.cin, b.cout, kernel, up=b.up, down=b.down), taps)
    if b.attention and (net.song or b.cout // 64):  # DhariwalUNet: out // 64 heads, none below 64 channels
        out += [(f"{name}.norm2.weight", (b.cout,), "gain"), (f"{name}.norm2.bias", (b.cout,), "bias")]
        out += _conv_entries(f"{name}.qkv", Conv(b.cout, 3 * b.cout, 1), taps)
        out += _conv_entries(f"{name}.proj", Conv(b.cout, b.cout, 1), taps)
    return out


def state_layout(model_class: str, init_kwargs: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(EDM state-dict key, shape, role) for every tensor of the network, in EDM's registration order; role is
    "weight", "bias", "gain" (GroupNorm scale), "freqs" (Fourier buffer) or "filter" (resampling buffer)."""
    net = layout(model_class, init_kwargs)
    kw = net.kw
    mc = kw["model_channels"]
    emb = mc * kw["channel_mult_emb"]
    taps = len(kw["resample_filter"]) if net.song else 2
    out: list[tuple[str, tuple[int, ...], str]] = []
    if net.song:
        noise = mc * kw["channel_mult_noise"]
        if kw["embedding_type"] == "fourier":
            out.append(("map_noise.freqs", (noise // 2,), "freqs"))
        if kw["label_dim"]:
            out += [("map_label.weight", (noise, kw["label_dim"]), "weight"), ("map_label.bias", (noise,), "bias")]
        if kw["augment_dim"]:
            out.append(("map_augment.weight", (noise, kw["augment_dim"]), "weight"))
        out += [("map_layer0.weight", (emb, noise), "weight"), ("map_layer0.bias", (emb,), "bias")]
        out += [("map_layer1.weight", (emb, emb), "weight"), ("map_layer1.bias", (emb,), "bias")]
    else:
        if kw["augment_dim"]:
            out.append(("map_augment.weight", (mc, kw["augment_dim"]), "weight"))
        out += [("map_layer0.weight", (emb, mc), "weight"), ("map_layer0.bias", (emb,), "bias")]
        out += [("map_layer1.weight", (emb, emb), "weight"), ("map_layer1.bias", (emb,), "bias")]
        if kw["label_dim"]:
            out.append(("map_label.weight", (emb, kw["label_dim"]), "weight"))
    for part, layers in (("enc", net.enc), ("dec", net.dec)):
        for key, layer in layers.items():
            name = key if key in ("out_norm", "out_conv") else f"{part}.{key}"
            if isinstance(layer, Conv):
                out += _conv_entries(name, layer, taps)
            elif isinstance(layer, Norm):
                out += [(f"{name}.weight", (layer.channels,), "gain"), (f"{name}.bias", (layer.channels,), "bias")]
            else:
                out += _block_entries(net, name, layer, taps)
    return out


def resample_filter(taps: list[float] | tuple[float, ...]) -> torch.Tensor:
    """EDM's resampling buffer: the outer product of the taps over the square of their sum, float32 (1, 1, k, k)."""
    f = torch.tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


def random_edm_state(model_class: str, init_kwargs: Mapping[str, Any], generator: torch.Generator,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random EDM-named state dict for SongUNet or DhariwalUNet with these constructor arguments: weights
    N(0, 1 / fan_in), biases N(0, 0.1^2), GroupNorm gains 1 + N(0, 0.1^2), Fourier frequencies N(0, 16^2) (EDM's
    scale), resampling filters as EDM computes them. Large enough that every layer (zero-initialised ones too)
    changes the output."""
    kw = _arguments(model_class, init_kwargs)
    taps = kw["resample_filter"] if model_class == "SongUNet" else [1, 1]
    state = {}
    for name, shape, role in state_layout(model_class, init_kwargs):
        if role == "filter":
            state[name] = resample_filter(taps).to(dtype)
            continue
        t = torch.randn(shape, generator=generator, dtype=torch.float64)
        if role == "weight":
            t = t / math.sqrt(math.prod(shape[1:]))
        elif role == "bias":
            t = 0.1 * t
        elif role == "gain":
            t = 1 + 0.1 * t
        else:  # Fourier frequencies
            t = 16 * t
        state[name] = t.to(dtype)
    return state


def parameter_count(model_class: str, init_kwargs: Mapping[str, Any]) -> int:
    """EDM's trainable parameters (every tensor but the frequency and filter buffers)."""
    return sum(math.prod(shape) for _, shape, role in state_layout(model_class, init_kwargs)
               if role not in ("freqs", "filter"))


# ------------------------------------------------------------------------------------------ forward passes


def _linear(p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def _group_norm(p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.group_norm(x, min(32, x.shape[1] // 4), p[f"{name}.weight"], p[f"{name}.bias"], eps)


def _conv(p: Mapping[str, torch.Tensor], name: str, c: Conv, x: torch.Tensor) -> torch.Tensor:
    w, b = p.get(f"{name}.weight"), p.get(f"{name}.bias")
    f = p.get(f"{name}.resample_filter")
    fpad = (f.shape[-1] - 1) // 2 if f is not None else 0
    wpad = w.shape[-1] // 2 if w is not None else 0
    if c.fused and c.down:
        x = F.conv2d(x, w, padding=wpad + fpad)
        x = F.conv2d(x, f.expand(x.shape[1], 1, -1, -1), stride=2, groups=x.shape[1])
    else:
        if c.up:
            x = F.conv_transpose2d(x, (4 * f).expand(x.shape[1], 1, -1, -1), stride=2, padding=fpad,
                                   groups=x.shape[1])
        if c.down:
            x = F.conv2d(x, f.expand(x.shape[1], 1, -1, -1), stride=2, padding=fpad, groups=x.shape[1])
        if w is not None:
            x = F.conv2d(x, w, padding=wpad)
    return x + b[None, :, None, None] if b is not None else x


def _block(net: Net, p: Mapping[str, torch.Tensor], name: str, b: Block, x: torch.Tensor,
           emb: torch.Tensor) -> torch.Tensor:
    eps = 1e-6 if net.song else 1e-5
    skip_scale = math.sqrt(0.5) if net.song else 1.0
    h = _conv(p, f"{name}.conv0", Conv(b.cin, b.cout, 3, up=b.up, down=b.down),
              F.silu(_group_norm(p, f"{name}.norm0", x, eps)))
    a = _linear(p, f"{name}.affine", emb)[:, :, None, None]
    if net.song:
        h = F.silu(_group_norm(p, f"{name}.norm1", h + a, eps))
    else:
        scale, shift = a.chunk(2, dim=1)
        h = F.silu(shift + _group_norm(p, f"{name}.norm1", h, eps) * (scale + 1))
    h = _conv(p, f"{name}.conv1", Conv(b.cout, b.cout, 3), h)  # dropout: evaluation mode
    if b.cout != b.cin or b.up or b.down:
        kernel = 1 if net.song or b.cout != b.cin else 0
        x = _conv(p, f"{name}.skip", Conv(b.cin, b.cout, kernel, up=b.up, down=b.down), x)
    x = (h + x) * skip_scale
    if b.attention and (net.song or b.cout // 64):
        n, c, height, width = x.shape
        heads = 1 if net.song else c // 64
        d = c // heads
        qkv = _conv(p, f"{name}.qkv", Conv(c, 3 * c, 1), _group_norm(p, f"{name}.norm2", x, eps))
        qkv = qkv.reshape(n, heads, d, 3, height * width)  # channel index = (head * d + channel) * 3 + q/k/v
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # each (n, heads, d, tokens)
        weights = torch.softmax(torch.einsum("nhdi,nhdj->nhij", q, k / math.sqrt(d)), dim=-1)
        out = torch.einsum("nhij,nhdj->nhdi", weights, v).reshape(n, c, height, width)
        x = (_conv(p, f"{name}.proj", Conv(c, c, 1), out) + x) * skip_scale
    return x


def _noise_features(net: Net, p: Mapping[str, torch.Tensor], c_noise: torch.Tensor) -> torch.Tensor:
    kw = net.kw
    if net.song and kw["embedding_type"] == "fourier":
        arg = torch.outer(c_noise, 2 * math.pi * p["map_noise.freqs"].to(c_noise.dtype))
    else:
        n = kw["model_channels"] * (kw["channel_mult_noise"] if net.song else 1)
        endpoint = 1 if net.song else 0  # SongUNet builds PositionalEmbedding(endpoint=True), ADM the default False
        j = torch.arange(n // 2, dtype=torch.float32) / (n // 2 - endpoint)
        arg = torch.outer(c_noise, ((1 / 10_000) ** j).to(c_noise.dtype))  # frequencies in float32, as EDM's
    features = torch.cat([arg.cos(), arg.sin()], dim=1)
    if net.song:  # SongUNet swaps the halves
        half = features.shape[1] // 2
        features = torch.cat([features[:, half:], features[:, :half]], dim=1)
    return features


def edm_forward(model_class: str, init_kwargs: Mapping[str, Any], p: Mapping[str, torch.Tensor], x: torch.Tensor,
                c_noise: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
    """EDM's network output F(x, c_noise, class_labels, augment_labels) in evaluation mode (no dropout).
    class_labels: one-hot rows (N, label_dim) as EDM's preconditioning passes them, None for zeros."""
    net = layout(model_class, init_kwargs)
    kw = net.kw
    if class_labels is None and kw["label_dim"]:
        class_labels = torch.zeros(x.shape[0], kw["label_dim"], dtype=x.dtype)
    emb = _noise_features(net, p, c_noise)
    if net.song:
        if kw["label_dim"]:
            emb = emb + _linear(p, "map_label", class_labels * math.sqrt(kw["label_dim"]))
        if kw["augment_dim"] and augment_labels is not None:
            emb = emb + _linear(p, "map_augment", augment_labels)
        emb = F.silu(_linear(p, "map_layer1", F.silu(_linear(p, "map_layer0", emb))))
    else:
        if kw["augment_dim"] and augment_labels is not None:
            emb = emb + _linear(p, "map_augment", augment_labels)
        emb = _linear(p, "map_layer1", F.silu(_linear(p, "map_layer0", emb)))
        if kw["label_dim"]:
            emb = emb + _linear(p, "map_label", class_labels)
        emb = F.silu(emb)

    skips, aux = [], x
    for key, layer in net.enc.items():
        name = f"enc.{key}"
        if key.endswith("aux_down"):
            aux = _conv(p, name, layer, aux)
        elif key.endswith("aux_skip"):
            x = skips[-1] = x + _conv(p, name, layer, aux)
        elif key.endswith("aux_residual"):
            x = skips[-1] = aux = (x + _conv(p, name, layer, aux)) / math.sqrt(2)
        else:
            x = _block(net, p, name, layer, x, emb) if isinstance(layer, Block) else _conv(p, name, layer, x)
            skips.append(x)

    aux, tmp = None, None
    for key, layer in net.dec.items():
        name = key if key in ("out_norm", "out_conv") else f"dec.{key}"
        if key.endswith("aux_up"):
            aux = _conv(p, name, layer, aux)
        elif key.endswith("aux_norm"):
            tmp = _group_norm(p, name, x, 1e-6)
        elif key.endswith("aux_conv"):
            tmp = _conv(p, name, layer, F.silu(tmp))
            aux = tmp if aux is None else tmp + aux
        elif key == "out_norm":
            x = F.silu(_group_norm(p, name, x, 1e-5))
        elif key == "out_conv":
            aux = _conv(p, name, layer, x)
        else:
            if x.shape[1] != layer.cin:
                x = torch.cat([x, skips.pop()], dim=1)
            x = _block(net, p, name, layer, x, emb)
    return aux
