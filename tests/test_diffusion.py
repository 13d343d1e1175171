"""EDM diffusion training and its samplers: the EDM formulas by hand, Heun and Euler against the closed-form
probability-flow ODE of Gaussian data, the recipe rules of objectives and samplers, and a tiny edm run end to end
(resume, checkpoint, `ctcore sample`, eval, the commands that need a consistency model, load_denoiser)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from ctcore_objectives import Edm, edm_denoise, edm_scalings, edm_weight
from ctcore_samplers import Euler, Heun
from helpers import DIFFUSION, one_line_error, tiny_recipe_text, write_tiny_recipe
from torch import nn
from typer.testing import CliRunner, Result

import ctcore
from ctcore.build import resume_run, start_run
from ctcore.checkpoints import load_checkpoint
from ctcore.cli import app
from ctcore.components import BuildContext, NoiseLevels, TrainingBatch
from ctcore.consistency import denoise
from ctcore.errors import RecipeError
from ctcore.recipe import ConsistencySection, dump_recipe, parse_recipe, read_recipe
from ctcore.sampling import read_sample_store
from ctcore.training import train, train_step

LAST = "ckpt-000000012.pt"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------- EDM by hand


@pytest.mark.parametrize("sigma_data", [0.5, 0.7])
def test_edm_scalings_and_weight_are_the_papers_formulas(sigma_data: float) -> None:
    values = [0.002, 0.3, 0.5, 1.0, 80.0]
    c_skip, c_out, c_in = edm_scalings(torch.tensor(values, dtype=torch.float64), sigma_data)
    weight = edm_weight(torch.tensor(values, dtype=torch.float64), sigma_data)
    sd = sigma_data
    for i, s in enumerate(values):
        assert c_skip[i].item() == pytest.approx(sd * sd / (s * s + sd * sd), rel=1e-14)
        assert c_out[i].item() == pytest.approx(s * sd / math.sqrt(s * s + sd * sd), rel=1e-14)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s * s + sd * sd), rel=1e-14)
        assert weight[i].item() == pytest.approx((s * s + sd * sd) / (s * sd) ** 2, rel=1e-14)
    # at sigma = sigma_data the skip and the network share the output equally
    half = edm_scalings(torch.tensor([sd], dtype=torch.float64), sd)
    assert half[0].item() == pytest.approx(0.5) and half[1].item() == pytest.approx(sd / math.sqrt(2))


class KnownNetwork(nn.Module):
    """F(x, c_noise) = 2 x + c_noise (per sample), recording what it was given."""

    noise_conditioning = "fourier"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.seen.append((x.clone(), c_noise.clone()))
        return 2 * x + c_noise.reshape(-1, 1, 1, 1)


class KnownPositionalNetwork(KnownNetwork):
    noise_conditioning = "positional"


@pytest.mark.parametrize(("network_class", "scale"), [(KnownNetwork, 0.25), (KnownPositionalNetwork, 250.0)],
                         ids=["fourier", "positional"])
def test_edm_denoise_is_c_skip_x_plus_c_out_f_of_c_in_x_and_c_noise(network_class: type, scale: float) -> None:
    network = network_class()
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    sigmas = [0.01, 0.5, 20.0]
    out = edm_denoise(network, x, torch.tensor(sigmas), None, sigma_data=0.5)
    (given_x, given_noise), = network.seen
    for i, s in enumerate(sigmas):
        c_skip, c_out, c_in = 0.25 / (s * s + 0.25), s * 0.5 / math.sqrt(s * s + 0.25), 1 / math.sqrt(s * s + 0.25)
        c_noise = scale * math.log(s)
        assert given_noise[i].item() == pytest.approx(c_noise, rel=1e-6)
        torch.testing.assert_close(given_x[i], c_in * x[i], rtol=1e-6, atol=0)
        torch.testing.assert_close(out[i], c_skip * x[i] + c_out * (2 * c_in * x[i] + c_noise), rtol=1e-5, atol=1e-6)


class TinyDenoiser(nn.Module):
    """A per-pixel network with weights (so that the loss has a gradient) and the Fourier convention."""

    noise_conditioning = "fourier"

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(3, 3)
        self.noise = nn.Linear(1, 3)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.mix(x.movedim(1, -1)) + self.noise(c_noise.reshape(-1, 1, 1, 1))
        return torch.tanh(h).movedim(-1, 1)


@pytest.mark.parametrize(("options", "p_mean", "p_std"), [({}, -1.2, 1.2), ({"p_mean": 0.4, "p_std": 0.5}, 0.4, 0.5)],
                         ids=["edm-defaults", "other-options"])
def test_edm_loss_is_the_weighted_squared_error_of_the_batchs_own_draws(options: dict, p_mean: float,
                                                                        p_std: float) -> None:
    torch.manual_seed(0)
    network = TinyDenoiser()
    objective = Edm(Edm.Options(**options), BuildContext(data_shape=(3, 4, 4)))
    objective.bind(network, {})
    x_all = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    share = slice(1, 3)  # this process's rows of a global batch of 4
    constants = ConsistencySection()
    batch = TrainingBatch(step=5, x=x_all[share], labels=None, batch_size=4, share=share, student=network,
                          constants=constants, index_generator=torch.Generator().manual_seed(1),
                          noise_generator=torch.Generator().manual_seed(2))
    loss = objective.loss(batch)
    assert loss.shape == () and loss.requires_grad

    gen = torch.Generator().manual_seed(2)  # the same draws, in the same order, from the batch's noise generator
    n = torch.randn(4, generator=gen)
    z = torch.randn(4, 3, 4, 4, generator=gen)
    sd, total = 0.5, 0.0
    with torch.no_grad():
        for i in range(share.start, share.stop):
            s = math.exp(p_mean + p_std * n[i].item())
            x = x_all[i]
            noisy = x + s * z[i]
            c_skip, c_out, c_in = sd * sd / (s * s + sd * sd), s * sd / math.sqrt(s * s + sd * sd), \
                1 / math.sqrt(s * s + sd * sd)
            f = network((c_in * noisy)[None], torch.tensor([0.25 * math.log(s)]), None)[0]
            d = c_skip * noisy + c_out * f
            total += (s * s + sd * sd) / (s * sd) ** 2 * (d - x).square().sum().item()
    expected = total / (share.stop - share.start)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the index generator is not drawn from, and the loss is a function of the batch alone
    assert torch.equal(batch.index_generator.get_state(), torch.Generator().manual_seed(1).get_state())
    again = Edm(Edm.Options(**options), BuildContext()).loss(
        TrainingBatch(step=5, x=x_all[share], labels=None, batch_size=4, share=share, student=network,
                      constants=constants, index_generator=torch.Generator().manual_seed(1),
                      noise_generator=torch.Generator().manual_seed(2)))
    assert torch.equal(loss, again)


# ------------------------------------------------------------------------ Heun and Euler, in closed form

S = 0.5
"""Data x ~ N(0, S^2) per pixel: the exact denoiser is D(x, sigma) = S^2 / (S^2 + sigma^2) x."""


def gaussian_denoiser(calls: list[float]):
    def d(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],) and labels is None
        calls.append(sigma[0].item())
        return x * (S**2 / (S**2 + sigma.to(x.dtype) ** 2)).reshape(-1, 1, 1, 1)

    return d


def karras(n: int, lo: float = 0.002, hi: float = 80.0, rho: float = 7.0) -> list[float]:
    """EDM eq. 5: sigma_i = (hi^(1/rho) + i / (n - 1) (lo^(1/rho) - hi^(1/rho)))^rho, i = 0..n-1."""
    return [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)]


def ode_error(cls: type, steps: int) -> tuple[float, int]:
    """Relative error of the sampler's x(0) against the exact x(0) = x_0 S / sqrt(sigma_0^2 + S^2), and its calls."""
    sampler = cls(cls.Options(steps=steps), BuildContext())
    levels = NoiseLevels()
    plan = sampler.plan(None, None, levels)
    noise = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls: list[float] = []
    out = sampler.sample(gaussian_denoiser(calls), noise, plan, None, levels, False)
    x0 = noise[0] * plan[0]
    exact = x0 * S / math.sqrt(plan[0] ** 2 + S**2)
    return ((out - exact).abs().max() / exact.abs().max()).item(), len(calls)


def test_the_closed_form_solves_the_probability_flow_ode() -> None:
    """x(sigma) = x_0 sqrt((sigma^2 + S^2) / (sigma_0^2 + S^2)) has dx/dsigma = (x - D(x, sigma)) / sigma."""
    for sigma in (0.01, 0.5, 3.0, 60.0):
        x = math.sqrt((sigma**2 + S**2) / (80.0**2 + S**2))
        h = 1e-6 * sigma
        slope = (math.sqrt(((sigma + h) ** 2 + S**2) / (80.0**2 + S**2))
                 - math.sqrt(((sigma - h) ** 2 + S**2) / (80.0**2 + S**2))) / (2 * h)
        assert slope == pytest.approx((x - S**2 / (S**2 + sigma**2) * x) / sigma, rel=1e-6)


def test_heun_with_18_levels_lands_near_the_exact_solution_and_far_nearer_than_euler() -> None:
    heun, heun_calls = ode_error(Heun, 18)
    euler, euler_calls = ode_error(Euler, 18)
    assert (heun_calls, euler_calls) == (35, 18)
    assert 0.05 < heun < 0.056  # measured 0.05527 (x(0) too large by 5.5%)
    assert 0.15 < euler < 0.156  # measured 0.15392 (too small by 15.4%)
    assert heun < euler / 2.5


def test_heun_is_second_order_and_euler_first_order() -> None:
    """Doubling the levels divides Heun's error by about 4 (measured 4.5, 4.3, 4.2) and Euler's by about 2."""
    heun = [ode_error(Heun, n)[0] for n in (18, 36, 72, 144)]
    euler = [ode_error(Euler, n)[0] for n in (18, 36, 72, 144)]
    assert heun[-1] < 7.5e-4  # measured 6.9e-4 at 144 levels
    for a, b in zip(heun, heun[1:], strict=False):
        assert 3.8 < a / b < 4.8, heun
    for a, b in zip(euler, euler[1:], strict=False):
        assert 1.9 < a / b < 2.1, euler


@pytest.mark.parametrize(("cls", "evaluations"), [(Heun, 35), (Euler, 18)])
def test_the_default_plan_is_edms_18_level_karras_grid(cls: type, evaluations: int) -> None:
    sampler = cls(cls.Options(), BuildContext())
    assert (sampler.options.steps, sampler.options.rho) == (18, 7.0)
    plan = sampler.plan(None, None, NoiseLevels())
    assert len(plan) == 18 and plan[0] == pytest.approx(80.0, rel=1e-12) and plan[-1] == pytest.approx(0.002)
    assert plan == pytest.approx(karras(18), rel=1e-12)
    assert all(isinstance(s, float) for s in plan)
    assert sampler.evaluations(plan) == evaluations and sampler.noise_draws(plan) == 1
    calls: list[float] = []
    sampler.sample(gaussian_denoiser(calls), torch.randn(1, 2, 3, 2, 2), plan, None, NoiseLevels(), True)
    assert len(calls) == evaluations
    # every level is evaluated; Heun also at each next level but 0 (its last step, to sigma = 0, is Euler's)
    expected = plan if cls is Euler else [v for a, b in zip(plan, [*plan[1:], None], strict=True)
                                         for v in ([a, b] if b is not None else [a])]
    assert calls == pytest.approx(expected, rel=1e-6)
    other = sampler.plan(4, None, NoiseLevels(0.01, 20.0))
    assert other == pytest.approx(karras(4, 0.01, 20.0), rel=1e-12)
    assert sampler.plan(1, None, NoiseLevels()) == [80.0] and sampler.evaluations([80.0]) == 1


def test_an_explicit_plan_must_decrease_within_sigma_max() -> None:
    sampler = Heun(Heun.Options(), BuildContext())
    assert sampler.plan(None, [80, 1.0, 0.1], NoiseLevels()) == [80.0, 1.0, 0.1]
    with pytest.raises(ValueError, match=r"^sigmas must decrease \(e.g. 80,0.821\), got \[1.0, 2.0\]$"):
        sampler.plan(None, [1.0, 2.0], NoiseLevels())
    with pytest.raises(ValueError, match=r"^sigmas must lie in \(0, sigma_max\] = \(0, 80.0\], got \[90.0, 1.0\]$"):
        sampler.plan(None, [90.0, 1.0], NoiseLevels())


# --------------------------------------------------------------------------------------------- recipes


def recipe_problems(text: str, registry) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, registry, source="bad.toml")
    return info.value.problems


PARTS = {"teacher": {"name": "no-ema"}, "metric": {"name": "pseudo-huber"}, "curriculum": {"name": "exponential"},
         "noise_schedule": {"name": "lognormal"}}


@pytest.mark.parametrize(("kind", "problem"), [
    ("teacher", "teacher: objective 'edm' trains without a teacher; delete the section [teacher]"),
    ("metric", "metric: objective 'edm' trains without a metric; delete the section [metric]"),
    ("curriculum", "curriculum: objective 'edm' trains without a curriculum; delete the section [curriculum]"),
    ("noise_schedule", "noise_schedule: objective 'edm' trains without a noise schedule; delete the section "
                       "[noise_schedule]"),
], ids=["teacher", "metric", "curriculum", "noise_schedule"])
def test_an_edm_recipe_with_a_consistency_part_is_refused(tmp_path: Path, registry, kind: str, problem: str) -> None:
    text = tiny_recipe_text(tmp_path / "out", **{**DIFFUSION, kind: PARTS[kind]})
    assert recipe_problems(text, registry) == [problem]
    path = tmp_path / "edm.toml"
    path.write_text(text)
    before = sorted(tmp_path.iterdir())
    assert one_line_error(invoke("check", path)) == f"{path}: {problem}"
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_an_edm_recipe_with_every_consistency_part_lists_each(tmp_path: Path, registry) -> None:
    text = tiny_recipe_text(tmp_path, objective={"name": "edm"}, sampler=None)  # the tiny recipe's four parts
    assert recipe_problems(text, registry) == [
        f"{kind}: objective 'edm' trains without a {kind.replace('_', ' ')}; delete the section [{kind}]"
        for kind in ("metric", "noise_schedule", "curriculum", "teacher")]


def test_a_sampler_must_sample_the_model_the_objective_trains(tmp_path: Path, registry) -> None:
    heun = tiny_recipe_text(tmp_path, sampler={"name": "heun"})
    assert recipe_problems(heun, registry) == [
        "sampler.name: sampler 'heun' samples diffusion models, but objective 'consistency' trains a consistency "
        "model; use one of: consistency, meanflow, scm"]
    consistency = tiny_recipe_text(tmp_path, **{**DIFFUSION, "sampler": {"name": "consistency"}})
    assert recipe_problems(consistency, registry) == [
        "sampler.name: sampler 'consistency' samples consistency models, but objective 'edm' trains a diffusion "
        "model; use one of: euler, heun"]
    path = tmp_path / "heun.toml"
    path.write_text(heun)
    assert one_line_error(invoke("check", path)).startswith(f"{path}: sampler.name: sampler 'heun' samples")


def test_the_default_objective_and_samplers(tmp_path: Path, registry) -> None:
    plain = parse_recipe(tiny_recipe_text(tmp_path), registry)  # no [objective], no [sampler]
    assert plain.components["objective"].name == "consistency"
    assert plain.components["sampler"].name == "consistency"
    assert set(plain.components) == {"network", "objective", "metric", "noise_schedule", "curriculum", "teacher",
                                     "sampler"}
    edm = parse_recipe(tiny_recipe_text(tmp_path, **{**DIFFUSION, "sampler": None}), registry)
    assert set(edm.components) == {"network", "objective", "sampler"}
    assert edm.components["sampler"].name == "heun" and edm.components["sampler"].options == Heun.Options()
    assert (edm.components["objective"].options.p_mean, edm.components["objective"].options.p_std) == (-1.2, 1.2)


@pytest.mark.parametrize("objective", ["consistency", "edm"])
def test_the_resolved_recipe_round_trips(tmp_path: Path, registry, objective: str) -> None:
    overrides = {**DIFFUSION, "sampler": None} if objective == "edm" else {}
    recipe = parse_recipe(tiny_recipe_text(tmp_path, **overrides), registry, source="r.toml")
    text = dump_recipe(recipe)
    again = parse_recipe(text, registry, source="r.toml")
    assert again == recipe and dump_recipe(again) == text
    assert f'[objective]\nname = "{objective}"' in text
    sampler = '[sampler]\nname = "heun"\nsteps = 18\nrho = 7.0' if objective == "edm" else \
        '[sampler]\nname = "consistency"'
    assert sampler in text
    assert ("[teacher]" in text) == (objective == "consistency")


# ----------------------------------------------------------------------------------- a tiny edm run


def train_tiny(root: Path, registry, name: str, stop_at: int | None = None, **overrides):
    recipe = read_recipe(write_tiny_recipe(root / f"{name}.toml", root / name, **overrides), registry)
    run = start_run(recipe, registry)
    try:
        train(run, stop_at=stop_at, progress=False)
    finally:
        run.close()
    return run


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory: pytest.TempPathFactory, registry):
    """A finished tiny edm run (12 steps, heun with 4 levels); tests write only into their own tmp_path."""
    return train_tiny(tmp_path_factory.mktemp("edm"), registry, "edm", **DIFFUSION)


def assert_same_weights(a, b) -> None:
    for key in ("student", "eval_ema"):
        da, db = getattr(a, key).state_dict(), getattr(b, key).state_dict()
        assert da.keys() == db.keys()
        assert all(torch.equal(da[k], db[k]) for k in da), key
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert oa.keys() == ob.keys()
    for pid, state in oa.items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(ob[pid][k])) for k, v in state.items()), pid


def test_a_resumed_edm_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path: Path, registry, edm_run) -> None:
    part = train_tiny(tmp_path, registry, "part", stop_at=6, **DIFFUSION)
    assert part.step == 6 and part.teacher is None
    resumed = resume_run(None, registry, part.out_dir)
    try:
        assert resumed.step == 6
        train(resumed, progress=False)
        assert resumed.step == edm_run.step == 12
        assert_same_weights(edm_run, resumed)
        rows = [json.loads(line) for line in (part.out_dir / "stats.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8, 10, 12]
        assert all("num_scales" not in r and "teacher_decay" not in r for r in rows)  # no consistency fields
        train_step(resumed)  # and the comparison can fail
        with pytest.raises(AssertionError):
            assert_same_weights(edm_run, resumed)
    finally:
        resumed.close()


def test_an_edm_checkpoint_names_network_objective_and_sampler_and_holds_no_teacher(edm_run) -> None:
    state = load_checkpoint(edm_run.out_dir / "checkpoints" / LAST)
    components = state["provenance"]["components"]
    assert set(components) == {"network", "objective", "sampler"}
    assert components["objective"] == {"name": "edm", "distribution": "ctcore", "version": ctcore.__version__}
    assert components["sampler"]["name"] == "heun"
    assert state["teacher"] == {}
    assert '[objective]\nname = "edm"' in state["recipe"] and "[teacher]" not in state["recipe"]
    pngs = sorted(p.name for p in (edm_run.out_dir / "samples").glob("*.png"))
    assert pngs == ["step-0000006-heun4.png", "step-0000012-heun4.png"]  # the sampler's preview plan


@pytest.mark.parametrize(("sampler", "steps", "evaluations"), [("heun", 4, 7), ("euler", 6, 6)])
def test_sample_with_a_diffusion_sampler_records_it_in_the_store(edm_run, tmp_path: Path, sampler: str, steps: int,
                                                                  evaluations: int) -> None:
    out = tmp_path / "s.h5"
    result = invoke("sample", edm_run.out_dir, "--sampler", sampler, "--steps", steps, "-n", 5, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"5 samples ({steps}-level {sampler} ({evaluations} network evaluations) [80.0, " in result.stdout
    store = read_sample_store(out)
    assert store["images"].shape == (5, 3, 4, 4) and store["images"].dtype == torch.uint8
    assert (store["attrs"]["sampler"], store["attrs"]["evaluations"]) == (sampler, evaluations)
    assert store["attrs"]["sigmas"] == pytest.approx(karras(steps), rel=1e-12)


def test_the_recipes_sampler_is_the_default_and_the_samplers_differ(edm_run, tmp_path: Path) -> None:
    runs = {}
    for name, extra in (("recipe", []), ("heun", ["--sampler", "heun", "--steps", 4]),
                        ("euler", ["--sampler", "euler", "--steps", 4])):
        out = tmp_path / f"{name}.h5"
        assert invoke("sample", edm_run.out_dir, "-n", 6, "-o", out, *extra).exit_code == 0
        runs[name] = read_sample_store(out)
    assert runs["recipe"]["attrs"]["sampler"] == "heun" and runs["recipe"]["attrs"]["evaluations"] == 7
    assert torch.equal(runs["recipe"]["images"], runs["heun"]["images"])  # the recipe says heun, 4 levels
    assert not torch.equal(runs["heun"]["images"], runs["euler"]["images"])


def test_consistency_sampling_of_a_diffusion_checkpoint_is_one_line(edm_run, tmp_path: Path) -> None:
    ckpt = edm_run.out_dir / "checkpoints" / LAST
    result = invoke("sample", edm_run.out_dir, "--sampler", "consistency", "-o", tmp_path / "s.h5")
    assert one_line_error(result) == (
        f"--sampler consistency: it samples consistency models, but checkpoint {str(ckpt)!r} holds a diffusion "
        "model (objective 'edm'); use one of: euler, heun")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["edit", "search-sigmas"])
def test_commands_for_consistency_models_refuse_a_diffusion_checkpoint(edm_run, tmp_path: Path,
                                                                       command: str) -> None:
    ckpt = edm_run.out_dir / "checkpoints" / LAST
    if command == "edit":
        images = tmp_path / "images"
        images.mkdir()
        args = ["edit", "inpaint", edm_run.out_dir, "--images", images, "--mask-kind", "random-pixels",
                "-o", tmp_path / "e.h5"]
    else:
        args = ["search-sigmas", edm_run.out_dir, "--steps", 2, "-n", 8, "--plot", tmp_path / "p.png"]
    before = sorted(p.name for p in edm_run.out_dir.rglob("*"))
    assert one_line_error(invoke(*args)) == (
        f"ctcore {command} works on consistency models, but checkpoint {str(ckpt)!r} holds a diffusion model "
        "(objective 'edm'); sample it with `ctcore sample`, or distil it into a consistency model first")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["images"] if command == "edit" else [])
    assert sorted(p.name for p in edm_run.out_dir.rglob("*")) == before


def test_eval_of_an_edm_run_gives_the_distance_training_logged(edm_run) -> None:
    rows = [json.loads(line) for line in (edm_run.out_dir / "stats.jsonl").read_text().splitlines()]
    logged = [r["sliced_wasserstein"] for r in rows if r.get("event") == "distance"]
    assert len(logged) == 2 and logged[0] != logged[1]
    result = invoke("eval", edm_run.out_dir, "--metric", "sliced-wasserstein", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["value"] == logged[-1]  # same samples (heun, 4 levels), data and projections: exactly
    assert out["sigmas"] == pytest.approx(karras(4), rel=1e-12)


def test_load_denoiser_gives_d_of_a_diffusion_run_and_f_of_a_consistency_run(edm_run, tmp_path: Path,
                                                                             registry) -> None:
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.01, 0.7, 40.0])

    def eval_ema(run_dir: Path) -> nn.Module:
        state = load_checkpoint(run_dir / "checkpoints" / LAST)
        spec = read_recipe(run_dir / "recipe.toml", registry).components["network"]
        network = registry.get("network", "mlp")(spec.options, BuildContext((3, 4, 4), 0, 12))
        network.load_state_dict(state["eval_ema"])
        return network.eval()

    d = ctcore.load_denoiser(edm_run.out_dir)
    assert d.model == "diffusion"
    with torch.no_grad():
        expected = edm_denoise(eval_ema(edm_run.out_dir), x, sigma, None, 0.5)
        assert torch.equal(d(x, sigma), expected)
        assert not torch.equal(expected, denoise(eval_ema(edm_run.out_dir), x, sigma, None, sigma_min=0.002,
                                                 sigma_data=0.5))  # D is not the consistency function

    consistency = train_tiny(tmp_path, registry, "ct")
    f = ctcore.load_denoiser(consistency.out_dir)
    assert f.model == "consistency"
    with torch.no_grad():
        assert torch.equal(f(x, sigma), denoise(eval_ema(consistency.out_dir), x, sigma, None, sigma_min=0.002,
                                                sigma_data=0.5))
