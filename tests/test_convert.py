"""`ctcore convert openai-cm` and `ctcore.load_denoiser`: released-layout state dicts built here (key names and
shapes of the CM repository's UNetModel, written from its structure, no download) convert to checkpoints whose
denoiser equals the released computation evaluated here in the released layout, to float64 precision."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import pytest
import torch
from torch.nn import functional as F
from typer.testing import CliRunner

import ctcore
from ctcore.cli import app
from ctcore.convert import CONFIGS, ReleasedConfig, convert_openai_cm, released_name
from ctcore.sampling import sample_noise, to_uint8

SMALL = ReleasedConfig(
    "small", {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
              "num_head_channels": 16, "resblock_updown": True, "use_scale_shift_norm": True, "dropout": 0.0},
    (3, 16, 16), 10, (1.0,), "a CPU-sized class-conditional ADM")
PLAIN = ReleasedConfig(
    "plain", {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [16],
              "num_head_channels": 32, "resblock_updown": False, "use_scale_shift_norm": False, "dropout": 0.0},
    (3, 16, 16), 0, (1.0,), "unconditional, strided-conv / upsample-conv resampling, no AdaGN")
LSUN256_PARAMS = 526_304_771
"""The released LSUN-256 architecture's parameter count as released_shapes (below, written from the CM
repository's UNetModel and its launch.sh flags) counts it. UNVERIFIED against a downloaded file: the repository
states no count. Cross-check: the same layout with ADM's AdaGN and learned variances (6 output channels) counts
552.8M, the 552M that Dhariwal & Nichol (2021) list for their LSUN models (quoted from memory)."""


# ------------------------------------------------------------------ the released layout, written from its code


def released_shapes(cfg: ReleasedConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the CM repository's UNetModel state dict for a configuration, in its module order."""
    o, (in_ch, size, _) = cfg.network, cfg.data_shape
    mc, mult, nrb = o["model_channels"], o["channel_mult"], o["num_res_blocks"]
    attn_ds = {size // r for r in o["attention_resolutions"]}
    emb, out = 4 * mc, {}

    def param(name: str, weight: tuple[int, ...]) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = weight, (weight[0],)

    def res(p: str, cin: int, cout: int) -> None:
        param(f"{p}.in_layers.0", (cin,))
        param(f"{p}.in_layers.2", (cout, cin, 3, 3))
        param(f"{p}.emb_layers.1", ((2 if o["use_scale_shift_norm"] else 1) * cout, emb))
        param(f"{p}.out_layers.0", (cout,))
        param(f"{p}.out_layers.3", (cout, cout, 3, 3))
        if cin != cout:
            param(f"{p}.skip_connection", (cout, cin, 1, 1))

    def attn(p: str, c: int) -> None:
        param(f"{p}.norm", (c,))
        param(f"{p}.qkv", (3 * c, c, 1, 1))
        param(f"{p}.proj_out", (c, c, 1, 1))

    param("time_embed.0", (emb, mc))
    param("time_embed.2", (emb, emb))
    if cfg.num_classes:
        out["label_emb.weight"] = (cfg.num_classes, emb)
    ch = mult[0] * mc
    param("input_blocks.0.0", (ch, in_ch, 3, 3))
    chans, ds, k = [ch], 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            res(f"input_blocks.{k}.0", ch, m * mc)
            ch = m * mc
            if ds in attn_ds:
                attn(f"input_blocks.{k}.1", ch)
            chans.append(ch)
            k += 1
        if level != len(mult) - 1:
            if o["resblock_updown"]:
                res(f"input_blocks.{k}.0", ch, ch)
            else:
                param(f"input_blocks.{k}.0.op", (ch, ch, 3, 3))
            chans.append(ch)
            k, ds = k + 1, ds * 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    k = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nrb + 1):
            res(f"output_blocks.{k}.0", ch + chans.pop(), m * mc)
            ch, j = m * mc, 1
            if ds in attn_ds:
                attn(f"output_blocks.{k}.1", ch)
                j = 2
            if level and i == nrb:
                if o["resblock_updown"]:
                    res(f"output_blocks.{k}.{j}", ch, ch)
                else:
                    param(f"output_blocks.{k}.{j}.conv", (ch, ch, 3, 3))
                ds //= 2
            k += 1
    param("out.0", (ch,))
    param("out.2", (in_ch, ch, 3, 3))
    return out


def released_state_dict(cfg: ReleasedConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Random weights (no zero layers) under the released names, with GroupNorm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in released_shapes(cfg).items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        w = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)
        if len(shape) == 1 and (".in_layers.0." in name or ".out_layers.0." in name or "norm" in name
                                or name.startswith("out.0")) and name.endswith("weight"):
            w = 1 + 0.1 * w
        sd[name] = w.to(dtype)
    return sd


def released_forward(sd: dict, cfg: ReleasedConfig, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
    """The released UNetModel's forward, evaluated functionally from its state dict (float64 except the
    float32 timestep features, as the CM code computes them)."""
    o, size = cfg.network, cfg.data_shape[1]
    mc, mult, nrb = o["model_channels"], o["channel_mult"], o["num_res_blocks"]
    attn_ds = {size // r for r in o["attention_resolutions"]}
    p = {k: v.double() for k, v in sd.items()}
    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()
    emb = F.linear(F.silu(F.linear(emb, p["time_embed.0.weight"], p["time_embed.0.bias"])),
                   p["time_embed.2.weight"], p["time_embed.2.bias"])
    if y is not None:
        emb = emb + p["label_emb.weight"][y]

    def gn(h, n):
        return F.group_norm(h, 32, p[f"{n}.weight"], p[f"{n}.bias"])

    def conv(h, n, pad=1):
        return F.conv2d(h, p[f"{n}.weight"], p[f"{n}.bias"], padding=pad)

    def res(h, n, resample=None):
        a = F.silu(gn(h, f"{n}.in_layers.0"))
        if resample == "down":
            a, h = F.avg_pool2d(a, 2), F.avg_pool2d(h, 2)
        elif resample == "up":
            a, h = F.interpolate(a, scale_factor=2, mode="nearest"), F.interpolate(h, scale_factor=2, mode="nearest")
        a = conv(a, f"{n}.in_layers.2")
        e = F.linear(F.silu(emb), p[f"{n}.emb_layers.1.weight"], p[f"{n}.emb_layers.1.bias"])[:, :, None, None]
        if o["use_scale_shift_norm"]:
            scale, shift = e.chunk(2, dim=1)
            a = gn(a, f"{n}.out_layers.0") * (1 + scale) + shift
        else:
            a = gn(a + e, f"{n}.out_layers.0")
        a = conv(F.silu(a), f"{n}.out_layers.3")
        skip = conv(h, f"{n}.skip_connection", 0) if f"{n}.skip_connection.weight" in p else h
        return skip + a

    def attn(h, n):  # the flash path: qkv channels "(three heads d)"
        b, c, hh, ww = h.shape
        d = o["num_head_channels"]
        q, k, v = conv(gn(h, f"{n}.norm"), f"{n}.qkv", 0).reshape(b, 3, c // d, d, hh * ww).unbind(1)
        w = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d), dim=-1)
        a = torch.einsum("bhts,bhds->bhdt", w, v).reshape(b, c, hh, ww)
        return h + conv(a, f"{n}.proj_out", 0)

    h = conv(x, "input_blocks.0.0")
    hs, ds, k = [h], 1, 1
    for level, _ in enumerate(mult):
        for _ in range(nrb):
            h = res(h, f"input_blocks.{k}.0")
            if ds in attn_ds:
                h = attn(h, f"input_blocks.{k}.1")
            hs.append(h)
            k += 1
        if level != len(mult) - 1:
            n = f"input_blocks.{k}.0"
            h = res(h, n, "down") if o["resblock_updown"] else F.conv2d(h, p[f"{n}.op.weight"], p[f"{n}.op.bias"],
                                                                          stride=2, padding=1)
            hs.append(h)
            k, ds = k + 1, ds * 2
    h = res(attn(res(h, "middle_block.0"), "middle_block.1"), "middle_block.2")
    k = 0
    for level in reversed(range(len(mult))):
        for i in range(nrb + 1):
            h = res(torch.cat([h, hs.pop()], dim=1), f"output_blocks.{k}.0")
            j = 1
            if ds in attn_ds:
                h, j = attn(h, f"output_blocks.{k}.1"), 2
            if level and i == nrb:
                n = f"output_blocks.{k}.{j}"
                h = res(h, n, "up") if o["resblock_updown"] else conv(
                    F.interpolate(h, scale_factor=2, mode="nearest"), f"{n}.conv")
                ds //= 2
            k += 1
    return conv(F.silu(gn(h, "out.0")), "out.2")


def released_denoise(sd, cfg, x, sigma, y):
    """karras_diffusion.KarrasDenoiser.denoise of the CM repository (distillation scalings), sigma in float32."""
    sigma_min, sd_ = 0.002, 0.5
    c_skip = sd_**2 / ((sigma - sigma_min) ** 2 + sd_**2)
    c_out = (sigma - sigma_min) * sd_ / (sigma**2 + sd_**2) ** 0.5
    c_in = 1 / (sigma**2 + sd_**2) ** 0.5
    rescaled_t = 1000 * 0.25 * torch.log(sigma + 1e-44)
    def col(v):
        return v.double().reshape(-1, 1, 1, 1)

    out = released_forward(sd, cfg, col(c_in) * x, rescaled_t, y)
    return col(c_out) * out + col(c_skip) * x


# ------------------------------------------------------------------ tests


def _inputs(cfg: ReleasedConfig, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *cfg.data_shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.7, 80.0][:batch], dtype=torch.float32)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    return x, sigma, y


@pytest.mark.parametrize("cfg", [SMALL, PLAIN], ids=["adagn-updown-classes", "plain-unconditional"])
def test_converted_denoiser_equals_the_released_computation_in_float64(cfg, registry, tmp_path) -> None:
    sd = released_state_dict(cfg)
    src = tmp_path / "released.pt"
    torch.save(sd, src)
    result = convert_openai_cm(src, tmp_path / "conv.pt", registry, configs={cfg.name: cfg})
    assert result["config"] == cfg.name and result["dtypes"] == ["float32"]
    assert result["parameters"] == sum(math.prod(s) for s in released_shapes(cfg).values())
    f = ctcore.load_denoiser(tmp_path / "conv.pt")
    f.network.double()
    x, sigma, y = _inputs(cfg)
    ours = f(x, sigma, y)
    theirs = released_denoise(sd, cfg, x, sigma, y)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12), (ours - theirs).abs().max()
    assert torch.equal(ours[0], x[0])  # f(x, sigma_min) = x exactly
    assert (ours - x).abs()[1:].min() > 0  # and the network does contribute elsewhere


def test_checkpoint_holds_the_weights_recipe_and_provenance(registry, tmp_path) -> None:
    sd = released_state_dict(SMALL)
    src, out = tmp_path / "cd_small.pt", tmp_path / "conv.pt"
    torch.save(sd, src)
    convert_openai_cm(src, out, registry, configs={"small": SMALL})
    state = torch.load(out, weights_only=True)
    from ctcore.checkpoints import validate_checkpoint
    from ctcore.sampling import file_digest

    recipe = validate_checkpoint(state, out, registry, use="eval-ema")
    validate_checkpoint(state, out, registry, use="student")
    net = recipe.components["network"]
    assert net.name == "adm" and net.options.model_channels == 32 and net.options.channel_mult == (1, 2)
    assert net.options.use_scale_shift_norm and net.options.resblock_updown and net.options.num_head_channels == 16
    c = recipe.consistency
    assert (c.sigma_min, c.sigma_max, c.sigma_data) == (0.002, 80.0, 0.5)
    assert state["step"] == 0 and "optimizer" not in state
    for key in ("eval_ema", "student", "teacher"):
        assert all(torch.equal(state[key][k], sd[released_name(k)]) for k in state[key])
    assert state["provenance"]["converted_from"] == {"format": "openai-cm", "file": str(src),
                                                     "sha256": file_digest(src), "config": "small",
                                                     "dtypes": ["float32"]}
    assert state["provenance"]["data_shape"] == [3, 16, 16] and state["provenance"]["num_classes"] == 10


def test_fp16_source_converts_to_fp32(registry, tmp_path) -> None:
    sd = released_state_dict(SMALL, torch.float16)
    torch.save(sd, tmp_path / "half.pt")
    result = convert_openai_cm(tmp_path / "half.pt", tmp_path / "conv.pt", registry, configs={"small": SMALL})
    assert result["dtypes"] == ["float16"]
    state = torch.load(tmp_path / "conv.pt", weights_only=True)
    assert all(v.dtype == torch.float32 and torch.equal(v, sd[released_name(k)].float())
               for k, v in state["eval_ema"].items())


def test_configuration_is_inferred_from_shapes(registry, tmp_path) -> None:
    torch.save(released_state_dict(PLAIN), tmp_path / "plain.pt")
    result = convert_openai_cm(tmp_path / "plain.pt", tmp_path / "conv.pt", registry,
                               configs={"small": SMALL, "plain": PLAIN})
    assert result["config"] == "plain"


@pytest.fixture
def small_imagenet64(monkeypatch):
    """The CLI's imagenet64 configuration replaced by SMALL (the real one is 296M parameters)."""
    monkeypatch.setitem(CONFIGS, "imagenet64", attrs_evolve(SMALL, name="imagenet64"))
    monkeypatch.delitem(CONFIGS, "lsun256")


def attrs_evolve(cfg, **changes):
    import attrs

    return attrs.evolve(cfg, **changes)


def test_a_mismatching_state_dict_is_refused_naming_the_key(small_imagenet64, tmp_path) -> None:
    sd = released_state_dict(SMALL)
    sd["input_blocks.1.0.in_layers.2.weight"] = torch.zeros(32, 32, 1, 1)
    torch.save(sd, tmp_path / "bad.pt")
    out = tmp_path / "conv.pt"
    r = CliRunner().invoke(app, ["convert", "openai-cm", str(tmp_path / "bad.pt"), str(out)])
    assert r.exit_code == 1
    assert r.output == (
        f"error: {str(tmp_path / 'bad.pt')!r} does not match any released configuration (imagenet64; closest: "
        "imagenet64): key 'input_blocks.1.0.in_layers.2.weight' has shape (32, 32, 1, 1), the model expects "
        "(32, 32, 3, 3); give a released OpenAI consistency-model file of that architecture\n")
    del sd["input_blocks.1.0.in_layers.2.weight"]
    torch.save(sd, tmp_path / "bad.pt")
    r = CliRunner().invoke(app, ["convert", "openai-cm", str(tmp_path / "bad.pt"), str(out), "--config",
                                 "imagenet64"])
    assert r.exit_code == 1 and "key 'input_blocks.1.0.in_layers.2.weight' is missing; " in r.output
    assert r.output.count("\n") == 1 and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]  # no temporary file left either


def test_cli_converts_never_overwrites_and_sample_and_load_denoiser_agree(small_imagenet64, tmp_path) -> None:
    src, out = tmp_path / "cd.pt", tmp_path / "conv.pt"
    torch.save(released_state_dict(SMALL), src)
    runner = CliRunner()
    r = runner.invoke(app, ["convert", "openai-cm", str(src), str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {out} (imagenet64, ") and " parameters from float32 " in r.output
    before = out.read_bytes()
    r = runner.invoke(app, ["convert", "openai-cm", str(src), str(out)])
    assert r.exit_code == 2
    assert r.output == f"error: {str(out)!r} exists; pass --overwrite to replace it, or choose another OUT.pt\n"
    assert out.read_bytes() == before
    r = runner.invoke(app, ["convert", "openai-cm", str(src), str(out), "--overwrite", "--json"])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)
    assert (printed["source"], printed["out"], printed["config"]) == (str(src), str(out), "imagenet64")
    assert sorted(printed) == ["config", "dtypes", "out", "parameters", "sha256", "source", "tensors"]
    assert_one_step_samples_match(out, tmp_path / "s.h5")


def assert_one_step_samples_match(checkpoint: Path, store: Path, weights: str = "eval-ema") -> None:
    """`ctcore sample --steps 1` images equal load_denoiser's f(sigma_max z, sigma_max), clipped, for its noise."""
    r = CliRunner().invoke(app, ["sample", str(checkpoint), "-n", "3", "--steps", "1", "--seed", "5", "-o",
                                 str(store), "--weights", weights])
    assert r.exit_code == 0, r.output
    with h5py.File(store) as h:
        images, labels = torch.from_numpy(h["images"][...]), torch.from_numpy(h["labels"][...])
    f = ctcore.load_denoiser(checkpoint, weights=weights)
    prov = torch.load(checkpoint, weights_only=True)["provenance"] if checkpoint.is_file() else None
    shape, classes = (prov["data_shape"], prov["num_classes"]) if prov else (list(images.shape[1:]), 0)
    draws = [sample_noise(s, shape, 1, classes) for s in (5, 6, 7)]
    z = torch.stack([d[0][0] for d in draws])
    assert labels.tolist() == [d[1] for d in draws]
    mine = to_uint8(f(80.0 * z, 80.0, labels.long() if classes else None).clamp(-1, 1))
    assert torch.equal(mine, images)
    assert len(set(images.flatten().tolist())) > 2  # not a constant image


def test_load_denoiser_on_a_trained_run(tmp_path) -> None:
    from helpers import write_tiny_recipe

    from ctcore.checkpoints import list_checkpoints, load_checkpoint

    recipe = write_tiny_recipe(tmp_path / "tiny.toml", tmp_path / "run")
    r = CliRunner().invoke(app, ["run", str(recipe)])
    assert r.exit_code == 0, r.output
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    assert_one_step_samples_match(ckpt, tmp_path / "s.h5", weights="student")
    f = ctcore.load_denoiser(tmp_path / "run", weights="student")  # a run directory: its latest checkpoint
    state = load_checkpoint(ckpt)
    assert all(torch.equal(v, state["student"][k]) for k, v in f.network.state_dict().items())
    x = torch.randn(2, *state["provenance"]["data_shape"])
    assert torch.equal(f(x, 0.002), x)


def test_released_noise_conditioning_is_ctcores() -> None:
    """ln(sigma + 1e-44) is ln(sigma) bit for bit at every sigma a CM samples at, so `adm`'s positional
    c_noise = 250 ln(sigma) reproduces the released one without an option."""
    from ctcore.consistency import c_noise

    for dtype in (torch.float32, torch.float64):
        sigma = torch.logspace(math.log10(0.002), math.log10(80.0), 1001, dtype=dtype)
        assert torch.equal(c_noise(sigma, "positional"), 1000 * 0.25 * torch.log(sigma + 1e-44))


def test_released_configurations(registry) -> None:
    """ImageNet-64 has the 295,899,267 parameters of ctcore's adm at its defaults (and of the released model);
    LSUN-256's count, built on the meta device, equals the released layout's (LSUN256_PARAMS)."""
    from ctcore.components import BuildContext
    from ctcore.convert import _expected

    for cfg, count in ((CONFIGS["imagenet64"], 295_899_267), (CONFIGS["lsun256"], LSUN256_PARAMS)):
        want, _, recipe = _expected(cfg, registry)
        assert want == {k: torch.Size(s) for k, s in released_shapes(cfg).items()}
        spec = recipe.components["network"]
        with torch.device("meta"):
            net = registry.get("network", "adm")(spec.options, BuildContext(cfg.data_shape, cfg.num_classes))
        assert sum(p.numel() for p in net.parameters()) == count
    adm_lsun = attrs_evolve(CONFIGS["lsun256"], network={**CONFIGS["lsun256"].network, "use_scale_shift_norm": True})
    shapes = released_shapes(adm_lsun)
    learned_variances = 3 * math.prod(shapes["out.2.weight"][1:]) + 3
    assert round((sum(math.prod(v) for v in shapes.values()) + learned_variances) / 1e6, 1) == 552.8
    assert CONFIGS["imagenet64"].sigma_mid == (1.382368,) and CONFIGS["lsun256"].sigma_mid == (4.365562,)


def test_eval_and_init_from_accept_a_converted_checkpoint(registry, tmp_path, monkeypatch) -> None:
    """FID of the converted model (a stand-in Inception with random weights) and a warm start from it."""
    import json

    import numpy as np
    from test_fid import RecordingDistance, randomised_inception

    import ctcore.fid
    from ctcore.checkpoints import read_warm_start
    from ctcore.fid import save_statistics

    sd = released_state_dict(SMALL)
    torch.save(sd, tmp_path / "cd.pt")
    out = tmp_path / "conv.pt"
    convert_openai_cm(tmp_path / "cd.pt", out, registry, configs={"small": SMALL})
    weights = tmp_path / "w.pth"
    torch.save(randomised_inception().state_dict(), weights)
    ref = save_statistics(tmp_path / "ref.npz", {"mu": np.zeros(2048), "sigma": np.eye(2048),
                                                 "fid_protocol": "tensorflow"})
    monkeypatch.setattr(ctcore.fid, "frechet_distance", RecordingDistance())
    r = CliRunner().invoke(app, ["eval", str(out), "--ref", str(ref), "--inception", str(weights), "-n", "2",
                                 "--steps", "2", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert (result["step"], result["num_samples"], result["sigmas"]) == (0, 2, [80.0, SMALL.sigma_mid[0]])
    warm = read_warm_start(out, "eval-ema", registry)
    assert warm.step == 0 and sorted(released_name(k) for k in warm.state_dict) == sorted(sd)


def _bad_source(case: str, path: Path) -> str:
    """Write a bad SOURCE for `case`; return the essential part of its one-line refusal."""
    sd = released_state_dict(SMALL)
    if case == "missing":
        return f"{str(path)!r} not found; give a released OpenAI consistency-model file"
    if case == "garbage":
        path.write_bytes(b"not a pickle at all")
        return f"{str(path)!r} is not a loadable PyTorch state dict (UnpicklingError: "
    if case == "a-list":
        torch.save([torch.zeros(1)], path)
        return f"{str(path)!r} holds a list, not a state dict (names -> tensors); give a released"
    if case == "ctcore-checkpoint":
        torch.save({"format": "ctcore-checkpoint-1"}, path)
        return f"{str(path)!r} is already a ctcore checkpoint: use it as it is (ctcore sample, eval, run --init-from)"
    if case == "integer-tensor":
        sd["out.0.bias"] = sd["out.0.bias"].long()
        torch.save(sd, path)
        return "key 'out.0.bias' has dtype torch.int64, not a floating-point dtype"
    if case == "extra-key":
        sd["extra.weight"] = torch.zeros(1)
        torch.save(sd, path)
        return "key 'extra.weight' is not in the model"
    sd["out.2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, path)
    return f"{str(path)!r} holds non-finite values in key 'out.2.weight'; give an undamaged copy of the file"


@pytest.mark.parametrize("case", ["missing", "garbage", "a-list", "ctcore-checkpoint", "integer-tensor", "extra-key",
                                  "non-finite"])
def test_a_bad_source_is_one_line_exit_1_and_nothing_written(case, small_imagenet64, tmp_path) -> None:
    src, out = tmp_path / "src.pt", tmp_path / "out" / "conv.pt"
    expected = _bad_source(case, src)
    before = sorted(tmp_path.rglob("*"))
    r = CliRunner().invoke(app, ["convert", "openai-cm", str(src), str(out)])
    assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert expected in r.output
    assert sorted(tmp_path.rglob("*")) == before
