"""The five component kinds, the context components are built with, and one Protocol per kind.

A component is a class with a kebab-case `name`, a one-line `summary` and a nested frozen attrs `Options`
class whose fields are its recipe settings (all with defaults). Every component is constructed the same way:
`cls(options, context)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    import torch
    from torch import nn

KINDS: tuple[str, ...] = ("network", "metric", "noise_schedule", "curriculum", "teacher")
"""Recipe section names; also the `kind` argument of the registry."""

HOOKS: dict[str, str] = {
    "network": "ctcore_register_networks",
    "metric": "ctcore_register_metrics",
    "noise_schedule": "ctcore_register_noise_schedules",
    "curriculum": "ctcore_register_curricula",
    "teacher": "ctcore_register_teachers",
}

NOISE_CONVENTIONS: dict[str, float] = {"fourier": 0.25, "positional": 1000 * 0.25}
"""c_noise = factor * ln(sigma): 0.25 for Gaussian-Fourier embeddings (NCSN++), 250 for ADM positional ones."""

MAX_NUM_SCALES: int = 2**24
"""The most sigma-grid points a curriculum may ask for: torch.multinomial, which draws the pair indices, takes at
most 2^24 categories (a grid that large is already 128 MiB of float64 per stage)."""


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


@runtime_checkable
class NoiseSchedule(Protocol):
    """Which adjacent pair (sigma_i, sigma_{i+1}) of the sigma grid each example trains on."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Length N-1, non-negative, sums to 1; entry i is for the pair (sigmas[i], sigmas[i+1])."""
        ...

    def sample(self, sigmas: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Pair indices in [0, N-2], one per example."""
        ...


@runtime_checkable
class Curriculum(Protocol):
    """N(k): the number of sigma-grid points at training step k (non-decreasing in k)."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def num_scales(self, step: int) -> int: ...


@runtime_checkable
class Teacher(Protocol):
    """Makes the target network theta^- from the student and updates it after each optimizer step."""

    name: ClassVar[str]
    summary: ClassVar[str]

    network: nn.Module

    def bind(self, student: nn.Module) -> None:
        """Create `self.network` from the student (the student itself for a stop-gradient teacher)."""
        ...

    def decay(self, step: int, num_scales: int) -> float:
        """mu(k): 0 means theta^- = theta."""
        ...

    def update(self, student: nn.Module, step: int, num_scales: int) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Teacher state to checkpoint: empty when the teacher is the student."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


PROTOCOLS: dict[str, type] = {
    "network": Network,
    "metric": Metric,
    "noise_schedule": NoiseSchedule,
    "curriculum": Curriculum,
    "teacher": Teacher,
}


class NoiseScheduleBase:
    """Convenience base: implement `probabilities`, get multinomial `sample` for free."""

    def probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, sigmas: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        import torch

        p = self.probabilities(sigmas).to(dtype=torch.float64, device=generator.device)
        return torch.multinomial(p, batch_size, replacement=True, generator=generator)


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


positive = requirement(lambda v: v > 0, "must be > 0")
non_negative = requirement(lambda v: v >= 0, "must be >= 0")
unit_interval = requirement(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
