"""Built-in training objectives: the consistency loss of CT / iCT / CD / ECT, and EDM's denoising loss (Karras et
al. 2022).

The consistency objective draws pairs (sigma_lo, sigma_hi) from the noise schedule (adjacent points of the
curriculum's Karras grid, or ECT's continuous pairs) and evaluates the student at sigma_hi and the teacher at
sigma_lo with the same z and the same dropout mask, at the point the teacher names (x + sigma_lo z, or for
distillation one ODE step of a diffusion model). The EDM objective trains a denoiser D(x, sigma) for the diffusion
teachers that distillation and tuning start from: sigma ~ lognormal(P_mean, P_std), loss
lambda(sigma) ||D(x + sigma z, sigma) - x||^2; its `preconditioning` option also gives the VP and VE
formulations as EDM defines them (NVlabs/edm training/networks.py VPPrecond / VEPrecond, training/loss.py VPLoss /
VELoss), so that networks converted from EDM's releases denoise and train as they did there.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import nn

from ctcore import hookimpl
from ctcore.components import OBJECTIVE_PARTS, BuildContext, PairDraw, TrainingBatch, one_of, show, within
from ctcore.consistency import c_noise, consistency_loss, denoise, karras_sigmas, noise_convention, per_sample
from ctcore_objectives.continuous import MeanFlow, Scd, Sct, TrigFlowDiffusion


class Consistency:
    """CT / iCT / CD / ECT: mean_b lambda d(f_theta(x + sigma_hi z, sigma_hi), f_theta-(x_lo, sigma_lo))."""

    name: ClassVar[str] = "consistency"
    summary: ClassVar[str] = ("consistency training and distillation (CT, iCT, CD, ECT): the student at sigma_hi "
                              "against the teacher at sigma_lo")
    model: ClassVar[str] = "consistency"
    uses: ClassVar[tuple[str, ...]] = OBJECTIVE_PARTS  # the curriculum only with a grid noise schedule
    default_sampler: ClassVar[str] = "consistency"
    network_passes: ClassVar[int] = 4  # student forward and backward, teacher forward

    @attrs.frozen
    class Options:
        parameterization: Literal["cm", "edm", "ect"] = attrs.field(default="cm",
                                                                   validator=one_of("cm", "edm", "ect"))
        """cm: c_skip = sd^2 / ((s - s_min)^2 + sd^2), so f(x, sigma_min) = x (CM, iCT); edm: EDM's c_skip and
        c_out, so f(x, 0) = x and a diffusion denoiser is a consistency function to start from; ect: EDM's while
        training, and at evaluation (sample, eval, edit, search-sigmas, the run's grids and distances) CM's shifted
        by ect_sigma_min, as ECT's ECMPrecond does in eval mode."""
        ect_sigma_min: float = attrs.field(default=0.003, validator=within(
            0.0, 1.0, "parameterization 'ect' only: the shift of c_skip and c_out at evaluation; ECT 0.003"))
        """The sigma_min of ECT's evaluation-time parameterization (ECMPrecond's default 0.003, not the recipe's
        consistency.sigma_min); used by parameterization 'ect' only."""

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options
        self.student: nn.Module | None = None
        self.parts: dict[str, Any] = {}
        self.grid: tuple[int, torch.Tensor] | None = None
        """The Karras grid of the current N(k) on the training device (N never decreases: one grid at a time)."""
        self.num_scales = 0

    def bind(self, student: nn.Module, parts: dict[str, Any]) -> None:
        self.student, self.parts = student, parts

    def sigmas(self, num_scales: int, constants: Any, device: torch.device) -> torch.Tensor:
        """The Karras grid of N points, made once per curriculum stage (no copy per step)."""
        if self.grid is None or self.grid[0] != num_scales or self.grid[1].device != device:
            c = constants
            self.grid = (num_scales, karras_sigmas(num_scales, c.sigma_min, c.sigma_max, c.rho).to(device))
        return self.grid[1]

    def _num_scales(self, step: int) -> int:
        """N(k) of the curriculum; 0 without one (a continuous noise schedule)."""
        curriculum = self.parts.get("curriculum")
        return curriculum.num_scales(step) if curriculum is not None else 0

    def loss(self, batch: TrainingBatch) -> torch.Tensor:
        c, x = batch.constants, batch.x
        self.num_scales = self._num_scales(batch.step)
        grid = self.sigmas(self.num_scales, c, x.device) if self.num_scales else None
        draw = PairDraw(batch.step, batch.batch_size, grid, batch.index_generator, batch.noise_generator)
        sigma_lo, sigma_hi = self.parts["noise_schedule"].pairs(draw)
        sigma_lo, sigma_hi = sigma_lo.to(x.device)[batch.share], sigma_hi.to(x.device)[batch.share]
        z = torch.randn((batch.batch_size, *x.shape[1:]), generator=batch.noise_generator,
                        device=x.device)[batch.share]
        teacher = self.parts["teacher"]
        if batch.teacher is not None:  # compiled for its no-grad pass (training.compile)
            target = batch.teacher
        else:
            target = batch.student if teacher.network is self.student else teacher.network

        def f(network: nn.Module, noisy: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> Any:
            return self.train_function(network, noisy, sigma, labels, c)

        loss, _ = consistency_loss(batch.student, target, self.parts["metric"], x, batch.labels, sigma_lo, sigma_hi,
                                   z, weighting=c.weighting, f=f,
                                   teacher_input=getattr(teacher, "teacher_input", None))
        return loss

    def after_step(self, step: int) -> None:
        self.parts["teacher"].update(self.student, step, self.num_scales)

    def log_fields(self, step: int) -> dict[str, float]:
        n = self._num_scales(step)
        fields = {"num_scales": n} if n else {}
        return {**fields, "teacher_decay": self.parts["teacher"].decay(step, n),
                **self.parts["noise_schedule"].log_fields(step)}

    def train_function(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                       constants: Any) -> torch.Tensor:
        """f(x, sigma) as the loss trains it: CM's (cm) or EDM's (edm, ect) c_skip and c_out."""
        if self.options.parameterization == "cm":
            return denoise(network, x, sigma, labels, sigma_min=constants.sigma_min, sigma_data=constants.sigma_data)
        return edm_denoise(network, x, sigma, labels, constants.sigma_data)

    def denoise(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                constants: Any) -> torch.Tensor:
        """f(x, sigma) as the model is evaluated: the training function, except that ECT evaluates CM's c_skip and
        c_out shifted by ect_sigma_min (its ECMPrecond in eval mode)."""
        if self.options.parameterization == "ect":
            return denoise(network, x, sigma, labels, sigma_min=self.options.ect_sigma_min,
                           sigma_data=constants.sigma_data)
        return self.train_function(network, x, sigma, labels, constants)

    def boundary_scalings(self, constants: Any) -> tuple[float, float]:
        """(sigma_min, sigma_data) of CM's boundary-condition scalings that `denoise` evaluates: c_skip = sd^2 / ((s -
        s_min)^2 + sd^2), c_out = (s - s_min) sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2) (what
        `ctcore export diffusers` checks against CMStochasticIterativeScheduler). EDM's scalings are these with
        s_min = 0; ECT's evaluation shifts them by ect_sigma_min."""
        shift = {"cm": constants.sigma_min, "edm": 0.0, "ect": self.options.ect_sigma_min}
        return shift[self.options.parameterization], constants.sigma_data


# ------------------------------------------------------------------------------------------------- EDM


def edm_scalings(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM's preconditioning (Karras et al. 2022, Table 1): c_skip = sd^2 / (s^2 + sd^2), c_out = s sd /
    sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2)."""
    sd2 = sigma_data**2
    return sd2 / (sigma**2 + sd2), sigma * sigma_data / torch.sqrt(sigma**2 + sd2), 1.0 / torch.sqrt(sigma**2 + sd2)


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, which makes the effective weight of F's target 1."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_denoise(network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                sigma_data: float = 0.5) -> torch.Tensor:
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with c_noise the network's convention: 0.25 ln sigma for
    Fourier embeddings (EDM's ln(sigma) / 4), 1000 * 0.25 ln sigma for ADM's positional ones."""
    sigma = sigma.to(device=x.device, dtype=torch.float32)
    c_skip, c_out, c_in = edm_scalings(sigma, sigma_data)

    raw = network(per_sample(c_in, x) * x, c_noise(sigma, noise_convention(network)), labels)
    return per_sample(c_skip, x) * x + per_sample(c_out, x) * raw.to(x.dtype)


# VP and VE as NVlabs/edm defines them: training/networks.py (VPPrecond, VEPrecond) and training/loss.py (VPLoss,
# VELoss). Their c_* follow EDM's float32 operations, so a converted network sees the inputs it saw there.


def vp_sigma(t: torch.Tensor, beta_d: float, beta_min: float) -> torch.Tensor:
    """VP's noise level at time t, sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM's VPPrecond.sigma),
    in t's dtype; expm1 is exp(.) - 1 without its cancellation near t = 0."""
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma: torch.Tensor, beta_d: float, beta_min: float) -> torch.Tensor:
    """The t of a VP noise level, (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d (EDM's
    VPPrecond.sigma_inv, with its operations: c_noise of a converted network is the value EDM gave it)."""
    return ((beta_min**2 + 2 * beta_d * torch.log(1 + sigma**2)).sqrt() - beta_min) / beta_d


def preconditioning_scalings(sigma: torch.Tensor, options: Any, sigma_data: float,
                             convention: str = "fourier") -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) of D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) under the edm objective's
    `options.preconditioning`, in sigma's dtype: edm as `edm_scalings` with c_noise in the network's `convention`;
    vp 1, -sigma, 1 / sqrt(sigma^2 + 1), (M - 1) t(sigma); ve 1, sigma, 1, ln(sigma / 2) (EDM's VPPrecond,
    VEPrecond)."""
    if options.preconditioning == "vp":
        one = torch.ones_like(sigma)
        return (one, -sigma, 1 / (sigma**2 + 1).sqrt(),
                (options.vp_steps - 1) * vp_sigma_inv(sigma, options.beta_d, options.beta_min))
    if options.preconditioning == "ve":
        one = torch.ones_like(sigma)
        return one, sigma, one, torch.log(0.5 * sigma)
    return (*edm_scalings(sigma, sigma_data), c_noise(sigma, convention))


def preconditioned_denoise(network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                           options: Any, sigma_data: float) -> torch.Tensor:
    """D(x, sigma) under the edm objective's preconditioning: `edm_denoise` for edm; for vp and ve the network gets
    c_noise as EDM computes it (not through its noise_conditioning), the scalings in float32 as in EDM."""
    if options.preconditioning == "edm":
        return edm_denoise(network, x, sigma, labels, sigma_data)
    sigma = sigma.to(device=x.device, dtype=torch.float32)
    c_skip, c_out, c_in, noise = preconditioning_scalings(sigma, options, sigma_data)

    raw = network(per_sample(c_in, x) * x, noise, labels)
    return per_sample(c_skip, x) * x + per_sample(c_out, x) * raw.to(x.dtype)


def uniform_training_sigma(u: torch.Tensor, options: Any) -> torch.Tensor:
    """The noise level of VPLoss (vp: sigma(t) at t = 1 + u (epsilon_t - 1)) or VELoss (ve: ve_sigma_min
    (ve_sigma_max / ve_sigma_min)^u) for uniform draws u in [0, 1), in float64."""
    o, u = options, u.to(torch.float64)
    if o.preconditioning == "vp":
        return vp_sigma(1 + u * (o.epsilon_t - 1), o.beta_d, o.beta_min)
    return o.ve_sigma_min * (o.ve_sigma_max / o.ve_sigma_min) ** u


def edm_sigma_range(options: Any) -> tuple[float, float]:
    """(sigma_min, sigma_max) a network of this preconditioning supports, EDM's net.sigma_min / net.sigma_max:
    edm (0, inf); vp (sigma(epsilon_t), sigma(1)); ve (ve_sigma_min, ve_sigma_max). EDM's generate.py samples
    from min(80, sigma_max) down to max(0.002, sigma_min). VP's are in float64 (EDM's VPPrecond computes them in
    float32: 0.000977 rather than 0.0010005 at its defaults; both clamp to 0.002)."""
    o = options
    if o.preconditioning == "vp":
        t = torch.tensor([o.epsilon_t, 1.0], dtype=torch.float64)
        low, high = vp_sigma(t, o.beta_d, o.beta_min).tolist()
        return low, high
    if o.preconditioning == "ve":
        return o.ve_sigma_min, o.ve_sigma_max
    return 0.0, math.inf


class Edm:
    """EDM (Karras et al. 2022): ln sigma ~ N(P_mean, P_std^2); loss mean_b lambda(sigma) ||D(x + sigma z) - x||^2.
    With preconditioning vp or ve: EDM's VP / VE formulations (their D, sigma draws and lambda = 1 / sigma^2)."""

    name: ClassVar[str] = "edm"
    summary: ClassVar[str] = "EDM denoising (Karras et al. 2022): trains a diffusion denoiser D(x, sigma)"
    model: ClassVar[str] = "diffusion"
    uses: ClassVar[tuple[str, ...]] = ()
    default_sampler: ClassVar[str] = "heun"
    network_passes: ClassVar[int] = 3  # one forward and its backward

    @attrs.frozen
    class Options:
        p_mean: float = attrs.field(default=-1.2, validator=within(
            -20.0, 20.0, "mean of ln sigma; EDM -1.2, so sigma is about 0.3"))
        p_std: float = attrs.field(default=1.2, validator=within(
            0.0, 20.0, "std of ln sigma; EDM 1.2", open_lo=True))
        """P_mean and P_std of EDMLoss's ln sigma ~ N(P_mean, P_std^2) (NVlabs/edm training/loss.py); used by
        preconditioning 'edm' only."""
        preconditioning: Literal["edm", "vp", "ve"] = attrs.field(default="edm", validator=one_of("edm", "vp", "ve"))
        """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) and the training loss, as NVlabs/edm's training/networks.py
        and training/loss.py define them. edm (EDMPrecond, EDMLoss): c_skip = sd^2 / (s^2 + sd^2), c_out = s sd /
        sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2), c_noise in the network's convention; ln s ~ N(p_mean,
        p_std^2), lambda = (s^2 + sd^2) / (s sd)^2. vp (VPPrecond, VPLoss): c_skip = 1, c_out = -s, c_in = 1 /
        sqrt(s^2 + 1), c_noise = (vp_steps - 1) t(s); s = sigma(t) at t = 1 + u (epsilon_t - 1), u ~ U[0, 1),
        lambda = 1 / s^2. ve (VEPrecond, VELoss): c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s / 2); s =
        ve_sigma_min (ve_sigma_max / ve_sigma_min)^u, lambda = 1 / s^2. vp and ve give the network c_noise as EDM
        computes it, whatever its noise_conditioning, and do not use sigma_data, p_mean or p_std. The loss is
        EDM's: lambda times the squared error summed over the pixels, averaged over the batch."""
        beta_d: float = attrs.field(default=19.9, validator=within(
            0.01, 100.0, "VP's sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1); EDM 19.9"))
        """VP's beta_d, the extent of its noise schedule sigma(t) (VPPrecond and VPLoss: 19.9); vp only."""
        beta_min: float = attrs.field(default=0.1, validator=within(
            0.0, 20.0, "VP's sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1); EDM 0.1"))
        """VP's beta_min, the initial slope of sigma(t) (VPPrecond and VPLoss: 0.1); vp only."""
        vp_steps: int = attrs.field(default=1000, validator=within(
            2, 1_000_000, "VP's c_noise = (vp_steps - 1) t; EDM's M, 1000"))
        """VP's M, the DDPM step count that scales c_noise = (M - 1) t (VPPrecond: 1000); vp only."""
        epsilon_t: float = attrs.field(default=1e-5, validator=within(
            1e-8, 0.5, "the smallest t VP trains at, t in [epsilon_t, 1]; EDM 1e-5"))
        """VP's epsilon_t: training draws t in (epsilon_t, 1], and sigma(epsilon_t) is the network's sigma_min
        (VPPrecond and VPLoss: 1e-5); vp only."""
        ve_sigma_min: float = attrs.field(default=0.02, validator=within(
            1e-5, 1e4, "VE trains at sigma in [ve_sigma_min, ve_sigma_max); EDM 0.02"))
        """VE's sigma_min, the lowest noise level it trains at and supports (VEPrecond and VELoss: 0.02); ve only."""
        ve_sigma_max: float = attrs.field(default=100.0, validator=within(
            1e-5, 1e4, "VE trains at sigma in [ve_sigma_min, ve_sigma_max); EDM 100"))
        """VE's sigma_max, the highest noise level it trains at and supports (VEPrecond and VELoss: 100); ve
        only."""

        def __attrs_post_init__(self) -> None:
            if self.ve_sigma_max <= self.ve_sigma_min:
                raise ValueError(f"ve_sigma_max: must be > ve_sigma_min ({show(self.ve_sigma_min)}), got "
                                 f"{show(self.ve_sigma_max)}")

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options

    def bind(self, student: nn.Module, parts: dict[str, Any]) -> None:
        pass

    def loss(self, batch: TrainingBatch) -> torch.Tensor:
        o, x, sd = self.options, batch.x, batch.constants.sigma_data
        if o.preconditioning == "edm":  # EDMLoss
            n = torch.randn((batch.batch_size,), generator=batch.noise_generator, device=x.device)[batch.share]
            sigma = torch.exp(n * o.p_std + o.p_mean)
            weight = edm_weight(sigma, sd)
        else:  # VPLoss, VELoss: a float32 uniform draw as EDM's, the noise level from it in float64
            u = torch.rand((batch.batch_size,), generator=batch.noise_generator, device=x.device)[batch.share]
            sigma = uniform_training_sigma(u, o).float()
            weight = 1 / sigma**2
        z = torch.randn((batch.batch_size, *x.shape[1:]), generator=batch.noise_generator,
                        device=x.device)[batch.share]
        noisy = x + sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) * z
        out = preconditioned_denoise(batch.student, noisy, sigma, batch.labels, o, sd)
        squared = (out.float() - x.float()).square().flatten(1).sum(1)  # EDM sums over pixels
        return (weight * squared).mean()

    def after_step(self, step: int) -> None:
        pass

    def log_fields(self, step: int) -> dict[str, float]:
        return {}

    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max) the preconditioning supports (EDM's net.sigma_min / net.sigma_max)."""
        return edm_sigma_range(self.options)

    def denoise(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                constants: Any) -> torch.Tensor:
        return preconditioned_denoise(network, x, sigma, labels, self.options, constants.sigma_data)


@hookimpl
def ctcore_register_objectives() -> list[type]:
    return [Consistency, Edm, Sct, Scd, TrigFlowDiffusion, MeanFlow]
