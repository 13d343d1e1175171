"""Built-in curricula, noise schedules, metrics and teachers against the reference sheet's values."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from torch import nn

import ctcore

# ------------------------------------------------------------------------------------------ curricula


@pytest.fixture(scope="module")
def exponential(registry):
    return registry.create("curriculum", "exponential", total_steps=400_000)


@pytest.fixture(scope="module")
def ct_curriculum(registry):
    return registry.create("curriculum", "ct", s0=2, s1=150, total_steps=800_000)


def test_exponential_defaults_are_ict_values(exponential):
    assert (exponential.options.s0, exponential.options.s1) == (10, 1280)
    assert exponential.stage_steps == 50_000  # K' (sheet sec. 4.2)


@pytest.mark.parametrize(
    ("step", "n"),
    [(0, 11), (50_000, 21), (100_000, 41), (150_000, 81), (200_000, 161), (250_000, 321), (300_000, 641),
     (350_000, 1281)],
)
def test_exponential_stage_starts(exponential, step, n):
    assert exponential.num_scales(step) == n


@pytest.mark.parametrize(
    ("step", "n"),
    [(1, 11), (25_000, 11), (49_999, 11), (50_000, 21), (99_999, 21), (100_000, 41), (349_999, 641)],
)
def test_exponential_constant_within_stages(exponential, step, n):
    assert exponential.num_scales(step) == n


@pytest.mark.parametrize("step", [399_999, 400_000, 450_000, 10_000_000])
def test_exponential_stays_at_s1_plus_one(exponential, step):
    assert exponential.num_scales(step) == 1281


@pytest.mark.parametrize(
    ("frac", "n"), [(0.0, 2), (0.01, 16), (0.1, 48), (0.25, 76), (0.5, 107), (0.75, 131), (1.0, 151)]
)
def test_ct_curriculum_sheet_values(ct_curriculum, frac, n):
    assert ct_curriculum.num_scales(round(frac * 800_000)) == n


def test_ct_curriculum_is_non_decreasing(ct_curriculum):
    values = [ct_curriculum.num_scales(k) for k in range(0, 800_001, 4_000)]
    assert values == sorted(values)
    assert ct_curriculum.num_scales(1_600_000) == 151


def test_constant_curriculum(registry):
    assert registry.create("curriculum", "constant").num_scales(0) == 18
    c = registry.create("curriculum", "constant", num_scales=40)
    assert {c.num_scales(k) for k in (0, 1, 10_000, 10**9)} == {40}


# ------------------------------------------------------------------------------------ noise schedules

# Reference sheet sec. 5, N = 11, pairs from the smallest sigma upward, 3 decimals. The sheet prints 0.214 for
# the 4th pair, but the formula gives 0.213494... (0.213 to 3 decimals; the independent math check below
# agrees with the code), so 0.213 is used here. Reported as a sheet rounding error.
LOGNORMAL_11 = [0.063, 0.182, 0.246, 0.213, 0.142, 0.081, 0.041, 0.020, 0.009, 0.004]


def _lognormal_by_hand(sigmas: list[float], p_mean: float = -1.1, p_std: float = 2.0) -> list[float]:
    cdf = [math.erf((math.log(s) - p_mean) / (math.sqrt(2) * p_std)) for s in sigmas]
    mass = [b - a for a, b in zip(cdf, cdf[1:], strict=False)]
    return [m / sum(mass) for m in mass]


def test_lognormal_probabilities_n11(registry):
    sigmas = ctcore.karras_sigmas(11)
    p = registry.create("noise_schedule", "lognormal").probabilities(sigmas)
    assert p.shape == (10,)
    assert [round(v, 3) for v in p.tolist()] == LOGNORMAL_11
    assert p.tolist() == pytest.approx(_lognormal_by_hand(sigmas.tolist()), rel=1e-9)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_lognormal_options_change_probabilities(registry):
    sigmas = ctcore.karras_sigmas(11)
    p = registry.create("noise_schedule", "lognormal", p_mean=-1.2, p_std=1.2).probabilities(sigmas)
    assert p.tolist() == pytest.approx(_lognormal_by_hand(sigmas.tolist(), -1.2, 1.2), rel=1e-9)


@pytest.mark.parametrize("n", [2, 11, 161])
def test_uniform_probabilities(registry, n):
    p = registry.create("noise_schedule", "uniform").probabilities(ctcore.karras_sigmas(n))
    assert p.shape == (n - 1,)
    assert p.tolist() == pytest.approx([1 / (n - 1)] * (n - 1), rel=1e-12)


@pytest.mark.parametrize("name", ["lognormal", "uniform"])
def test_sample_frequencies_match_probabilities(registry, name):
    schedule = registry.create("noise_schedule", name)
    sigmas = ctcore.karras_sigmas(11)
    draws = schedule.sample(sigmas, 200_000, torch.Generator().manual_seed(0))
    assert draws.shape == (200_000,)
    assert int(draws.min()) >= 0 and int(draws.max()) <= 9
    freq = torch.bincount(draws, minlength=10).double() / 200_000
    assert freq.tolist() == pytest.approx(schedule.probabilities(sigmas).tolist(), abs=0.01)


def test_sample_is_reproducible_from_generator(registry):
    schedule = registry.create("noise_schedule", "lognormal")
    sigmas = ctcore.karras_sigmas(11)
    a = schedule.sample(sigmas, 64, torch.Generator().manual_seed(5))
    b = schedule.sample(sigmas, 64, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


LOG1MEXP_AT = [-1e-300, -1e-200, -1e-30, -1e-17, -1e-16, -1e-10, -1e-3, -0.1, -0.5, -0.69,
               math.nextafter(-math.log(2), 0.0), -math.log(2), math.nextafter(-math.log(2), -1.0), -0.7, -1.0, -5.0,
               -30.0, -37.0, -100.0, -700.0, -708.0, -720.0, -740.0, -745.0]
"""From just below 0 through the switch at -ln 2 to where exp(d) underflows: log(1 - e^d) runs from -690 to -5e-324."""


def test_log1mexp_is_within_two_ulps_of_a_high_precision_reference():
    """log(1 - e^d) in the lognormal schedule's tail masses against mpmath at 800 digits (enough for 1 - e^-745):
    at most 2 float64 ulps of the reference away (measured: at most 1.4, in the subnormal range)."""
    from ctcore_noise import _log1mexp

    got = _log1mexp(torch.tensor(LOG1MEXP_AT, dtype=torch.float64)).tolist()
    with mpmath.workdps(800):
        for d, value in zip(LOG1MEXP_AT, got, strict=True):
            exact = mpmath.log(1 - mpmath.exp(mpmath.mpf(d)))
            ulps = float(abs(mpmath.mpf(value) - exact)) / math.ulp(float(exact))
            assert ulps <= 2, (d, value, float(exact), ulps)
    # 1 - e^0 = 0, and a d above 0 (rounding) is clamped to 0
    assert _log1mexp(torch.tensor([0.0, 1e-3], dtype=torch.float64)).tolist() == [-math.inf, -math.inf]


# ------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(("shape", "c"), [((3, 32, 32), 0.0299), ((3, 64, 64), 0.0599)])
def test_pseudo_huber_default_c(registry, shape, c):
    metric = registry.create("metric", "pseudo-huber", data_shape=shape)
    assert round(metric.c, 4) == c
    assert metric.c == pytest.approx(0.00054 * math.sqrt(math.prod(shape)), rel=1e-12)


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, torch.randn(shape, generator=g, dtype=torch.float64)


def test_pseudo_huber_is_on_the_whole_sample_norm(registry):
    metric = registry.create("metric", "pseudo-huber", data_shape=(3, 32, 32))
    x, y = _pair((4, 3, 32, 32))
    y = x + 0.01 * (y - x)  # small differences, where the two forms differ most
    got = metric(x, y)
    assert got.shape == (4,)
    c = 0.00054 * math.sqrt(3072)
    for j in range(4):
        sq = (x[j] - y[j]).square().sum().item()
        assert got[j].item() == pytest.approx(math.sqrt(sq + c * c) - c, rel=1e-9)
    elementwise = (torch.sqrt((x - y).square() + c * c) - c).flatten(1).mean(dim=1)
    assert not torch.allclose(got, elementwise, rtol=0.05)
    assert torch.all(metric(x, x) == 0)


def test_pseudo_huber_explicit_c_overrides(registry):
    metric = registry.create("metric", "pseudo-huber", data_shape=(3, 32, 32), c=0.5)
    assert metric.c == 0.5
    x, y = _pair((2, 3, 32, 32), seed=1)
    sq = (x - y).flatten(1).square().sum(dim=1)
    torch.testing.assert_close(metric(x, y), torch.sqrt(sq + 0.25) - 0.5)


def test_pseudo_huber_c_from_input_without_data_shape(registry):
    metric = registry.create("metric", "pseudo-huber")
    assert metric.c is None
    for shape in [(2, 3, 32, 32), (2, 3, 64, 64), (2, 1, 4, 4)]:
        x, y = _pair(shape, seed=2)
        c = 0.00054 * math.sqrt(math.prod(shape[1:]))
        sq = (x - y).flatten(1).square().sum(dim=1)
        torch.testing.assert_close(metric(x, y), torch.sqrt(sq + c * c) - c)


def test_l2_metric_is_per_sample_mean_of_squares(registry):
    metric = registry.create("metric", "l2")
    x, y = _pair((3, 2, 5, 5), seed=3)
    got = metric(x, y)
    assert got.shape == (3,)
    for j in range(3):
        assert got[j].item() == pytest.approx(((x[j] - y[j]) ** 2).sum().item() / 50, rel=1e-12)
    assert torch.all(metric(x, x) == 0)


# ------------------------------------------------------------------------------------------- teachers


@pytest.mark.parametrize(("frac", "mu"), [(0.0, 0.9), (0.1, 0.99562), (0.5, 0.99803), (1.0, 0.99861)])
def test_ema_adaptive_decay_sheet_values(registry, ct_curriculum, frac, mu):
    teacher = registry.create("teacher", "ema", schedule="adaptive", mu0=0.9, s0=2)
    step = round(frac * 800_000)
    assert round(teacher.decay(step, ct_curriculum.num_scales(step)), 5) == mu


def test_ema_adaptive_code_decay(registry, ct_curriculum):
    teacher = registry.create("teacher", "ema", schedule="adaptive-code", mu0=0.9, s0=2)
    assert teacher.decay(0, ct_curriculum.num_scales(0)) == pytest.approx(0.81, rel=1e-12)
    n = ct_curriculum.num_scales(400_000)
    assert teacher.decay(400_000, n) == pytest.approx(math.exp(2 * math.log(0.9) / (n - 1)), rel=1e-12)


def test_ema_fixed_decay(registry):
    teacher = registry.create("teacher", "ema", schedule="fixed", mu0=0.95)
    assert {teacher.decay(k, n) for k, n in [(0, 2), (1000, 17), (10**6, 151)]} == {0.95}


def test_no_ema_teacher_is_the_student(registry):
    teacher = registry.create("teacher", "no-ema")
    student = nn.Linear(3, 2)
    teacher.bind(student)
    assert teacher.network is student
    assert teacher.decay(0, 11) == 0.0
    assert teacher.decay(399_999, 1281) == 0.0
    teacher.update(student, 1, 11)
    assert teacher.network is student
    assert teacher.state_dict() == {}


def test_ema_teacher_update_rule(registry):
    teacher = registry.create("teacher", "ema", schedule="fixed", mu0=0.9)
    torch.manual_seed(0)
    student = nn.Linear(3, 2)
    teacher.bind(student)
    assert teacher.network is not student
    assert all(not p.requires_grad for p in teacher.network.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.detach().clone() for p in teacher.network.parameters()]
    theta = [p.detach().clone() for p in student.parameters()]
    assert not torch.allclose(before[0], theta[0])

    teacher.update(student, 1, 11)
    for t_new, t_old, s in zip(teacher.network.parameters(), before, theta, strict=True):
        torch.testing.assert_close(t_new.detach(), 0.9 * t_old + 0.1 * s)
    # the student is not touched
    for p, s in zip(student.parameters(), theta, strict=True):
        assert torch.equal(p.detach(), s)


def test_ema_teacher_update_uses_adaptive_mu(registry):
    teacher = registry.create("teacher", "ema", schedule="adaptive", mu0=0.9, s0=2)
    torch.manual_seed(1)
    student = nn.Linear(4, 4)
    teacher.bind(student)
    with torch.no_grad():
        student.weight.add_(1.0)
    before = teacher.network.weight.detach().clone()
    mu = math.exp(2 * math.log(0.9) / 48)
    teacher.update(student, 80_000, 48)
    expected = mu * before + (1 - mu) * student.weight.detach()
    torch.testing.assert_close(teacher.network.weight.detach(), expected)
