"""`ctcore convert edm`: EDM-shaped network pickles written here (tests/edm_pickles.py, no EDM code) convert to
ctcore diffusion checkpoints whose denoiser D(x, sigma) equals EDM's preconditioned network, computed here by an
independent rendition of EDM's code (tests/edm_reference.py) and EDM's preconditioning formulas; bad files are one
line, exit 1, and nothing is written."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import attrs
import pytest
import torch
from typer.testing import CliRunner

from ctcore.cli import app
from ctcore.convert import load_denoiser
from tests.edm_pickles import Node, edm_extra, network_node, write_edm_pickle
from tests.edm_reference import edm_forward, random_edm_state

SONG = {"img_resolution": 16, "in_channels": 3, "out_channels": 3, "model_channels": 16, "channel_mult": [1, 2],
        "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.13}
DDPMPP = {**SONG, "embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard",
          "channel_mult_noise": 1, "resample_filter": [1, 1], "augment_dim": 9}
NCSNPP = {**SONG, "embedding_type": "fourier", "encoder_type": "residual", "decoder_type": "standard",
          "channel_mult_noise": 2, "resample_filter": [1, 3, 3, 1], "label_dim": 10}
ADM = {"img_resolution": 8, "in_channels": 3, "out_channels": 3, "model_channels": 128, "channel_mult": [1, 1],
       "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.1, "label_dim": 10}

VP_SIGMA_MIN_32 = float(torch.tensor(0.5 * 18.0 * 1e-4**2 + 0.2 * 1e-4, dtype=torch.float32).exp().sub(1).sqrt())
VP_SIGMA_MAX_32 = float(torch.tensor(0.5 * 18.0 + 0.2, dtype=torch.float32).exp().sub(1).sqrt())

CASES = {
    # name: (precond class, its attributes, model class, model kwargs)
    "edm-ddpmpp": ("EDMPrecond", {"sigma_min": 0.0, "sigma_max": math.inf, "sigma_data": 0.6}, "SongUNet", DDPMPP),
    "vp-ddpmpp": ("VPPrecond", {"beta_d": 18.0, "beta_min": 0.2, "M": 500, "epsilon_t": 1e-4,
                                # VPPrecond's sigma(epsilon_t) and sigma(1) as it stores them: in float32
                                "sigma_min": VP_SIGMA_MIN_32, "sigma_max": VP_SIGMA_MAX_32}, "SongUNet", DDPMPP),
    "ve-ncsnpp": ("VEPrecond", {"sigma_min": 0.05, "sigma_max": 50.0}, "SongUNet", NCSNPP),
    "edm-adm": ("EDMPrecond", {"sigma_min": 0.0, "sigma_max": math.inf, "sigma_data": 0.5}, "DhariwalUNet", ADM),
}


def _pickle(tmp_path: Path, case: str, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    precond, attrs, model, kwargs = CASES[case]
    state = random_edm_state(model, kwargs, torch.Generator().manual_seed(seed))
    common = {"img_resolution": kwargs["img_resolution"], "img_channels": 3, "label_dim": kwargs.get("label_dim", 0),
              "use_fp16": False}
    node = network_node(precond, {**common, "model_type": model}, model, kwargs, state, {**common, **attrs})
    return write_edm_pickle(tmp_path / f"{case}.pkl", node, edm_extra()), state


def _edm_denoiser(case: str, state: dict[str, torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
                  labels: torch.Tensor | None) -> torch.Tensor:
    """EDM's D(x, sigma) of the case, in float64: its preconditioning's formulas (training/networks.py) around
    the reference network."""
    precond, a, model, kwargs = CASES[case]
    s = sigma.to(torch.float64).reshape(-1, 1, 1, 1)
    if precond == "EDMPrecond":
        sd = a["sigma_data"]
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sd**2 + s**2).sqrt(), s.log() / 4
    elif precond == "VPPrecond":
        t = ((a["beta_min"] ** 2 + 2 * a["beta_d"] * (1 + s**2).log()).sqrt() - a["beta_min"]) / a["beta_d"]
        c_skip, c_out, c_in, c_noise = 1.0, -s, 1 / (s**2 + 1).sqrt(), (a["M"] - 1) * t
    else:
        c_skip, c_out, c_in, c_noise = 1.0, s, 1.0, (0.5 * s).log()
    one_hot = None if labels is None else torch.nn.functional.one_hot(labels, kwargs["label_dim"]).to(torch.float64)
    p64 = {k: v.to(torch.float64) for k, v in state.items()}
    f = edm_forward(model, kwargs, p64, c_in * x.to(torch.float64), c_noise.flatten(), one_hot)
    return c_skip * x.to(torch.float64) + c_out * f


@pytest.mark.parametrize("case", list(CASES))
def test_converted_denoiser_is_edms_preconditioned_network(case, tmp_path) -> None:
    source, state = _pickle(tmp_path, case)
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(app, ["convert", "edm", str(source), str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    precond, attrs, model, kwargs = CASES[case]
    assert (report["preconditioning"], report["network"]) == (precond, model)
    assert report["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    f = load_denoiser(out)
    assert f.model == "diffusion"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, kwargs["img_resolution"], kwargs["img_resolution"], generator=g)
    labels = torch.tensor([0, 3, 7, 9]) if kwargs.get("label_dim") else None
    sigma = torch.tensor([0.002, 0.3, 5.0, 80.0])
    ours = f(x * sigma.reshape(-1, 1, 1, 1), sigma, labels).to(torch.float64)
    theirs = _edm_denoiser(case, state, x * sigma.reshape(-1, 1, 1, 1), sigma, labels)
    scale = theirs.abs().amax(dim=(1, 2, 3))
    err = ((ours - theirs).abs().amax(dim=(1, 2, 3)) / scale).max().item()
    assert err < 1e-4, err  # the float32 network and preconditioning against the float64 rendition


def test_checkpoint_records_recipe_sampling_range_and_provenance(tmp_path) -> None:
    source, _ = _pickle(tmp_path, "ve-ncsnpp")
    out = tmp_path / "ve.pt"
    result = CliRunner().invoke(app, ["convert", "edm", str(source), str(out)])
    assert result.exit_code == 0, result.output
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert result.stdout.replace("\n", "") == (
        f"wrote {out} (VEPrecond(SongUNet) as ncsnpp, {_count(out):,} parameters from float32 {source}, sha256 "
        f"{digest[:12]}...)")
    state = torch.load(out, weights_only=True)
    assert state["step"] == 0 and "optimizer" not in state
    recipe = state["recipe"]
    assert 'preconditioning = "ve"' in recipe and "ve_sigma_min = 0.05" in recipe and "ve_sigma_max = 50.0" in recipe
    assert "sigma_min = 0.05\n" in recipe and "sigma_max = 50.0\n" in recipe  # generate.py's clamp of (0.05, 50)
    assert 'label_input = "noise"' in recipe and "num_classes = 10" in recipe and "fourier_scale" in recipe
    conv = state["provenance"]["converted_from"]
    src = conv.pop("module_sources")
    assert conv == {"format": "edm-pickle", "file": str(source), "sha256": digest, "preconditioning": "VEPrecond",
                    "network": "SongUNet", "dtypes": ["float32"], "use_fp16": False}
    assert set(src) >= {"VEPrecond", "SongUNet"} and all(len(h) == 64 for h in src.values())


def _count(path: Path) -> int:
    f = load_denoiser(path)
    return sum(p.numel() for p in f.network.parameters())


def test_sample_and_edm_sampling_range_of_a_converted_vp_model(tmp_path) -> None:
    source, _ = _pickle(tmp_path, "vp-ddpmpp")
    out = tmp_path / "vp.pt"
    assert CliRunner().invoke(app, ["convert", "edm", str(source), str(out)]).exit_code == 0
    recipe = torch.load(out, weights_only=True)["recipe"]
    # generate.py samples from the wrapper's own (float32) sigma(epsilon_t), above 0.002, to 80
    float64 = math.sqrt(math.expm1(0.5 * 18.0 * 1e-4**2 + 0.2 * 1e-4))
    assert float64 != VP_SIGMA_MIN_32 > 0.002
    assert f"sigma_min = {VP_SIGMA_MIN_32!r}\n" in recipe and "sigma_max = 80.0\n" in recipe
    assert "vp_steps = 500" in recipe
    result = CliRunner().invoke(app, ["sample", str(out), "-n", "2", "--steps", "3", "--out", str(tmp_path / "s.h5"),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.h5").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0


def test_init_from_a_converted_model_warm_starts_a_matching_network(tmp_path) -> None:
    """A consistency recipe whose [network] is the converted one starts from its weights (as ECT does)."""
    from ctcore.checkpoints import read_warm_start
    from ctcore.registry import load_registry

    source, _ = _pickle(tmp_path, "edm-ddpmpp")
    out = tmp_path / "m.pt"
    assert CliRunner().invoke(app, ["convert", "edm", str(source), str(out)]).exit_code == 0
    warm = read_warm_start(out, "eval-ema", load_registry())
    f = load_denoiser(out)
    assert all(torch.equal(warm.state_dict[k], v) for k, v in f.network.state_dict().items())


def _unsupported(tmp_path: Path) -> Path:
    _, _, model, kwargs = CASES["edm-ddpmpp"]
    state = random_edm_state(model, kwargs, torch.Generator().manual_seed(0))
    node = network_node("iDDPMPrecond", {}, model, kwargs, state, {})
    return write_edm_pickle(tmp_path / "iddpm.pkl", node)


def _missing_key(tmp_path: Path) -> Path:
    _, _, model, kwargs = CASES["edm-ddpmpp"]
    state = random_edm_state(model, kwargs, torch.Generator().manual_seed(0))
    del state["map_layer1.bias"]
    node = network_node("EDMPrecond", {}, model, kwargs, state, {"sigma_data": 0.5})
    return write_edm_pickle(tmp_path / "missing.pkl", node)


def _other_network(tmp_path: Path) -> Path:
    node = Node("EDMPrecond", attrs={"sigma_data": 0.5}, children={"model": Node("UNet2DModel", init_kwargs={})})
    return write_edm_pickle(tmp_path / "other.pkl", node)


def _code(tmp_path: Path) -> Path:
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    node = Node("EDMPrecond", attrs={"sigma_data": Payload()})
    return write_edm_pickle(tmp_path / "code.pkl", node)


def _nan(tmp_path: Path) -> Path:
    _, _, model, kwargs = CASES["edm-ddpmpp"]
    state = random_edm_state(model, kwargs, torch.Generator().manual_seed(0))
    state["map_layer0.weight"][0, 0] = float("nan")
    node = network_node("EDMPrecond", {}, model, kwargs, state, {"sigma_data": 0.5})
    return write_edm_pickle(tmp_path / "nan.pkl", node)


def _absurd_constant(tmp_path: Path) -> Path:
    _, _, model, kwargs = CASES["vp-ddpmpp"]
    state = random_edm_state(model, kwargs, torch.Generator().manual_seed(0))
    node = network_node("VPPrecond", {}, model, kwargs, state, {"beta_d": 1e9})
    return write_edm_pickle(tmp_path / "absurd.pkl", node)


FIX = "give a network pickle from NVlabs/edm (network-snapshot-*.pkl or a released edm-*.pkl)"
BAD = {
    "iddpm": (_unsupported, "{src}: its network is a iDDPMPrecond, which ctcore does not convert (it converts "
              "EDMPrecond, VPPrecond, VEPrecond: EDM's config-F and VP / VE models; iDDPMPrecond's learned variance "
              "has no ctcore equivalent); " + FIX),
    "missing-key": (_missing_key, "{src}: EDM SongUNet state: key 'map_layer1.bias' is missing (expected a float "
                    "tensor of shape (64,)); " + FIX),
    "other-network": (_other_network, "{src}: the network inside EDMPrecond is a UNet2DModel; ctcore converts "
                      "SongUNet (DDPM++, NCSN++) and DhariwalUNet (ADM); " + FIX),
    "code": (_code, "{src} asks for posix.system, which is not part of an EDM network pickle and could run code "
             "(nothing was run); " + FIX),
    "absurd-constant": (_absurd_constant, "{src}: its recipe: objective.beta_d: must be within [0.01, 100] (VP's "
                        "sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1); EDM 19.9), got 1e+09; " + FIX),
    "nan": (_nan, "{src} holds non-finite values in the tensor ctcore names emb0.weight; give an undamaged copy of "
            "the file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_pickle_is_one_line_exit_1_and_nothing_written(case, tmp_path) -> None:
    make, line = BAD[case]
    source = make(tmp_path)
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(app, ["convert", "edm", str(source), str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.strip() == "error: " + line.format(src=repr(str(source))), result.stderr
    assert not out.exists() and not (tmp_path / "ran").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name])


def test_never_overwrites_and_never_writes_over_its_source(tmp_path) -> None:
    source, _ = _pickle(tmp_path, "edm-ddpmpp")
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep")
    result = CliRunner().invoke(app, ["convert", "edm", str(source), str(out)])
    assert result.exit_code == 2 and out.read_bytes() == b"keep"
    assert result.stderr.strip() == (f"error: {str(out)!r} exists; pass --overwrite to replace it, or choose "
                                     "another OUT.pt")
    assert CliRunner().invoke(app, ["convert", "edm", str(source), str(out), "--overwrite"]).exit_code == 0
    before = source.read_bytes()
    result = CliRunner().invoke(app, ["convert", "edm", str(source), str(source), "--overwrite"])
    assert result.exit_code == 2 and source.read_bytes() == before


EDM_CIFAR10 = {"img_resolution": 32, "in_channels": 3, "out_channels": 3, "label_dim": 0, "augment_dim": 9,
               "model_channels": 128, "channel_mult": [2, 2, 2], "dropout": 0.13}
"""EDM's released unconditional CIFAR-10 networks' arguments (NVlabs/edm train.py, --cond=0, augment 0.12)."""


@pytest.mark.parametrize(("recipe", "arch", "dropout"), [("ect_cifar10.toml", "ddpmpp", 0.2),
                                                         ("cd_cifar10.toml", "ncsnpp", 0.0)])
def test_ect_and_cd_recipes_hold_the_released_network_they_start_from(recipe, arch, dropout) -> None:
    """ECT tunes edm-cifar10-32x32-uncond-vp (DDPM++), CD distils edm-cifar10-32x32-uncond-ve (NCSN++): each recipe's
    [network] is exactly what `convert edm` makes of that network, dropout aside (it has no weights)."""
    from ctcore.convert_edm import songunet_options
    from ctcore.recipe import read_recipe
    from ctcore.registry import load_registry

    presets = {"ddpmpp": {"embedding_type": "positional", "encoder_type": "standard", "channel_mult_noise": 1,
                          "resample_filter": [1, 1]},
               "ncsnpp": {"embedding_type": "fourier", "encoder_type": "residual", "channel_mult_noise": 2,
                          "resample_filter": [1, 3, 3, 1]}}
    converted = songunet_options({**EDM_CIFAR10, **presets[arch], "decoder_type": "standard"})
    spec = read_recipe(Path(__file__).resolve().parents[1] / "recipes" / recipe, load_registry()).components["network"]
    ours = {"name": spec.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in
                                  ((f, getattr(spec.options, f)) for f in converted if f != "name")}}
    assert ours == {**converted, "dropout": dropout}


@pytest.mark.parametrize("mode", ["cd", "ect"])
def test_cd_and_ect_start_from_a_converted_model(mode, tmp_path) -> None:
    """A converted EDM model is a `[teacher] cd` checkpoint and a run.init_from source: a consistency run with its
    [network] starts from its weights (step 0 equals them) and trains."""
    from helpers import write_tiny_recipe

    from ctcore.checkpoints import list_checkpoints, load_checkpoint

    source, _ = _pickle(tmp_path, "edm-ddpmpp")
    model = tmp_path / "edm.pt"
    assert CliRunner().invoke(app, ["convert", "edm", str(source), str(model)]).exit_code == 0
    f = load_denoiser(model)
    network = attrs.asdict(f.network.options)  # the converted recipe's [network] (tuples as lists)
    overrides = {"data": {"resolution": 16, "channels": 3, "num_images": 16},
                 "network": {"name": "ncsnpp", **network, "dropout": 0.0},
                 "run": {"init_from": str(model)},
                 "training": {"total_steps": 2, "batch_size": 2, "checkpoint_every": 2, "sample_every": 100},
                 "evaluation": {"distance": "none"}}
    if mode == "cd":
        overrides |= {"teacher": {"name": "cd", "checkpoint": str(model), "solver": "euler"},
                      "noise_schedule": {"name": "uniform"}, "curriculum": {"name": "constant", "num_scales": 4}}
    else:
        overrides |= {"objective": {"name": "consistency", "parameterization": "ect"},
                      "noise_schedule": {"name": "ect"}, "curriculum": None, "metric": {"name": "l2-norm"}}
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", **overrides)
    result = CliRunner().invoke(app, ["run", str(recipe), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"initialised from {model}" in result.stdout
    state = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert state["step"] == 2 and state["provenance"]["init_from"]["checkpoint"] == str(model)
    moved = [k for k, v in f.network.state_dict().items() if not torch.equal(state["student"][k], v)]
    assert moved  # it trained from the converted weights
