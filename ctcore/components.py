"""The component kinds, the context components are built with, and one Protocol per kind.

A component is a class with a kebab-case `name`, a one-line `summary` and a nested frozen attrs `Options`
class whose fields are its recipe settings (all with defaults). Every component is constructed the same way:
`cls(options, context)`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

KINDS: tuple[str, ...] = ("network", "objective", "metric", "noise_schedule", "curriculum", "teacher", "sampler")
"""The kinds a run has at most one of, each selected by its own recipe section ([network] name = ...). Every run
has a network, an objective and a sampler; the objective says which of OBJECTIVE_PARTS it trains with."""

OBJECTIVE_PARTS: tuple[str, ...] = ("metric", "noise_schedule", "curriculum", "teacher")
"""The kinds a training objective may use (`Objective.uses`): a run has exactly these of them, no others. The
consistency objective uses all four; the EDM denoising objective none."""

DEFAULT_OBJECTIVE: str = "consistency"
"""The objective of a recipe without an [objective] section: every recipe written before objectives existed."""

MODELS: tuple[str, ...] = ("consistency", "diffusion")
"""What a trained network computes, as `Objective.model` and `Sampler.model` name it: "consistency", the
consistency function f(x, sigma) that maps a noisy image to a clean one in one evaluation; "diffusion", the
denoiser D(x, sigma) whose probability-flow ODE an ODE solver integrates."""

LOGGER: str = "logger"
"""The kind of tracking backends: a run has any number, selected by `[logging] backends = [...]`."""

ALL_KINDS: tuple[str, ...] = (*KINDS, LOGGER)
"""Every kind the registry holds; the `kind` argument of the registry and of `ctcore.testing`."""

HOOKS: dict[str, str] = {
    "network": "ctcore_register_networks",
    "metric": "ctcore_register_metrics",
    "noise_schedule": "ctcore_register_noise_schedules",
    "curriculum": "ctcore_register_curricula",
    "teacher": "ctcore_register_teachers",
    "objective": "ctcore_register_objectives",
    "sampler": "ctcore_register_samplers",
    "logger": "ctcore_register_loggers",
}

NOISE_CONVENTIONS: dict[str, float] = {"fourier": 0.25, "positional": 1000 * 0.25}
"""c_noise = factor * ln(sigma): 0.25 for Gaussian-Fourier embeddings (NCSN++), 250 for ADM positional ones."""

MAX_NUM_SCALES: int = 2**24
"""The most sigma-grid points a curriculum may ask for: torch.multinomial, which draws the pair indices, takes at
most 2^24 categories (a grid that large is already 128 MiB of float64 per stage)."""


class WeightsUnavailable(ValueError):
    """A weights file that a component needs is absent: no path given and none found, or no file at the path.

    Components raise it (instead of a plain ValueError, whose handling it shares) when built on a real device;
    `option` names the option that takes the file. `ctcore.testing.check_all` skips such a component with its
    message, so a stock install without the file passes a plugin author's tests.
    """

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


@attrs.frozen
class BuildContext:
    """What a component learns from the run rather than from its own options."""

    data_shape: tuple[int, ...] | None = None
    """Shape of one training sample, e.g. (3, 32, 32)."""
    num_classes: int = 0
    """0 for unconditional data."""
    total_steps: int | None = None
    """K, the number of training iterations (curricula need it)."""


CONTEXT_KEYS: tuple[str, ...] = tuple(f.name for f in attrs.fields(BuildContext))

RESERVED_OPTIONS: tuple[str, ...] = (*CONTEXT_KEYS, "name")
"""Option names no component may use: context keys travel beside options in Registry.create, and `name`
selects the component in a recipe."""

NAME_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
"""Component names are kebab-case."""


@runtime_checkable
class Network(Protocol):
    """Raw F_theta(c_in * x, c_noise, labels) -> tensor shaped like x; the core adds c_skip / c_out."""

    name: ClassVar[str]
    summary: ClassVar[str]
    noise_conditioning: ClassVar[Literal["fourier", "positional"]]

    def __call__(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor: ...


@runtime_checkable
class Metric(Protocol):
    """d(x, y) -> one non-negative value per sample, zero when x == y."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@attrs.frozen
class PairDraw:
    """What a noise schedule draws one step's noise-level pairs from (built by the consistency objective)."""

    step: int
    """k, the step being trained (0-based)."""
    batch_size: int
    """The global batch: one pair per example (each process keeps its share of the draw)."""
    grid: torch.Tensor | None
    """For a grid schedule, the increasing Karras grid of the curriculum's N(k) points on the training device;
    None for a continuous schedule (the run has no curriculum)."""
    index_generator: torch.Generator
    """Generator on the training device for discrete draws (grid indices)."""
    noise_generator: torch.Generator
    """Generator on the training device for Gaussian draws (a continuous schedule's noise levels); the noise z is
    drawn from it after the pairs."""


@runtime_checkable
class NoiseSchedule(Protocol):
    """Which pair of noise levels (sigma_lo < sigma_hi) each example trains on: the student sees sigma_hi, the
    teacher sigma_lo. A grid schedule picks adjacent points of the curriculum's Karras grid (iCT, CT, CD); a
    continuous one draws them itself (ECT)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    grid: ClassVar[bool]
    """True: pairs are adjacent points of `draw.grid`, and the run has a [curriculum] for N(k); False: the
    schedule draws continuous pairs, and the run has no curriculum."""

    def pairs(self, draw: PairDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_lo, sigma_hi), float64 of shape (draw.batch_size,) on the generators' device, with
        0 <= sigma_lo < sigma_hi; sigma_lo = 0 means the target is the clean image itself (f(x, 0) = x)."""
        ...

    def log_fields(self, step: int) -> dict[str, float]:
        """Numbers for the training records after step k ({} for none; ECT's stage)."""
        ...


@runtime_checkable
class Curriculum(Protocol):
    """N(k): the number of sigma-grid points at training step k (non-decreasing in k)."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def num_scales(self, step: int) -> int: ...


@runtime_checkable
class Teacher(Protocol):
    """Makes the target network theta^- from the student and updates it after each optimizer step.

    Optional: `teacher_input(x, z, sigma_lo, sigma_hi, labels) -> tensor`, where the target network is evaluated
    at sigma_lo, from the clean images x and the noise z the student saw at sigma_hi; one ODE step of a diffusion
    model in distillation (cd). It runs under no_grad, sigma_lo / sigma_hi hold one value per example. Without
    it the point is x + sigma_lo z (consistency training). Optional too: `network_passes`, the forward passes
    per training image of a model the teacher holds besides the target (cd: 2 with Heun), which `ctcore bench`
    adds to the objective's.
    """

    name: ClassVar[str]
    summary: ClassVar[str]

    network: nn.Module

    def bind(self, student: nn.Module) -> None:
        """Create `self.network` from the student (the student itself for a stop-gradient teacher)."""
        ...

    def decay(self, step: int, num_scales: int) -> float:
        """mu(k): 0 means theta^- = theta (num_scales is N(k), 0 in a run without a curriculum)."""
        ...

    def update(self, student: nn.Module, step: int, num_scales: int) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Teacher state to checkpoint: empty when the teacher is the student."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@attrs.frozen
class TrainingBatch:
    """What an objective's `loss` sees at one training step (built by the training loop)."""

    step: int
    """k, the step being trained (0-based)."""
    x: torch.Tensor
    """This process's share of the clean images (with training.micro_batch_size: one micro-batch of it), in
    [-1, 1], on the training device."""
    labels: torch.Tensor | None
    """Their class labels (None for unconditional data)."""
    batch_size: int
    """The global batch: draw per-example randomness for this many examples, then keep `share` of them, so that
    any number of processes together compute the single-process step."""
    share: slice
    """The rows of a global-batch draw that `x` holds: this process's (with micro-batches, this micro-batch's)."""
    student: nn.Module
    """The student as the loss calls it (itself, or its torch.compile / DDP wrapper); gradients flow into it."""
    constants: Any
    """The recipe's [consistency] section: sigma_min, sigma_max, sigma_data, rho, weighting."""
    index_generator: torch.Generator
    """Generator on the training device for discrete draws (pair indices); the data batch was drawn from it."""
    noise_generator: torch.Generator
    """Generator on the training device for the Gaussian noise z."""
    teacher: nn.Module | None = None
    """The teacher's network as the loss calls it under no_grad: with training.compile its own torch.compile
    wrapper, compiled apart from `student` so that neither pass retraces the other; None: call the teacher's
    network itself."""


@runtime_checkable
class Objective(Protocol):
    """The training objective: the loss of one step, and the model function the trained network makes."""

    name: ClassVar[str]
    summary: ClassVar[str]
    model: ClassVar[Literal["consistency", "diffusion"]]
    """What the trained network computes (see MODELS); a run's sampler must sample this kind of model."""
    uses: ClassVar[tuple[str, ...]]
    """The OBJECTIVE_PARTS it trains with; the recipe has exactly these sections of them."""
    default_sampler: ClassVar[str]
    """The sampler of a recipe that has no [sampler] section."""
    network_passes: ClassVar[int]
    """Forward-pass equivalents of the network per training image, a backward pass counting two (consistency:
    student forward and backward, teacher forward = 4; EDM: 3): `ctcore bench` reports TFLOP/s with it."""
    # Optional: `eager_passes: ClassVar[bool]`, True for an objective that runs the unwrapped network eagerly besides
    # the student's pass and needs both to draw one dropout mask (a JVP: sct, scd, meanflow); preflight then refuses
    # dropout under training.compile, whose random numbers are not eager's.

    def bind(self, student: nn.Module, parts: dict[str, Any]) -> None:
        """Called once at run building with the student (unwrapped) and the components named in `uses`."""
        ...

    def loss(self, batch: TrainingBatch) -> torch.Tensor:
        """The scalar loss of this step (the core runs it under autocast, then backward and the optimizer). It must
        be the mean over the batch's rows, so that micro-batches (training.micro_batch_size), each weighted by its
        rows' share, combine into the whole batch's loss; each micro-batch's call starts the generators from the
        same state, so draw the global batch and keep `batch.share`."""
        ...

    def after_step(self, step: int) -> None:
        """After the optimizer step k = `step` was applied (a consistency objective updates its teacher)."""
        ...

    def log_fields(self, step: int) -> dict[str, float]:
        """Extra numbers for the training records of stats.jsonl after step k = `step` (num_scales: the
        progress display shows it), {} for none."""
        ...

    def denoise(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                constants: Any) -> torch.Tensor:
        """The model function of a network trained with this objective: f(x, sigma) or D(x, sigma), with its
        preconditioning; `sigma` holds one value per sample, `constants` is the recipe's [consistency]."""
        ...


@attrs.frozen
class NoiseLevels:
    """What a sampler learns from the recipe: the model's noise range, sampling.sigma_mid and sigma_data."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_mid: tuple[float, ...] = ()
    sigma_data: float = 0.5
    """The recipe's [consistency] sigma_data: samplers that plan in another time variable (TrigFlow's t = arctan(sigma
    / sigma_data)) convert with it."""


@runtime_checkable
class Sampler(Protocol):
    """How images are made from noise with a trained model: the noise levels visited and the update rule."""

    name: ClassVar[str]
    summary: ClassVar[str]
    model: ClassVar[Literal["consistency", "diffusion"]]
    """The kind of model it samples (see MODELS)."""

    def plan(self, steps: int | None, sigmas: list[float] | None, levels: NoiseLevels) -> list[float]:
        """The decreasing noise levels one sample visits: `sigmas` checked, or the sampler's own for `steps`
        (None: its default). Raises ValueError with a message saying what to change."""
        ...

    def preview_plans(self, levels: NoiseLevels) -> dict[str, list[float]]:
        """The plans the training loop draws sample grids with, by a file-name tag ("1step", "heun-18")."""
        ...

    def noise_draws(self, sigmas: list[float]) -> int:
        """How many standard-normal images one sample needs for this plan (its seed draws them)."""
        ...

    def evaluations(self, sigmas: list[float]) -> int:
        """Network evaluations per sample for this plan (NFE)."""
        ...

    def sample(self, denoiser: Callable[..., torch.Tensor], noise: torch.Tensor, sigmas: list[float],
               labels: torch.Tensor | None, levels: NoiseLevels, clip: bool) -> torch.Tensor:
        """Images from `noise` (noise_draws, B, ...) through the plan; `denoiser(x, sigma per sample, labels)`
        is the model function; `clip` clamps the result to [-1, 1]."""
        ...


@runtime_checkable
class Logger(Protocol):
    """A tracking backend: receives every record of the run's stats.jsonl, on rank 0 only."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def start(self, run_dir: Path, step: int, config: dict[str, Any]) -> None:
        """Open the backend before the first record: the run directory, the step the run (re)starts at and the
        resolved recipe as a dict. The constructor must not write anything."""
        ...

    def log(self, record: dict[str, Any]) -> None:
        """One record, exactly as stats.jsonl holds it (floats may be non-finite here); never modify it."""
        ...

    def close(self) -> None:
        """Flush and release the backend; called once when the run ends, however it ends."""
        ...


PROTOCOLS: dict[str, type] = {
    "network": Network,
    "metric": Metric,
    "noise_schedule": NoiseSchedule,
    "curriculum": Curriculum,
    "teacher": Teacher,
    "objective": Objective,
    "sampler": Sampler,
    "logger": Logger,
}


class NoiseScheduleBase:
    """Base of grid schedules: implement `probabilities(sigmas)`, entry i the chance of the pair (sigmas[i],
    sigmas[i+1]) of an increasing grid; `sample` draws indices from it (multinomial) and `pairs` their levels."""

    grid: ClassVar[bool] = True

    def probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, sigmas: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Pair indices in [0, N-2], one per example."""
        import torch

        p = self.probabilities(sigmas).to(dtype=torch.float64, device=generator.device)
        return torch.multinomial(p, batch_size, replacement=True, generator=generator)

    def pairs(self, draw: PairDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_i, sigma_{i+1}) for indices i drawn by `sample` from the index generator."""
        index = self.sample(draw.grid, draw.batch_size, draw.index_generator)
        return draw.grid[index], draw.grid[index + 1]

    def log_fields(self, step: int) -> dict[str, float]:
        return {}


# ------------------------------------------------------------------------------------ helpers for networks


MEMORY_ONLY = "memory_only"
"""attrs metadata key of a component option that changes memory and speed but not the values a step computes
(`checkpoint_blocks: bool = attrs.field(default=False, metadata={MEMORY_ONLY: True})`): a resumed run may change
it (ctcore.build.memory_knobs), e.g. to continue on a smaller GPU."""


checkpoint_probe: Callable[[Callable[..., Any], tuple[Any, ...]], None] | None = None
"""Set only while ctcore.preflight's estimate counts what autograd keeps (on the meta device): called with each
block `checkpointed` is about to checkpoint and its arguments, so the estimate can also run the block plainly and
count what it keeps, which its recomputation keeps during its backward. None otherwise."""


def checkpointed(function: Callable[..., Any], *args: Any, enabled: bool = True) -> Any:
    """`function(*args)` under activation checkpointing when `enabled` and autograd records: the activations it
    computes are recomputed in backward instead of kept (about one more forward pass of compute, for the memory),
    under the forward's RNG state, so dropout draws the same mask. Only the tensor arguments stay alive for the
    recomputation (`ctcore check`'s estimate counts them, and through `checkpoint_probe` what one block's
    recomputation keeps). Under `torch.no_grad` (the teacher, sampling) or when not `enabled`, a plain call.
    Non-reentrant (`use_reentrant=False`): works under torch.compile and when no input needs a gradient."""
    import torch.utils.checkpoint

    if enabled and torch.is_grad_enabled():
        if checkpoint_probe is not None:
            checkpoint_probe(function, args)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def split_times(c_noise: torch.Tensor, time_inputs: int, network: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(first, second) time inputs of a network's c_noise: (batch,), or with `time_inputs` 2 also (batch, 2). The
    second is zeros for a (batch,) c_noise and None for a one-time network; another shape is a ValueError naming the
    shapes the network takes (the `time_inputs` option of mlp, ncsnpp and adm)."""
    if c_noise.ndim != 1:
        if time_inputs != 2 or c_noise.ndim != 2 or c_noise.shape[1] != 2:
            shapes = "(batch,) or (batch, 2)" if time_inputs == 2 else "(batch,)"
            raise ValueError(f"network '{network}' takes c_noise of shape {shapes}, got {tuple(c_noise.shape)}")
        return c_noise[:, 0], c_noise[:, 1]
    return c_noise, (c_noise.new_zeros(c_noise.shape) if time_inputs == 2 else None)


def positional_features(c: torch.Tensor, num_channels: int, max_positions: float = 10_000,
                        endpoint: bool = False) -> torch.Tensor:
    """[cos(c w_j), sin(c w_j)], j < num_channels // 2, as EDM's PositionalEmbedding computes them (NVlabs/edm
    training/networks.py): w_j = (1 / max_positions)^(j / (half - endpoint)) in float32, the products in c's
    dtype, so a network converted from EDM computes its features exactly. c holds one value per sample."""
    import torch

    half = num_channels // 2
    exponent = torch.arange(half, dtype=torch.float32, device=c.device) / (half - (1 if endpoint else 0))
    freqs = (1 / max_positions) ** exponent
    arg = torch.outer(c, freqs.to(c.dtype))
    return torch.cat([arg.cos(), arg.sin()], dim=1)


# ------------------------------------------------------------------------------------ option validators


def requirement(condition: Callable[[Any], bool], text: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    """An attrs validator for Options fields: raises ValueError("key: <text>, got <value>"), the form in which
    recipe errors report it (`section.key: ...`). None passes, so optional fields may stay unset."""

    def validator(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not condition(value):
            raise ValueError(f"{attribute.name}: {text}, got {value!r}")

    return validator


def at_least(n: float) -> Callable[[Any, attrs.Attribute, Any], None]:
    """Validator: value >= n."""
    return requirement(lambda v: v >= n, f"must be >= {n}")


def one_of(*choices: Any) -> Callable[[Any, attrs.Attribute, Any], None]:
    """Validator for Literal options built directly in Python (the recipe reader checks them already)."""
    return requirement(lambda v: v in choices, f"must be one of {', '.join(map(repr, choices))}")


def show(value: Any) -> str:
    """A value as a message shows it: integers with `_` separators from 10_000 (as recipes write them), floats
    in their shortest exact form (1e+10, 0.99993), tuples as arrays."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@attrs.frozen
class Within:
    """An attrs validator: lo <= value <= hi (a bound with `open_lo` / `open_hi` is excluded), raising
    ValueError("key: must be within [lo, hi] (reason), got value"). With `each`, the value is a tuple and every
    entry must be within the range ("key[i]: ..."). None passes, so optional fields may stay unset.
    `ctcore.components.range_of(field)` finds it on a field, so docs and tests can read the range."""

    lo: float
    hi: float
    reason: str
    open_lo: bool = False
    open_hi: bool = False
    each: bool = False

    @property
    def interval(self) -> str:
        """"[lo, hi]", with "(" / ")" for an open bound."""
        return f"{'(' if self.open_lo else '['}{show(self.lo)}, {show(self.hi)}{')' if self.open_hi else ']'}"

    @property
    def message(self) -> str:
        return f"must be within {self.interval} ({self.reason})"

    def contains(self, v: Any) -> bool:
        if not _is_number(v):
            return False
        above = v > self.lo if self.open_lo else v >= self.lo
        below = v < self.hi if self.open_hi else v <= self.hi
        return above and below

    def __call__(self, _instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if not self.each:
            if not self.contains(value):
                raise ValueError(f"{attribute.name}: {self.message}, got {show(value)}")
            return
        for i, v in enumerate(value):
            if not self.contains(v):
                raise ValueError(f"{attribute.name}[{i}]: {self.message}, got {show(v)}")


def within(lo: float, hi: float, reason: str, *, open_lo: bool = False, open_hi: bool = False) -> Within:
    """Validator: lo <= value <= hi (inclusive unless open_lo / open_hi); `reason` says in a few words why."""
    return Within(lo, hi, reason, open_lo, open_hi)


def each_within(lo: float, hi: float, reason: str, *, open_lo: bool = False, open_hi: bool = False) -> Within:
    """Validator for a tuple option: every entry lo <= v <= hi (pair it with `entries` for the length)."""
    return Within(lo, hi, reason, open_lo, open_hi, each=True)


@attrs.frozen
class Entries:
    """An attrs validator for tuple options: between lo and hi entries ("key: must have 1 to 12 entries (...)")."""

    lo: int
    hi: int
    reason: str

    def __call__(self, _instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not self.lo <= len(value) <= self.hi:
            what = f"{self.lo} to {self.hi} entries" if self.lo < self.hi else f"{self.lo} entries"
            raise ValueError(f"{attribute.name}: must have {what} ({self.reason}), got {len(value)}")


def entries(lo: int, hi: int, reason: str) -> Entries:
    """Validator: a tuple option has lo..hi entries."""
    return Entries(lo, hi, reason)


def _validators(field: attrs.Attribute) -> list[Any]:
    v = field.validator
    return list(getattr(v, "_validators", ())) if v is not None and hasattr(v, "_validators") else [v]


def range_of(field: attrs.Attribute) -> Within | None:
    """The Within validator of an Options / section field, or None."""
    return next((v for v in _validators(field) if isinstance(v, Within)), None)


def entries_of(field: attrs.Attribute) -> Entries | None:
    """The Entries validator of a tuple field, or None."""
    return next((v for v in _validators(field) if isinstance(v, Entries)), None)


def range_text(field: attrs.Attribute) -> str | None:
    """A field's range in words ("in [-20, 20]", "1 to 12 entries, each in [1, 64]"), or None."""
    r, e = range_of(field), entries_of(field)
    if r is None:
        return None
    if not r.each:
        return f"in {r.interval}"
    return f"{e.lo} to {e.hi} entries, each in {r.interval}" if e is not None else f"each in {r.interval}"


DROPOUT_REASON = "kept activations are scaled by 1 / (1 - p); iCT uses 0.3"
FOURIER_SCALE_REASON = "std of the frozen frequencies; iCT 0.02, CM 16"
"""Reasons shared by the builtin networks' ranges."""

positive = requirement(lambda v: v > 0, "must be > 0")
non_negative = requirement(lambda v: v >= 0, "must be >= 0")
unit_interval = requirement(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")


def _has_control(text: str) -> bool:
    return any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in text)


def path_text(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator for path options: no NUL or other control characters (no file system takes them intact)."""
    if isinstance(value, str) and _has_control(value):
        raise ValueError(f"{attribute.name}: must not contain control characters such as NUL or a newline (it is a "
                         f"file path); retype it, got {value!r}")


def directory_name(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator for run.name, which names the run directory runs/<name>: one usable path component."""
    if not isinstance(value, str):
        return
    size = len(value.encode("utf-8", "surrogatepass"))
    where = "(it names the run directory runs/<name>)"
    problems = (
        (not value, f"must not be empty {where}; choose a name"),
        (_has_control(value), f"must not contain control characters such as NUL or a newline {where}; "
                              "choose another name"),
        (any(unicodedata.category(ch) == "Cf" for ch in value),
         f"must not contain invisible formatting characters such as a direction override or a zero-width space "
         f"{where}: the name would display differently from the directory; choose another name"),
        ("/" in value or "\\" in value, "must not contain '/' or '\\' (it names one directory, runs/<name>); choose "
                                        "another name, or set run.output_dir to place the run elsewhere"),
        (value in (".", ".."), f"must not be '.' or '..' {where}; choose another name"),
        (size > 255, f"must be at most 255 bytes in UTF-8 {where}, not {size}; choose a shorter name"),
    )
    for bad, text in problems:
        if bad:
            shown = value if size <= 255 else value[:20] + "..."
            raise ValueError(f"{attribute.name}: {text}, got {shown!r}")
