"""Continuous-time consistency objectives (issue 26): sCT and sCD (Lu & Song 2024, TrigFlow) and MeanFlow (Geng et
al. 2025). Their maths lives in the core (ctcore.trigflow, ctcore.meanflow, ctcore.jvp); these classes draw each
step's times and noise, call the network, and give the model function in EDM's sigma so that sampling, evaluation
and editing treat them like any consistency model.

sCT / sCD: x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2 I), t from the lognormal proposal on sigma_d tan t; the
student F(x_t / sigma_d, time_scale t) is regressed on F^- + g, g the normalised tangent of ctcore.trigflow.tangent,
whose dx_t/dt is cos(t) z - sin(t) x_0 (sCT) or the diffusion teacher's sigma_d F_teacher (sCD).
f(x_sigma, sigma) = cos(t) x_t - sin(t) sigma_d F with t = arctan(sigma / sigma_d), x_t = cos(t) x_sigma.

MeanFlow: z_t = (1 - t) x + t e, a network u(z, (time_scale t, time_scale (t - r))) (a network with time_inputs = 2)
regressed on v - (t - r) du/dt. As a consistency model: t = sigma / (1 + sigma), z = x_sigma / (1 + sigma) (so
x_sigma = x + sigma e), f = z - t u(z, r = 0, t).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import nn

from ctcore import meanflow, trigflow
from ctcore.components import BuildContext, TrainingBatch, one_of, within
from ctcore.consistency import per_sample


@contextlib.contextmanager
def _jvp_precision(precision: str, device: torch.device) -> Iterator[None]:
    """fp32: the JVP outside the step's autocast (float32 throughout); autocast: under it (bf16 where the run is)."""
    if precision == "fp32":
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        yield


def _jvp_network(network: nn.Module, method: str) -> tuple[Callable[..., torch.Tensor], torch.dtype, torch.dtype]:
    """(the network the JVP evaluates, its input dtype, its time dtype): the network itself for forward-ad; for
    finite-difference the same module called with float64 copies of its parameters and buffers
    (torch.func.functional_call), so that the central difference is taken in float64 (ctcore.jvp), times included
    (a float32 t + 1e-6 keeps one digit)."""
    if method != "finite-difference":
        return network, next(network.parameters()).dtype, torch.float32
    state = {name: value.detach().double() if value.is_floating_point() else value
             for name, value in itertools.chain(network.named_parameters(), network.named_buffers())}
    return (lambda *args: torch.func.functional_call(network, state, args)), torch.float64, torch.float64


def _network_time_inputs(network: nn.Module) -> int:
    return int(getattr(network, "time_inputs", 1))


@attrs.frozen
class _TrigFlowOptions:
    p_mean: float = attrs.field(default=-1.0, validator=within(
        -20.0, 20.0, "mean of ln(sigma_d tan t); sCM CIFAR-10 -1.0"))
    p_std: float = attrs.field(default=1.4, validator=within(
        0.0, 20.0, "std of ln(sigma_d tan t); sCM CIFAR-10 1.4", open_lo=True))
    """The proposal: t = arctan(e^tau / sigma_d), tau ~ N(p_mean, p_std^2) (sCM: the lognormal of EDM)."""
    time_scale: float = attrs.field(default=1.0, validator=within(
        1e-3, 1e6, "the network's noise input is time_scale * t"))
    """c_noise(t) = time_scale t, the network's time input (sCM section 4.1: t itself, with positional embeddings,
    which it equates to a Fourier scale of about 0.02)."""
    tangent_normalization: bool = True
    """g <- g / (||g|| + tangent_c) per sample (the paper's tangent normalisation); false: the paper's ablation."""
    tangent_c: float = attrs.field(default=0.1, validator=within(
        1e-8, 1e6, "the constant of g / (||g|| + c); sCM 0.1"))
    warmup_steps: int = attrs.field(default=10_000, validator=within(
        0, 100_000_000, "tangent warm-up H in steps; sCM 10k, 0 for none"))
    """H of the tangent warm-up r = min(1, k / H): the second term of g grows from 0 over H steps."""
    adaptive_weighting: bool = True
    """Weight each sample by exp(-logvar(t)) + logvar(t), logvar learned by the network's log-variance head (the
    network needs logvar_head = true); false: the plain mean squared error."""
    jvp_method: Literal["forward-ad", "finite-difference"] = attrs.field(
        default="forward-ad", validator=one_of("forward-ad", "finite-difference"))
    """How dF/dt is computed: forward-ad (torch.func.jvp through the network, attention on its math path) or
    finite-difference ((F(p + h v) - F(p - h v)) / 2h with h = jvp_step, in float64: the network's weights are
    copied to float64 for it each step; the same dropout mask)."""
    jvp_step: float = attrs.field(default=1e-6, validator=within(
        1e-12, 1.0, "the step h of the float64 finite-difference JVP; ctcore.jvp's 1e-6"))
    jvp_precision: Literal["autocast", "fp32"] = attrs.field(default="fp32", validator=one_of("autocast", "fp32"))
    """fp32: the JVP runs outside the step's autocast, in float32 (UNVERIFIED as the paper's prescription);
    autocast: under training.precision like the other passes (bf16 on a GPU)."""


class _TrigFlowObjective:
    """What sCT and sCD share: the draw of t and z, the tangent and the loss; they differ in dx_t/dt."""

    model: ClassVar[str] = "consistency"
    default_sampler: ClassVar[str] = "scm"
    network_passes: ClassVar[int] = 6  # the JVP (about 3 forward passes) and the student's forward and backward
    eager_passes: ClassVar[bool] = True
    """The JVP runs the unwrapped network eagerly and must share the student pass's dropout mask: preflight refuses
    dropout under training.compile."""
    Options = _TrigFlowOptions

    def __init__(self, options: _TrigFlowOptions, context: BuildContext) -> None:
        self.options = options
        self.student: nn.Module | None = None
        self.parts: dict[str, Any] = {}

    def bind(self, student: nn.Module, parts: dict[str, Any]) -> None:
        if self.options.adaptive_weighting:
            needs = "adaptive_weighting = true needs the network's learned log-variance"
            fix = "or set [objective] adaptive_weighting = false"
            if not callable(getattr(student, "logvar", None)):
                raise ValueError(f"{needs}, but the network has no logvar(c); set [network] logvar_head = true, {fix}")
            try:
                student.logvar(torch.zeros(1, device=next(student.parameters()).device))
            except ValueError as exc:
                raise ValueError(f"{needs}: {exc}, {fix}") from None
        self.student, self.parts = student, parts

    def F(self, network: nn.Module, x_in: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The raw network at TrigFlow time t: F(x_t / sigma_d, time_scale t)."""
        return network(x_in, self.options.time_scale * t, labels)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, conditional: torch.Tensor, labels: torch.Tensor | None,
                 constants: Any) -> torch.Tensor:
        """dx_t/dt at (x_t, t) for the tangent: the `conditional` cos(t) z - sin(t) x_0 (sCT) or a teacher's (sCD)."""
        raise NotImplementedError

    def loss(self, batch: TrainingBatch) -> torch.Tensor:
        o, x, sd = self.options, batch.x, batch.constants.sigma_data
        t = trigflow.proposal(batch.batch_size, batch.noise_generator, p_mean=o.p_mean, p_std=o.p_std,
                              sigma_d=sd)[batch.share].to(x.device)
        z = sd * torch.randn((batch.batch_size, *x.shape[1:]), generator=batch.noise_generator,
                             device=x.device)[batch.share]
        x_t, conditional = trigflow.interpolate(x, z, t)
        dxt_dt = self.velocity(x_t, t, conditional, batch.labels, batch.constants)
        network, dtype, time_dtype = _jvp_network(self.student, o.jvp_method)

        def F(x_in: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
            return self.F(network, x_in.to(dtype), time.to(time_dtype), batch.labels)

        with _jvp_precision(o.jvp_precision, x.device):
            F_minus, g = trigflow.tangent(F, x_t, t, dxt_dt, sigma_d=sd, r=trigflow.warmup(batch.step, o.warmup_steps),
                                          c=o.tangent_c if o.tangent_normalization else None, method=o.jvp_method,
                                          step=o.jvp_step)
        F_out = self.F(batch.student, x_t / sd, t, batch.labels).float()
        logvar = self.student.logvar(t) if o.adaptive_weighting else None
        return trigflow.scm_loss(F_out, F_minus.float(), g.float(), logvar).mean()

    def after_step(self, step: int) -> None:
        pass

    def log_fields(self, step: int) -> dict[str, float]:
        return {"tangent_warmup": trigflow.warmup(step, self.options.warmup_steps)}

    def denoise(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                constants: Any) -> torch.Tensor:
        """f(x_sigma, sigma) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t), t = arctan(sigma / sigma_d),
        x_t = cos(t) x_sigma (EDM's denoiser of the TrigFlow consistency function)."""
        sd = constants.sigma_data
        t = trigflow.t_from_sigma(sigma.to(device=x.device, dtype=torch.float32), sd)
        x_t = per_sample(torch.cos(t), x) * x
        raw = self.F(network, x_t / sd, t, labels)
        return trigflow.consistency_function(x_t, t, raw.to(x.dtype), sd)


class Sct(_TrigFlowObjective):
    """sCT (Lu & Song 2024): continuous-time consistency training in TrigFlow, dx_t/dt = cos(t) z - sin(t) x_0."""

    name: ClassVar[str] = "sct"
    summary: ClassVar[str] = ("sCT (Lu & Song 2024): continuous-time consistency training in TrigFlow, the tangent "
                              "by a JVP")
    uses: ClassVar[tuple[str, ...]] = ()

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, conditional: torch.Tensor, labels: torch.Tensor | None,
                 constants: Any) -> torch.Tensor:
        return conditional


class Scd(_TrigFlowObjective):
    """sCD (Lu & Song 2024): the tangent's dx_t/dt = sigma_d F_teacher(x_t, t), the frozen diffusion model of the
    teacher (`[teacher] name = "cd"`) converted to TrigFlow exactly: sigma_d F = (cos(t) x_t - D(x_t / cos t,
    sigma_d tan t)) / sin(t)."""

    name: ClassVar[str] = "scd"
    summary: ClassVar[str] = ("sCD (Lu & Song 2024): continuous-time consistency distillation of a diffusion model "
                              "([teacher] cd), the tangent by a JVP")
    uses: ClassVar[tuple[str, ...]] = ("teacher",)

    def bind(self, student: nn.Module, parts: dict[str, Any]) -> None:
        teacher = parts.get("teacher")
        if not callable(getattr(teacher, "diffusion_denoise", None)):
            name = getattr(teacher, "name", type(teacher).__name__)
            raise ValueError(f"distils a diffusion model, but teacher {name!r} holds none; use "
                             "[teacher] name = \"cd\" with checkpoint = the diffusion run to distil")
        super().bind(student, parts)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, conditional: torch.Tensor, labels: torch.Tensor | None,
                 constants: Any) -> torch.Tensor:
        sd = constants.sigma_data
        with torch.no_grad():
            t = t.clamp_min(torch.finfo(torch.float32).tiny)  # D at sigma = 0 is x itself; t = 0 has no slope
            denoised = self.parts["teacher"].diffusion_denoise(
                trigflow.edm_x_from_trigflow(x_t, t), trigflow.sigma_from_t(t, sd), labels)
            return sd * trigflow.velocity_from_denoised(x_t, t, denoised.to(x_t.dtype), sd)


class TrigFlowDiffusion:
    """sCM's TrigFlow diffusion model (Lu & Song 2024, eq. 4), the teacher sCT and sCD start from: sigma_d F(x_t /
    sigma_d, t) regressed on dx_t/dt = cos(t) z - sin(t) x_0, so D = cos(t) x_t - sin(t) sigma_d F is a denoiser
    with the same network and time input as an sct / scd student (run.init_from loads it as is)."""

    name: ClassVar[str] = "trigflow"
    summary: ClassVar[str] = ("TrigFlow diffusion (Lu & Song 2024): trains the denoiser sCT and sCD start from, "
                              "with their network and time input")
    model: ClassVar[str] = "diffusion"
    uses: ClassVar[tuple[str, ...]] = ()
    default_sampler: ClassVar[str] = "heun"
    network_passes: ClassVar[int] = 3  # one forward and its backward

    @attrs.frozen
    class Options:
        p_mean: float = attrs.field(default=-0.8, validator=within(
            -20.0, 20.0, "mean of ln(sigma_d tan t); sCM's ImageNet 64 teacher -0.8"))
        p_std: float = attrs.field(default=1.6, validator=within(
            0.0, 20.0, "std of ln(sigma_d tan t); sCM's ImageNet 64 teacher 1.6", open_lo=True))
        """The proposal of t, as sct's (sCM Table 4's teacher values; its CIFAR-10 teacher's are not stated)."""
        time_scale: float = attrs.field(default=1.0, validator=within(
            1e-3, 1e6, "the network's noise input is time_scale * t"))
        """c_noise(t) = time_scale t, as the sct / scd student that starts from this model must have it."""
        adaptive_weighting: bool = True
        """Weigh each sample by exp(-logvar(t)) and add logvar(t), the network's learned log-variance (EDM2's
        uncertainty weighting, which sCM's teachers follow: UNVERIFIED for CIFAR-10); false: the plain mean."""

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options
        self.student: nn.Module | None = None

    bind = _TrigFlowObjective.bind
    F = _TrigFlowObjective.F
    denoise = _TrigFlowObjective.denoise

    def loss(self, batch: TrainingBatch) -> torch.Tensor:
        o, x, sd = self.options, batch.x, batch.constants.sigma_data
        t = trigflow.proposal(batch.batch_size, batch.noise_generator, p_mean=o.p_mean, p_std=o.p_std,
                              sigma_d=sd)[batch.share].to(x.device)
        z = sd * torch.randn((batch.batch_size, *x.shape[1:]), generator=batch.noise_generator,
                             device=x.device)[batch.share]
        x_t, dxt_dt = trigflow.interpolate(x, z, t)
        F_out = self.F(batch.student, x_t / sd, t, batch.labels).float()
        mse = (F_out - dxt_dt.float() / sd).square().flatten(1).mean(1)  # ||sigma_d F - v||^2 / sigma_d^2 / D
        if not o.adaptive_weighting:
            return mse.mean()
        logvar = self.student.logvar(t)
        return (torch.exp(-logvar) * mse + logvar).mean()

    def after_step(self, step: int) -> None:
        pass

    def log_fields(self, step: int) -> dict[str, float]:
        return {}


class MeanFlow:
    """MeanFlow (Geng et al. 2025): the average velocity u(z_t, r, t) regressed on v - (t - r) du/dt."""

    name: ClassVar[str] = "meanflow"
    summary: ClassVar[str] = ("MeanFlow (Geng et al. 2025): average velocity u(z, r, t) by the MeanFlow identity, "
                              "one-step generation")
    model: ClassVar[str] = "consistency"
    uses: ClassVar[tuple[str, ...]] = ()
    default_sampler: ClassVar[str] = "meanflow"
    network_passes: ClassVar[int] = 6  # the JVP (about 3), the student's forward and backward
    eager_passes: ClassVar[bool] = True
    """As sCT's: the JVP runs eagerly and shares the student pass's dropout mask."""

    @attrs.frozen
    class Options:
        p_mean: float = attrs.field(default=meanflow.P_MEAN, validator=within(
            -20.0, 20.0, "mean of the logit-normal time draws; MeanFlow -0.4"))
        p_std: float = attrs.field(default=meanflow.P_STD, validator=within(
            0.0, 20.0, "std of the logit-normal time draws; MeanFlow 1.0", open_lo=True))
        """(r, t) from two draws sigmoid(N(p_mean, p_std^2)), t the larger (the paper's logit-normal sampler)."""
        ratio_r_neq_t: float = attrs.field(default=meanflow.RATIO_R_NEQ_T, validator=within(
            0.0, 1.0, "the share of samples with r != t; MeanFlow 0.25"))
        """The share of each batch with r != t; the rest take r = t (plain flow matching)."""
        adaptive_p: float = attrs.field(default=meanflow.ADAPTIVE_P, validator=within(
            0.0, 10.0, "the power of the adaptive weight; MeanFlow 1 (0: plain squared error)"))
        adaptive_c: float = attrs.field(default=meanflow.ADAPTIVE_C, validator=within(
            1e-12, 1e6, "the constant of the adaptive weight; MeanFlow 1e-3"))
        """The adaptive weight stopgrad(1 / (||u - u_tgt||^2 + adaptive_c)^adaptive_p) of each sample."""
        time_scale: float = attrs.field(default=1.0, validator=within(
            1e-3, 1e6, "the network's time inputs are time_scale * (t, t - r)"))
        """The network sees (time_scale t, time_scale (t - r)) (MeanFlow's code: t and t - r as they are)."""
        jvp_method: Literal["forward-ad", "finite-difference"] = attrs.field(
            default="forward-ad", validator=one_of("forward-ad", "finite-difference"))
        """How du/dt is computed: forward-ad (torch.func.jvp through the network) or finite-difference
        ((u(p + h v) - u(p - h v)) / 2h with h = jvp_step, in float64: the weights copied to float64 each step)."""
        jvp_step: float = attrs.field(default=1e-6, validator=within(
            1e-12, 1.0, "the step h of the float64 finite-difference JVP; ctcore.jvp's 1e-6"))
        jvp_precision: Literal["autocast", "fp32"] = attrs.field(default="fp32",
                                                                 validator=one_of("autocast", "fp32"))
        """fp32: the JVP runs outside the step's autocast, in float32; autocast: under training.precision."""

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options
        self.student: nn.Module | None = None

    def bind(self, student: nn.Module, parts: dict[str, Any]) -> None:
        if _network_time_inputs(student) < 2:
            raise ValueError("needs a network of two times u(z, r, t); set [network] time_inputs = 2")
        self.student = student

    def u(self, network: nn.Module, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
          labels: torch.Tensor | None) -> torch.Tensor:
        """u(z, r, t): the network at (time_scale t, time_scale (t - r))."""
        s = self.options.time_scale
        return network(z, torch.stack([s * t, s * (t - r)], dim=1), labels)

    def loss(self, batch: TrainingBatch) -> torch.Tensor:
        o, x = self.options, batch.x
        r, t = meanflow.sample_r_t(batch.batch_size, batch.noise_generator, p_mean=o.p_mean, p_std=o.p_std,
                                   ratio=o.ratio_r_neq_t, device=x.device)
        r, t = r[batch.share], t[batch.share]
        e = torch.randn((batch.batch_size, *x.shape[1:]), generator=batch.noise_generator,
                        device=x.device)[batch.share]
        z, v = meanflow.interpolate(x, e, t)
        network, dtype, time_dtype = _jvp_network(self.student, o.jvp_method)

        def u(z_in: torch.Tensor, r_in: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
            return self.u(network, z_in.to(dtype), r_in.to(time_dtype), t_in.to(time_dtype), batch.labels)

        with torch.no_grad(), _jvp_precision(o.jvp_precision, x.device):
            _, u_tgt = meanflow.target(u, z, r, t, v, method=o.jvp_method, step=o.jvp_step)
        out = self.u(batch.student, z, r, t, batch.labels).float()  # the JVP's dropout mask (shared_rng)
        return meanflow.loss(out, u_tgt.float(), o.adaptive_p, o.adaptive_c).mean()

    def after_step(self, step: int) -> None:
        pass

    def log_fields(self, step: int) -> dict[str, float]:
        return {}

    def jump(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor,
             labels: torch.Tensor | None, constants: Any) -> torch.Tensor:
        """x at sigma_to along the model's flow: z_r = z_t - (t - r) u(z_t, r, t) (MeanFlow eq. 12, its few-step
        sampling) with t = sigma / (1 + sigma), r = sigma_to / (1 + sigma_to), in EDM's x = z / (1 - t)."""
        return self._flow(network, x, sigma, sigma_to, labels)

    def denoise(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                constants: Any) -> torch.Tensor:
        """f(x_sigma, sigma) = z - t u(z, 0, t) with t = sigma / (1 + sigma), z = x_sigma / (1 + sigma): the jump
        from t to 0 (x_sigma = x + sigma e is z_t / (1 - t))."""
        return self._flow(network, x, sigma, torch.zeros_like(sigma), labels)

    def _flow(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor,
              labels: torch.Tensor | None) -> torch.Tensor:
        """The jump of `jump` and, to sigma_to = 0, of `denoise` (r = 0 and the factor 1 + 0 are exact)."""
        sigma = sigma.to(device=x.device, dtype=torch.float32)
        sigma_to = sigma_to.to(device=x.device, dtype=torch.float32)
        t, r = sigma / (1 + sigma), sigma_to / (1 + sigma_to)

        def u(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.u(network, z, r, t, labels).to(x.dtype)

        return meanflow.step(u, x / per_sample(1 + sigma, x), r, t) * per_sample(1 + sigma_to, x)
