"""EDM's networks as ctcore networks (ctcore.convert_edm): SongUNet in its DDPM++ and NCSN++ presets as `ncsnpp`,
DhariwalUNet as `adm`. Built from EDM's constructor arguments and an EDM-named state dict, each equals an
independent functional rendition of EDM's code (tests/edm_reference.py) to 1e-12 in float64; the released
architectures have EDM's parameter counts; every defect of the arguments or the state dict is one ValueError."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
import torch.nn.functional as F
from edm_reference import edm_forward, parameter_count, random_edm_state, resample_filter, state_layout
from helpers import tiny_recipe_text

from ctcore.components import BuildContext, positional_features
from ctcore.convert_edm import (
    dhariwal_network,
    dhariwal_options,
    edm_network_shape,
    songunet_network,
    songunet_options,
)
from ctcore.recipe import parse_recipe

SMALL = {"img_resolution": 16, "in_channels": 3, "out_channels": 3, "model_channels": 16, "channel_mult": [1, 2],
         "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.13}
"""A CPU-sized SongUNet: levels at 16 and 8 (widths 16 and 32), attention at 8 and in the middle."""

NCSNPP = {"embedding_type": "fourier", "channel_mult_noise": 2, "encoder_type": "residual",
          "decoder_type": "standard", "resample_filter": [1, 3, 3, 1]}
DDPMPP = {"embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
          "decoder_type": "standard", "resample_filter": [1, 1]}
"""EDM train.py's --arch=ncsnpp and --arch=ddpmpp SongUNet arguments."""

SMALL_ADM = {"img_resolution": 8, "in_channels": 3, "out_channels": 3, "model_channels": 128, "channel_mult": [1, 2],
             "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.1}
"""The smallest DhariwalUNet ctcore's adm expresses: 128 channels (EDM's GroupNorm has 32 groups from there), 2
levels, attention with 4 heads of 64 at 4x4 and in the middle."""

LABELS = {"label_dim": 10, "augment_dim": 9}

CIFAR10 = {"img_resolution": 32, "in_channels": 3, "out_channels": 3, "model_channels": 128,
           "channel_mult": [2, 2, 2], "dropout": 0.13, "augment_dim": 9}
FACES64 = {"img_resolution": 64, "in_channels": 3, "out_channels": 3, "model_channels": 128,
           "channel_mult": [1, 2, 2, 2], "dropout": 0.05, "augment_dim": 9}
IMAGENET64 = {"img_resolution": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
              "channel_mult": [1, 2, 3, 4], "dropout": 0.10, "label_dim": 1000}
"""The released networks' arguments as EDM's train.py builds them for the README's training commands (AFHQv2 64:
FFHQ's with dropout 0.25; CIFAR-10 conditional: label_dim 10; ImageNet: --augment=0, so no augment_dim)."""


def build(recipe: dict, init_kwargs: dict, state: dict[str, torch.Tensor], registry) -> torch.nn.Module:
    """The ctcore network of a converted recipe holding the converted state (float64 when the state is)."""
    shape, classes = edm_network_shape(init_kwargs)
    cls = registry.get("network", recipe["name"])
    options = cls.Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items() if k != "name"})
    net = cls(options, BuildContext(data_shape=shape, num_classes=classes)).to(next(iter(state.values())).dtype)
    net.load_state_dict(state, strict=True)
    return net.eval()


def compare(model_class: str, init_kwargs: dict, registry, seed: int = 0) -> None:
    """ctcore's converted network against the EDM rendition in float64 on random weights, inputs and labels."""
    g = torch.Generator().manual_seed(seed)
    edm_state = random_edm_state(model_class, init_kwargs, g, dtype=torch.float64)
    convert = songunet_network if model_class == "SongUNet" else dhariwal_network
    recipe, state = convert(init_kwargs, edm_state, registry=registry)
    net = build(recipe, init_kwargs, state, registry)
    shape, classes = edm_network_shape(init_kwargs)
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    c_noise = torch.tensor([-1.7, 0.3, 1.1], dtype=torch.float64)  # 0.25 ln sigma for sigma 0.0011 .. 81
    labels = torch.tensor([0, min(7, classes - 1), classes - 1]) if classes else None
    one_hot = F.one_hot(labels, classes).to(torch.float64) if classes else None
    with torch.no_grad():
        ours, theirs = net(x, c_noise, labels), edm_forward(model_class, init_kwargs, edm_state, x, c_noise, one_hot)
    assert theirs.std() > 0.3  # every layer matters: no zero-initialised layer hides the rest
    assert (ours - theirs).abs().max() < 1e-12
    if classes and model_class == "SongUNet":  # no labels: EDM's preconditioning feeds the zero vector
        with torch.no_grad():
            ours, theirs = net(x, c_noise, None), edm_forward(model_class, init_kwargs, edm_state, x, c_noise)
        assert (ours - theirs).abs().max() < 1e-12


# ------------------------------------------------------------------------------------------ equal computations


@pytest.mark.parametrize("labels", [{}, LABELS], ids=["unconditional", "labels-augment"])
@pytest.mark.parametrize("preset", [NCSNPP, DDPMPP], ids=["ncsnpp", "ddpmpp"])
def test_songunet_presets_equal_edm_in_float64(registry, preset: dict, labels: dict) -> None:
    compare("SongUNet", {**SMALL, **preset, **labels}, registry)


@pytest.mark.parametrize("variant", [
    {**NCSNPP, "encoder_type": "skip", "decoder_type": "skip"},
    {**DDPMPP, "encoder_type": "residual", "decoder_type": "skip", "channel_mult": [1, 2, 2],
     "attn_resolutions": [8, 4], "num_blocks": 2, "channel_mult_noise": 4},
], ids=["skip-encoder-skip-decoder", "residual-encoder-three-levels"])
def test_songunet_encoder_and_decoder_variants_equal_edm_in_float64(registry, variant: dict) -> None:
    compare("SongUNet", {**SMALL, **variant, "label_dim": 3}, registry, seed=1)


@pytest.mark.parametrize("labels", [{}, LABELS], ids=["unconditional", "labels-augment"])
def test_dhariwalunet_equals_edm_in_float64(registry, labels: dict) -> None:
    compare("DhariwalUNet", {**SMALL_ADM, **labels}, registry)


# ------------------------------------------------------------------------------------------ released networks


RELEASED = [
    ("cifar10-uncond-vp", "SongUNet", {**CIFAR10, **DDPMPP}, 55_733_891),
    ("cifar10-cond-vp", "SongUNet", {**CIFAR10, **DDPMPP, "label_dim": 10}, 55_735_299),
    ("cifar10-uncond-ve", "SongUNet", {**CIFAR10, **NCSNPP}, 56_397_827),
    ("cifar10-cond-ve", "SongUNet", {**CIFAR10, **NCSNPP, "label_dim": 10}, 56_400_643),
    ("ffhq-afhqv2-64-vp", "SongUNet", {**FACES64, **DDPMPP}, 61_805_571),
    ("ffhq-afhqv2-64-ve", "SongUNet", {**FACES64, **NCSNPP}, 62_761_091),
    ("imagenet-64-cond-adm", "DhariwalUNet", IMAGENET64, 295_899_267),
]
"""EDM's pre-trained networks (README table) and their parameter counts, as EDM counts them (augmentation weights
included, frozen buffers not). EDM's paper (Table 7) rounds them to 56M / 62M / 296M (UNVERIFIED: quoted from
memory)."""


@pytest.mark.parametrize(("name", "model_class", "kwargs", "count"), RELEASED, ids=[r[0] for r in RELEASED])
def test_released_architectures_convert_with_edms_parameter_count(registry, name, model_class, kwargs, count):
    """Built on the meta device from the converted options: ctcore's parameters plus the carried augmentation
    weights are EDM's count, and a full-size EDM state (meta weights, real buffers) maps key for key."""
    assert parameter_count(model_class, kwargs) == count
    edm_state = {}
    for key, shape, role in state_layout(model_class, kwargs):
        if role == "filter":
            edm_state[key] = resample_filter(kwargs.get("resample_filter", [1, 1]))
        else:
            edm_state[key] = torch.empty(shape, device="meta")
    convert = songunet_network if model_class == "SongUNet" else dhariwal_network
    recipe, state = convert(kwargs, edm_state, registry=registry)
    shape, classes = edm_network_shape(kwargs)
    cls = registry.get("network", recipe["name"])
    options = cls.Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items() if k != "name"})
    with torch.device("meta"):
        net = cls(options, BuildContext(data_shape=shape, num_classes=classes))
    net.load_state_dict(state, strict=True)
    carried = sum(b.numel() for n, b in net.named_buffers() if n == "augment_weight")
    assert sum(p.numel() for p in net.parameters()) + carried == count


def test_released_options(registry) -> None:
    """The recipe tables of EDM's CIFAR-10 DDPM++ and NCSN++ and its ImageNet ADM: every option, plain values."""
    ddpmpp = songunet_options({**CIFAR10, **DDPMPP, "label_dim": 10}, registry=registry)
    assert ddpmpp == {
        "name": "ncsnpp", "nf": 128, "ch_mult": [2, 2, 2], "num_res_blocks": 4, "attn_resolutions": [16],
        "dropout": 0.13, "resblock_type": "biggan", "fir": True, "fir_kernel": [1.0, 1.0], "resamp_with_conv": True,
        "skip_rescale": True, "progressive": "none", "progressive_input": "none", "progressive_combine": "sum",
        "init_scale": 0.0, "embedding_type": "positional", "fourier_scale": 16.0, "channel_mult_noise": 1,
        "max_positions": 10_000, "endpoint": True, "label_input": "noise", "augment_dim": 9,
        "checkpoint_blocks": False, "time_inputs": 1, "logvar_head": False}
    ncsnpp = songunet_options({**CIFAR10, **NCSNPP}, registry=registry)
    assert {k: v for k, v in ncsnpp.items() if ddpmpp[k] != v} == {
        "fir_kernel": [1.0, 3.0, 3.0, 1.0], "progressive_input": "residual", "embedding_type": "fourier",
        "channel_mult_noise": 2}
    assert dhariwal_options(IMAGENET64, registry=registry) == {
        "name": "adm", "model_channels": 192, "channel_mult": [1, 2, 3, 4], "num_res_blocks": 3,
        "attention_resolutions": [32, 16, 8], "num_head_channels": 64, "resblock_updown": True,
        "use_scale_shift_norm": True, "dropout": 0.1, "dropout_max_resolution": 4096, "attention": "sdpa",
        "num_groups": 32, "noise_embedding": "edm", "augment_dim": 0, "checkpoint_blocks": False, "time_inputs": 1,
        "logvar_head": False}
    assert edm_network_shape(IMAGENET64) == ((3, 64, 64), 1000)
    for table, (c, h, _), classes in [(ddpmpp, (3, 32, 32), 10), (ncsnpp, (3, 32, 32), 0),
                                      (dhariwal_options(IMAGENET64, registry=registry), (3, 64, 64), 1000)]:
        data = {"source": "hdf5", "path": "x.h5", "channels": c, "resolution": h, "num_classes": classes}
        text = tiny_recipe_text("runs/x", network=table, data=data)
        parsed = parse_recipe(text, registry).components["network"]  # a recipe's [network] table as it is
        assert {"name": parsed.name, **{k: _plain(v) for k, v in attrs.asdict(parsed.options).items()}} == table


# ------------------------------------------------------------------------------------------ refused inputs


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def small_state(model_class: str = "SongUNet", kwargs: dict | None = None) -> tuple[dict, dict]:
    kwargs = kwargs or ({**SMALL, **NCSNPP, **LABELS} if model_class == "SongUNet" else {**SMALL_ADM, **LABELS})
    return kwargs, random_edm_state(model_class, kwargs, torch.Generator().manual_seed(0))


def _drop(key: str):
    return lambda s: s.pop(key)


def _set(key: str, value):
    return lambda s: s.__setitem__(key, value)


STATE_DEFECTS = [
    ("missing", "SongUNet", _drop("map_noise.freqs"),
     "EDM SongUNet state: key 'map_noise.freqs' is missing (expected a float tensor of shape (16,))"),
    ("missing-filter", "SongUNet", _drop("enc.8x8_aux_residual.resample_filter"),
     "EDM SongUNet state: key 'enc.8x8_aux_residual.resample_filter' is missing (expected a float tensor of "
     "shape (1, 1, 4, 4))"),
    ("extra", "SongUNet", _set("dec.16x16_aux_up.resample_filter", resample_filter([1, 3, 3, 1])),
     "EDM SongUNet state: key 'dec.16x16_aux_up.resample_filter' is not part of a SongUNet with these arguments"),
    ("shape", "SongUNet", _set("dec.8x8_in0.qkv.weight", torch.zeros(32, 96, 1, 1)),
     "EDM SongUNet state: key 'dec.8x8_in0.qkv.weight' has shape (32, 96, 1, 1), expected (96, 32, 1, 1)"),
    ("tampered-filter", "SongUNet", lambda s: s["enc.8x8_down.conv0.resample_filter"].mul_(1.01),
     "EDM SongUNet state: key 'enc.8x8_down.conv0.resample_filter' is not the resampling filter of "
     "resample_filter=[1.0, 3.0, 3.0, 1.0] (outer product over the squared sum); the file has been altered"),
    ("integer", "SongUNet", _set("map_layer0.weight", torch.zeros(64, 32, dtype=torch.int64)),
     "EDM SongUNet state: key 'map_layer0.weight' has dtype int64, expected a floating-point tensor"),
    ("not-a-tensor", "SongUNet", _set("map_label.bias", [0.0] * 32),
     "EDM SongUNet state: key 'map_label.bias' holds a list, expected a float tensor of shape (32,)"),
    ("transposed-labels", "DhariwalUNet", _set("map_label.weight", torch.zeros(10, 512)),
     "EDM DhariwalUNet state: key 'map_label.weight' has shape (10, 512), expected (512, 10)"),
    ("tampered-adm-filter", "DhariwalUNet", _set("dec.8x8_up.skip.resample_filter", resample_filter([1, 2, 1])),
     "EDM DhariwalUNet state: key 'dec.8x8_up.skip.resample_filter' has shape (1, 1, 3, 3), expected (1, 1, 2, 2)"),
]


@pytest.mark.parametrize(("model_class", "damage", "message"), [d[1:] for d in STATE_DEFECTS],
                         ids=[d[0] for d in STATE_DEFECTS])
def test_a_defective_state_is_one_value_error_naming_the_edm_key(registry, model_class, damage, message) -> None:
    kwargs, state = small_state(model_class)
    damage(state)
    convert = songunet_network if model_class == "SongUNet" else dhariwal_network
    with pytest.raises(ValueError) as info:
        convert(kwargs, state, registry=registry)
    assert str(info.value) == message


ARGUMENT_DEFECTS = [
    ("unknown", "SongUNet", {"use_fp16": True}, "EDM argument use_fp16: not an argument of SongUNet"),
    ("missing", "SongUNet", {"img_resolution": None},
     "EDM argument img_resolution: missing; SongUNet needs img_resolution, in_channels, out_channels"),
    ("learned-variance", "DhariwalUNet", {"out_channels": 6},
     "EDM argument out_channels: ctcore's networks output as many channels as they read (in_channels = 3), got 6 "
     "(e.g. iDDPM's learned variance, which ctcore does not model)"),
    ("embedding-width", "SongUNet", {"channel_mult_emb": 2},
     "EDM argument channel_mult_emb: ctcore's networks have a 4 x model_channels embedding, got 2"),
    ("label-dropout", "SongUNet", {"label_dropout": 0.1},
     "EDM argument label_dropout: ctcore has no class-label dropout, got 0.1"),
    ("asymmetric-filter", "SongUNet", {"resample_filter": [1, 2]},
     "EDM argument resample_filter: ctcore's FIR resampling convolves where EDM correlates, which agree only for "
     "symmetric filters; got [1.0, 2.0]"),
    ("embedding-type", "SongUNet", {"embedding_type": "sinusoidal"},
     "EDM argument embedding_type: expected one of 'fourier', 'positional', got 'sinusoidal'"),
    ("channel-list", "SongUNet", {"channel_mult": 2}, "EDM argument channel_mult: expected a list of integers, got 2"),
    ("dropout", "SongUNet", {"dropout": 1.0},
     "EDM SongUNet arguments give a network ctcore's 'ncsnpp' cannot build: dropout: must be within [0, 0.99] "
     "(kept activations are scaled by 1 / (1 - p); iCT uses 0.3), got 1"),
    ("narrow-adm", "DhariwalUNet", {"model_channels": 64},
     "EDM argument model_channels: EDM's GroupNorm has min(32, C // 4) groups, fewer than 32 below 128 channels, "
     "which ctcore's adm (one num_groups) cannot express; got model_channels * min(channel_mult) = 64"),
    ("adm-heads", "DhariwalUNet", {"model_channels": 160, "attn_resolutions": [8]},
     "EDM argument model_channels: attention at 8x8 has 160 channels, not a multiple of EDM's 64 channels per "
     "head, which ctcore's adm cannot split alike"),
]


@pytest.mark.parametrize(("model_class", "change", "message"), [d[1:] for d in ARGUMENT_DEFECTS],
                         ids=[d[0] for d in ARGUMENT_DEFECTS])
def test_arguments_ctcore_cannot_express_are_one_value_error(registry, model_class, change, message) -> None:
    kwargs, state = small_state(model_class)
    kwargs = {k: v for k, v in {**kwargs, **change}.items() if v is not None}
    convert = songunet_network if model_class == "SongUNet" else dhariwal_network
    with pytest.raises(ValueError) as info:
        convert(kwargs, state, registry=registry)
    assert str(info.value) == message


# ------------------------------------------------------------------------------------------ the new options


def test_positional_features_embed_c_noise_as_given(registry) -> None:
    """ncsnpp's positional features are [sin(c w), cos(c w)] of c_noise itself with w_j = 10000^(-j / (half - 1))
    (EDM's SongUNet): the preconditioning, not the network, decides c_noise."""
    cls = registry.get("network", "ncsnpp")
    net = cls(cls.Options(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), embedding_type="positional",
                          channel_mult_noise=1), BuildContext(data_shape=(3, 8, 8)))
    seen = []
    net.emb0.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    c = torch.tensor([0.5, -1.25])
    net(torch.zeros(2, 3, 8, 8), c, None)
    w = torch.tensor([1.0, 10_000 ** (-1 / 3), 10_000 ** (-2 / 3), 1e-4])
    assert torch.allclose(seen[0], torch.cat([torch.sin(c[:, None] * w), torch.cos(c[:, None] * w)], 1), atol=1e-6)
    assert positional_features(c, 8)[:, 3].tolist() == torch.cos(c * 1e-4 ** 0.75).tolist()  # endpoint False


@pytest.mark.parametrize(("name", "options"), [
    ("ncsnpp", {"nf": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,)}),
    ("adm", {"model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_resolutions": (4,),
             "num_head_channels": 16, "num_groups": 8}),
])
def test_augment_weights_are_a_carried_buffer_that_never_changes_the_output(registry, name, options) -> None:
    """augment_dim adds a state-dict buffer (not a parameter: nothing trains it, DDP sees no unused parameter) and
    changes neither the initialisation nor the output, whatever its values."""
    cls = registry.get("network", name)
    context = BuildContext(data_shape=(3, 8, 8), num_classes=3)
    torch.manual_seed(0)
    plain = cls(cls.Options(**options), context).eval()
    torch.manual_seed(0)
    carried = cls(cls.Options(**options, augment_dim=9), context).eval()
    assert set(carried.state_dict()) - set(plain.state_dict()) == {"augment_weight"}
    assert [n for n, _ in carried.named_parameters()] == [n for n, _ in plain.named_parameters()]
    carried.augment_weight.normal_()
    x, c, labels = torch.randn(2, 3, 8, 8), torch.tensor([-1.0, 1.0]), torch.tensor([0, 2])
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
        carried.load_state_dict({**plain.state_dict(), "augment_weight": carried.augment_weight})
        assert torch.equal(plain(x, c, labels), carried(x, c, labels))
    assert math.prod(carried.augment_weight.shape) == 9 * (16 if name == "ncsnpp" else 32)
