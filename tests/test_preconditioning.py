"""EDM's VP and VE preconditioning as options of the edm objective, against formulas written here from NVlabs/edm
(training/networks.py VPPrecond, VEPrecond, EDMPrecond; training/loss.py VPLoss, VELoss; generate.py edm_sampler):
the scalings and c_noise, sigma(t) and its inverse, the sigma range, the losses for fixed generators, Heun sampling
of a checkpoint against an edm_sampler written here, the recipe's refusals, and a cd teacher distilling a vp
checkpoint with vp."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from ctcore_objectives import (
    Edm,
    edm_denoise,
    edm_sigma_range,
    preconditioning_scalings,
    vp_sigma,
    vp_sigma_inv,
)
from helpers import DIFFUSION, one_line_error, write_tiny_recipe
from torch import nn
from typer.testing import CliRunner

import ctcore
from ctcore.build import start_run
from ctcore.checkpoints import list_checkpoints, load_checkpoint
from ctcore.cli import app
from ctcore.components import BuildContext, TrainingBatch
from ctcore.consistency import pf_ode_step
from ctcore.data import to_uint8
from ctcore.recipe import ConsistencySection, read_recipe
from ctcore.sampling import (
    load_sampling_network,
    load_sampling_plan,
    read_sample_store,
    recipe_model_function,
    sample_noise,
)
from ctcore.training import train

REGISTRY = ctcore.load_registry()
SHAPE = (3, 4, 4)
NETWORK = {"name": "mlp", "width": 32, "num_blocks": 1, "embedding_features": 8, "dropout": 0.0,
           "fourier_scale": 1.0, "zero_init_output": False}
"""The tiny recipe's MLP with a random (not zero) output layer, so that F and hence every c_* shows in D."""
OTHER = {"vp": {"beta_d": 10.0, "beta_min": 1.0, "vp_steps": 500, "epsilon_t": 1e-3},
         "ve": {"ve_sigma_min": 0.5, "ve_sigma_max": 5.0}, "edm": {}}
"""Options other than EDM's, to show each one is used."""


# ------------------------------------------------------------- EDM's formulas, written from NVlabs/edm


def ref_vp_sigma(t: float, beta_d: float = 19.9, beta_min: float = 0.1) -> float:
    """VPPrecond.sigma: sqrt(e^(beta_d t^2 / 2 + beta_min t) - 1)."""
    return math.sqrt(math.exp(0.5 * beta_d * t * t + beta_min * t) - 1)


def ref_vp_t(sigma: float, beta_d: float = 19.9, beta_min: float = 0.1) -> float:
    """VPPrecond.sigma_inv."""
    return (math.sqrt(beta_min * beta_min + 2 * beta_d * math.log(1 + sigma * sigma)) - beta_min) / beta_d


def ref_scalings(kind: str, s: float, options: dict, sd: float = 0.5) -> tuple[float, float, float, float]:
    """(c_skip, c_out, c_in, c_noise) of EDMPrecond, VPPrecond and VEPrecond at sigma s, in float64."""
    o = {"beta_d": 19.9, "beta_min": 0.1, "vp_steps": 1000, **options}
    if kind == "vp":
        return 1.0, -s, 1 / math.sqrt(s * s + 1), (o["vp_steps"] - 1) * ref_vp_t(s, o["beta_d"], o["beta_min"])
    if kind == "ve":
        return 1.0, s, 1.0, math.log(s / 2)
    return sd * sd / (s * s + sd * sd), s * sd / math.sqrt(s * s + sd * sd), 1 / math.sqrt(s * s + sd * sd), \
        math.log(s) / 4


class RefPrecond:
    """EDM's preconditioned network around a raw network F(x, c_noise, labels): float32 as EDM's forward computes
    it, and EDM's net.sigma_min / net.sigma_max, which its sampler clamps to."""

    def __init__(self, kind: str, raw: nn.Module, options: dict | None = None, sigma_data: float = 0.5) -> None:
        self.kind, self.raw, self.sd = kind, raw, sigma_data
        self.o = {"beta_d": 19.9, "beta_min": 0.1, "vp_steps": 1000, "epsilon_t": 1e-5, "ve_sigma_min": 0.02,
                  "ve_sigma_max": 100.0, **(options or {})}
        if kind == "vp":  # VPPrecond computes them in float32
            self.sigma_min = float(self.vp_sigma(torch.as_tensor(self.o["epsilon_t"], dtype=torch.float32)))
            self.sigma_max = float(self.vp_sigma(torch.as_tensor(1.0, dtype=torch.float32)))
        elif kind == "ve":
            self.sigma_min, self.sigma_max = self.o["ve_sigma_min"], self.o["ve_sigma_max"]
        else:
            self.sigma_min, self.sigma_max = 0.0, float("inf")

    def vp_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return ((0.5 * self.o["beta_d"] * (t**2) + self.o["beta_min"] * t).exp() - 1).sqrt()

    def vp_t(self, sigma: torch.Tensor) -> torch.Tensor:
        bd, bm = self.o["beta_d"], self.o["beta_min"]
        return ((bm**2 + 2 * bd * (1 + sigma**2).log()).sqrt() - bm) / bd

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma).to(torch.float32).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        if self.kind == "vp":
            c_skip, c_out, c_in = 1, -sigma, 1 / (sigma**2 + 1).sqrt()
            c_noise = (self.o["vp_steps"] - 1) * self.vp_t(sigma)
        elif self.kind == "ve":
            c_skip, c_out, c_in, c_noise = 1, sigma, 1, (0.5 * sigma).log()
        else:
            sd = self.sd
            c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
            c_in, c_noise = 1 / (sd**2 + sigma**2).sqrt(), sigma.log() / 4
        return c_skip * x + c_out * self.raw(c_in * x, c_noise.flatten(), None).to(torch.float32)


def ref_edm_sampler(net: RefPrecond, latents: torch.Tensor, num_steps: int = 18, sigma_min: float = 0.002,
                    sigma_max: float = 80.0, rho: float = 7.0) -> tuple[torch.Tensor, list[float]]:
    """generate.py's edm_sampler with S_churn = 0 (so gamma = 0, t_hat = t_cur and x_hat = x_cur): the range
    clamped to the network's, the rho-spaced levels from sigma_max down in float64, then 0; Heun steps, the last
    one (to 0) Euler. Returns x in float64 and the levels before 0."""
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x_next = latents.to(torch.float64) * t[0]
    for k in range(num_steps):
        x_cur, t_cur, t_next = x_next, t[k], t[k + 1]
        d_cur = (x_cur - net(x_cur, t_cur).to(torch.float64)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if k < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next).to(torch.float64)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next, t[:-1].tolist()


# ---------------------------------------------------------------------------------- the formulas


SIGMAS = [0.002, 0.02, 0.3, 1.0, 7.5, 80.0]


@pytest.mark.parametrize("options", ["defaults", "other"])
@pytest.mark.parametrize("kind", ["edm", "vp", "ve"])
def test_the_scalings_are_edms_formulas(kind: str, options: str) -> None:
    chosen = OTHER[kind] if options == "other" else {}
    o = Edm.Options(preconditioning=kind, **chosen)
    got = preconditioning_scalings(torch.tensor(SIGMAS, dtype=torch.float64), o, 0.5)
    assert all(v.dtype == torch.float64 and v.shape == (len(SIGMAS),) for v in got)
    for i, s in enumerate(SIGMAS):
        expected = ref_scalings(kind, s, chosen)
        for name, value, want in zip(("c_skip", "c_out", "c_in", "c_noise"), got, expected, strict=True):
            assert value[i].item() == pytest.approx(want, rel=1e-12, abs=1e-300), (name, s)


def test_vp_sigma_and_its_inverse_are_edms_and_round_trip() -> None:
    ts = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    for bd, bm in ((19.9, 0.1), (10.0, 1.0)):
        sigmas = vp_sigma(ts, bd, bm)
        for t, s in zip(ts.tolist(), sigmas.tolist(), strict=True):
            assert s == pytest.approx(ref_vp_sigma(t, bd, bm), rel=1e-9)
        torch.testing.assert_close(vp_sigma_inv(sigmas, bd, bm), ts, rtol=1e-9, atol=0)
        levels = torch.tensor(SIGMAS, dtype=torch.float64)
        torch.testing.assert_close(vp_sigma(vp_sigma_inv(levels, bd, bm), bd, bm), levels, rtol=1e-9, atol=0)
    assert ref_vp_sigma(1e-5) == pytest.approx(0.0010004976, rel=1e-7)  # EDM's VP range at its defaults
    assert ref_vp_sigma(1.0) == pytest.approx(152.16697, rel=1e-7)


@pytest.mark.parametrize(("kind", "low", "high", "clamped"), [
    ("edm", 0.0, math.inf, (0.002, 80.0)),
    ("vp", ref_vp_sigma(1e-5), ref_vp_sigma(1.0), (0.002, 80.0)),
    ("ve", 0.02, 100.0, (0.02, 80.0)),
])
def test_the_sigma_range_is_the_networks_and_generate_py_clamps_it(kind: str, low: float, high: float,
                                                                   clamped: tuple[float, float]) -> None:
    lo, hi = edm_sigma_range(Edm.Options(preconditioning=kind))
    assert lo == pytest.approx(low, rel=1e-12) and hi == pytest.approx(high, rel=1e-12)
    assert (max(0.002, lo), min(80.0, hi)) == clamped
    lo, hi = edm_sigma_range(Edm.Options(preconditioning=kind, **OTHER[kind]))
    expected = {"edm": (0.0, math.inf), "vp": (ref_vp_sigma(1e-3, 10.0, 1.0), ref_vp_sigma(1.0, 10.0, 1.0)),
                "ve": (0.5, 5.0)}[kind]
    assert (lo, hi) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------------------- the loss


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cls = REGISTRY.get("network", "mlp")
    options = {k: v for k, v in NETWORK.items() if k != "name"}
    return cls(cls.Options(**options), BuildContext(SHAPE, 0, 12))


@pytest.mark.parametrize("options", ["defaults", "other"])
@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_the_vp_and_ve_losses_are_edms_for_the_batchs_own_draws(kind: str, options: str) -> None:
    """VPLoss: t = 1 + u (epsilon_t - 1), sigma = sigma(t); VELoss: sigma = sigma_min (sigma_max / sigma_min)^u;
    both lambda = 1 / sigma^2 on EDM's D, the squared error summed over pixels, averaged over this share."""
    chosen = OTHER[kind] if options == "other" else {}
    network = mlp()
    objective = Edm(Edm.Options(preconditioning=kind, **chosen), BuildContext(data_shape=SHAPE))
    x_all = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    share = slice(1, 4)
    batch = TrainingBatch(step=5, x=x_all[share], labels=None, batch_size=4, share=share, student=network,
                          constants=ConsistencySection(), index_generator=torch.Generator().manual_seed(1),
                          noise_generator=torch.Generator().manual_seed(2))
    loss = objective.loss(batch)
    assert loss.shape == () and loss.requires_grad

    gen = torch.Generator().manual_seed(2)  # EDM's draws: a uniform per example, then the noise
    u = torch.rand(4, generator=gen)
    z = torch.randn(4, *SHAPE, generator=gen)
    o = {"beta_d": 19.9, "beta_min": 0.1, "epsilon_t": 1e-5, "ve_sigma_min": 0.02, "ve_sigma_max": 100.0, **chosen}
    reference, total = RefPrecond(kind, network, chosen), 0.0
    for i in range(share.start, share.stop):
        if kind == "vp":
            s = ref_vp_sigma(1 + u[i].item() * (o["epsilon_t"] - 1), o["beta_d"], o["beta_min"])
        else:
            s = o["ve_sigma_min"] * (o["ve_sigma_max"] / o["ve_sigma_min"]) ** u[i].item()
        noisy = x_all[i] + torch.tensor(s, dtype=torch.float32) * z[i]
        d = reference(noisy[None], s)[0]
        total += 1 / s**2 * (d.double() - x_all[i].double()).square().sum().item()
    assert loss.item() == pytest.approx(total / 3, rel=1e-5)


def test_the_default_edm_loss_and_denoiser_are_unchanged() -> None:
    """preconditioning 'edm' is today's objective: its denoise is edm_denoise bit for bit."""
    network = mlp()
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.002, 0.5, 80.0])
    got = Edm(Edm.Options(), BuildContext()).denoise(network, x, sigma, None, ConsistencySection())
    assert torch.equal(got, edm_denoise(network, x, sigma, None, 0.5))
    torch.testing.assert_close(got, RefPrecond("edm", network)(x, sigma), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- sampling a checkpoint, as EDM


def train_tiny_precond(root: Path, kind: str) -> Path:
    """A 2-step tiny diffusion run with this preconditioning, its [consistency] range the one EDM's sampler uses
    (edm_sigma_range clamped to [0.002, 80]) and an 18-level heun sampler; returns the run directory."""
    lo, hi = edm_sigma_range(Edm.Options(preconditioning=kind))
    overrides = {**DIFFUSION, "objective": {"name": "edm", "preconditioning": kind}, "network": NETWORK,
                 "sampler": {"name": "heun", "steps": 18},
                 "consistency": {"sigma_min": max(0.002, lo), "sigma_max": min(80.0, hi)},
                 "training": {"total_steps": 2, "log_every": 1, "checkpoint_every": 2, "sample_every": 2},
                 "evaluation": {"distance": "none"}}
    run_dir = root / kind
    run = start_run(read_recipe(write_tiny_recipe(root / f"{kind}.toml", run_dir, **overrides), REGISTRY), REGISTRY)
    try:
        train(run, progress=False)
    finally:
        run.close()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precond")
    return {kind: train_tiny_precond(root, kind) for kind in ("edm", "vp", "ve")}


def raw_network(run_dir: Path) -> nn.Module:
    """The checkpoint's eval-EMA network F, built here from the recipe's options."""
    network = mlp()
    network.load_state_dict(load_checkpoint(list_checkpoints(run_dir)[-1])["eval_ema"])
    return network.eval()


@pytest.mark.parametrize("kind", ["edm", "vp", "ve"])
def test_heun_sampling_of_a_checkpoint_is_edms_generate_py(runs: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """`ctcore sample --sampler heun` (18 levels, rho 7) of a checkpoint whose recipe sets the preconditioning
    equals edm_sampler (S_churn 0) on EDM's preconditioned network for the same latents: the levels to 1e-12 and
    the images to 1e-6 of their largest value (on CPU they are equal bit for bit; ctcore's sampler returns float32,
    and its last step, Euler to 0, returns a float32 D), the stored uint8 pixels within one level of generate.py's
    conversion."""
    checkpoint, state, recipe, plan, sampler = load_sampling_plan(runs[kind], REGISTRY, sampler="heun")
    network, _ = load_sampling_network(checkpoint, state, recipe, REGISTRY, device="cpu")
    seeds = [0, 1, 2]
    z = torch.stack([sample_noise(s, SHAPE, 1, 0)[0] for s in seeds], dim=1)  # what `ctcore sample` draws
    got = sampler.sample(recipe_model_function(recipe, REGISTRY, network), z, plan, None, recipe.levels, False)

    expected, levels = ref_edm_sampler(RefPrecond(kind, raw_network(runs[kind])), z[0])
    assert len(plan) == 18 and plan == pytest.approx(levels, rel=1e-12)
    assert expected.abs().max() > 1.0  # F is not zero: the scalings show in the images
    scale = expected.abs().max().item()
    assert (got.double() - expected).abs().max().item() <= 1e-6 * scale

    out = tmp_path / "s.h5"
    result = CliRunner().invoke(app, ["sample", str(runs[kind]), "--sampler", "heun", "--num-samples", "3",
                                      "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    images = read_sample_store(out)["images"]
    assert torch.equal(images, to_uint8(got))  # the command samples through the same function
    edm_pixels = (expected * 127.5 + 128).clip(0, 255).to(torch.uint8)  # generate.py's conversion
    assert (images.int() - edm_pixels.int()).abs().max() <= 1


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_load_denoiser_of_a_checkpoint_uses_its_preconditioning(runs: dict[str, Path], kind: str) -> None:
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.02, 1.0, 80.0])
    with torch.no_grad():
        got = ctcore.load_denoiser(runs[kind])(x, sigma)
    raw = raw_network(runs[kind])
    torch.testing.assert_close(got, RefPrecond(kind, raw)(x, sigma), rtol=1e-6, atol=1e-5)
    assert not torch.allclose(got, RefPrecond("edm", raw)(x, sigma), atol=1e-2)


# ----------------------------------------------------------------------------------- recipe refusals


@pytest.mark.parametrize(("objective", "line"), [
    ({"preconditioning": "vq"}, "objective.preconditioning: must be one of 'edm', 'vp', 've'; got 'vq'"),
    ({"preconditioning": 1}, "objective.preconditioning: must be one of 'edm', 'vp', 've'; got 1"),
    ({"beta_d": 0.0}, "objective.beta_d: must be within [0.01, 100] (VP's sigma(t) = sqrt(exp(beta_d t^2 / 2 + "
                      "beta_min t) - 1); EDM 19.9), got 0"),
    ({"vp_steps": 1}, "objective.vp_steps: must be within [2, 1_000_000] (VP's c_noise = (vp_steps - 1) t; EDM's M, "
                      "1000), got 1"),
    ({"epsilon_t": 1.0}, "objective.epsilon_t: must be within [1e-08, 0.5] (the smallest t VP trains at, t in "
                         "[epsilon_t, 1]; EDM 1e-5), got 1"),
    ({"preconditioning": "ve", "ve_sigma_min": 5.0, "ve_sigma_max": 5.0},
     "objective.ve_sigma_max: must be > ve_sigma_min (5), got 5"),
], ids=["unknown", "not-a-string", "beta_d", "vp_steps", "epsilon_t", "ve-range"])
def test_a_bad_preconditioning_option_is_one_line_at_check(tmp_path: Path, objective: dict, line: str) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run",
                               **{**DIFFUSION, "objective": {"name": "edm", **objective}})
    result = CliRunner().invoke(app, ["check", str(recipe)])
    assert one_line_error(result) == f"{recipe}: {line}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_check_of_a_vp_or_ve_recipe_passes_with_its_memory_estimate(tmp_path: Path, kind: str) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run",
                               **{**DIFFUSION, "objective": {"name": "edm", "preconditioning": kind}})
    result = CliRunner().invoke(app, ["check", str(recipe)])
    assert result.exit_code == 0, result.output
    assert f"ok: {recipe} is valid" in result.output and "training needs about" in result.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- distilling a vp model


def test_a_cd_teacher_of_a_vp_checkpoint_denoises_with_vp_and_checks(runs: dict[str, Path], tmp_path: Path) -> None:
    """The cd teacher builds D from the checkpoint's own recipe: one Heun step with VP's D, not EDM's; `ctcore
    check` of the cd recipe (preflight and the memory estimate) passes."""
    cls = REGISTRY.get("teacher", "cd")
    teacher = cls(cls.Options(checkpoint=str(runs["vp"])), BuildContext(SHAPE, 0, 12))
    teacher.bind(mlp(1))
    gen = torch.Generator().manual_seed(1)
    x, z = torch.rand(4, *SHAPE, generator=gen) * 2 - 1, torch.randn(4, *SHAPE, generator=gen)
    lo = torch.tensor([0.002, 0.3, 1.0, 20.0], dtype=torch.float64)
    hi = torch.tensor([0.01, 0.5, 2.5, 80.0], dtype=torch.float64)
    raw = raw_network(runs["vp"])
    start = x + hi.float().reshape(-1, 1, 1, 1) * z
    with torch.no_grad():
        got = teacher.teacher_input(x, z, lo, hi, None)
        vp = pf_ode_step(RefPrecond("vp", raw), start, hi, lo, "heun")
        edm = pf_ode_step(RefPrecond("edm", raw), start, hi, lo, "heun")
    torch.testing.assert_close(got, vp, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, edm, atol=1e-2)

    recipe = write_tiny_recipe(tmp_path / "cd.toml", tmp_path / "cd", network=NETWORK,
                               teacher={"name": "cd", "checkpoint": str(runs["vp"])},
                               noise_schedule={"name": "uniform"}, curriculum={"name": "constant", "num_scales": 5},
                               consistency={"weighting": "uniform"})
    result = CliRunner().invoke(app, ["check", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "training needs about" in result.output
    assert not (tmp_path / "cd").exists()
