"""The continuous-time objectives sct, scd and meanflow and the samplers scm and meanflow (issue 26): registered like
every builtin, their losses equal to independent computations on linear networks, their model functions exact at
sigma = 0, their sampling plans, the one-line refusals of a network or teacher that lacks what they need, and
training that resumes bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import MEANFLOW, SCT, tiny_scd, write_tiny_recipe
from torch import nn
from typer.testing import CliRunner

from ctcore import meanflow, trigflow
from ctcore.build import resume_run, start_run
from ctcore.cli import app
from ctcore.components import NoiseLevels, TrainingBatch
from ctcore.recipe import ConsistencySection, read_recipe
from ctcore.registry import load_registry
from ctcore.training import train

REGISTRY = load_registry()
TRIGFLOW = {"objective": {"name": "trigflow"}, "sampler": {"name": "heun", "steps": 4},
            "network": {"logvar_head": True}, "teacher": None, "metric": None, "noise_schedule": None,
            "curriculum": None}
"""Overrides that make the tiny recipe sCM's TrigFlow diffusion model (the teacher of sct / scd)."""


def test_the_objectives_and_samplers_are_registered_by_the_ctcore_distribution() -> None:
    for kind, name in [("objective", "sct"), ("objective", "scd"), ("objective", "meanflow"), ("sampler", "scm"),
                       ("sampler", "meanflow")]:
        assert REGISTRY.provider(kind, name).distribution == "ctcore", (kind, name)
    result = CliRunner().invoke(app, ["list-components", "--json"])
    assert result.exit_code == 0, result.output
    for name in ("sct", "scd", "meanflow", "scm"):
        assert f'"{name}"' in result.stdout


# ------------------------------------------------------------------------------ losses against linear networks


class Linear(nn.Module):
    """F(u, c) = W u + a c_0 + b c_1 over the flattened sample (c_1 = 0 for a (B,) c), in float64; logvar(c) = k c."""

    time_inputs = 2

    def __init__(self, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.W = nn.Parameter(torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5)
        self.a = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.k = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, u: torch.Tensor, c: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        c0, c1 = (c[:, 0], c[:, 1]) if c.ndim == 2 else (c, torch.zeros_like(c))
        flat = u.flatten(1).double() @ self.W.T + c0.double()[:, None] * self.a + c1.double()[:, None] * self.b
        return flat.view(u.shape)

    def logvar(self, c: torch.Tensor) -> torch.Tensor:
        return self.k * c.double()


def _batch(student: nn.Module, x: torch.Tensor, step: int = 3) -> TrainingBatch:
    return TrainingBatch(step=step, x=x, labels=None, batch_size=x.shape[0], share=slice(0, x.shape[0]),
                         student=student, constants=ConsistencySection(), index_generator=torch.Generator(),
                         noise_generator=torch.Generator().manual_seed(7))


def _objective(name: str, **options: object):
    return REGISTRY.create("objective", name, data_shape=(2, 2, 2), **options)


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_sct_loss_and_its_gradient_equal_an_independent_computation_on_a_linear_network(adaptive: bool) -> None:
    """For F(u, t) = W u + a t the tangent is closed-form: sigma_d cos t sin t dF/dt = W (cos t sin t dx_t/dt) +
    a cos t sin t sigma_d; the loss at F = F^- is mean_b w ||g||^2 / D (+ logvar), its gradient -2 w g u^T / D."""
    torch.manual_seed(0)
    net, x = Linear(8), torch.rand(4, 2, 2, 2, dtype=torch.float64) * 2 - 1
    objective = _objective("sct", adaptive_weighting=adaptive, warmup_steps=10)
    objective.bind(net, {})
    loss = objective.loss(_batch(net, x, step=3))
    loss.backward()

    sd, r, D = 0.5, 0.3, 8
    gen = torch.Generator().manual_seed(7)
    t = trigflow.proposal(4, gen, p_mean=-1.0, p_std=1.4, sigma_d=sd).double()
    z = sd * torch.randn((4, 2, 2, 2), generator=gen).double()
    cos, sin = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x0, zf = x.flatten(1), z.flatten(1)
    x_t, dxdt = cos * x0 + sin * zf, cos * zf - sin * x0
    with torch.no_grad():
        u = x_t / sd
        F = u @ net.W.T + t[:, None] * net.a
        sd_dF = (cos * sin * dxdt) @ net.W.T + (cos * sin * sd) * net.a
        g = -cos**2 * (sd * F - dxdt) - r * (sin * cos * x_t + sd_dF)
        g = g / (g.norm(dim=1, keepdim=True) + 0.1)
        mse = g.square().sum(1) / D
        lv = net.k * t if adaptive else torch.zeros_like(t)
        expected = (torch.exp(-lv) * mse + lv).mean()
        grad_W = (-2 / D * torch.exp(-lv)[:, None, None] * g[:, :, None] * u[:, None, :]).mean(0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(net.W.grad, grad_W, rtol=1e-5, atol=1e-8)
    assert objective.log_fields(3) == {"tangent_warmup": 0.3}


def test_the_meanflow_loss_equals_an_independent_computation_on_a_linear_network() -> None:
    """For u(z, r, t) = W z + a t + b (t - r): du/dt along (v, 0, 1) = W v + a + b, u_tgt = v - (t - r) du/dt, and
    the loss is mean_b ||u - u_tgt||^2 / (||u - u_tgt||^2 + c)^p (summed over the sample's entries)."""
    net, x = Linear(8), torch.rand(6, 2, 2, 2, dtype=torch.float64) * 2 - 1
    objective = _objective("meanflow", ratio_r_neq_t=0.5, adaptive_p=0.75)
    objective.bind(net, {})
    loss = objective.loss(_batch(net, x))

    gen = torch.Generator().manual_seed(7)
    r, t = meanflow.sample_r_t(6, gen, ratio=0.5)
    assert (r < t).sum() == 3 and (r == t).sum() == 3
    e = torch.randn((6, 2, 2, 2), generator=gen).double().flatten(1)
    r, t, x0 = r.double(), t.double(), x.flatten(1)
    z, v = (1 - t[:, None]) * x0 + t[:, None] * e, e - x0
    with torch.no_grad():
        u = z @ net.W.T + t[:, None] * net.a + (t - r)[:, None] * net.b
        target = v - (t - r)[:, None] * (v @ net.W.T + net.a + net.b)
        delta = (u - target).square().sum(1)
        expected = (delta / (delta + 1e-3) ** 0.75).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------------------------- model functions


def test_the_model_functions_are_exact_at_sigma_0_and_match_their_time_variables() -> None:
    """sct: f(x, 0) = x and f(x_sigma, sigma) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t), x_t = cos t x_sigma;
    meanflow: f(x, 0) = x and f = z - t u(z, 0, t), t = sigma / (1 + sigma), z = x_sigma / (1 + sigma)."""
    net, c = Linear(8), ConsistencySection()
    x = torch.rand(2, 2, 2, 2, dtype=torch.float64)
    sigma = torch.tensor([0.0, 3.0])
    for name in ("sct", "meanflow"):
        out = _objective(name).denoise(net, x, sigma, None, c)
        assert torch.equal(out[0], x[0]), name
    t = math.atan(3.0 / 0.5)
    x_t = math.cos(t) * x[1:]
    F = net(x_t / 0.5, torch.tensor([t], dtype=torch.float32), None)
    expected = math.cos(t) * x_t - math.sin(t) * 0.5 * F
    torch.testing.assert_close(_objective("sct").denoise(net, x[1:], sigma[1:], None, c), expected)
    tm, z = 0.75, x[1:] / 4.0
    u = net(z, torch.tensor([[tm, tm]]), None)
    torch.testing.assert_close(_objective("meanflow").denoise(net, x[1:], sigma[1:], None, c), z - tm * u)


# --------------------------------------------------------------------------------------------- samplers


def test_the_scm_and_meanflow_samplers_plan_from_the_papers_times_and_renoise_exactly() -> None:
    levels = NoiseLevels(0.002, 80.0, (), 0.5)
    scm = REGISTRY.create("sampler", "scm")
    assert scm.plan(None, None, levels) == [80.0]
    assert scm.plan(2, None, levels) == [80.0, 0.5 * math.tan(1.1)]
    assert scm.preview_plans(levels) == {"1step": [80.0], "2step": [80.0, 0.5 * math.tan(1.1)]}
    flow = REGISTRY.create("sampler", "meanflow", t_mid=0.75)
    assert flow.plan(2, None, levels) == [80.0, 3.0]
    with pytest.raises(ValueError, match=r"^scm samples in 1 or 2 steps by itself \(t_mid = 1.1\); for 3 steps give "
                                         r"the levels, e.g. --sigmas 80,2,0.5$"):
        scm.plan(3, None, levels)
    with pytest.raises(ValueError, match=r"^scm: t_mid = 1.1 is sigma 0.98238, not below sigma_max 0.5; lower "
                                         r"sampler.t_mid$"):
        scm.plan(2, None, NoiseLevels(0.002, 0.5, (), 0.5))
    calls = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        calls.append((x.clone(), sigma.clone()))
        return 0.5 * x

    noise = torch.randn(2, 3, 1, 2, 2)
    out = scm.sample(denoiser, noise, [80.0, 2.0], None, levels, clip=False)
    torch.testing.assert_close(calls[0][0], 80.0 * noise[0])
    torch.testing.assert_close(calls[1][0], 40.0 * noise[0] + 2.0 * noise[1])
    assert calls[1][1].tolist() == [2.0] * 3
    torch.testing.assert_close(out, 0.5 * (40.0 * noise[0] + 2.0 * noise[1]))


def test_the_meanflow_sampler_chains_the_models_own_jumps_as_the_paper_and_renoises_when_asked() -> None:
    """MeanFlow eq. 12 in two steps through t_mid = 0.5: z_r = z_1 - (t - r) u(z_1, r, t), then x = z_r - r u(z_r, 0,
    r); the model function carries the objective's jump through finite_outputs. deterministic = false re-noises."""
    from ctcore.runstate import model_function
    from ctcore.sampling import finite_outputs

    net, c = Linear(8), ConsistencySection()
    objective = _objective("meanflow")
    f = finite_outputs(model_function(objective, net, c))
    noise = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64)
    levels = NoiseLevels(0.002, 80.0, (), 0.5)
    flow = REGISTRY.create("sampler", "meanflow")
    sigmas = flow.plan(2, None, levels)
    assert sigmas == [80.0, 1.0]
    out = flow.sample(f, noise, sigmas, None, levels, clip=False)
    with torch.no_grad():
        t, r = 80.0 / 81.0, 0.5
        z1 = 80.0 * noise[0] / 81.0
        u1 = net(z1, torch.tensor([[t, t - r]] * 3, dtype=torch.float32), None)
        z_r = z1 - (t - r) * u1
        expected = z_r - r * net(z_r, torch.tensor([[r, r]] * 3, dtype=torch.float32), None)
    torch.testing.assert_close(out, expected)
    renoised = REGISTRY.create("sampler", "meanflow", deterministic=False).sample(f, noise, sigmas, None, levels,
                                                                                    clip=False)
    x0 = f(80.0 * noise[0], torch.full((3,), 80.0), None)
    torch.testing.assert_close(renoised, f(x0 + 1.0 * noise[1], torch.full((3,), 1.0), None))
    assert not hasattr(model_function(_objective("sct"), net, c), "jump")  # only a flow map has one


def test_check_objective_holds_a_flow_maps_jump_to_its_contract() -> None:
    """ctcore.testing.check_objective passes meanflow's jump and fails one that returns the wrong shape."""
    from ctcore.testing import ContractViolation, check_objective

    cls = REGISTRY.get("objective", "meanflow")
    check_objective(cls)

    class Broken(cls):
        def jump(self, network, x, sigma, sigma_to, labels, constants):
            return x[:1]

    with pytest.raises(ContractViolation, match=r"jump\(network, x, sigma, sigma_to, labels, constants\) must return "
                                                r"finite values shaped like x \(3, 3, 4, 4\), got \(1, 3, 4, 4\)$"):
        check_objective(Broken)


# --------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("overrides", "message"), [
    ({**SCT, "network": {"logvar_head": False}},
     "adaptive_weighting = true needs the network's learned log-variance: network 'mlp' has no log-variance head: "
     "set its option logvar_head = true, or set [objective] adaptive_weighting = false"),
    ({**MEANFLOW, "network": {"time_inputs": 1}},
     "needs a network of two times u(z, r, t); set [network] time_inputs = 2"),
    ({**SCT, "objective": {"name": "scd"}, "teacher": {"name": "no-ema"}},
     "distils a diffusion model, but teacher 'no-ema' holds none; use [teacher] name = \"cd\" with "
     "checkpoint = the diffusion run to distil"),
], ids=["sct-without-logvar-head", "meanflow-with-one-time", "scd-without-a-diffusion-teacher"])
def test_a_network_or_teacher_that_lacks_what_the_objective_needs_is_one_line_at_check(tmp_path, overrides,
                                                                                        message) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", **overrides)
    result = CliRunner().invoke(app, ["check", str(recipe)])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: {recipe}: objective {overrides['objective']['name']!r} (from "
                                          f"distribution 'ctcore {REGISTRY.provider('objective', 'sct').version}'): "
                                          f"{message}"]


def test_dropout_under_training_compile_is_refused_where_the_jvp_runs_eagerly(tmp_path) -> None:
    """torch.compile draws other random numbers than eager, so a compiled student pass cannot share the eager JVP's
    dropout mask: one line at check with dropout 0.1 (the tiny recipe's); dropout 0 compiles."""
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", **SCT, training={"compile": "on"})
    result = CliRunner().invoke(app, ["check", str(recipe)])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: {recipe}: objective 'sct' (from distribution 'ctcore {REGISTRY.provider('objective', 'sct').version}"
        "'): runs its JVP eagerly, and the compiled student pass would draw another dropout mask than the JVP "
        "(torch.compile's random numbers are not eager's); set training.compile = \"off\" (or [network] dropout = 0)"]
    plain = write_tiny_recipe(tmp_path / "p.toml", tmp_path / "run", **{**SCT, "network": {"logvar_head": True,
                                                                                           "dropout": 0.0}},
                              training={"compile": "on"})
    assert CliRunner().invoke(app, ["check", str(plain)]).exit_code == 0


class Recording(nn.Module):
    """Records, for each call, whether CPU autocast was on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.autocast, self.time_inputs = inner, [], inner.time_inputs

    def forward(self, u: torch.Tensor, c: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return self.inner(u, c, labels)

    def logvar(self, c: torch.Tensor) -> torch.Tensor:
        return self.inner.logvar(c)


@pytest.mark.parametrize(("name", "precision", "expected"), [
    ("sct", "fp32", [False, True]), ("sct", "autocast", [True, True]),
    ("meanflow", "fp32", [False, True]), ("meanflow", "autocast", [True, True])])
def test_jvp_precision_fp32_runs_the_jvp_outside_bf16_autocast(name, precision, expected) -> None:
    """Under the step's bf16 autocast, `jvp_precision = "fp32"` runs the JVP's pass with autocast off (float32)
    and the student's pass under it; "autocast" runs both under it."""
    net = Recording(REGISTRY.create("network", "mlp", data_shape=(2, 2, 2), width=8, num_blocks=1,
                                    embedding_features=4, time_inputs=2, logvar_head=True))
    objective = _objective(name, jvp_precision=precision)
    objective.bind(net, {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective.loss(_batch(net, torch.rand(4, 2, 2, 2) * 2 - 1))
    assert net.autocast == expected and torch.isfinite(loss)


@pytest.mark.parametrize("name", ["sct", "meanflow"])
def test_the_finite_difference_jvp_gives_the_forward_ad_loss_of_a_float32_network(name) -> None:
    """jvp_method = "finite-difference" (h = jvp_step 1e-6) runs three float64 passes (the weights copied to float64)
    and gives the loss of forward-mode AD through the float32 network to float32 rounding."""
    net = REGISTRY.create("network", "mlp", data_shape=(2, 2, 2), width=16, num_blocks=1, embedding_features=4,
                          time_inputs=2, logvar_head=True, zero_init_output=False)
    seen: list[torch.dtype] = []
    net.inp.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = torch.rand(8, 2, 2, 2) * 2 - 1
    losses, passes = [], []
    for method in ("forward-ad", "finite-difference"):
        seen.clear()
        objective = _objective(name, jvp_method=method,  # p = 0: MeanFlow's plain squared error, not ~1 per sample
                               **({"warmup_steps": 0} if name == "sct" else {"adaptive_p": 0.0}))
        objective.bind(net, {})
        losses.append(objective.loss(_batch(net, x)).item())
        passes.append(list(seen))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5), losses
    assert passes == [[torch.float32, torch.float32], [torch.float64] * 3 + [torch.float32]]


# ------------------------------------------------------------------------------------ training and resume


def _state(run) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v for k, v in run.student.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in run.eval_ema.state_dict().items()})
    for pid, entry in run.optimizer.state_dict()["state"].items():
        state.update({f"opt.{pid}.{k}": torch.as_tensor(v) for k, v in entry.items()})
    return state


@pytest.mark.parametrize("name", ["sct", "meanflow", "scd"])
def test_a_resumed_continuous_time_run_equals_the_uninterrupted_run_bit_for_bit(tmp_path, name) -> None:
    """With dropout 0.1 (the tiny recipe's): the JVP and the student's pass share each step's mask; scd distils a
    tiny trigflow run, and its cd teacher's target and the diffusion file's digest resume too."""
    if name == "scd":
        teacher = start_run(read_recipe(write_tiny_recipe(tmp_path / "t.toml", tmp_path / "teacher", **TRIGFLOW),
                                        REGISTRY), REGISTRY)
        train(teacher, progress=False)
    overrides = {"sct": SCT, "meanflow": MEANFLOW, "scd": tiny_scd(tmp_path / "teacher")}[name]

    def run_of(name: str, stop_at: int | None):
        recipe = read_recipe(write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name, **overrides), REGISTRY)
        run = start_run(recipe, REGISTRY)
        train(run, stop_at=stop_at, progress=False)
        return run

    whole, part = run_of("whole", None), run_of("part", 6)
    resumed = resume_run(None, REGISTRY, part.out_dir)
    train(resumed, progress=False)
    a, b = _state(whole), _state(resumed)
    if whole.teacher is not None:
        a.update({f"teacher.{k}": torch.as_tensor(v) for k, v in whole.teacher.state_dict().items()
                  if isinstance(v, torch.Tensor)})
        b.update({f"teacher.{k}": torch.as_tensor(v) for k, v in resumed.teacher.state_dict().items()
                  if isinstance(v, torch.Tensor)})
    assert a.keys() == b.keys() and resumed.step == whole.step == 12
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert any(not torch.equal(a[k], v) for k, v in _state(part).items() if k in a)  # training moved them



def test_a_trigflow_diffusion_run_starts_sct_with_its_own_denoiser_and_is_the_teacher_scd_distils(tmp_path) -> None:
    """sCM starts sCT and sCD from its TrigFlow diffusion model: `trigflow` trains it with the student's network and
    time input, so run.init_from gives an sct student whose consistency function at step 0 is that denoiser, bit for
    bit; and a `cd` teacher holding it drives scd."""
    teacher = start_run(read_recipe(write_tiny_recipe(tmp_path / "t.toml", tmp_path / "teacher", **TRIGFLOW),
                                    REGISTRY), REGISTRY)
    train(teacher, progress=False)
    assert teacher.objective.model == "diffusion"
    sct = start_run(read_recipe(write_tiny_recipe(tmp_path / "s.toml", tmp_path / "sct", **SCT,
                                                  run={"init_from": str(tmp_path / "teacher")}), REGISTRY), REGISTRY)
    x, sigma, c = torch.randn(3, 3, 4, 4), torch.tensor([0.01, 0.9, 60.0]), ConsistencySection()
    with torch.no_grad():
        expected = teacher.objective.denoise(teacher.eval_ema, x, sigma, None, c)
        assert torch.equal(sct.objective.denoise(sct.eval_ema, x, sigma, None, c), expected)  # eval: no dropout
    scd = start_run(read_recipe(write_tiny_recipe(tmp_path / "d.toml", tmp_path / "scd",
                                                  **tiny_scd(tmp_path / "teacher")), REGISTRY), REGISTRY)
    summary = train(scd, progress=False)
    assert scd.step == 12 and math.isfinite(summary["final_distance"])


@pytest.mark.parametrize("name", ["sct", "meanflow"])
def test_micro_batches_train_like_the_whole_batch(tmp_path, name) -> None:
    """training.micro_batch_size: every pass draws the global batch's t, z (and r) and keeps its rows, the tangent
    and the adaptive weights are per sample, so 6 steps in passes of 4 equal whole batches of 8 to float32
    rounding (dropout 0: fresh masks per pass are not the whole batch's)."""
    overrides = {"sct": SCT, "meanflow": MEANFLOW}[name]
    network = {**overrides["network"], "dropout": 0.0}
    runs = []
    for micro in (0, 4):
        recipe = write_tiny_recipe(tmp_path / f"{micro}.toml", tmp_path / str(micro), **{**overrides,
                                   "network": network}, training={"total_steps": 6, "micro_batch_size": micro})
        run = start_run(read_recipe(recipe, REGISTRY), REGISTRY)
        train(run, progress=False)
        runs.append(run)
    pairs = list(zip(runs[1].student.parameters(), runs[0].student.parameters(), strict=True))
    difference = max((a - b).abs().max().item() for a, b in pairs) / max(b.abs().max().item() for _, b in pairs)
    assert difference < 1e-4, difference
    assert any(not torch.equal(p, q) for p, q in zip(runs[0].student.parameters(),
                                                     start_run(read_recipe(tmp_path / "0.toml", REGISTRY),
                                                               REGISTRY, tmp_path / "fresh").student.parameters(),
                                                     strict=True))

