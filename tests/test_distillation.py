"""Consistency distillation (teacher cd) and Easy Consistency Tuning (noise schedule ect): the PF-ODE step against
the closed form of Gaussian data, the cd teacher's input and its refusals at `check`, ECT's pairs by hand, the
sigma_lo = 0 boundary, the EDM parameterization, the l2-norm metric, run.init_from, and tiny cd / ect runs end to
end (resume bit for bit, `ctcore sample`, list-components)."""

from __future__ import annotations

import copy
import json
import math
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from ctcore_noise import MAX_STAGE_BITS
from ctcore_objectives import edm_denoise
from helpers import DIFFUSION, ECT, one_line_error, tiny_cd, train_tiny_diffusion, write_tiny_recipe
from torch import nn
from typer.testing import CliRunner, Result

import ctcore
from ctcore.build import resume_run, start_run
from ctcore.checkpoints import list_checkpoints, load_checkpoint
from ctcore.cli import app
from ctcore.components import BuildContext, PairDraw
from ctcore.consistency import consistency_loss, denoise, karras_sigmas, noised, pf_ode_step
from ctcore.errors import RecipeError
from ctcore.files import file_digest
from ctcore.recipe import ConsistencySection, read_recipe
from ctcore.sampling import read_sample_store
from ctcore.training import train, train_step

REGISTRY = ctcore.load_registry()
LAST = "ckpt-000000012.pt"
S = 0.5
"""The data std of the Gaussian toy x0 ~ N(0, S^2 I)."""


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny edm run (checkpoints at steps 6 and 12) to distil and tune; tests never write into it."""
    return train_tiny_diffusion(tmp_path_factory.mktemp("diffusion") / "edm")


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """The tiny recipe's network on 3x4x4 images, seeded."""
    torch.manual_seed(seed)
    cls = REGISTRY.get("network", "mlp")
    return cls(cls.Options(width=32, num_blocks=1, embedding_features=8, dropout=dropout),
               BuildContext((3, 4, 4), 0, 12))


def equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_tiny(root: Path, name: str, stop_at: int | None = None, **overrides):
    run = start_run(read_recipe(write_tiny_recipe(root / f"{name}.toml", root / name, **overrides), REGISTRY),
                    REGISTRY)
    try:
        train(run, stop_at=stop_at, progress=False)
    finally:
        run.close()
    return run


def records(run_dir: Path) -> list[dict]:
    """The training records (those with a loss) of stats.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if "loss" in r]


# ------------------------------------------------------------------------ the PF-ODE step, Gaussian data


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact D(x, sigma) = S^2 / (S^2 + sigma^2) x of Gaussian data N(0, S^2 I)."""
    return (S**2 / (S**2 + sigma**2)).reshape(-1, *([1] * (x.ndim - 1))) * x


def step_error(sigma: torch.Tensor, sigma_next: torch.Tensor, solver: str) -> torch.Tensor:
    """Per-pair relative error of one pf_ode_step from sigma to sigma_next against x(sigma') = x(sigma)
    sqrt((S^2 + sigma'^2) / (S^2 + sigma^2))."""
    x = torch.randn(len(sigma), 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = pf_ode_step(gaussian_denoiser, x, sigma, sigma_next, solver)
    exact = x * torch.sqrt((S**2 + sigma_next**2) / (S**2 + sigma**2)).reshape(-1, 1, 1, 1)
    return (out - exact).abs().flatten(1).amax(1) / exact.abs().flatten(1).amax(1)


def test_heun_steps_on_an_18_point_grid_match_the_closed_form_and_beat_euler() -> None:
    """Every adjacent pair of the 18-point Karras grid (sigma_{i+1} -> sigma_i): Heun's worst relative error is
    1.99e-2 (the step 1.09 -> 0.585), Euler's 5.35e-2 (0.585 -> 0.296); Heun is nearer on every pair."""
    grid = karras_sigmas(18)
    heun, euler = step_error(grid[1:], grid[:-1], "heun"), step_error(grid[1:], grid[:-1], "euler")
    assert 0.0195 < float(heun.max()) < 0.0204  # measured 0.019942
    assert 0.0530 < float(euler.max()) < 0.0540  # measured 0.053538
    assert (int(heun.argmax()), int(euler.argmax())) == (6, 5)
    assert (heun < euler).all()
    assert float(heun[0]) < 1e-8  # the smallest pair 0.002 <- 0.0038: measured 4.6e-9


def test_heun_is_third_order_locally_and_euler_second() -> None:
    """One step from sigma = 1 of length h = 0.4, 0.2, 0.1, 0.05: halving h divides Heun's error by about 8 (measured
    13.3, 10.2, 9.0, towards 8) and Euler's by about 4 (5.9, 4.8, 4.4): local errors O(h^3) and O(h^2), so Heun is
    a second-order method and Euler a first-order one."""
    hs = torch.tensor([0.4, 0.2, 0.1, 0.05], dtype=torch.float64)
    one = torch.ones(4, dtype=torch.float64)
    heun, euler = step_error(one, one - hs, "heun"), step_error(one, one - hs, "euler")
    heun_ratios, euler_ratios = (heun[:-1] / heun[1:]).tolist(), (euler[:-1] / euler[1:]).tolist()
    assert heun_ratios == pytest.approx([13.34, 10.19, 8.99], abs=0.01)
    assert euler_ratios == pytest.approx([5.90, 4.77, 4.35], abs=0.01)
    assert float(heun[-1]) < 9e-6  # measured 8.97e-6 at h = 0.05 (Euler 2.17e-4)
    assert all(h < e for h, e in zip(heun.tolist(), euler.tolist(), strict=True))


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_the_cd_teacher_input_is_one_ode_step_of_the_checkpoints_denoiser(diffusion: Path, solver: str) -> None:
    """The real cd teacher built from the diffusion checkpoint: teacher_input(x, z, lo, hi) is pf_ode_step with
    load_denoiser's D of the same checkpoint from x + hi z, exactly, and not the CT point x + lo z."""
    cls = REGISTRY.get("teacher", "cd")
    teacher = cls(cls.Options(checkpoint=str(diffusion), solver=solver), BuildContext((3, 4, 4), 0, 12))
    teacher.bind(mlp())
    assert teacher.source == diffusion / "checkpoints" / LAST
    gen = torch.Generator().manual_seed(1)
    x, z = torch.rand(4, 3, 4, 4, generator=gen) * 2 - 1, torch.randn(4, 3, 4, 4, generator=gen)
    lo = torch.tensor([0.002, 0.3, 1.0, 20.0], dtype=torch.float64)
    hi = torch.tensor([0.01, 0.5, 2.5, 80.0], dtype=torch.float64)
    with torch.no_grad():
        got = teacher.teacher_input(x, z, lo, hi, None)
        expected = pf_ode_step(ctcore.load_denoiser(diffusion), x + hi.float().reshape(-1, 1, 1, 1) * z, hi, lo,
                               solver)
    assert torch.equal(got, expected)
    assert not torch.allclose(got, noised(x, z, lo), atol=1e-3)
    other = cls(cls.Options(checkpoint=str(diffusion), solver="euler" if solver == "heun" else "heun"),
                BuildContext((3, 4, 4), 0, 12))
    other.bind(mlp())
    with torch.no_grad():
        assert not torch.equal(other.teacher_input(x, z, lo, hi, None), got)  # the solver option is used


# ------------------------------------------------------------------------------- cd refusals at `check`


WHERE = ("set teacher.checkpoint to the run directory or checkpoint file of a run with objective 'edm' or "
         "'trigflow'")


@pytest.mark.parametrize("case", ["missing", "empty-dir", "consistency", "other-shape", "blank", "too-long"])
def test_a_teacher_checkpoint_that_is_not_a_diffusion_model_of_this_data_is_one_line_at_check(
        diffusion: Path, tmp_path: Path, case: str) -> None:
    source = {"missing": tmp_path / "absent", "empty-dir": tmp_path / "empty", "blank": "", "too-long": "x" * 300,
              "consistency": tmp_path / "ct", "other-shape": tmp_path / "edm2"}[case]
    if case == "empty-dir":
        source.mkdir()
    elif case == "consistency":
        train_tiny(tmp_path, "ct", training={"total_steps": 2, "checkpoint_every": 2, "sample_every": 2})
    elif case == "other-shape":
        train_tiny(tmp_path, "edm2", data={"resolution": 2},
                   training={"total_steps": 2, "checkpoint_every": 2, "sample_every": 2}, **DIFFUSION)
    ckpt = f"{str(Path(source) / 'checkpoints' / 'ckpt-000000002.pt')!r}"
    problem = {
        "missing": f"{str(source)!r} not found; train the diffusion model first (a recipe with objective "
                   f"'edm' or 'trigflow' whose run writes it), or {WHERE}",
        "empty-dir": f"{str(source)!r} holds no checkpoint (checkpoints/ckpt-*.pt) yet; let its diffusion run write "
                     f"one, or {WHERE}",
        "consistency": f"{ckpt} holds a consistency model (objective 'consistency'); consistency distillation "
                       f"needs a diffusion model: {WHERE}",
        "other-shape": f"{ckpt} models images of shape [3, 2, 2] with num_classes 0, but this run's data has shape "
                       "[3, 4, 4] with num_classes 0; distil a model of the same data",
        "blank": f"name the diffusion model to distil; {WHERE}, e.g. \"runs/quickstart_diffusion\"",
        "too-long": f"{'x' * 300!r} cannot be looked up (File name too long); {WHERE}",
    }[case]
    recipe = write_tiny_recipe(tmp_path / "cd.toml", tmp_path / "cd", **tiny_cd(source))
    assert one_line_error(invoke("check", recipe)) == f"{recipe}: teacher.checkpoint: {problem}"
    assert not (tmp_path / "cd").exists()
    good = write_tiny_recipe(tmp_path / "good.toml", tmp_path / "good", **tiny_cd(diffusion))
    assert invoke("check", good).exit_code == 0  # the same recipe with the diffusion run passes


# ------------------------------------------------------------------------------------ ECT's pairs by hand


def ect(**options):
    cls = REGISTRY.get("noise_schedule", "ect")
    return cls(cls.Options(**options), BuildContext())


def test_ect_pairs_are_the_papers_formulas_for_a_fixed_generator() -> None:
    """t = exp(p_mean + p_std n), n(t) = 1 + k sigmoid(-b t), r = max(t (1 - n(t) / q^a), 0),
    a = 1 + floor((step - 1) / d), by hand in Python floats for non-default options, at steps in stages 1, 1, 2, 4."""
    o = {"p_mean": -0.5, "p_std": 1.5, "q": 4.0, "k": 7.0, "b": 0.5, "d": 10}
    schedule = ect(**o)
    for step, a in ((0, 1), (10, 1), (11, 2), (35, 4)):
        draw = PairDraw(step, 64, None, torch.Generator().manual_seed(99), torch.Generator().manual_seed(5))
        r, t = schedule.pairs(draw)
        assert r.dtype == t.dtype == torch.float64 and r.shape == t.shape == (64,)
        normal = torch.randn(64, generator=torch.Generator().manual_seed(5), dtype=torch.float64).tolist()
        t_hand = [math.exp(o["p_mean"] + o["p_std"] * n) for n in normal]
        r_hand = [max(s * (1 - (1 + o["k"] / (1 + math.exp(o["b"] * s))) / o["q"] ** a), 0.0) for s in t_hand]
        assert t.tolist() == pytest.approx(t_hand, rel=1e-13)
        assert r.tolist() == pytest.approx(r_hand, rel=1e-12, abs=1e-300)
        assert schedule.log_fields(step) == {"ect_stage": a}
    # stage 1 with q = 4: r = 0 where n(t) >= 4, i.e. t <= 2 ln(4 / 3) = 0.58 for k = 7, b = 0.5
    r0, t0 = schedule.pairs(PairDraw(0, 64, None, torch.Generator(), torch.Generator().manual_seed(5)))
    assert (r0 == 0).any() and (r0 > 0).any() and (r0 < t0).all()


def test_ect_stages_grow_every_d_steps_and_stop_at_two_to_the_20() -> None:
    """q = 2: stage a halves (t - r) / t each d steps until q^a = 2^MAX_STAGE_BITS = 2^20 (a = 20); later stages
    keep that ratio, and t and r still differ in float32 far past it."""
    assert MAX_STAGE_BITS == 20
    schedule = ect(d=3)
    assert [schedule.stage(s) for s in (0, 1, 3, 4, 6, 7, 60, 61, 10**9)] == [1, 1, 1, 2, 2, 3, 20, 21,
                                                                           1 + (10**9 - 1) // 3]
    t = torch.tensor([0.002, 0.3, 5.0, 80.0], dtype=torch.float64)
    n_t = 1 + 8.0 * torch.sigmoid(-t)
    for step, bits in ((0, 1), (4, 2), (58, 20), (61, 20), (10**9, 20)):
        assert torch.equal(schedule.ratio(t, step), n_t / 2.0**bits), step
    assert torch.equal(schedule.ratio(t, 55), 2 * schedule.ratio(t, 58))  # a = 19 -> 20 still halves
    q4 = ect(q=4.0, d=1)  # two bits a stage: a = 10 reaches the cap, a = 11 keeps it
    assert torch.equal(q4.ratio(t, 10), q4.ratio(t, 11)) and torch.equal(q4.ratio(t, 9), 4 * q4.ratio(t, 10))
    r, hi = schedule.pairs(PairDraw(10**9, 4096, None, torch.Generator(), torch.Generator().manual_seed(0)))
    assert (r.float() < hi.float()).all()
    assert schedule.log_fields(10**9) == {"ect_stage": 1 + (10**9 - 1) // 3}


def ect_code_stages(iterations: int, tick: int, double: int) -> list[int]:
    """The stage (from 0) of each iteration k = 0, 1, ... as ECT's training loop sets it: its tick 0 is the first
    iteration alone, tick j then ends at iteration 1 + j * tick (counted from 1), and after tick j the stage becomes
    j // double (ct_training_loop.py: `new_stage = (cur_tick - 1) // double_ticks` after `cur_tick += 1`)."""
    stages, stage, tick_index, tick_end = [], 0, 0, 1
    for k in range(iterations):
        stages.append(stage)
        if k + 1 == tick_end:  # the iteration that ends tick `tick_index`
            stage = max(stage, tick_index // double)
            tick_index += 1
            tick_end = 1 + tick_index * tick
    return stages


def test_ect_stages_begin_where_ects_training_loop_begins_them() -> None:
    """ECT's CIFAR-10 run (--tick 12.8 kimg at batch 128 = 100 iterations, --double 250 ticks, so d = 25,000): its
    stage 1 (ctcore's a = 2) begins at iteration 25,001 counted from 0, not 25,000; likewise every later stage, and
    for a tick that does not divide d alike."""
    schedule = ect(d=25_000)
    code = ect_code_stages(75_003, tick=100, double=250)
    assert code[25_000] == 0 and code[25_001] == 1 and code[50_001] == 2
    assert [schedule.stage(k) for k in range(75_003)] == [1 + s for s in code]
    small = ect(d=6)
    assert [small.stage(k) for k in range(40)] == [1 + s for s in ect_code_stages(40, tick=3, double=2)]


# -------------------------------------------------------------------------- the loss at sigma_lo = 0


def test_where_sigma_lo_is_0_the_target_is_the_clean_image_and_nothing_is_nan() -> None:
    """consistency_loss on ECT-like pairs (r = 0 for examples 0 and 2): those distances are
    lambda d(f_student(x + hi z, hi), x), the others lambda d(f_student(x + hi z, hi), f_teacher(x + lo z, lo));
    loss and gradients are finite."""
    student = mlp(0)
    teacher = mlp(1)  # other weights, so that the target's source shows
    metric = REGISTRY.get("metric", "l2-norm")(REGISTRY.get("metric", "l2-norm").Options(), BuildContext())
    gen = torch.Generator().manual_seed(3)
    x, z = torch.rand(4, 3, 4, 4, generator=gen) * 2 - 1, torch.randn(4, 3, 4, 4, generator=gen)
    lo = torch.tensor([0.0, 0.4, 0.0, 3.0], dtype=torch.float64)
    hi = torch.tensor([0.3, 1.0, 2.0, 10.0], dtype=torch.float64)

    def f(network, noisy, sigma, labels):
        return edm_denoise(network, noisy, sigma, labels, 0.5)

    loss, distances = consistency_loss(student, teacher, metric, x, None, lo, hi, z, weighting="inverse-delta", f=f)
    weights = (1.0 / (hi - lo)).float()
    with torch.no_grad():
        out = f(student, noised(x, z, hi), hi, None)
        to_x = metric(out, x) * weights
        to_teacher = metric(out, f(teacher, noised(x, z, lo), lo, None)) * weights
    assert torch.isfinite(distances).all() and torch.isfinite(loss)
    assert torch.allclose(distances[[0, 2]], to_x[[0, 2]], rtol=1e-6, atol=0)
    assert torch.allclose(distances[[1, 3]], to_teacher[[1, 3]], rtol=1e-6, atol=0)
    assert not torch.allclose(distances, to_x, rtol=1e-3)  # the other examples do use the teacher
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------------- recipe rules (ect)


ECT_CURRICULUM = ("curriculum: noise schedule 'ect' draws continuous noise levels, without the sigma grid a "
                  "curriculum sizes; delete the section [curriculum]")


def test_an_ect_recipe_with_a_curriculum_is_refused(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run",
                               **{**ECT, "curriculum": {"name": "constant", "num_scales": 5}})
    with pytest.raises(RecipeError) as info:
        read_recipe(recipe, REGISTRY)
    assert info.value.problems == [ECT_CURRICULUM]
    assert one_line_error(invoke("check", recipe)) == f"{recipe}: {ECT_CURRICULUM}"
    assert not (tmp_path / "run").exists()


def test_a_bad_ect_option_without_a_curriculum_is_one_problem(tmp_path: Path) -> None:
    """Not also 'curriculum: missing section' (the schedule is known from its name though its options failed)."""
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run",
                               **{**ECT, "noise_schedule": {"name": "ect", "q": 1.0}})
    with pytest.raises(RecipeError) as info:
        read_recipe(recipe, REGISTRY)
    assert info.value.problems == ["noise_schedule.q: must be within (1, 1000] (t - r shrinks by q each stage; ECT "
                                   "CIFAR-10 2, ImageNet 4), got 1"]


def test_a_grid_recipe_without_a_curriculum_still_needs_one(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", curriculum=None)
    with pytest.raises(RecipeError) as info:
        read_recipe(recipe, REGISTRY)
    assert info.value.problems == ["curriculum: missing section; add [curriculum] with name = one of: constant, ct, "
                                   "exponential"]


def test_an_ect_run_trains_and_logs_its_stage_not_num_scales(diffusion: Path, tmp_path: Path) -> None:
    """The tiny ect recipe (d = 4) warm-started by run.init_from: records after steps 2..12 (k = 1..11) log
    ect_stage 1 + (k - 1) // 4 and no num_scales; the weights stay finite."""
    run = train_tiny(tmp_path, "ect", run={"init_from": str(diffusion)}, **ECT)
    assert run.step == 12 and "curriculum" not in run.recipe.components
    rows = records(tmp_path / "ect")
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert [r["ect_stage"] for r in rows] == [1, 1, 2, 2, 3, 3]
    assert all("num_scales" not in r and r["teacher_decay"] == 0.0 and math.isfinite(r["loss"]) for r in rows)
    state = load_checkpoint(tmp_path / "ect" / "checkpoints" / LAST)
    assert all(torch.isfinite(v).all() for v in state["student"].values())


# ----------------------------------------------------------------------- parameterization and l2-norm


@pytest.mark.parametrize("parameterization", ["cm", "edm", "ect"])
def test_the_parameterization_picks_cms_or_edms_consistency_function(parameterization: str) -> None:
    """cm trains and evaluates CM's f, edm EDM's; ect trains EDM's and evaluates CM's shifted by ect_sigma_min
    (ECT's ECMPrecond in train and in eval mode)."""
    cls = REGISTRY.get("objective", "consistency")
    objective = cls(cls.Options(parameterization=parameterization, ect_sigma_min=0.05), BuildContext())
    constants = ConsistencySection(sigma_min=0.01, sigma_data=0.7)
    network = mlp(0)
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.01, 0.7, 40.0], dtype=torch.float64)
    with torch.no_grad():
        evaluated = objective.denoise(network, x, sigma, None, constants)
        trained = objective.train_function(network, x, sigma, None, constants)
        edm = edm_denoise(network, x, sigma, None, 0.7)
        cm = denoise(network, x, sigma, None, sigma_min=0.01, sigma_data=0.7)
        ect_eval = denoise(network, x, sigma, None, sigma_min=0.05, sigma_data=0.7)
    assert torch.equal(trained, cm if parameterization == "cm" else edm)
    assert torch.equal(evaluated, {"cm": cm, "edm": edm, "ect": ect_eval}[parameterization])
    assert not torch.allclose(edm, cm, atol=1e-4) and not torch.allclose(ect_eval, cm, atol=1e-4)
    if parameterization == "cm":
        assert torch.equal(evaluated[0], x[0])  # f(x, sigma_min) = x


def test_ects_evaluation_shift_is_its_ecmprecond_in_eval_mode() -> None:
    """parameterization ect with the default ect_sigma_min 0.003 evaluates c_skip = sd^2 / ((s - 0.003)^2 + sd^2),
    c_out = (s - 0.003) sd / sqrt(s^2 + sd^2), by hand; at sigma 0.821 its output differs from EDM's by about
    0.35 % of the output's size (the difference the issue measured), far above float32 rounding."""
    cls = REGISTRY.get("objective", "consistency")
    objective = cls(cls.Options(parameterization="ect"), BuildContext())
    assert objective.options.ect_sigma_min == 0.003
    constants = ConsistencySection()
    network = mlp(1)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    s = torch.full((4,), 0.821, dtype=torch.float64)
    with torch.no_grad():
        got = objective.denoise(network, x, s, None, constants)
        sd, sf = 0.5, 0.821
        raw = network(x / math.sqrt(sf**2 + sd**2), torch.full((4,), 0.25 * math.log(sf)), None)
        by_hand = sd**2 / ((sf - 0.003) ** 2 + sd**2) * x + (sf - 0.003) * sd / math.sqrt(sf**2 + sd**2) * raw
        edm = objective.train_function(network, x, s, None, constants)
    assert torch.allclose(got, by_hand, rtol=1e-5, atol=1e-6)
    relative = float((got - edm).norm() / edm.norm())
    assert 1e-3 < relative < 1e-2


def test_a_bad_parameterization_is_one_line(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run",
                               objective={"name": "consistency", "parameterization": "karras"})
    assert one_line_error(invoke("check", recipe)) == (
        f"{recipe}: objective.parameterization: must be one of 'cm', 'edm', 'ect'; got 'karras'")


def test_l2_norm_is_the_root_of_the_summed_squares_with_a_zero_gradient_at_equality() -> None:
    cls = REGISTRY.get("metric", "l2-norm")
    metric = cls(cls.Options(), BuildContext((3, 4, 4)))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 4, 4, generator=gen, requires_grad=True)
    y = torch.randn(3, 3, 4, 4, generator=gen)
    y[1] = x[1].detach()  # sample 1: x == y
    value = metric(x, y)
    expected = ((x.detach() - y) ** 2).flatten(1).sum(1).sqrt()
    assert value.shape == (3,) and float(value[1].detach()) == 0.0
    assert torch.allclose(value.detach(), expected, rtol=1e-6, atol=0)
    assert float(value[0].detach()) == pytest.approx(float(torch.linalg.norm(x[0].detach() - y[0])), rel=1e-6)
    value.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    for i in (0, 2):  # elsewhere (x - y) / ||x - y||
        assert torch.allclose(x.grad[i], (x[i] - y[i]).detach() / expected[i], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ run.init_from


def test_run_init_from_starts_from_the_checkpoints_eval_ema_and_is_recorded(diffusion: Path, tmp_path: Path) -> None:
    recipe = read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", run={"init_from": str(diffusion)},
                                           **ECT), REGISTRY)
    newest = diffusion / "checkpoints" / LAST
    state = load_checkpoint(newest)
    run = start_run(recipe, REGISTRY)
    try:
        assert run.step == 0
        assert equal_state(run.student.state_dict(), state["eval_ema"])
        assert equal_state(run.eval_ema.state_dict(), state["eval_ema"])
        assert not equal_state(run.student.state_dict(), state["student"])  # the eval EMA, not the student
        record = run.provenance["init_from"]
        assert record["checkpoint"] == str(newest) and record["weights"] == "eval-ema" and record["step"] == 12
        assert record["run_id"] == state["provenance"]["run_id"]
        written = json.loads((tmp_path / "run" / "provenance.json").read_text(encoding="utf-8"))
        assert written["init_from"] == record
    finally:
        run.close()


@pytest.mark.parametrize("case", ["missing", "empty-dir"])
def test_check_of_a_missing_run_init_from_is_one_line_naming_the_key(tmp_path: Path, case: str) -> None:
    source = tmp_path / ("absent.pt" if case == "missing" else "empty")
    if case == "empty-dir":
        source.mkdir()
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", run={"init_from": str(source)}, **ECT)
    fix = ("not found; train that run (or convert that model) first, or give run.init_from the checkpoint file "
           "or run directory of an existing run" if case == "missing" else
           "holds no checkpoint (checkpoints/ckpt-*.pt); give a checkpoint file, or a run directory that has written "
           "one")
    assert one_line_error(invoke("check", recipe)) == f"{recipe}: run.init_from: {str(source)!r} {fix}"
    assert not (tmp_path / "run").exists()


def test_cli_init_from_overrides_the_recipe_key(diffusion: Path, tmp_path: Path) -> None:
    """run.init_from names the step-6 checkpoint; --init-from the run directory (its step-12 checkpoint) wins."""
    first = diffusion / "checkpoints" / "ckpt-000000006.pt"
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", run={"init_from": str(first)},
                               training={"total_steps": 2, "checkpoint_every": 2, "sample_every": 2}, **ECT)
    result = invoke("run", recipe, "--init-from", diffusion, "--no-progress")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "provenance.json").read_text(encoding="utf-8"))["init_from"]
    assert (record["checkpoint"], record["step"]) == (str(diffusion / "checkpoints" / LAST), 12)
    alone = write_tiny_recipe(tmp_path / "a.toml", tmp_path / "alone", run={"init_from": str(first)},
                              training={"total_steps": 2, "checkpoint_every": 2, "sample_every": 2}, **ECT)
    assert invoke("run", alone, "--no-progress").exit_code == 0
    record = json.loads((tmp_path / "alone" / "provenance.json").read_text(encoding="utf-8"))["init_from"]
    assert (record["checkpoint"], record["step"]) == (str(first), 6)  # without the flag, the recipe's key


# -------------------------------------------------------------------------------------- a tiny cd run


def assert_same(a, b) -> None:
    for key in ("student", "eval_ema"):
        assert equal_state(getattr(a, key).state_dict(), getattr(b, key).state_dict()), key
    assert equal_state(a.teacher.network.state_dict(), b.teacher.network.state_dict())
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert oa.keys() == ob.keys()
    for pid, state in oa.items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(ob[pid][k])) for k, v in state.items()), pid


def test_a_cd_run_trains_resumes_bit_for_bit_and_samples(diffusion: Path, tmp_path: Path) -> None:
    whole = train_tiny(tmp_path, "whole", **tiny_cd(diffusion))
    assert whole.step == 12
    assert [p.name for p in list_checkpoints(tmp_path / "whole")] == ["ckpt-000000006.pt", LAST]
    rows = records(tmp_path / "whole")
    assert [r["num_scales"] for r in rows] == [5] * 6 and all("ect_stage" not in r for r in rows)
    state = load_checkpoint(tmp_path / "whole" / "checkpoints" / LAST)
    assert state["provenance"]["components"]["teacher"]["name"] == "cd"
    teacher_state = dict(state["teacher"])
    assert (teacher_state.pop("diffusion_checkpoint"), teacher_state.pop("diffusion_sha256")) == (
        str(diffusion / "checkpoints" / LAST), file_digest(diffusion / "checkpoints" / LAST))
    assert equal_state(teacher_state, whole.teacher.network.state_dict())
    assert not equal_state(state["student"], load_checkpoint(diffusion / "checkpoints" / LAST)["student"])

    part = train_tiny(tmp_path, "part", stop_at=6, **tiny_cd(diffusion))
    resumed = resume_run(None, REGISTRY, part.out_dir)
    try:
        assert resumed.step == 6 and resumed.teacher.source == diffusion / "checkpoints" / LAST
        train(resumed, progress=False)
        assert resumed.step == 12
        assert_same(whole, resumed)
        train_step(resumed)  # and the comparison can fail
        with pytest.raises(AssertionError):
            assert_same(whole, resumed)
    finally:
        resumed.close()

    out = tmp_path / "s.h5"
    result = invoke("sample", tmp_path / "whole", "-n", 4, "-o", out)
    assert result.exit_code == 0, result.output
    store = read_sample_store(out)
    assert store["images"].shape == (4, 3, 4, 4) and store["images"].dtype == torch.uint8
    assert store["attrs"]["sampler"] == "consistency"


def test_a_resumed_cd_run_distils_the_file_it_started_with_though_its_run_has_a_newer_one(
        diffusion: Path, tmp_path: Path) -> None:
    """teacher.checkpoint names a run directory, whose newest checkpoint changes between start and resume: the
    resumed run keeps distilling the file its checkpoints record, bit for bit; that file gone, one line."""
    growing = tmp_path / "growing"
    (growing / "checkpoints").mkdir(parents=True)
    first = growing / "checkpoints" / "ckpt-000000006.pt"
    shutil.copy(diffusion / "checkpoints" / "ckpt-000000006.pt", first)
    whole = train_tiny(tmp_path, "whole", **tiny_cd(growing))
    part = train_tiny(tmp_path, "part", stop_at=6, **tiny_cd(growing))
    shutil.copy(diffusion / "checkpoints" / LAST, growing / "checkpoints" / LAST)  # the diffusion run went on
    resumed = resume_run(None, REGISTRY, part.out_dir)
    try:
        assert resumed.teacher.source == first
        train(resumed, progress=False)
        assert_same(whole, resumed)
    finally:
        resumed.close()

    again = train_tiny(tmp_path, "again", stop_at=6, **tiny_cd(growing))  # starts from the newest, step 12
    (growing / "checkpoints" / LAST).unlink()
    result = invoke("run", again.out_dir, "--resume", "--no-progress")
    assert one_line_error(result, 1) == (
        f"teacher.checkpoint: this run distils {str(growing / 'checkpoints' / LAST)!r} (sha256 "
        f"{file_digest(diffusion / 'checkpoints' / LAST)[:12]}...), which is gone or has changed, and "
        f"teacher.checkpoint now gives {str(first)!r}; put that file back to resume the run"), result.output
    assert [p.name for p in list_checkpoints(again.out_dir)] == ["ckpt-000000006.pt"]  # nothing lost


# ------------------------------------------------------------------------------------------ registration


def test_list_components_shows_cd_and_ect_from_the_ctcore_distribution() -> None:
    result = invoke("list-components", "--json")
    assert result.exit_code == 0, result.output
    rows = {(r["kind"], r["name"]): r for r in json.loads(result.stdout)}
    for kind, name in (("teacher", "cd"), ("noise_schedule", "ect"), ("metric", "l2-norm")):
        assert (rows[kind, name]["distribution"], rows[kind, name]["version"]) == ("ctcore", ctcore.__version__)
    assert rows["teacher", "cd"]["options"] == {"checkpoint": "", "weights": "eval-ema", "solver": "heun", "mu": 0.0}
    assert rows["noise_schedule", "ect"]["options"] == {"p_mean": -1.1, "p_std": 2.0, "q": 2.0, "k": 8.0, "b": 1.0,
                                                         "d": 25000}
    # through the entry points and hooks a third party uses: the plugin modules' hook functions return the classes
    modules = {ep.name: ep.load() for ep in entry_points(group="ctcore") if ep.name in ("teachers", "noise-schedules")}
    assert REGISTRY.get("teacher", "cd") in modules["teachers"].ctcore_register_teachers()
    assert REGISTRY.get("noise_schedule", "ect") in modules["noise-schedules"].ctcore_register_noise_schedules()


def test_the_cd_teacher_is_a_frozen_copy_that_follows_the_student_by_mu(diffusion: Path) -> None:
    """mu = 0.5: after update theta^- = (theta^- + theta) / 2; the diffusion model and the target do not train."""
    cls = REGISTRY.get("teacher", "cd")
    teacher = cls(cls.Options(checkpoint=str(diffusion), mu=0.5), BuildContext((3, 4, 4), 0, 12))
    student = mlp(0)
    teacher.bind(student)
    before = copy.deepcopy(teacher.network.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, 0, 5)
    after, now = teacher.network.state_dict(), student.state_dict()
    name = "inp.weight"
    assert torch.allclose(after[name], (before[name] + now[name]) / 2, atol=1e-6)
    assert teacher.decay(0, 5) == 0.5
    assert not any(p.requires_grad for p in teacher.network.parameters())
    assert not any(p.requires_grad for p in teacher.diffusion.parameters())
    assert equal_state(teacher.diffusion.state_dict(), load_checkpoint(diffusion / "checkpoints" / LAST)["eval_ema"])
