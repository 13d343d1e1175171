"""Rebuild the networks of NVlabs/edm (training/networks.py) as ctcore networks: SongUNet (EDM's DDPM++ and NCSN++
presets) as `ncsnpp`, DhariwalUNet (EDM's ADM) as `adm`, from the constructor arguments an EDM pickle records and
the network's state dict under EDM's names.

The computations agree up to floating-point reordering (tests/test_convert_edm_networks.py compares each with an
independent rendition of EDM's code to 1e-12 in float64); what differs is only layout, mapped here: EDM's attention
holds q, k and v in one 1 x 1 convolution whose channels are grouped per head as [channel][q, k, v] (ctcore: three
convolutions in `ncsnpp`, [q | k | v][head][channel] in `adm`); DhariwalUNet's class embedding is a bias-free
Linear of one-hot labels (ctcore: an embedding table, its transpose). EDM's frozen buffers are checked, not
trusted: the Fourier frequencies become ctcore's (a buffer there too), every resampling filter must be the one
`resample_filter` gives. Arguments ctcore cannot express (e.g. label dropout, DhariwalUNet widths below 128, where
EDM's GroupNorm uses fewer than 32 groups) are refused with a ValueError naming the argument, as is every defect
of the state dict (naming the EDM key). Tensors keep their dtype; those copied as they are are the given tensors
(detached), not copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

SONG_DEFAULTS: dict[str, Any] = {
    "label_dim": 0, "augment_dim": 0, "model_channels": 128, "channel_mult": [1, 2, 2, 2], "channel_mult_emb": 4,
    "num_blocks": 4, "attn_resolutions": [16], "dropout": 0.10, "label_dropout": 0, "embedding_type": "positional",
    "channel_mult_noise": 1, "encoder_type": "standard", "decoder_type": "standard", "resample_filter": [1, 1],
}
"""SongUNet's constructor defaults (NVlabs/edm training/networks.py) besides the three it always receives."""

DHARIWAL_DEFAULTS: dict[str, Any] = {
    "label_dim": 0, "augment_dim": 0, "model_channels": 192, "channel_mult": [1, 2, 3, 4], "channel_mult_emb": 4,
    "num_blocks": 3, "attn_resolutions": [32, 16, 8], "dropout": 0.10, "label_dropout": 0,
}
"""DhariwalUNet's constructor defaults (NVlabs/edm training/networks.py) besides the three it always receives."""

REQUIRED = ("img_resolution", "in_channels", "out_channels")
"""The arguments EDM's preconditioning wrappers always pass (img_channels as in and out for VP, VE and EDM)."""

HEAD_CHANNELS = 64
"""DhariwalUNet's channels per attention head (UNetBlock's channels_per_head)."""

Piece = tuple[str, str, str | None]
"""(EDM key, how it maps, ctcore key): "copy", "transpose", "qkv" (SongUNet's interleaved q, k, v: the ctcore key
is the attention block's prefix), "qkv-heads" (DhariwalUNet's per-head q, k, v) or "filter" (checked, no key)."""


# ------------------------------------------------------------------------------------------ arguments


def _integer(kw: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = kw[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"EDM argument {key}: expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _integers(kw: Mapping[str, Any], key: str) -> list[int]:
    v = kw[key]
    if not isinstance(v, list | tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise ValueError(f"EDM argument {key}: expected a list of integers, got {v!r}")
    return list(v)


def _number(kw: Mapping[str, Any], key: str) -> float:
    v = kw[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"EDM argument {key}: expected a number, got {v!r}")
    return float(v)


def _choice(kw: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    if kw[key] not in choices:
        raise ValueError(f"EDM argument {key}: expected one of {', '.join(map(repr, choices))}, got {kw[key]!r}")
    return kw[key]


def _arguments(model_class: str, defaults: Mapping[str, Any], init_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded arguments with EDM's defaults filled in; unknown or missing ones refused."""
    unknown = [k for k in init_kwargs if k not in defaults and k not in REQUIRED]
    if unknown:
        raise ValueError(f"EDM argument {unknown[0]}: not an argument of {model_class}")
    missing = [k for k in REQUIRED if k not in init_kwargs]
    if missing:
        raise ValueError(f"EDM argument {missing[0]}: missing; {model_class} needs {', '.join(REQUIRED)}")
    kw = {**defaults, **init_kwargs}
    if _integer(kw, "out_channels", 1, 1024) != _integer(kw, "in_channels", 1, 1024):
        raise ValueError(f"EDM argument out_channels: ctcore's networks output as many channels as they read "
                         f"(in_channels = {kw['in_channels']}), got {kw['out_channels']} (e.g. iDDPM's learned "
                         f"variance, which ctcore does not model)")
    if _integer(kw, "channel_mult_emb", 1, 64) != 4:
        raise ValueError(f"EDM argument channel_mult_emb: ctcore's networks have a 4 x model_channels embedding, "
                         f"got {kw['channel_mult_emb']}")
    if _number(kw, "label_dropout") != 0:
        raise ValueError(f"EDM argument label_dropout: ctcore has no class-label dropout, got {kw['label_dropout']}")
    return kw


def edm_network_shape(init_kwargs: Mapping[str, Any]) -> tuple[tuple[int, int, int], int]:
    """((channels, height, width), number of classes) of an EDM network from its constructor arguments."""
    for key in REQUIRED:
        if key not in init_kwargs:
            raise ValueError(f"EDM argument {key}: missing; EDM's networks need {', '.join(REQUIRED)}")
    channels = _integer(init_kwargs, "in_channels", 1, 1024)
    resolution = _integer(init_kwargs, "img_resolution", 1, 4096)
    classes = _integer({"label_dim": 0, **init_kwargs}, "label_dim", 0, 100_000)
    return (channels, resolution, resolution), classes


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def _build(name: str, options: dict[str, Any], init_kwargs: Mapping[str, Any], model_class: str,
           registry: Any) -> tuple[dict[str, Any], dict[str, torch.Size]]:
    """The complete option dict (every field, plain values) and ctcore key -> shape of the network on meta."""
    from ctcore.components import BuildContext

    if registry is None:
        from ctcore.registry import load_registry

        registry = load_registry()
    cls = registry.get("network", name)
    fields = {f.name: f for f in attrs.fields(cls.Options)}
    data_shape, classes = edm_network_shape(init_kwargs)
    try:
        opts = cls.Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
        with torch.device("meta"):
            net = cls(opts, BuildContext(data_shape=data_shape, num_classes=classes))
    except ValueError as exc:
        raise ValueError(f"EDM {model_class} arguments give a network ctcore's {name!r} cannot build: {exc}") from None
    recipe = {"name": name, **{k: _plain(getattr(opts, k)) for k in fields}}
    return recipe, {k: v.shape for k, v in net.state_dict().items()}


# ------------------------------------------------------------------------------------------ name mapping


class _Pieces(list):
    """EDM key -> ctcore key pairs in EDM's registration order, with helpers for EDM's layer kinds."""

    def tensor(self, edm: str, ours: str | None, how: str = "copy") -> None:
        self.append((edm, how, ours))

    def layer(self, edm: str, ours: str, bias: bool = True) -> None:
        """A Linear, a Conv2d with weights, or a GroupNorm: weight and (optionally) bias."""
        self.tensor(f"{edm}.weight", f"{ours}.weight")
        if bias:
            self.tensor(f"{edm}.bias", f"{ours}.bias")

    def conv(self, edm: str, ours: str | None, resample: bool = False) -> None:
        """An EDM Conv2d: weights when `ours` names a ctcore layer, the resampling filter when it resamples."""
        if ours is not None:
            self.layer(edm, ours)
        if resample:
            self.tensor(f"{edm}.resample_filter", None, "filter")


def _song_block(p: _Pieces, edm: str, ours: str, cin: int, cout: int, attn: str | None = None,
                resample: bool = False) -> None:
    """A SongUNet UNetBlock -> an ncsnpp ResnetBlock (and AttnBlock `attn`)."""
    p.layer(f"{edm}.norm0", f"{ours}.norm0")
    p.conv(f"{edm}.conv0", f"{ours}.conv0", resample)
    p.layer(f"{edm}.affine", f"{ours}.emb_proj")
    p.layer(f"{edm}.norm1", f"{ours}.norm1")
    p.conv(f"{edm}.conv1", f"{ours}.conv1")
    if cin != cout or resample:  # resample_proj=True: a 1 x 1 projection whenever the block resamples
        p.conv(f"{edm}.skip", f"{ours}.shortcut", resample)
    if attn is not None:
        p.layer(f"{edm}.norm2", f"{attn}.norm")
        p.tensor(f"{edm}.qkv.weight", attn, "qkv")
        p.tensor(f"{edm}.qkv.bias", attn, "qkv")
        p.layer(f"{edm}.proj", f"{attn}.out")


def _song_pieces(kw: Mapping[str, Any]) -> _Pieces:
    """SongUNet's state (networks.py's constructor order) -> ncsnpp's names."""
    p = _Pieces()
    if kw["embedding_type"] == "fourier":
        p.tensor("map_noise.freqs", "fourier.freqs")
    if kw["label_dim"]:
        p.layer("map_label", "label_proj")
    if kw["augment_dim"]:
        p.tensor("map_augment.weight", "augment_weight")
    p.layer("map_layer0", "emb0")
    p.layer("map_layer1", "emb1")
    mc, mult, levels = kw["model_channels"], kw["channel_mult"], len(kw["channel_mult"])
    attn_at = set(kw["attn_resolutions"])
    cout, skips = mc, [mc]
    for level, m in enumerate(mult):
        r = kw["img_resolution"] >> level
        if level == 0:
            p.conv(f"enc.{r}x{r}_conv", "conv_in")
        else:
            _song_block(p, f"enc.{r}x{r}_down", f"down.{level - 1}.resample", cout, cout, resample=True)
            if kw["encoder_type"] == "skip":
                p.conv(f"enc.{r}x{r}_aux_down", None, resample=True)
                p.conv(f"enc.{r}x{r}_aux_skip", f"down.{level - 1}.combine.conv")
            elif kw["encoder_type"] == "residual":
                p.conv(f"enc.{r}x{r}_aux_residual", f"down.{level - 1}.pyramid.conv", resample=True)
            skips.append(cout)
        for i in range(kw["num_blocks"]):
            attn = f"down.{level}.attns.{i}" if r in attn_at else None
            _song_block(p, f"enc.{r}x{r}_block{i}", f"down.{level}.blocks.{i}", cout, mc * m, attn)
            cout = mc * m
            skips.append(cout)
    for level in reversed(range(levels)):
        r, stage = kw["img_resolution"] >> level, levels - 1 - level
        if level == levels - 1:
            _song_block(p, f"dec.{r}x{r}_in0", "mid.0", cout, cout, "mid.1")
            _song_block(p, f"dec.{r}x{r}_in1", "mid.2", cout, cout)
        else:  # the up-sampling block ends the stage of the level below in ncsnpp
            _song_block(p, f"dec.{r}x{r}_up", f"up.{stage - 1}.resample", cout, cout, resample=True)
        for i in range(kw["num_blocks"] + 1):
            attn = f"up.{stage}.attn" if i == kw["num_blocks"] and r in attn_at else None
            cin = cout + skips.pop()
            _song_block(p, f"dec.{r}x{r}_block{i}", f"up.{stage}.blocks.{i}", cin, mc * mult[level], attn)
            cout = mc * mult[level]
        if kw["decoder_type"] == "skip":
            if level < levels - 1:
                p.conv(f"dec.{r}x{r}_aux_up", None, resample=True)
            p.layer(f"dec.{r}x{r}_aux_norm", f"up.{stage}.pyramid_norm")
            p.conv(f"dec.{r}x{r}_aux_conv", f"up.{stage}.pyramid_conv")
        elif level == 0:
            p.layer(f"dec.{r}x{r}_aux_norm", "norm_out")
            p.conv(f"dec.{r}x{r}_aux_conv", "conv_out")
    return p


def _dhariwal_block(p: _Pieces, edm: str, ours: str, cin: int, cout: int, attn: str | None = None,
                    resample: bool = False) -> None:
    """A DhariwalUNet UNetBlock -> an adm ResBlock (and AttentionBlock `attn`)."""
    p.layer(f"{edm}.norm0", f"{ours}.norm1")
    p.conv(f"{edm}.conv0", f"{ours}.conv1", resample)
    p.layer(f"{edm}.affine", f"{ours}.emb_proj")
    p.layer(f"{edm}.norm1", f"{ours}.norm2")
    p.conv(f"{edm}.conv1", f"{ours}.conv2")
    if cin != cout or resample:  # resample_proj=False: weights only when the width changes
        p.conv(f"{edm}.skip", f"{ours}.skip" if cin != cout else None, resample)
    if attn is not None:
        p.layer(f"{edm}.norm2", f"{attn}.norm")
        p.tensor(f"{edm}.qkv.weight", f"{attn}.qkv.weight", "qkv-heads")
        p.tensor(f"{edm}.qkv.bias", f"{attn}.qkv.bias", "qkv-heads")
        p.layer(f"{edm}.proj", f"{attn}.proj")


def _dhariwal_pieces(kw: Mapping[str, Any]) -> _Pieces:
    """DhariwalUNet's state (networks.py's constructor order) -> adm's names."""
    p = _Pieces()
    if kw["augment_dim"]:
        p.tensor("map_augment.weight", "augment_weight")
    p.layer("map_layer0", "time_embed.0")
    p.layer("map_layer1", "time_embed.2")
    if kw["label_dim"]:
        p.tensor("map_label.weight", "label_embed.weight", "transpose")
    mc, mult, levels = kw["model_channels"], kw["channel_mult"], len(kw["channel_mult"])
    attn_at = set(kw["attn_resolutions"])
    stage, cout, skips = 0, mc * mult[0], [mc * mult[0]]
    for level, m in enumerate(mult):
        r = kw["img_resolution"] >> level
        if level == 0:
            p.conv(f"enc.{r}x{r}_conv", "input_conv")
        else:
            _dhariwal_block(p, f"enc.{r}x{r}_down", f"encoder.{stage}.0", cout, cout, resample=True)
            stage += 1
            skips.append(cout)
        for i in range(kw["num_blocks"]):
            attn = f"encoder.{stage}.1" if r in attn_at else None
            _dhariwal_block(p, f"enc.{r}x{r}_block{i}", f"encoder.{stage}.0", cout, mc * m, attn)
            stage, cout = stage + 1, mc * m
            skips.append(cout)
    stage = 0
    for level in reversed(range(levels)):
        r = kw["img_resolution"] >> level
        if level == levels - 1:
            _dhariwal_block(p, f"dec.{r}x{r}_in0", "middle.0", cout, cout, "middle.1")
            _dhariwal_block(p, f"dec.{r}x{r}_in1", "middle.2", cout, cout)
        else:  # the up-sampling block is the last layer of the stage before, after its attention if any
            above = kw["img_resolution"] >> (level + 1)
            layer = 2 if above in attn_at else 1
            _dhariwal_block(p, f"dec.{r}x{r}_up", f"decoder.{stage - 1}.{layer}", cout, cout, resample=True)
        for i in range(kw["num_blocks"] + 1):
            attn = f"decoder.{stage}.1" if r in attn_at else None
            cin = cout + skips.pop()
            _dhariwal_block(p, f"dec.{r}x{r}_block{i}", f"decoder.{stage}.0", cin, mc * mult[level], attn)
            stage, cout = stage + 1, mc * mult[level]
    p.layer("out_norm", "out_norm")
    p.conv("out_conv", "out_conv")
    return p


# ------------------------------------------------------------------------------------------ state dicts


def _edm_shape(how: str, ours: str | None, shapes: Mapping[str, torch.Size], leaf: str,
               taps: int) -> tuple[int, ...]:
    """The shape EDM stores for a piece, from the ctcore shape it maps to."""
    if how == "filter":
        return (1, 1, taps, taps)
    if how == "qkv":
        q = shapes[f"{ours}.q.{leaf}"]
        return (3 * q[0], *q[1:])
    if how == "transpose":
        return tuple(reversed(shapes[ours]))
    return tuple(shapes[ours])


def _expected_filter(taps: list[float]) -> torch.Tensor:
    """EDM Conv2d's resampling buffer for these taps: outer(f, f) / sum(f)^2, shape (1, 1, k, k), in float64."""
    f = torch.tensor(taps, dtype=torch.float64)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


def _map_state(model_class: str, pieces: _Pieces, state: Mapping[str, Any], shapes: Mapping[str, torch.Size],
               taps: list[float]) -> dict[str, torch.Tensor]:
    """ctcore's state dict from EDM's, every defect one ValueError naming the EDM key."""
    what = f"EDM {model_class} state"
    expected: dict[str, tuple[int, ...]] = {}
    for edm, how, ours in pieces:
        leaf = edm.rsplit(".", 1)[1]
        want = expected[edm] = _edm_shape(how, ours, shapes, leaf, len(taps))
        if edm not in state:
            raise ValueError(f"{what}: key {edm!r} is missing (expected a float tensor of shape {want})")
        value = state[edm]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what}: key {edm!r} holds a {type(value).__name__}, expected a float tensor of shape "
                             f"{want}")
        if not value.is_floating_point():
            raise ValueError(f"{what}: key {edm!r} has dtype {str(value.dtype).removeprefix('torch.')}, expected a "
                             "floating-point tensor")
        if tuple(value.shape) != want:
            raise ValueError(f"{what}: key {edm!r} has shape {tuple(value.shape)}, expected {want}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{what}: key {extra[0]!r} is not part of a {model_class} with these arguments")

    filt = _expected_filter(taps)
    out: dict[str, torch.Tensor] = {}
    for edm, how, ours in pieces:
        value = state[edm].detach()
        if how == "filter":
            tol = 4 * torch.finfo(value.dtype).eps
            if not torch.allclose(value.to(torch.float64), filt, rtol=tol, atol=0.0):
                raise ValueError(f"{what}: key {edm!r} is not the resampling filter of resample_filter={taps} "
                                 f"(outer product over the squared sum); the file has been altered")
        elif how == "qkv":  # channel index c * 3 + (q, k, v)
            leaf = edm.rsplit(".", 1)[1]
            for i, part in enumerate("qkv"):
                out[f"{ours}.{part}.{leaf}"] = value[i::3].contiguous()
        elif how == "qkv-heads":  # EDM (head, channel, q/k/v) -> ctcore (q/k/v, head, channel)
            heads = value.shape[0] // 3 // HEAD_CHANNELS
            rest = value.shape[1:]
            out[ours] = value.reshape(heads, HEAD_CHANNELS, 3, *rest).movedim(2, 0).reshape(value.shape).contiguous()
        elif how == "transpose":
            out[ours] = value.t().contiguous()
        else:
            out[ours] = value
    if set(out) != set(shapes):  # pragma: no cover - a mapping bug, not a user error
        raise AssertionError(f"EDM -> ctcore mapping leaves {sorted(set(shapes) - set(out))[:3]} unset")
    return out


def _song(init_kwargs: Mapping[str, Any], registry: Any) -> tuple[dict[str, Any], dict[str, Any], dict, list[float]]:
    """SongUNet's arguments (defaults filled in), ncsnpp's options, its key -> shape, and the resampling taps."""
    kw = _arguments("SongUNet", SONG_DEFAULTS, init_kwargs)
    mc = _integer(kw, "model_channels", 1, 4096)
    taps = kw["resample_filter"]
    if (not isinstance(taps, list | tuple) or not taps
            or not all(isinstance(t, int | float) and not isinstance(t, bool) for t in taps)):
        raise ValueError(f"EDM argument resample_filter: expected a list of numbers, got {taps!r}")
    taps = [float(t) for t in taps]
    if taps != taps[::-1]:
        raise ValueError(f"EDM argument resample_filter: ctcore's FIR resampling convolves where EDM correlates, "
                         f"which agree only for symmetric filters; got {taps}")
    for key in ("channel_mult", "attn_resolutions"):
        _integers(kw, key)
    _integer(kw, "num_blocks", 0, 10_000)
    embedding = _choice(kw, "embedding_type", ("fourier", "positional"))
    encoder = _choice(kw, "encoder_type", ("standard", "skip", "residual"))
    decoder = _choice(kw, "decoder_type", ("standard", "skip"))
    options = {
        "nf": mc, "ch_mult": list(kw["channel_mult"]), "num_res_blocks": kw["num_blocks"],
        "attn_resolutions": list(kw["attn_resolutions"]), "dropout": _number(kw, "dropout"),
        "resblock_type": "biggan",  # resampling inside the residual blocks, a 1 x 1 projection on the skip path
        "fir": True, "fir_kernel": taps,  # [1, 1] filters are nearest / 2 x 2 average resampling
        "resamp_with_conv": True, "skip_rescale": True,  # skip_scale sqrt(0.5) in every block and sum
        "progressive": {"standard": "none", "skip": "output_skip"}[decoder],
        "progressive_input": {"standard": "none", "skip": "input_skip", "residual": "residual"}[encoder],
        "progressive_combine": "sum", "embedding_type": embedding,
        "fourier_scale": 16.0,  # FourierEmbedding's scale; only an initialisation (the frequencies are copied)
        "channel_mult_noise": _integer(kw, "channel_mult_noise", 1, 1024),
        "max_positions": 10_000, "endpoint": True,  # SongUNet's PositionalEmbedding(endpoint=True)
        "label_input": "noise", "augment_dim": _integer(kw, "augment_dim", 0, 1 << 20),
    }
    _integer(kw, "label_dim", 0, 100_000)
    recipe, shapes = _build("ncsnpp", options, kw, "SongUNet", registry)
    return kw, recipe, shapes, taps


def songunet_options(init_kwargs: Mapping[str, Any], *, registry: Any = None) -> dict[str, Any]:
    """The recipe's [network] table (name "ncsnpp" and every option, plain values) of EDM's SongUNet with these
    constructor arguments (absent ones take EDM's defaults)."""
    return _song(init_kwargs, registry)[1]


def songunet_network(init_kwargs: Mapping[str, Any], state: Mapping[str, Any], *,
                     registry: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(recipe [network] table, state dict) of ctcore's `ncsnpp` equal to EDM's SongUNet with these constructor
    arguments (absent ones take EDM's defaults) and this state dict (EDM's names, buffers included)."""
    kw, recipe, shapes, taps = _song(init_kwargs, registry)
    return recipe, _map_state("SongUNet", _song_pieces(kw), state, shapes, taps)


def _dhariwal(init_kwargs: Mapping[str, Any], registry: Any) -> tuple[dict[str, Any], dict[str, Any], dict]:
    """DhariwalUNet's arguments (defaults filled in), adm's options and its key -> shape."""
    kw = _arguments("DhariwalUNet", DHARIWAL_DEFAULTS, init_kwargs)
    mc = _integer(kw, "model_channels", 1, 4096)
    mult, attn_at = _integers(kw, "channel_mult"), _integers(kw, "attn_resolutions")
    _integer(kw, "num_blocks", 0, 10_000)
    _integer(kw, "label_dim", 0, 100_000)
    if mult and mc * min(mult) < 128:
        raise ValueError(f"EDM argument model_channels: EDM's GroupNorm has min(32, C // 4) groups, fewer than 32 "
                         f"below 128 channels, which ctcore's adm (one num_groups) cannot express; got model_channels "
                         f"* min(channel_mult) = {mc * min(mult)}")
    for level, m in enumerate(mult):
        r = _integer(kw, "img_resolution", 1, 4096) >> level
        if (r in attn_at or level == len(mult) - 1) and mc * m % HEAD_CHANNELS:
            raise ValueError(f"EDM argument model_channels: attention at {r}x{r} has {mc * m} channels, not a multiple "
                             f"of EDM's {HEAD_CHANNELS} channels per head, which ctcore's adm cannot split alike")
    options = {
        "model_channels": mc, "channel_mult": mult, "num_res_blocks": kw["num_blocks"],
        "attention_resolutions": attn_at, "num_head_channels": HEAD_CHANNELS,
        "resblock_updown": True,  # nearest / 2 x 2 average resampling inside the residual blocks
        "use_scale_shift_norm": True,  # adaptive_scale=True
        "dropout": _number(kw, "dropout"), "dropout_max_resolution": 4096,  # EDM: dropout in every block
        "num_groups": 32, "noise_embedding": "edm", "augment_dim": _integer(kw, "augment_dim", 0, 1 << 20),
    }
    recipe, shapes = _build("adm", options, kw, "DhariwalUNet", registry)
    return kw, recipe, shapes


def dhariwal_options(init_kwargs: Mapping[str, Any], *, registry: Any = None) -> dict[str, Any]:
    """The recipe's [network] table (name "adm" and every option, plain values) of EDM's DhariwalUNet with these
    constructor arguments (absent ones take EDM's defaults)."""
    return _dhariwal(init_kwargs, registry)[1]


def dhariwal_network(init_kwargs: Mapping[str, Any], state: Mapping[str, Any], *,
                     registry: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(recipe [network] table, state dict) of ctcore's `adm` equal to EDM's DhariwalUNet with these constructor
    arguments (absent ones take EDM's defaults) and this state dict (EDM's names, buffers included)."""
    kw, recipe, shapes = _dhariwal(init_kwargs, registry)
    return recipe, _map_state("DhariwalUNet", _dhariwal_pieces(kw), state, shapes, [1.0, 1.0])


# ------------------------------------------------------------------------------------------ ctcore convert edm

PRECONDITIONING = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
"""EDM's preconditioning wrappers (training/networks.py) -> the `edm` objective's `preconditioning` option."""

PRECONDITIONING_CONSTANTS = {
    "edm": {"sigma_data": ("sigma_data", 0.5)},
    "vp": {"beta_d": ("beta_d", 19.9), "beta_min": ("beta_min", 0.1), "vp_steps": ("M", 1000),
           "epsilon_t": ("epsilon_t", 1e-5)},
    "ve": {"ve_sigma_min": ("sigma_min", 0.02), "ve_sigma_max": ("sigma_max", 100.0)},
}
"""ctcore option -> (EDM attribute, EDM's default) of each preconditioning."""

EDM_FIX = "give a network pickle from NVlabs/edm (network-snapshot-*.pkl or a released edm-*.pkl)"

SAMPLING_RANGE = (0.002, 80.0)
"""generate.py's sigma range, which it narrows to the network's own (sigma_min = max(0.002, net.sigma_min))."""


def _precond_constant(obj: Any, key: str, default: float, where: str) -> float:
    """A preconditioning constant as the wrapper holds it (its attribute, else its recorded argument, else EDM's
    default); a ValueError unless it is a number (an integer where EDM's default is one, as M)."""
    value = obj.state.get(key, obj.init_kwargs.get(key, default))
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"{where} attribute {key!r} must be a number, got {value!r}")
    if isinstance(default, int):
        if value != int(value):
            raise ValueError(f"{where} attribute {key!r} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _recipe_text(stem: str, data_shape: tuple[int, int, int], num_classes: int, network: Mapping[str, Any],
                 objective: Mapping[str, Any], sigma_range: tuple[float, float], sigma_data: float,
                 precond_class: str, model_class: str) -> str:
    from ctcore.convert import _toml_value

    def table(values: Mapping[str, Any]) -> str:
        return "\n".join(f"{k} = {_toml_value(v) if not isinstance(v, str) else repr(v)}" for k, v in values.items())

    c, h, _ = data_shape
    steps = 18 if h <= 32 else 40  # EDM's deterministic settings: CIFAR-10 18 levels, 64 x 64 40
    name = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in stem)[:80] or "edm"
    return f"""# Converted by `ctcore convert edm` from NVlabs/edm's {precond_class}({model_class}); the network and its
# preconditioning are EDM's; the training settings are ctcore's defaults, not how the model was trained.
[run]
name = "{name}"

[data]
source = "hdf5"
path = "data/train.h5"
channels = {c}
resolution = {h}
num_classes = {num_classes}

[network]
{table(network)}

[objective]
{table(objective)}

[sampler]
name = "heun"
steps = {steps}
rho = 7.0

[consistency]
sigma_min = {sigma_range[0]!r}
sigma_max = {sigma_range[1]!r}
sigma_data = {sigma_data!r}

[sampling]
sigma_mid = []
"""


def convert_edm(source: str | Path, out: str | Path, registry: Any, *, overwrite: bool = False) -> dict[str, Any]:
    """Write a ctcore diffusion checkpoint holding the `ema` network of an NVlabs/edm pickle; returns what was
    written. The pickle is read as data (`ctcore.edm_pickle`): nothing in it runs. Every problem is one RunError
    (UsageError for the arguments) and nothing is written then."""
    from ctcore.checkpoints import first_nonfinite
    from ctcore.components import BuildContext
    from ctcore.convert import write_converted
    from ctcore.edm_pickle import child, module_tensors, read_edm_pickle
    from ctcore.errors import RunError, UsageError
    from ctcore.files import refuse_writing_inputs
    from ctcore.recipe import parse_recipe
    from ctcore.sampling import recipe_objective

    source, out = Path(source), Path(out)
    refuse_writing_inputs([("OUT.pt", out)], [("SOURCE", source)])
    if out.exists() and not overwrite:
        raise UsageError(f"{str(out)!r} exists; pass --overwrite to replace it, or choose another OUT.pt")
    pk = read_edm_pickle(source)
    where = f"{str(source)!r}"
    precond = pk.ema
    kind = PRECONDITIONING.get(precond.class_name)
    if kind is None:
        raise RunError(f"{where}: its network is a {precond.class_name}, which ctcore does not convert (it converts "
                       f"{', '.join(PRECONDITIONING)}: EDM's config-F and VP / VE models; iDDPMPrecond's learned "
                       f"variance has no ctcore equivalent); {EDM_FIX}")
    model = child(precond, "model")
    mapping = {"SongUNet": songunet_network, "DhariwalUNet": dhariwal_network}.get(model.class_name)
    if mapping is None:
        raise RunError(f"{where}: the network inside {precond.class_name} is a {model.class_name}; ctcore converts "
                       f"SongUNet (DDPM++, NCSN++) and DhariwalUNet (ADM); {EDM_FIX}")
    tensors = module_tensors(model)
    try:
        constants = {ours: _precond_constant(precond, theirs, default, precond.class_name)
                     for ours, (theirs, default) in PRECONDITIONING_CONSTANTS[kind].items()}
        data_shape, num_classes = edm_network_shape(model.init_kwargs)
        network, weights = mapping(model.init_kwargs, tensors, registry=registry)
    except ValueError as exc:
        raise RunError(f"{where}: {exc}; {EDM_FIX}") from None
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in weights.values()})
    weights = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in weights.items()}
    bad = first_nonfinite(weights)
    if bad is not None:
        raise RunError(f"{where} holds non-finite values in the tensor ctcore names {bad}; give an undamaged copy "
                       "of the file")
    sigma_data = constants.pop("sigma_data", 0.5)
    objective = {"name": "edm", "preconditioning": kind, **constants}

    def recipe_for(sigma_range: tuple[float, float]) -> Any:
        text = _recipe_text(source.stem, data_shape, num_classes, network, objective, sigma_range, sigma_data,
                            precond.class_name, model.class_name)
        try:
            return parse_recipe(text, registry, source="its recipe")
        except UsageError as exc:  # values in the file outside what ctcore accepts (a damaged or forged file)
            raise RunError(f"{where}: {exc}; {EDM_FIX}") from None

    lo, hi = recipe_objective(recipe_for(SAMPLING_RANGE), registry).sigma_range()
    try:  # generate.py reads the wrapper's own attributes (VPPrecond computes them in float32)
        lo, hi = (_precond_constant(precond, "sigma_min", lo, precond.class_name),
                  _precond_constant(precond, "sigma_max", hi, precond.class_name))
    except ValueError as exc:
        raise RunError(f"{where}: {exc}; {EDM_FIX}") from None
    recipe = recipe_for((max(SAMPLING_RANGE[0], lo), min(SAMPLING_RANGE[1], hi)))
    write_converted(out, recipe, registry, weights, data_shape, num_classes, overwrite=overwrite, converted_from={
        "format": "edm-pickle", "file": str(source), "sha256": pk.sha256, "preconditioning": precond.class_name,
        "network": model.class_name, "module_sources": dict(pk.module_sources), "dtypes": dtypes,
        "use_fp16": bool(precond.state.get("use_fp16", precond.init_kwargs.get("use_fp16", False)))})
    spec = recipe.components["network"]
    with torch.device("meta"):
        net = registry.get("network", spec.name)(spec.options, BuildContext(data_shape, num_classes))
    return {"out": out, "preconditioning": precond.class_name, "network": model.class_name,
            "ctcore_network": spec.name, "sha256": pk.sha256, "tensors": len(weights), "dtypes": dtypes,
            "parameters": sum(p.numel() for p in net.parameters()),
            "sigma_range": [recipe.consistency.sigma_min, recipe.consistency.sigma_max]}
