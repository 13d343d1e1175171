"""Contract checks for component authors; the builtins' tests run the same checks.

Call `check_component(kind, cls)` from a plugin's own tests. Every check builds tiny tensors, runs in well
under a second for small components, and raises `AssertionError` naming the class and the broken rule.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from ctcore.components import (
    ALL_KINDS,
    MAX_NUM_SCALES,
    MODELS,
    NAME_PATTERN,
    NOISE_CONVENTIONS,
    OBJECTIVE_PARTS,
    RESERVED_OPTIONS,
    BuildContext,
    NoiseLevels,
    NoiseScheduleBase,
    PairDraw,
    TrainingBatch,
    WeightsUnavailable,
    split_times,
)
from ctcore.consistency import karras_sigmas
from ctcore.errors import CtcoreError, PackageUnavailable

if TYPE_CHECKING:
    from ctcore.registry import Registry

__all__ = [
    "SkippedComponentWarning",
    "check_all",
    "check_component",
    "check_component_class",
    "check_curriculum",
    "check_logger",
    "check_metric",
    "check_metric_values",
    "check_network",
    "check_noise_schedule",
    "check_num_scales",
    "check_objective",
    "check_pairs",
    "check_sampler",
    "check_sampler_plans",
    "check_schedule_on_grid",
    "check_teacher",
]



class SkippedComponentWarning(UserWarning):
    """check_all skipped a component whose weights file is absent (make it an error with
    `-W error::ctcore.testing.SkippedComponentWarning`, or pass `require_weights=True`)."""


class ContractViolation(AssertionError):
    """A broken contract rule; `problem` is the rule without the class name (ctcore check names the component)."""

    def __init__(self, cls: type, problem: str) -> None:
        super().__init__(f"{getattr(cls, '__qualname__', cls)!s}: {problem}")
        self.problem = problem


def _fail(cls: type, problem: str) -> AssertionError:
    return ContractViolation(cls, problem)


def _build(cls: type, context: BuildContext, options: dict[str, Any]) -> Any:
    """Construct a component the way the core does: `cls(cls.Options(**options), context)`."""
    return cls(cls.Options(**options), context)


def _option_names(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls.Options)]


# ---------------------------------------------------------------------------------------------------------
# Class shape (every kind)
# ---------------------------------------------------------------------------------------------------------


def check_component_class(kind: str, cls: type) -> None:
    """Check the class attributes every component needs: `name`, `summary` and a frozen attrs `Options`."""
    if kind not in ALL_KINDS:
        raise AssertionError(f"unknown component kind {kind!r}; expected one of {', '.join(ALL_KINDS)}")
    if not isinstance(cls, type):
        raise _fail(cls, f"a {kind} component must be a class, got {type(cls).__name__}")

    name = getattr(cls, "name", None)
    if not isinstance(name, str):
        raise _fail(cls, f"needs a class attribute `name` (str), got {name!r}")
    if not NAME_PATTERN.match(name):
        raise _fail(cls, f"`name` must be kebab-case (lowercase letters, digits, hyphens), got {name!r}")

    summary = getattr(cls, "summary", None)
    if not isinstance(summary, str) or not summary.strip():
        raise _fail(cls, f"needs a class attribute `summary` (non-empty str), got {summary!r}")
    if "\n" in summary.strip():
        raise _fail(cls, f"`summary` must be one line, got {summary!r}")

    options = getattr(cls, "Options", None)
    if not isinstance(options, type) or not attrs.has(options):
        raise _fail(cls, "needs a nested attrs class `Options` (decorate it with @attrs.frozen)")
    fields = attrs.fields(options)
    missing = [f.name for f in fields if f.default is attrs.NOTHING]
    if missing:
        raise _fail(cls, f"every option needs a default so a recipe may omit it; no default: {missing}")
    reserved = [f.name for f in fields if f.name in RESERVED_OPTIONS]
    if reserved:
        raise _fail(cls, f"option names {reserved} are reserved (context keys and `name`)")
    try:
        defaults = options()
    except Exception as exc:
        raise _fail(cls, f"`Options()` with all defaults fails: {type(exc).__name__}: {exc}") from exc
    probe = fields[0].name if fields else "_ctcore_probe"
    try:
        setattr(defaults, probe, getattr(defaults, probe, None))
    except attrs.exceptions.FrozenInstanceError:
        pass
    except AttributeError:  # slotted but not frozen: assigning an unknown attribute fails differently
        raise _fail(cls, "`Options` must be frozen (use @attrs.frozen)") from None
    else:
        raise _fail(cls, "`Options` must be frozen (use @attrs.frozen): options are shared, never changed")

    if kind == "network":
        conv = getattr(cls, "noise_conditioning", None)
        if conv not in NOISE_CONVENTIONS:
            raise _fail(cls, f"`noise_conditioning` must be one of {sorted(NOISE_CONVENTIONS)}, got {conv!r}")
    if kind in ("objective", "sampler"):
        model = getattr(cls, "model", None)
        if model not in MODELS:
            raise _fail(cls, f"`model` must be one of {', '.join(map(repr, MODELS))} (what the trained network "
                             f"computes), got {model!r}")
    if kind == "noise_schedule" and not isinstance(getattr(cls, "grid", None), bool):
        raise _fail(cls, f"`grid` must be True (pairs of the curriculum's sigma grid) or False (continuous pairs, "
                         f"no curriculum), got {getattr(cls, 'grid', None)!r}")
    if kind == "objective":
        uses = getattr(cls, "uses", None)
        if not isinstance(uses, tuple) or any(u not in OBJECTIVE_PARTS for u in uses) or len(set(uses)) != len(uses):
            raise _fail(cls, f"`uses` must be a tuple of distinct kinds among {', '.join(OBJECTIVE_PARTS)}, got "
                             f"{uses!r}")
        default = getattr(cls, "default_sampler", None)
        if not isinstance(default, str) or not NAME_PATTERN.match(default):
            raise _fail(cls, f"`default_sampler` must name a sampler (kebab-case), got {default!r}")
        passes = getattr(cls, "network_passes", None)
        if not isinstance(passes, int) or isinstance(passes, bool) or not 1 <= passes <= 1000:
            raise _fail(cls, f"`network_passes` must be an int in [1, 1000] (forward-pass equivalents per training "
                             f"image), got {passes!r}")


# ---------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------


def _network_inputs(
    cls: type, data_shape: tuple[int, ...], num_classes: int, batch: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = torch.randn(batch, *data_shape)
    sigma = torch.tensor([0.002, 1.0, 80.0])[:batch]
    c_noise = NOISE_CONVENTIONS[cls.noise_conditioning] * torch.log(sigma)
    labels = torch.randint(0, num_classes, (batch,)) if num_classes > 0 else None
    return x, c_noise, labels


def _check_network_forward(cls: type, net: nn.Module, data_shape: tuple[int, ...], num_classes: int) -> None:
    """Output shape, finiteness and gradient flow for one built network."""
    x, c_noise, labels = _network_inputs(cls, data_shape, num_classes)
    net.train()
    out = net(x, c_noise, labels)
    where = f"forward(x, c_noise, labels) with num_classes={num_classes}"
    if not isinstance(out, torch.Tensor):
        raise _fail(cls, f"{where} must return a tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise _fail(cls, f"{where} must return the shape of x {tuple(x.shape)}, got {tuple(out.shape)}")
    if not out.is_floating_point() or not torch.isfinite(out).all():
        raise _fail(cls, f"{where} returned non-finite or non-float values")

    # A random projection, so a zero-initialised output layer still passes gradient to its own weights.
    (out * torch.randn_like(out)).sum().backward()
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if not params:
        raise _fail(cls, "has no trainable parameters")
    unreached = [n for n, p in params if p.grad is None]
    if unreached:
        raise _fail(cls, f"{where}: no gradient reaches parameters {unreached} (unused parameters)")
    if not all(torch.isfinite(p.grad).all() for _, p in params):
        raise _fail(cls, f"{where}: non-finite gradients")
    if not any(p.grad.abs().sum() > 0 for _, p in params):
        raise _fail(cls, f"{where}: every parameter gradient is zero")


def _check_network_dropout(cls: type, options: dict[str, Any], data_shape: tuple[int, ...]) -> None:
    """With dropout on, restoring the RNG state must reproduce the mask (the teacher reuses the student's)."""
    # perturbed: a possibly zero-initialised output must show the dropout
    net = _perturbed(_build(cls, BuildContext(data_shape=data_shape), {**options, "dropout": 0.5})).train()
    x, c_noise, labels = _network_inputs(cls, data_shape, 0)
    state = torch.get_rng_state()
    first = net(x, c_noise, labels)
    torch.set_rng_state(state)
    with torch.no_grad():
        again = net(x, c_noise, labels)
    if not torch.equal(first.detach(), again):
        raise _fail(cls, "two train-mode forwards from the same RNG state differ; dropout must draw its "
                         "masks from torch's global generator so the core can share them with the teacher")
    with torch.no_grad():
        other = net(x, c_noise, labels)
    if torch.equal(other, again):
        raise _fail(cls, "option dropout=0.5 has no effect in train mode")


def _perturbed(net: nn.Module) -> nn.Module:
    """The network with every parameter moved by 0.1 N(0, 1), so a zero-initialised output layer passes gradient
    to the layers before it."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def _added_parameters(cls: type, context: BuildContext, options: dict[str, Any], **added: Any) -> list[str]:
    """Names of the parameters that a network built with the `added` options has and one built without them lacks
    (or has in another shape)."""
    with torch.random.fork_rng(devices=[]):
        without = {n: p.shape for n, p in _build(cls, context, options).named_parameters()}
        built = _build(cls, context, {**options, **added})
    return [n for n, p in built.named_parameters() if without.get(n) != p.shape]


def _unreached(net: nn.Module, names: list[str]) -> list[str]:
    """Those of the named parameters that the last backward left without a non-zero gradient."""
    params = dict(net.named_parameters())
    return [n for n in names if params[n].grad is None or not params[n].grad.abs().sum() > 0]


def _check_network_time_inputs(cls: type, options: dict[str, Any], data_shape: tuple[int, ...],
                               num_classes: int) -> None:
    """time_inputs 2: a (batch, 2) c_noise keeps x's shape, its second column changes the output and trains the
    second input's embedding; (batch,) means a zero second column, exactly; (batch, 3) is a ValueError."""
    context = BuildContext(data_shape=data_shape, num_classes=num_classes)
    base = {**options, "time_inputs": 1}
    second = _added_parameters(cls, context, base, time_inputs=2)
    if not second:
        raise _fail(cls, "time_inputs=2 adds no parameters: the second time input needs an embedding of its own")
    net = _perturbed(_build(cls, context, {**base, "time_inputs": 2})).train()
    x, c_noise, labels = _network_inputs(cls, data_shape, num_classes)
    zeros = torch.stack([c_noise, torch.zeros_like(c_noise)], dim=1)
    both = torch.stack([c_noise, torch.tensor([0.5, -0.7, 1.3])[:len(c_noise)]], dim=1)
    where = "with time_inputs=2, forward(x, c_noise of shape (batch, 2), labels)"
    out = net(x, both, labels)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _fail(cls, f"{where} must return the shape of x {tuple(x.shape)}, got {got}")
    if not out.is_floating_point() or not torch.isfinite(out).all():
        raise _fail(cls, f"{where} returned non-finite or non-float values")
    if out.requires_grad:
        (out * torch.randn_like(out)).sum().backward()
    net.eval()
    with torch.no_grad():
        one, zero, other = net(x, c_noise, labels), net(x, zeros, labels), net(x, both, labels)
    if torch.equal(other, zero):
        raise _fail(cls, f"{where}: the second column must change the output, but it gives that of a zero one")
    unreached = _unreached(net, second)
    if unreached:
        raise _fail(cls, f"{where}: no gradient reaches the second input's embedding {unreached}")
    if not torch.equal(one, zero):
        raise _fail(cls, "with time_inputs=2, a c_noise of shape (batch,) must mean a second time input of 0: it "
                         "must give exactly the output of (batch, 2) with a zero second column")
    wrong = "with time_inputs=2, a c_noise of shape (batch, 3) must raise ValueError"
    try:
        net(x, torch.zeros(len(c_noise), 3), labels)
    except ValueError:
        pass
    except Exception as exc:
        raise _fail(cls, f"{wrong}, got {type(exc).__name__}: {exc}") from exc
    else:
        raise _fail(cls, wrong)


def _check_network_logvar(cls: type, options: dict[str, Any], data_shape: tuple[int, ...]) -> None:
    """logvar_head: logvar(c) is (batch,), finite and trains the head; without the head it is a ValueError that
    names the option."""
    context = BuildContext(data_shape=data_shape)
    head = _added_parameters(cls, context, {**options, "logvar_head": False}, logvar_head=True)
    net = _build(cls, context, {**options, "logvar_head": True})
    _, c_noise, _ = _network_inputs(cls, data_shape, 0)
    out = net.logvar(c_noise)
    if not isinstance(out, torch.Tensor) or out.shape != c_noise.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _fail(cls, f"with logvar_head=true, logvar(c) must have shape (batch,) = {tuple(c_noise.shape)}, got "
                         f"{got}")
    if not out.is_floating_point() or not torch.isfinite(out).all():
        raise _fail(cls, "with logvar_head=true, logvar(c) returned non-finite or non-float values")
    if out.requires_grad:
        out.sum().backward()
    unreached = _unreached(net, head)
    if not head or unreached:
        raise _fail(cls, f"with logvar_head=true, no gradient of logvar(c) reaches the head's parameters "
                         f"{unreached or '(logvar_head adds none)'}")
    absent = "with logvar_head=false, logvar(c) must raise ValueError naming the option logvar_head"
    try:
        _build(cls, context, {**options, "logvar_head": False}).logvar(c_noise)
    except ValueError as exc:
        if "logvar_head" not in str(exc):
            raise _fail(cls, f"{absent}, got {exc}") from exc
    except Exception as exc:
        raise _fail(cls, f"{absent}, got {type(exc).__name__}: {exc}") from exc
    else:
        raise _fail(cls, absent)


def check_network(
    cls: type, data_shape: tuple[int, ...] = (3, 8, 8), num_classes: int = 0, **options: Any
) -> None:
    """Check a network: an nn.Module whose forward(x, c_noise, labels) keeps x's shape and trains; with an option
    `time_inputs`, also built with 2 (a (batch, 2) c_noise); with an option `logvar_head`, its logvar(c)."""
    data_shape = tuple(data_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = _build(cls, BuildContext(data_shape=data_shape, num_classes=num_classes), options)
        if not isinstance(net, nn.Module):
            raise _fail(cls, f"a network must be a torch.nn.Module, got {type(net).__name__}")
        _check_network_forward(cls, net, data_shape, num_classes)

        if num_classes == 0:  # class-conditional use too, when the network supports it
            try:
                conditional = _build(cls, BuildContext(data_shape=data_shape, num_classes=3), options)
            except (ValueError, NotImplementedError, CtcoreError):
                conditional = None  # the network declines class labels when it is built
            if conditional is not None:
                _check_network_forward(cls, conditional, data_shape, 3)

        if "dropout" in _option_names(cls):
            _check_network_dropout(cls, options, data_shape)
        if "time_inputs" in _option_names(cls):
            _check_network_time_inputs(cls, options, data_shape, num_classes)
        if "logvar_head" in _option_names(cls):
            _check_network_logvar(cls, options, data_shape)


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def check_metric_values(cls: type, metric: nn.Module, data_shape: tuple[int, ...], when: str) -> None:
    """d(x, y) of one built metric on 3 random CPU samples: shape (3,), finite, >= 0, differentiable, d(x, x) = 0."""
    x = torch.randn(3, *data_shape, requires_grad=True)
    y = torch.randn(3, *data_shape)
    d = metric(x, y)
    if not isinstance(d, torch.Tensor) or d.shape != (3,):
        got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise _fail(cls, f"{when}: d(x, y) must have shape (batch,) = (3,), got {got}")
    if not torch.isfinite(d).all():
        raise _fail(cls, f"{when}: d(x, y) is not finite: {d.tolist()}")
    if (d < 0).any():
        raise _fail(cls, f"{when}: d(x, y) must be non-negative, got {d.tolist()}")
    if not d.requires_grad:
        raise _fail(cls, f"{when}: d(x, y) must be differentiable in x, but it does not require grad")
    d.sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all() or not (x.grad != 0).any():
        raise _fail(cls, f"{when}: d(x, y) must be differentiable in x with a finite, non-zero gradient")
    with torch.no_grad():
        same = metric(x.detach(), x.detach().clone())
    if same.shape != (3,) or not torch.allclose(same, torch.zeros(3), atol=1e-6):
        raise _fail(cls, f"{when}: d(x, x) must be 0 for every sample, got {same.tolist()}")


def check_metric(cls: type, data_shape: tuple[int, ...] = (3, 8, 8), **options: Any) -> None:
    """Check a metric: d(x, y) is per-sample, non-negative, zero on x == y, differentiable, shape-agnostic."""
    data_shape = tuple(data_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        metric = _build(cls, BuildContext(data_shape=data_shape), options)
        if not isinstance(metric, nn.Module):
            raise _fail(cls, f"a metric must be a torch.nn.Module, got {type(metric).__name__}")
        check_metric_values(cls, metric, data_shape, f"with data_shape={data_shape}")
        try:  # the core may not know the data shape: sizes must then come from the inputs
            unshaped = _build(cls, BuildContext(data_shape=None), options)
            check_metric_values(cls, unshaped, data_shape, "with data_shape=None")
        except AssertionError:
            raise
        except Exception as exc:
            raise _fail(cls, f"fails with data_shape=None: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------
# Noise schedules
# ---------------------------------------------------------------------------------------------------------


def check_schedule_on_grid(cls: type, schedule: Any, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and 4096 sampled indices of one built schedule on one sigma grid, checked; returns both."""
    n = sigmas.shape[0]
    p = schedule.probabilities(sigmas)
    if not isinstance(p, torch.Tensor) or p.shape != (n - 1,):
        got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
        raise _fail(cls, f"probabilities() of a {n}-point grid must have shape ({n - 1},), got {got}")
    p64 = p.to(torch.float64)
    if not torch.isfinite(p64).all() or (p64 < 0).any():
        raise _fail(cls, f"probabilities() of a {n}-point grid must be finite and non-negative")
    total = p64.sum().item()
    if abs(total - 1.0) > 1e-9:
        raise _fail(cls, f"probabilities() of a {n}-point grid sums to {total!r}, not 1 within 1e-9 "
                         "(normalise in float64)")

    idx = schedule.sample(sigmas, 4096, torch.Generator().manual_seed(0))
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.shape != (4096,):
        got = (idx.dtype, tuple(idx.shape)) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise _fail(cls, f"sample(sigmas, 4096, generator) must give 4096 int64 indices, got {got}")
    if idx.min() < 0 or idx.max() > n - 2:
        raise _fail(cls, f"sample() indices must lie in [0, {n - 2}] for {n} sigmas, got "
                         f"[{idx.min().item()}, {idx.max().item()}]")
    again = schedule.sample(sigmas, 4096, torch.Generator().manual_seed(0))
    if not torch.equal(idx, again):
        raise _fail(cls, "sample() must draw only from its generator: the same seed gave other indices")
    return p64, idx


def check_pairs(cls: type, schedule: Any, step: int, grid: torch.Tensor | None = None) -> torch.Tensor:
    """4096 pairs of one built schedule at `step` (on `grid` for a grid schedule), checked: float64 of shape
    (4096,), finite, 0 <= sigma_lo < sigma_hi, points of the grid, drawn only from the draw's generators; returns
    sigma_hi."""
    if not callable(getattr(schedule, "pairs", None)) or not callable(getattr(schedule, "log_fields", None)):
        raise _fail(cls, "needs methods pairs(draw) and log_fields(step) and a class attribute grid: subclass "
                         "ctcore.components.NoiseScheduleBase for a grid schedule (see docs/plugins.md)")

    def draw(seed: int) -> tuple[Any, Any]:
        return schedule.pairs(PairDraw(step, 4096, grid, torch.Generator().manual_seed(seed),
                                       torch.Generator().manual_seed(seed + 1)))

    pairs = draw(0)
    if not isinstance(pairs, tuple) or len(pairs) != 2 or not all(isinstance(p, torch.Tensor) for p in pairs):
        raise _fail(cls, f"pairs(draw) must return a tuple (sigma_lo, sigma_hi) of two tensors, got "
                         f"{type(pairs).__name__}")
    lo, hi = pairs
    if any(p.dtype != torch.float64 or p.shape != (4096,) for p in pairs):
        raise _fail(cls, f"pairs(draw) must give float64 tensors of shape (batch_size,) = (4096,), got "
                         f"{lo.dtype} {tuple(lo.shape)} and {hi.dtype} {tuple(hi.shape)}")
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()) or (lo < 0).any() or not (lo < hi).all():
        raise _fail(cls, f"pairs(draw) at step {step} must satisfy 0 <= sigma_lo < sigma_hi, finite, for every "
                         "example")
    if grid is not None and not (torch.isin(lo, grid).all() and torch.isin(hi, grid).all()):
        raise _fail(cls, "pairs(draw) of a grid schedule must be points of draw.grid")
    again = draw(0)
    if not (torch.equal(lo, again[0]) and torch.equal(hi, again[1])):
        raise _fail(cls, "pairs(draw) must draw only from the draw's generators: the same seeds gave other pairs")
    fields = schedule.log_fields(step)
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise _fail(cls, f"log_fields({step}) must return a dict of str keys, got {fields!r}")
    return hi


def check_noise_schedule(cls: type, **options: Any) -> None:
    """Check a noise schedule: a grid schedule's probabilities and indices on Karras grids and the pairs they
    give; a continuous schedule's pairs from the first step to far past any training length."""
    schedule = _build(cls, BuildContext(total_steps=1000), options)
    if not cls.grid:
        for step in (0, 1, 1000, 10**6, 10**9):
            check_pairs(cls, schedule, step)
        return
    for n in (2, 11, 161, 1281):
        sigmas = karras_sigmas(n)
        p64, idx = check_schedule_on_grid(cls, schedule, sigmas)
        check_pairs(cls, schedule, 0, sigmas)
        if n == 11:  # the draws follow `probabilities` (generous bound; the seed makes it deterministic)
            freq = torch.bincount(idx, minlength=n - 1).to(torch.float64) / idx.numel()
            bound = 5 * torch.sqrt(p64 * (1 - p64) / idx.numel()) + 0.005
            if ((freq - p64).abs() > bound).any():
                raise _fail(cls, f"sample() frequencies {freq.tolist()} do not follow {p64.tolist()}")


# ---------------------------------------------------------------------------------------------------------
# Curricula
# ---------------------------------------------------------------------------------------------------------


def check_curriculum(cls: type, total_steps: int = 1000, **options: Any) -> None:
    """Check a curriculum: num_scales(step) is an int in [2, 2^24], non-decreasing from step 0 to past the end."""
    curriculum = _build(cls, BuildContext(total_steps=total_steps), options)
    grid = {round(i * total_steps / 199) for i in range(200)}
    check_num_scales(cls, curriculum, sorted(grid | {0, total_steps, total_steps + 1, 2 * total_steps,
                                                      10 * total_steps}))


def check_num_scales(cls: type, curriculum: Any, steps: list[int]) -> list[int]:
    """N(k) of one built curriculum at increasing `steps`, checked (int, 2 <= N <= MAX_NUM_SCALES, non-decreasing)."""
    previous, previous_step, found = 0, None, []
    for step in steps:
        n = curriculum.num_scales(step)
        if not isinstance(n, int) or isinstance(n, bool):
            raise _fail(cls, f"num_scales({step}) must return an int, got {type(n).__name__}")
        if n < 2:
            raise _fail(cls, f"num_scales({step}) must be >= 2 (a sigma grid needs two points), got {n}")
        if n > MAX_NUM_SCALES:
            raise _fail(cls, f"num_scales({step}) must be at most 2^24 = {MAX_NUM_SCALES:,} (torch.multinomial's "
                             f"limit on categories), got {n:,}")
        if n < previous:
            raise _fail(cls, f"num_scales must be non-decreasing: num_scales({previous_step}) = {previous} "
                             f"but num_scales({step}) = {n}")
        previous, previous_step = n, step
        found.append(n)
    return found


# ---------------------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------------------


class _TinyStudent(nn.Module):
    """A two-layer student with a buffer, standing in for a real network."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.silu(self.fc1(x))) * self.scale


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, torch.Tensor):
            if not isinstance(other, torch.Tensor) or not torch.equal(value, other):
                return False
        elif value != other:
            return False
    return True


def _check_train_mode(cls: type, network: nn.Module, after: str) -> None:
    """The teacher network is in train mode like the training student: its dropout is active, so the mask it
    replays is the student's (the engine does not switch the teacher's mode)."""
    off = [name or "the network itself" for name, module in network.named_modules() if not module.training]
    if off:
        raise _fail(cls, f"after {after} the teacher network must be in train mode like the student (dropout "
                         f"active, its mask the student's), but it has modules in eval mode: {', '.join(off)}")


def check_teacher(cls: type, data_shape: tuple[int, ...] = (4,), **options: Any) -> None:
    """Check a teacher rule: bind, decay in [0, 1), a finite teacher_input (if it has one) shaped like x (of
    `data_shape`), update, frozen teacher weights, the student's train mode after bind and update, state_dict
    roundtrip."""
    context = BuildContext()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = _TinyStudent().train()
        teacher = _build(cls, context, options)
        teacher.bind(student)
        network = getattr(teacher, "network", None)
        if not isinstance(network, nn.Module):
            raise _fail(cls, f"bind(student) must set `self.network`, got {type(network).__name__}")
        if network is not student and any(p.requires_grad for p in network.parameters()):
            raise _fail(cls, "a teacher network other than the student must not require grad")
        _check_train_mode(cls, network, "bind(student)")

        for step, num_scales in ((0, 2), (0, 11), (1000, 161), (100_000, 1281)):
            mu = teacher.decay(step, num_scales)
            if not isinstance(mu, float | int) or isinstance(mu, bool) or not 0.0 <= mu < 1.0:
                raise _fail(cls, f"decay({step}, {num_scales}) must be a number in [0, 1), got {mu!r}")

        x, z = torch.rand(3, *data_shape) * 2 - 1, torch.randn(3, *data_shape)
        sigma_lo, sigma_hi = torch.tensor([0.002, 0.5, 20.0], dtype=torch.float64), torch.tensor(
            [0.01, 0.8, 80.0], dtype=torch.float64)
        with torch.no_grad():
            x_lo = teacher.teacher_input(x, z, sigma_lo, sigma_hi, None) if hasattr(teacher, "teacher_input") else x
        if not isinstance(x_lo, torch.Tensor) or x_lo.shape != x.shape or not torch.isfinite(x_lo).all():
            got = tuple(x_lo.shape) if isinstance(x_lo, torch.Tensor) else type(x_lo).__name__
            raise _fail(cls, f"teacher_input(x, z, sigma_lo, sigma_hi, labels) must give finite values shaped like "
                             f"x {tuple(x.shape)}, got {got}")

        with torch.no_grad():
            for p in student.parameters():
                p.add_(1.0)
        teacher.update(student, 1, 11)
        network = teacher.network
        if not all(torch.isfinite(p).all() for p in network.parameters()):
            raise _fail(cls, "update() left non-finite teacher weights")
        _check_train_mode(cls, network, "update()")
        if not all(p.requires_grad for p in student.parameters()):
            raise _fail(cls, "bind() or update() stopped the student's own parameters from requiring grad")
        if teacher.decay(1, 11) == 0:
            pairs = zip(network.parameters(), student.parameters(), strict=True)
            if not all(torch.equal(t, s) for t, s in pairs):
                raise _fail(cls, "with decay 0 the teacher must equal the student after update()")

        state = teacher.state_dict()
        if not isinstance(state, dict):
            raise _fail(cls, f"state_dict() must return a dict, got {type(state).__name__}")
        if teacher.network is student and state:
            raise _fail(cls, "state_dict() must be empty when the teacher is the student itself")
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            restored = torch.load(buffer, weights_only=True)
        except Exception as exc:
            raise _fail(cls, f"state_dict() must load with torch.load(weights_only=True): {exc}") from exc
        fresh = _build(cls, context, options)
        fresh.bind(_TinyStudent())
        fresh.load_state_dict(restored)
        if not _same_state(state, fresh.state_dict()):
            raise _fail(cls, "load_state_dict(state_dict()) on a freshly bound teacher loses state")


# ---------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------


class _TinyNetwork(nn.Module):
    """A per-pixel network with a noise input, standing in for a real one (Fourier convention, no dropout); like the
    builtins' options time_inputs = 2 and logvar_head, it also takes a (B, 2) c_noise and has logvar(c)."""

    noise_conditioning = "fourier"
    time_inputs = 2

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = nn.Linear(channels, channels)
        self.noise = nn.Linear(1, channels)
        self.noise_2 = nn.Linear(1, channels)
        self.logvar_linear = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        first, second = split_times(c_noise, self.time_inputs, "stand-in")
        h = (self.mix(x.movedim(1, -1)) + self.noise(first.reshape(-1, 1, 1, 1).to(x.dtype))
             + self.noise_2(second.reshape(-1, 1, 1, 1).to(x.dtype)))
        return torch.tanh(h).movedim(-1, 1)

    def logvar(self, c: torch.Tensor) -> torch.Tensor:
        return self.logvar_linear(c.reshape(-1, 1).float()).squeeze(1)


class _SquaredDistance(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).square().flatten(1).mean(1)


class _UniformPairs(NoiseScheduleBase):
    def probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        return torch.full((sigmas.shape[0] - 1,), 1.0 / (sigmas.shape[0] - 1), dtype=torch.float64)


class _FixedScales:
    def num_scales(self, step: int) -> int:
        return 11


class _StopGradient:
    network: nn.Module

    def bind(self, student: nn.Module) -> None:
        self.network = student

    def decay(self, step: int, num_scales: int) -> float:
        return 0.0

    def update(self, student: nn.Module, step: int, num_scales: int) -> None:
        self.network = student

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def diffusion_denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The exact denoiser of N(0, 0.5^2) data, x 0.25 / (sigma^2 + 0.25), as a distillation teacher's model."""
        return x * (0.25 / (sigma.to(x.dtype) ** 2 + 0.25)).reshape(-1, *([1] * (x.ndim - 1)))


def _stand_in_parts(student: nn.Module, uses: tuple[str, ...]) -> dict[str, Any]:
    """Simple components of the kinds an objective uses (squared distance, uniform pairs, N = 11, stop-gradient with
    an exact Gaussian denoiser as its diffusion model)."""
    teacher = _StopGradient()
    teacher.bind(student)
    made = {"metric": _SquaredDistance(), "noise_schedule": _UniformPairs(), "curriculum": _FixedScales(),
            "teacher": teacher}
    return {kind: made[kind] for kind in uses}


def check_objective(cls: type, data_shape: tuple[int, ...] = (3, 4, 4), **options: Any) -> None:
    """Check an objective on a tiny per-pixel network and stand-in parts: a finite scalar loss that trains the
    student and depends on no randomness but the batch's generators; after_step, log_fields and a denoise shaped
    like its input."""
    from ctcore.recipe import ConsistencySection

    data_shape = tuple(data_shape)
    constants = ConsistencySection()

    def loss_of(global_seed: int) -> tuple[torch.Tensor, nn.Module, Any]:
        torch.manual_seed(0)
        student = _TinyNetwork(data_shape[0])
        objective = _build(cls, BuildContext(data_shape=data_shape, total_steps=100), options)
        objective.bind(student, _stand_in_parts(student, cls.uses))
        x = torch.rand(4, *data_shape) * 2 - 1
        torch.manual_seed(global_seed)  # the loss must not depend on the global generator
        batch = TrainingBatch(step=0, x=x[:2], labels=None, batch_size=4, share=slice(0, 2), student=student,
                              constants=constants, index_generator=torch.Generator().manual_seed(1),
                              noise_generator=torch.Generator().manual_seed(2))
        loss = objective.loss(batch)
        return loss, student, objective

    with torch.random.fork_rng(devices=[]):
        loss, student, objective = loss_of(10)
        if not isinstance(loss, torch.Tensor) or loss.shape != ():
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise _fail(cls, f"loss(batch) must return a scalar tensor, got {got}")
        if not loss.is_floating_point() or not torch.isfinite(loss):
            raise _fail(cls, f"loss(batch) must be finite, got {loss}")
        if not loss.requires_grad:
            raise _fail(cls, "loss(batch) must be differentiable in the student, but it does not require grad")
        loss.backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]  # not every input is every loss's
        if (student.mix.weight.grad is None or any(not torch.isfinite(g).all() for g in grads)
                or not any((g != 0).any() for g in grads)):
            raise _fail(cls, "loss(batch).backward() must give the student finite, non-zero gradients")
        again, _, _ = loss_of(11)
        if not torch.equal(loss.detach(), again.detach()):
            raise _fail(cls, "loss(batch) must draw its randomness only from batch.index_generator and "
                             "batch.noise_generator: another global seed changed it (every process of a run must "
                             "draw the same global batch)")
        objective.after_step(0)
        fields = objective.log_fields(0)
        if not isinstance(fields, dict) or not all(isinstance(k, str) and isinstance(v, int | float)
                                                   and not isinstance(v, bool) for k, v in fields.items()):
            raise _fail(cls, f"log_fields(step) must return a dict of names to numbers, got {fields!r}")
        x = torch.rand(3, *data_shape) * 2 - 1
        with torch.no_grad():
            out = objective.denoise(student, x, torch.tensor([0.002, 1.0, 80.0]), None, constants)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or not torch.isfinite(out).all():
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise _fail(cls, f"denoise(network, x, sigma, labels, constants) must return finite values shaped like x "
                             f"{tuple(x.shape)}, got {got}")
        if callable(getattr(objective, "jump", None)):  # a flow map: the model's trajectory between two levels
            with torch.no_grad():
                sigma = torch.tensor([0.5, 1.0, 80.0])
                out = objective.jump(student, x, sigma, sigma / 2, None, constants)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape or not torch.isfinite(out).all():
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise _fail(cls, f"jump(network, x, sigma, sigma_to, labels, constants) must return finite values "
                                 f"shaped like x {tuple(x.shape)}, got {got}")


# ---------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------


def _check_plan(cls: type, sigmas: Any, levels: NoiseLevels, what: str) -> None:
    if not isinstance(sigmas, list) or not sigmas or not all(isinstance(s, float) for s in sigmas):
        raise _fail(cls, f"{what} must be a non-empty list of floats, got {sigmas!r}")
    if any(not 0.0 < s <= levels.sigma_max for s in sigmas):
        raise _fail(cls, f"{what} must lie in (0, sigma_max] = (0, {levels.sigma_max}], got {sigmas}")
    if any(b >= a for a, b in zip(sigmas, sigmas[1:], strict=False)):
        raise _fail(cls, f"{what} must decrease, got {sigmas}")


def check_sampler_plans(cls: type, sampler: Any, levels: NoiseLevels) -> None:
    """The default plan and the preview plans of one built sampler for `levels`, checked."""
    try:
        default = sampler.plan(None, None, levels)
    except ValueError as exc:
        raise _fail(cls, f"plan(None, None, levels) (its default plan) fails for sigma_min {levels.sigma_min}, "
                         f"sigma_max {levels.sigma_max}, sigma_mid {list(levels.sigma_mid)}: {exc}") from None
    _check_plan(cls, default, levels, "plan(None, None, levels)")
    previews = sampler.preview_plans(levels)
    if not isinstance(previews, dict) or not previews:
        raise _fail(cls, f"preview_plans(levels) must return a non-empty dict of tags to plans, got {previews!r}")
    for tag, plan in previews.items():
        if not isinstance(tag, str) or not NAME_PATTERN.match(tag):
            raise _fail(cls, f"preview_plans(levels) tags name files: kebab-case strings, got {tag!r}")
        _check_plan(cls, plan, levels, f"preview_plans(levels)[{tag!r}]")


def check_sampler(cls: type, data_shape: tuple[int, ...] = (3, 4, 4), **options: Any) -> None:
    """Check a sampler: valid plans (explicit sigmas checked, increasing ones refused), noise draws and network
    evaluations per sample, and images shaped like the noise that depend on nothing but the noise."""
    data_shape = tuple(data_shape)
    levels = NoiseLevels(0.002, 80.0, (0.821,))
    sampler = _build(cls, BuildContext(data_shape=data_shape), options)
    check_sampler_plans(cls, sampler, levels)
    given = sampler.plan(None, [80.0, 0.821], levels)
    _check_plan(cls, given, levels, "plan(None, [80.0, 0.821], levels)")
    try:
        sampler.plan(None, [0.821, 80.0], levels)
    except ValueError:
        pass
    else:
        raise _fail(cls, "plan(None, [0.821, 80.0], levels) must raise ValueError: the sigmas increase")
    plan = sampler.plan(None, None, levels)
    draws, evaluations = sampler.noise_draws(plan), sampler.evaluations(plan)
    for what, v in (("noise_draws", draws), ("evaluations", evaluations)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _fail(cls, f"{what}(plan) must be an int >= 1, got {v!r}")
    calls = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        calls.append(1)
        if sigma.shape != (x.shape[0],):
            raise _fail(cls, f"the denoiser takes one sigma per sample, shape ({x.shape[0]},), got "
                             f"{tuple(sigma.shape)}")
        scale = (0.25 / (sigma**2 + 0.25)).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return x * scale  # the exact denoiser of N(0, 0.5^2) data

    noise = torch.randn((draws, 3, *data_shape), generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]):
        outs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            calls.clear()
            outs.append(sampler.sample(denoiser, noise.clone(), plan, None, levels, True))
    out = outs[0]
    if not isinstance(out, torch.Tensor) or out.shape != noise.shape[1:] or not torch.isfinite(out).all():
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _fail(cls, f"sample() must return finite images shaped like noise[0] {tuple(noise.shape[1:])}, got {got}")
    if not torch.equal(outs[0], outs[1]):
        raise _fail(cls, "sample() must use no randomness but `noise`: another global seed changed the images")
    if out.abs().max() > 1.0:
        raise _fail(cls, "sample(..., clip=True) must return images within [-1, 1]")
    if len(calls) != evaluations:
        raise _fail(cls, f"evaluations(plan) says {evaluations} network evaluations, but sample() made {len(calls)}")


# ---------------------------------------------------------------------------------------------------------
# Loggers
# ---------------------------------------------------------------------------------------------------------

LOGGER_RECORDS: tuple[dict[str, Any], ...] = (
    {"time": 1.0, "event": "distance", "step": 0, "sliced_wasserstein": 0.5},
    {"time": 2.0, "step": 2, "loss": 1.5, "num_scales": 11, "lr": 1e-4, "teacher_decay": 0.0, "img_per_s": 900.0},
    {"time": 3.0, "event": "nonfinite", "step": 3, "loss": float("nan"), "consecutive": 1, "last_good_step": 2},
    {"time": 4.0, "step": 4, "loss": float("inf"), "num_scales": 11, "lr": 1e-4, "teacher_decay": 0.0,
     "img_per_s": 900.0},
    {"time": 5.0, "event": "samples", "step": 4, "path": "samples/step-000000004.png"},
    {"time": 6.0, "event": "fid", "step": 4, "fid": 30.5, "num_samples": 100, "steps": 1, "inception_score": 2.5},
    {"time": 7.0, "event": "checkpoint", "step": 4, "path": "checkpoints/ckpt-000000004.pt"},
    {"time": 8.0, "event": "a-future-event", "step": 4, "value": [1, 2]},
)
"""What `check_logger` logs: every kind of record a run writes, non-finite losses and an event no logger knows."""


def check_logger(cls: type, **options: Any) -> None:
    """Check a logger, in a fresh working directory: the constructor writes nothing; start, log of every kind of
    record a run writes, close, then a resumed start in the same directory write only under the run directory and
    leave each record as it was."""
    import contextlib
    import copy
    import math
    import os
    import tempfile
    from pathlib import Path

    from ctcore.images import save_grid

    def unchanged(kept: dict[str, Any], record: dict[str, Any]) -> bool:
        return kept.keys() == record.keys() and all(
            v == record[k] or (isinstance(v, float) and math.isnan(v) and isinstance(record[k], float)
                               and math.isnan(record[k])) for k, v in kept.items())

    context = BuildContext(data_shape=(3, 4, 4), total_steps=4)
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        logger = _build(cls, context, options)
        if os.listdir(tmp):
            raise _fail(cls, f"the constructor must not write anything (open files in start()), but it wrote "
                             f"{sorted(os.listdir(tmp))}")
        run_dir = Path(tmp) / "run"
        save_grid(torch.zeros(4, 3, 4, 4, dtype=torch.uint8), run_dir / "samples" / "step-000000004.png")
        records = [{**r, "path": str(run_dir / r["path"])} if "path" in r else dict(r) for r in LOGGER_RECORDS]
        logger.start(run_dir, 0, {"run": {"name": "check"}, "logging": {"backends": ["jsonl", cls.name]}})
        for record in records:
            kept = copy.deepcopy(record)
            logger.log(record)
            if not unchanged(kept, record):
                raise _fail(cls, f"log(record) must not change the record (every logger gets the same one), "
                                 f"but it changed {kept!r} into {record!r}")
        logger.close()
        resumed = _build(cls, context, options)
        resumed.start(run_dir, 4, {"run": {"name": "check"}})  # a resumed run starts again in the same directory
        resumed.log(dict(records[1]))
        resumed.close()
        if os.listdir(tmp) != ["run"]:
            raise _fail(cls, f"write only under the run directory given to start(); it also wrote "
                             f"{sorted(set(os.listdir(tmp)) - {'run'})} in the working directory")


# ---------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------

_CHECKS = {
    "network": check_network,
    "metric": check_metric,
    "noise_schedule": check_noise_schedule,
    "curriculum": check_curriculum,
    "teacher": check_teacher,
    "objective": check_objective,
    "sampler": check_sampler,
    "logger": check_logger,
}


def check_component(kind: str, cls: type, **kwargs: Any) -> None:
    """Run the class-shape check, then the behaviour check for `kind` (kwargs go to the latter)."""
    check_component_class(kind, cls)
    _CHECKS[kind](cls, **kwargs)


def check_all(registry: Registry, options: dict[tuple[str, str], dict[str, Any]] | None = None, *,
              require_weights: bool = False, require_packages: bool = False) -> list[str]:
    """Check every component of a `ctcore.registry.Registry`; report all failures.

    Components use default options unless `options[(kind, name)]` gives others (e.g. a reduced width, so a
    300M-parameter network checks in a second). A component whose weights file is absent (it raises
    `ctcore.components.WeightsUnavailable`, as lpips does on a stock install) is skipped with a
    SkippedComponentWarning, unless `require_weights`; so is one whose optional package is not installed (it raises
    `ctcore.errors.PackageUnavailable`, as the tensorboard logger does), unless `require_packages`. Returns the skip
    messages.
    """
    options = options or {}
    failures, skipped = [], []
    for kind in ALL_KINDS:
        for name in registry.names(kind):
            where = registry.provider(kind, name).distribution
            try:
                check_component(kind, registry.get(kind, name), **options.get((kind, name), {}))
            except WeightsUnavailable as exc:
                if require_weights:
                    failures.append(f"{kind} {name!r} from {where}: WeightsUnavailable: {exc}")
                    continue
                skipped.append(f"skipped {kind} {name!r} from {where}: {exc}; to check it, pass "
                               f"options={{({kind!r}, {name!r}): {{{exc.option!r}: PATH}}}} to check_all")
                warnings.warn(skipped[-1], SkippedComponentWarning, stacklevel=2)
            except PackageUnavailable as exc:
                if require_packages:
                    failures.append(f"{kind} {name!r} from {where}: PackageUnavailable: {exc}")
                    continue
                skipped.append(f"skipped {kind} {name!r} from {where}: {exc}")
                warnings.warn(skipped[-1], SkippedComponentWarning, stacklevel=2)
            except Exception as exc:
                kind_of = "AssertionError" if isinstance(exc, AssertionError) else type(exc).__name__
                failures.append(f"{kind} {name!r} from {where}: {kind_of}: {exc}")
    if failures:
        raise AssertionError(f"{len(failures)} component(s) break the contract:\n" + "\n".join(failures))
    return skipped

