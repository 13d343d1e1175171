"""The paper's maths in ctcore.consistency, checked against the iCT reference sheet (secs. 2, 3, 6, 9, 17)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import ctcore
from ctcore.consistency import c_noise, consistency_loss, consistency_scalings, denoise, pair_weights

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, RHO = 0.002, 80.0, 0.5, 7.0

# Reference sheet sec. 3: the N = 11 Karras grid (iCT start), printed to 4 decimals.
SHEET_GRID_11 = [0.002, 0.0167, 0.0851, 0.3183, 0.9654, 2.5152, 5.8389, 12.3816, 24.4083, 45.3137, 80.0]


def _mlp(registry, **options):
    torch.manual_seed(0)
    return registry.create("network", "mlp", data_shape=(1, 4, 4), zero_init_output=False, **options)


# ----------------------------------------------------------------------------------------- Karras grid


def test_karras_sigmas_n11_matches_sheet():
    sigmas = ctcore.karras_sigmas(11)
    assert sigmas.shape == (11,)
    assert [round(v, 4) for v in sigmas.tolist()] == SHEET_GRID_11


def test_karras_sigmas_matches_formula_independently():
    n = 18
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    expected = [(lo + i / (n - 1) * (hi - lo)) ** RHO for i in range(n)]
    assert ctcore.karras_sigmas(n).tolist() == pytest.approx(expected, rel=1e-12)


def test_karras_sigmas_increasing_with_exact_ends():
    for n in (2, 11, 1281):
        sigmas = ctcore.karras_sigmas(n)
        assert torch.all(sigmas[1:] > sigmas[:-1])
        assert sigmas[0].item() == SIGMA_MIN
        assert sigmas[-1].item() == SIGMA_MAX


def test_karras_sigmas_dtype():
    assert ctcore.karras_sigmas(11).dtype == torch.float64
    s32 = ctcore.karras_sigmas(11, dtype=torch.float32)
    assert s32.dtype == torch.float32
    assert s32.tolist() == pytest.approx(ctcore.karras_sigmas(11).tolist(), rel=1e-6)


@pytest.mark.parametrize("n", [1, 0, -3])
def test_karras_sigmas_needs_two_points(n):
    with pytest.raises(ValueError, match="at least 2 points"):
        ctcore.karras_sigmas(n)


def test_the_objective_trains_on_the_karras_grid_of_the_current_curriculum_stage(tmp_path, registry, monkeypatch):
    """The consistency objective caches its grid per N(k): across stage changes (the tiny recipe's exponential
    curriculum, s0 2, s1 8 over 12 steps: N = 3, 5, 9 from steps 0, 4, 8) the grid the noise schedule draws from
    is karras_sigmas(N(k)) exactly, rebuilt at each stage and the same tensor within one."""
    from helpers import write_tiny_recipe

    from ctcore.build import build_run
    from ctcore.recipe import read_recipe
    from ctcore.training import train_step

    run = build_run(read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run"), registry), registry)
    schedule = run.objective.parts["noise_schedule"]
    grids = []
    draw_pairs = schedule.pairs

    def recording(draw):
        grids.append(draw.grid)
        return draw_pairs(draw)

    monkeypatch.setattr(schedule, "pairs", recording)
    for _ in range(12):
        train_step(run)
    scales = [run.curriculum.num_scales(k) for k in range(12)]
    assert scales == [3] * 4 + [5] * 4 + [9] * 4
    c = run.recipe.consistency
    for k, (n, grid) in enumerate(zip(scales, grids, strict=True)):
        assert torch.equal(grid, ctcore.karras_sigmas(n, c.sigma_min, c.sigma_max, c.rho)), k
    assert [grids[k] is grids[k - 1] for k in range(1, 12)] == [k not in (4, 8) for k in range(1, 12)]
    assert run.objective.grid[0] == 9


# --------------------------------------------------------------------------------------- scalings


def _sheet_scalings(s: float) -> tuple[float, float, float]:
    sd = SIGMA_DATA
    c_skip = sd**2 / ((s - SIGMA_MIN) ** 2 + sd**2)
    c_out = (s - SIGMA_MIN) * sd / math.sqrt(s**2 + sd**2)
    c_in = 1 / math.sqrt(s**2 + sd**2)
    return c_skip, c_out, c_in


@pytest.mark.parametrize("sigma", [0.002, 0.003, 0.01, 0.1, 0.5, 1.0, 2.5, 80.0])
def test_consistency_scalings_match_sheet_formulas(sigma):
    got = [v.item() for v in consistency_scalings(torch.tensor(sigma, dtype=torch.float64))]
    assert got == pytest.approx(_sheet_scalings(sigma), rel=1e-12, abs=1e-15)


def test_consistency_scalings_accepts_python_float_and_batches():
    sigmas = [0.01, 0.5, 3.0]
    c_skip, c_out, c_in = consistency_scalings(torch.tensor(sigmas, dtype=torch.float64))
    assert c_skip.shape == c_out.shape == c_in.shape == (3,)
    for j, s in enumerate(sigmas):
        assert (c_skip[j].item(), c_out[j].item(), c_in[j].item()) == pytest.approx(_sheet_scalings(s))
    scalar = consistency_scalings(0.5)
    assert [v.item() for v in scalar] == pytest.approx(_sheet_scalings(0.5))


def test_c_out_denominator_uses_sigma_not_shifted_sigma():
    # Checklist item 1: the shift is in c_out's numerator only. Near sigma = 1 the wrong form differs by
    # ~3e-4 relative, far above the 1e-12 tolerance, so this test distinguishes the two.
    s = 1.0
    wrong = (s - SIGMA_MIN) * SIGMA_DATA / math.sqrt((s - SIGMA_MIN) ** 2 + SIGMA_DATA**2)
    right = _sheet_scalings(s)[1]
    assert abs(wrong - right) / right > 1e-4
    got = consistency_scalings(torch.tensor(s, dtype=torch.float64))[1].item()
    assert got == pytest.approx(right, rel=1e-12)


def test_boundary_condition_scalings():
    c_skip, c_out, _ = consistency_scalings(torch.tensor(SIGMA_MIN, dtype=torch.float64))
    assert c_skip.item() == 1.0
    assert c_out.item() == 0.0


def test_denoise_at_sigma_min_returns_input_exactly(registry):
    net = _mlp(registry)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((3,), SIGMA_MIN)
    with torch.no_grad():
        raw = net(x, c_noise(sigma, "fourier"), None)
        assert raw.abs().max() > 1e-3  # the raw network output is not zero, so the skip must do the work
        out = denoise(net, x, sigma)
        assert torch.equal(out, x)
        # ...and away from sigma_min it does not return x (the check above is not vacuous)
        assert not torch.allclose(denoise(net, x, torch.full((3,), 1.0)), x)


def test_denoise_matches_parameterization_by_hand(registry):
    net = _mlp(registry)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.3, 7.0])
    with torch.no_grad():
        got = denoise(net, x, sigma)
        for j, s in enumerate(sigma.tolist()):
            c_skip, c_out, c_in = _sheet_scalings(s)
            raw = net(c_in * x[j : j + 1], torch.tensor([0.25 * math.log(s)]), None)
            expected = c_skip * x[j : j + 1] + c_out * raw
            torch.testing.assert_close(got[j : j + 1], expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- c_noise


def test_c_noise_conventions():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    fourier = c_noise(sigma, "fourier").tolist()
    positional = c_noise(sigma, "positional").tolist()
    assert fourier == pytest.approx([0.25 * math.log(s) for s in sigma.tolist()], rel=1e-12, abs=1e-15)
    expected_positional = [1000 * 0.25 * math.log(s) for s in sigma.tolist()]
    assert positional == pytest.approx(expected_positional, rel=1e-12, abs=1e-12)


class _RecordNoise(nn.Module):
    """Returns zeros and records the c_noise it was given."""

    noise_conditioning = "positional"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, c_noise, labels):
        self.seen.append(c_noise.detach().clone())
        return torch.zeros_like(x)


class _RecordNoiseFourier(_RecordNoise):
    noise_conditioning = "fourier"


@pytest.mark.parametrize(("cls", "factor"), [(_RecordNoise, 250.0), (_RecordNoiseFourier, 0.25)])
def test_denoise_feeds_the_network_its_noise_convention(cls, factor):
    net = cls()
    sigma = torch.tensor([0.05, 2.0, 40.0])
    denoise(net, torch.zeros(3, 1, 2, 2), sigma)
    expected = [factor * math.log(s) for s in sigma.tolist()]
    assert net.seen[0].tolist() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------- pair weights


def test_pair_weights_inverse_delta_n11_matches_sheet():
    sigmas = ctcore.karras_sigmas(11)
    w = pair_weights(sigmas, "inverse-delta")
    assert w.shape == (10,)
    assert round(w[0].item(), 1) == 67.9  # smallest pair
    assert round(w[-1].item(), 3) == 0.029  # largest pair
    s = sigmas.tolist()
    assert w.tolist() == pytest.approx([1 / (b - a) for a, b in zip(s, s[1:], strict=False)], rel=1e-12)
    assert torch.all(w[1:] < w[:-1])  # decreasing: the weight is indexed by the pair, smallest first


def test_pair_weights_inverse_delta_n1281_matches_sheet():
    w = pair_weights(ctcore.karras_sigmas(1281), "inverse-delta")
    assert w.shape == (1280,)
    assert round(w[0].item()) == 25_585
    assert round(w[-1].item(), 2) == 2.94


def test_pair_weights_uniform_is_ones():
    w = pair_weights(ctcore.karras_sigmas(11), "uniform")
    assert w.shape == (10,)
    assert torch.equal(w, torch.ones(10, dtype=torch.float64))


def test_pair_weights_rejects_unknown_weighting():
    with pytest.raises(ValueError, match="unknown weighting"):
        pair_weights(ctcore.karras_sigmas(11), "inverse_delta")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- consistency loss


def _perturbed_copy(net: nn.Module) -> nn.Module:
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return other


def grid_loss(student, teacher, metric, x, labels, sigmas, pair, z, *, weighting):
    """consistency_loss on the pairs (sigmas[i], sigmas[i+1]) of a grid, with the CM/iCT parameterization."""
    return consistency_loss(student, teacher, metric, x, labels, sigmas[pair], sigmas[pair + 1], z,
                            weighting=weighting, f=denoise)


@pytest.mark.parametrize("weighting", ["inverse-delta", "uniform"])
def test_consistency_loss_value_by_hand(registry, weighting):
    student = _mlp(registry)
    teacher = _perturbed_copy(student)  # different weights: swapping the student's/teacher's sigma shows up
    metric = registry.create("metric", "pseudo-huber", data_shape=(1, 4, 4))
    sigmas = ctcore.karras_sigmas(11)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 4, 4, generator=g)
    z = torch.randn(4, 1, 4, 4, generator=g)
    pair = torch.tensor([0, 3, 9, 5])

    loss, per_example = grid_loss(
        student, teacher, metric, x, None, sigmas, pair, z, weighting=weighting
    )

    c = 0.00054 * math.sqrt(16)
    expected = []
    s = sigmas.tolist()
    with torch.no_grad():
        for j, i in enumerate(pair.tolist()):
            lo, hi = s[i], s[i + 1]

            def f(net, sig, j=j):
                c_skip, c_out, c_in = _sheet_scalings(sig)
                xs = x[j : j + 1] + sig * z[j : j + 1]
                raw = net(c_in * xs, torch.tensor([0.25 * math.log(sig)]), None)
                return c_skip * xs + c_out * raw

            diff = (f(student, hi) - f(teacher, lo)).double()
            d = math.sqrt(diff.square().sum().item() + c * c) - c
            lam = 1 / (hi - lo) if weighting == "inverse-delta" else 1.0
            expected.append(lam * d)
    assert per_example.tolist() == pytest.approx(expected, rel=1e-4)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert loss.requires_grad and not per_example.requires_grad


def test_consistency_loss_teacher_gets_no_gradient(registry):
    student = _mlp(registry)
    teacher = copy.deepcopy(student)
    metric = registry.create("metric", "pseudo-huber", data_shape=(1, 4, 4))
    g = torch.Generator().manual_seed(4)
    x, z = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    loss, _ = grid_loss(student, teacher, metric, x, None, ctcore.karras_sigmas(11),
                               torch.tensor([1, 2, 6, 8]), z, weighting="inverse-delta")
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters()]
    assert all(gr is not None for gr in grads)
    assert sum(gr.abs().sum().item() for gr in grads) > 0


class _MaskNet(nn.Module):
    """Dropout(0.5) on a ones tensor; records every mask it applied."""

    noise_conditioning = "fourier"

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.lin = nn.Linear(16, 16)
        self.masks: list[torch.Tensor] = []

    def forward(self, x, c_noise, labels):
        mask = self.drop(torch.ones_like(x))
        self.masks.append(mask.detach().clone())
        return self.lin(x.flatten(1)).view(x.shape) * mask


def _mask_step(net, metric, seed):
    g = torch.Generator().manual_seed(seed)
    x, z = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    loss, _ = grid_loss(net, net, metric, x, None, ctcore.karras_sigmas(11),
                               torch.randint(0, 10, (8,), generator=g), z, weighting="inverse-delta")
    return loss, x


def test_consistency_loss_shares_dropout_mask(registry):
    torch.manual_seed(123)
    net = _MaskNet().train()
    metric = registry.create("metric", "pseudo-huber", data_shape=(1, 4, 4))

    _mask_step(net, metric, seed=5)
    _mask_step(net, metric, seed=6)
    assert len(net.masks) == 4  # student, teacher, student, teacher
    m_student1, m_teacher1, m_student2, m_teacher2 = net.masks
    assert (m_student1 == 0).any() and (m_student1 == 2).any()  # dropout really is active
    assert torch.equal(m_student1, m_teacher1)
    assert torch.equal(m_student2, m_teacher2)
    assert not torch.equal(m_student1, m_student2)  # the RNG advances between steps, it is not reset


def test_consistency_loss_teacher_replays_rng_without_extra_draws(registry):
    net = _MaskNet().train()
    metric = registry.create("metric", "pseudo-huber", data_shape=(1, 4, 4))
    g = torch.Generator().manual_seed(7)
    x, z = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    pair = torch.randint(0, 10, (8,), generator=g)

    torch.manual_seed(99)
    start = torch.get_rng_state()
    grid_loss(net, net, metric, x, None, ctcore.karras_sigmas(11), pair, z, weighting="inverse-delta")
    after_loss = torch.get_rng_state()

    torch.set_rng_state(start)
    net.drop(torch.ones_like(x))  # exactly one dropout forward
    after_one = torch.get_rng_state()
    assert torch.equal(after_loss, after_one)

    torch.set_rng_state(start)
    net.drop(torch.ones_like(x))
    net.drop(torch.ones_like(x))
    assert not torch.equal(torch.get_rng_state(), after_loss)  # two forwards would be detectable


def test_without_rng_restore_masks_differ():
    # Control: calling the same network twice with no state restore gives different masks, so the
    # shared-mask test above can fail.
    torch.manual_seed(123)
    net = _MaskNet().train()
    x = torch.randn(8, 1, 4, 4)
    c = torch.zeros(8)
    net(x, c, None)
    net(x, c, None)
    assert not torch.equal(net.masks[0], net.masks[1])
