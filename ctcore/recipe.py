"""TOML recipes → attrs sections via a strict cattrs converter; every problem reported at once.

A recipe is complete and standalone: core sections (run, data, consistency, training, sampling, evaluation,
logging) have defaults here, and each component section (network, metric, noise_schedule, curriculum, teacher)
has a `name` plus that component's options, whose defaults live on the component's `Options` class. Loggers are
listed in `[logging] backends`; a logger's options go in its own table `[logging.<name>]`.
"""

from __future__ import annotations

import math
import re
import shlex
import tomllib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs
from cattrs.errors import ClassValidationError, IterableValidationError, IterableValidationNote
from cattrs.v import transform_error

from ctcore.components import (
    DEFAULT_OBJECTIVE,
    KINDS,
    LOGGER,
    OBJECTIVE_PARTS,
    BuildContext,
    NoiseLevels,
    directory_name,
    each_within,
    entries,
    path_text,
    show,
    within,
)
from ctcore.errors import RecipeError, UsageError, did_you_mean, path_not_found, unknown_name_message

if typing.TYPE_CHECKING:
    from ctcore.registry import Registry




MAX_SEED = 10**18
"""Seeds are at most this, so every seed derived from one (seed + 1, seed + 2, seed + step + 1_000_003 (rank + 1),
sampling seed + j) stays far inside the 64-bit range torch.Generator.manual_seed and the sample stores accept."""
MAX_STEPS = 999_999_999
"""Checkpoint names hold the step in 9 digits (ckpt-000400000.pt) so that they sort by step."""
MAX_SIGMA_RATIO = 2.0
"""sigma_max >= 2 sigma_min: measured, the Karras grid of up to 1,000,001 points then stays strictly increasing
in float64 and in float32 (student and teacher see distinct sigmas) for every rho in range; at a ratio of 1.1 a
1,000,001-point grid has 161,139 equal float32 neighbours, at 1 + 1e-9 its float64 weights become infinite."""

_SEED = within(0, MAX_SEED, "seeds derived from it, such as seed + 1 and per-rank offsets, must fit in 64 bits")
_STEPS = within(1, MAX_STEPS, "checkpoint names hold 9 digits of the step")
_STEPS_OR_0 = within(0, MAX_STEPS, "checkpoint names hold 9 digits of the step")
_INTERVAL = within(1, MAX_STEPS, "an interval in steps; checkpoint names hold 9 digits of the step")


@attrs.frozen
class RunSection:
    """Where the run lives and how it is seeded."""

    name: str = attrs.field(default="run", validator=directory_name)
    output_dir: str = attrs.field(default="", validator=path_text)
    """Empty means runs/<name>, relative to the working directory."""
    seed: int = attrs.field(default=0, validator=_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = attrs.field(default=0, validator=within(
        0, 512, "0: automatic; beyond a two-socket server's cores (2 x 192) threads only wait, and each takes 16 to "
                "75 MiB of address space"))
    """torch's CPU threads (torch.set_num_threads) for training, sampling, evaluation and the bench; 0: half the
    usable CPUs (split among torchrun's local processes), 1 to 8. CPU results depend on the count."""
    init_from: str = attrs.field(default="", validator=path_text)
    """A checkpoint, or a run directory (its newest), whose weights a new run's network starts from (ECT and CD
    start from a diffusion model); empty: a fresh initialisation. `ctcore run --init-from` overrides it."""
    init_weights: Literal["eval-ema", "student"] = "eval-ema"
    """Which of init_from's networks: its eval EMA or its student."""


@attrs.frozen
class DataSection:
    """Training data: the built-in synthetic set (no download) or an HDF5 file."""

    source: Literal["synthetic", "hdf5"] = "synthetic"
    path: str = attrs.field(default="", validator=path_text)
    """HDF5 file with uint8 `images` (N, C, H, W) and optional `labels` (source = "hdf5")."""
    channels: int = attrs.field(default=3, validator=within(1, 1024, "1 grey, 3 RGB, more for multispectral data"))
    """Channels per image; an HDF5 file must match (the synthetic set is RGB)."""
    resolution: int = attrs.field(default=32, validator=within(1, 4096, "image side in pixels; CIFAR-10 32"))
    """Image side in pixels; an HDF5 file must match. Networks are built for (channels, resolution, resolution)."""
    num_images: int = attrs.field(default=20_000, validator=within(
        1, 100_000_000, "synthetic images are generated in memory"))
    """Synthetic data only: how many images to generate."""
    num_classes: int = attrs.field(default=0, validator=within(0, 100_000, "ImageNet-21k has 21,841"))
    """0: unconditional. Otherwise labels 0..num_classes-1 are fed to the network (HDF5 `labels`, or the
    synthetic set's 8 glyph shapes)."""
    random_flip: bool = False
    """Random horizontal flips with p = 0.5 (CIFAR-10 in CM and iCT)."""


@attrs.frozen
class ConsistencySection:
    """The paper's constants (EDM/CM values) and the loss weighting lambda."""

    sigma_min: float = attrs.field(default=0.002, validator=within(
        1e-5, 100.0, "noise std for pixels in [-1, 1]; 1e-5 is far below one 8-bit step, 0.0078"))
    sigma_max: float = attrs.field(default=80.0, validator=within(
        1e-3, 1e4, "noise std for pixels in [-1, 1]; at 1e4 float32 rounds x + sigma z to 1/8 of an 8-bit step"))
    sigma_data: float = attrs.field(default=0.5, validator=within(
        1e-3, 1e3, "the data std; pixels are in [-1, 1] and its square enters c_skip, c_out, c_in"))
    rho: float = attrs.field(default=7.0, validator=within(
        0.1, 1000.0, "the grid takes sigma^(1/rho), which leaves float64 near rho = 0.02; 1000 is already geometric"))
    weighting: Literal["inverse-delta", "uniform"] = "inverse-delta"
    """iCT: 1 / (sigma_{i+1} - sigma_i); CT: uniform (lambda = 1)."""


@attrs.frozen
class TrainingSection:
    """Optimizer, eval EMA of the student, precision and the cadence of logs, checkpoints and samples."""

    total_steps: int = attrs.field(default=400_000, validator=_STEPS)
    batch_size: int = attrs.field(default=1024, validator=within(
        1, 1_000_000, "examples per step; papers use up to 4096"))
    micro_batch_size: int = attrs.field(default=0, validator=within(
        0, 1_000_000, "0: the whole batch of each process in one pass; else examples per forward and backward"))
    """Gradient accumulation: each process runs its share of batch_size (batch_size / processes) in micro-batches
    of this many examples, one forward and backward each, then takes one optimizer step. The step equals the
    whole-batch step up to the order of floating-point sums (the same examples, noise, noise levels and loss
    normalisation); dropout masks are drawn per micro-batch. Must divide the share; 0: the whole share at once."""
    optimizer: Literal["radam", "adam"] = "radam"
    lr: float = attrs.field(default=1e-4, validator=within(
        0.0, 1.0, "Adam moves each weight by about lr per step; papers use 1e-5 to 1e-3", open_lo=True))
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), validator=each_within(
        0.0, 1.0, "bias correction divides by 1 - beta^k", open_hi=True))
    eps: float = attrs.field(default=1e-8, validator=within(
        1e-30, 1.0, "below about 1e-38 it vanishes in float32, and 0 / 0 is NaN"))
    weight_decay: float = attrs.field(default=0.0, validator=within(
        0.0, 1.0, "coupled L2 added to the gradient; beyond 1 it outweighs the loss"))
    warmup_steps: int = attrs.field(default=0, validator=_STEPS_OR_0)
    """Linear learning-rate warmup over this many steps (0: none)."""
    grad_clip: float = attrs.field(default=0.0, validator=within(
        0.0, 1e10, "0: no clipping; a cap on the global gradient norm, useless far above 1e10"))
    """Max global gradient norm (0: no clipping)."""
    eval_ema_decay: float = attrs.field(default=0.99993, validator=within(
        0.0, 1.0, "the EMA weight 1 - decay must stay positive", open_hi=True))
    """Decay of the eval EMA of the student (used for sampling); not the teacher."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the student; auto: on CUDA, off on CPU."""
    log_every: int = attrs.field(default=100, validator=_INTERVAL)
    checkpoint_every: int = attrs.field(default=10_000, validator=_INTERVAL)
    sample_every: int = attrs.field(default=10_000, validator=_INTERVAL)
    keep_checkpoints: int = attrs.field(default=3, validator=within(1, 100_000, "checkpoints kept on disk"))
    max_nonfinite_steps: int = attrs.field(default=10, validator=_STEPS_OR_0)
    """A step whose loss or gradient is not finite is skipped (logged in stats.jsonl); after this many in a row
    the run stops and checkpoints the last good weights. 0: no check (saves one scalar read per step)."""


@attrs.frozen
class SamplingSection:
    """Sample grids during training and the default of `ctcore sample`."""

    num_samples: int = attrs.field(default=64, validator=within(
        1, 100_000, "samples per grid; FID uses 50,000"))
    seed: int = attrs.field(default=0, validator=_SEED)
    """Sample j uses seed + j, so any subset can be regenerated."""
    sigma_mid: tuple[float, ...] = attrs.field(default=(), validator=[
        entries(0, 1000, "one network evaluation each"), each_within(
            1e-5, 1e4, "noise std between the smallest sigma_min and the largest sigma_max")])
    """Intermediate sigmas of multistep sampling: [0.821] is iCT's CIFAR-10 two-step; empty: one step."""
    clip: bool = True
    """Clamp every denoised output to [-1, 1]."""


@attrs.frozen
class EvaluationSection:
    """The distribution distance of the eval EMA at the start, during and at the end of a run (sliced Wasserstein in
    pixel space), and FID / Inception Score during training."""

    distance: Literal["sliced-wasserstein", "none"] = "sliced-wasserstein"
    distance_every: int = attrs.field(default=0, validator=_STEPS_OR_0)
    """The distance every this many steps, besides step 0 and the end (0: automatic, ten points over the run, every
    max(1, total_steps // 10) steps); the same samples each time, so the points form a curve."""
    num_samples: int = attrs.field(default=1000, validator=within(1, 100_000, "samples compared in pixel space"))
    num_projections: int = attrs.field(default=256, validator=within(1, 10_000, "random directions averaged"))
    fid_every: int = attrs.field(default=0, validator=_STEPS_OR_0)
    """FID and Inception Score of the eval EMA every this many steps and at the end (0: never)."""
    fid_num_samples: int = attrs.field(default=10_000, validator=within(
        2, 1_000_000, "a covariance needs 2; papers use 50,000"))
    """Samples per periodic FID (papers report 50,000; fewer is cheaper and biased upwards)."""
    fid_steps: int = attrs.field(default=1, validator=within(
        1, 1001, "steps of the recipe's sampler; consistency sampling takes 1 + the most sampling.sigma_mid values"))
    """Steps of the recipe's sampler: consistency sampling 1 (one step) or n (through the first n - 1 values of
    sampling.sigma_mid); heun and euler the n levels of their Karras grid (EDM: 18)."""
    fid_batch_size: int = attrs.field(default=256, validator=within(1, 65_536, "samples per evaluation batch"))
    inception: str = attrs.field(default="", validator=path_text)
    """Inception-v3 FID weights (pt_inception-2015-12-05-6726825d.pth); required when fid_every > 0."""
    fid_reference: str = attrs.field(default="", validator=path_text)
    """Reference statistics .npz (mu, sigma), e.g. from `ctcore eval-ref-stats`; required when fid_every > 0."""
    fid_protocol: Literal["tensorflow", "pytorch-fid"] = "tensorflow"
    """How images are resized to 299x299 for FID: the TensorFlow graph's (the published numbers) or pytorch-fid's;
    fid_reference must have been made under the same one."""
    fid_reference_protocol: Literal["recorded", "tensorflow", "pytorch-fid"] = "recorded"
    """The protocol fid_reference was made under when the file records none (EDM's files: "tensorflow");
    "recorded": the file's own record (pytorch-fid for a file without one). A file that records another is refused."""
    is_split: Literal["ordered", "shuffled"] = "ordered"
    """Inception Score splits: consecutive samples in seed order, or after a seeded shuffle (torch-fidelity's)."""
    is_split_seed: int = attrs.field(default=2020, validator=within(
        0, 2**32 - 1, "numpy.random.RandomState takes 32-bit seeds; torch-fidelity uses 2020"))
    """The shuffle's seed when is_split = "shuffled"."""


ALWAYS_ON_LOGGER = "jsonl"
"""stats.jsonl: the run's own record (resume, `ctcore report` and the FID plot read it), written whether listed or
not; the resolved recipe lists it first."""


def _with_jsonl(backends: Any) -> Any:
    """backends with "jsonl" first (it is always on); anything but a tuple is left for the validators to refuse."""
    if not isinstance(backends, tuple):
        return backends
    return (ALWAYS_ON_LOGGER, *(b for b in backends if b != ALWAYS_ON_LOGGER))


def _no_repeats(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    repeated = sorted({b for b in value if value.count(b) > 1}) if isinstance(value, tuple) else []
    if repeated:
        raise ValueError(f"{attribute.name}: lists {repeated[0]!r} more than once; list each backend once")


@attrs.frozen
class LoggingSection:
    """Tracking backends (loggers) the run's records go to, on rank 0; `jsonl` (stats.jsonl) is always on."""

    backends: tuple[str, ...] = attrs.field(default=(ALWAYS_ON_LOGGER,), converter=_with_jsonl, validator=[
        entries(0, 64, "logger names"), _no_repeats])
    """Logger names, e.g. ["jsonl", "tensorboard"]; options of a logger go in a table [logging.<name>]."""


CORE_SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "consistency": ConsistencySection,
    "training": TrainingSection,
    "sampling": SamplingSection,
    "evaluation": EvaluationSection,
    "logging": LoggingSection,
}
ALL_SECTIONS: tuple[str, ...] = (*CORE_SECTIONS, *KINDS)


@attrs.frozen
class ComponentSpec:
    """One component section: its registered name and structured options."""

    name: str
    options: Any


@attrs.frozen
class Recipe:
    """A validated recipe: core sections plus one ComponentSpec per kind."""

    run: RunSection
    data: DataSection
    consistency: ConsistencySection
    training: TrainingSection
    sampling: SamplingSection
    evaluation: EvaluationSection
    components: dict[str, ComponentSpec]
    source: str = "<recipe>"
    logging: LoggingSection = LoggingSection()
    loggers: dict[str, Any] = attrs.field(factory=dict)
    """Options of each logger in logging.backends, by name."""
    notes: tuple[str, ...] = attrs.field(default=(), eq=False)
    """What reading the recipe changed that the user should hear of (options a --set of a component's name dropped);
    the CLI prints each as `note: ...`."""

    def section(self, name: str) -> Any:
        return self.components[name] if name in KINDS else getattr(self, name)

    @property
    def levels(self) -> NoiseLevels:
        """What the recipe's sampler learns from it: sigma_min, sigma_max and sampling.sigma_mid."""
        return noise_levels(self.consistency, self.sampling)


def noise_levels(consistency: ConsistencySection, sampling: SamplingSection) -> NoiseLevels:
    """The NoiseLevels a sampler plans with: [consistency] sigma_min, sigma_max and sigma_data, sampling.sigma_mid."""
    return NoiseLevels(consistency.sigma_min, consistency.sigma_max, sampling.sigma_mid, consistency.sigma_data)


def samplers_for(registry: Registry, model: str) -> list[str]:
    """The installed samplers of one kind of model (ctcore.components.MODELS), for "use one of: ..." advice."""
    return [n for n in registry.names("sampler") if registry.get("sampler", n).model == model]


# ---------------------------------------------------------------------------------------------- converter


def _type_word(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)


def _strict_converter() -> cattrs.Converter:
    """No silent coercion: "false" is not a bool, 1.5 is not an int, 1 is not a bool."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def s_bool(v: Any, _t: Any) -> bool:
        if type(v) is not bool:
            raise TypeError(f"expected true or false, got {v!r} ({_type_word(v)})")
        return v

    def s_int(v: Any, _t: Any) -> int:
        if type(v) is not int:
            raise TypeError(f"expected an integer, got {v!r} ({_type_word(v)})")
        return v

    def s_float(v: Any, _t: Any) -> float:
        if type(v) not in (int, float):
            raise TypeError(f"expected a number, got {v!r} ({_type_word(v)})")
        if not math.isfinite(v):
            raise TypeError(f"expected a finite number, got {v!r}")
        return float(v)

    def s_str(v: Any, _t: Any) -> str:
        if type(v) is not str:
            raise TypeError(f"expected a string, got {v!r} ({_type_word(v)})")
        return v

    def is_literal(t: Any) -> bool:
        return typing.get_origin(t) is Literal

    def s_literal(v: Any, t: Any) -> Any:
        choices = typing.get_args(t)
        if v not in choices or type(v) is not type(choices[0]):
            msg = f"must be one of {', '.join(repr(c) for c in choices)}; got {v!r}"
            guess = did_you_mean(v, [str(c) for c in choices]) if isinstance(v, str) else None
            raise ValueError(msg + (f" (did you mean {guess!r}?)" if guess else ""))
        return v

    def is_tuple(t: Any) -> bool:
        return typing.get_origin(t) is tuple

    def s_tuple(v: Any, t: Any) -> tuple:
        if not isinstance(v, list):
            raise TypeError(f"expected an array, got {v!r} ({_type_word(v)})")
        args = typing.get_args(t)
        if len(args) == 2 and args[1] is Ellipsis:
            types = [args[0]] * len(v)
        else:
            if len(v) != len(args):
                raise ValueError(f"expected an array of {len(args)} values, got {len(v)}")
            types = list(args)
        out, errors = [], []
        for i, (item, ty) in enumerate(zip(v, types, strict=True)):
            try:
                out.append(conv.structure(item, ty))
            except Exception as exc:
                exc.add_note(IterableValidationNote(f"Structuring index {i}", i, ty))
                errors.append(exc)
        if errors:  # the first bad entry only: an array of 1,000 wrong values is one problem, not 1,000
            raise IterableValidationError("array", errors[:1], t)
        return tuple(out)

    conv.register_structure_hook(bool, s_bool)
    conv.register_structure_hook(int, s_int)
    conv.register_structure_hook(float, s_float)
    conv.register_structure_hook(str, s_str)
    conv.register_structure_hook_func(is_literal, s_literal)
    conv.register_structure_hook_func(is_tuple, s_tuple)
    return conv


def _messages(exc: BaseException, prefix: str) -> list[str]:
    """Flatten a cattrs error (tree) into `section.key: message` lines."""
    if not isinstance(exc, ClassValidationError | IterableValidationError):
        return [f"{prefix}: {exc}"]
    out = []
    for line in transform_error(exc, path="$", format_exception=lambda e, _t: str(e)):
        message, _, where = line.rpartition(" @ ")
        path = where.removeprefix("$").lstrip(".")
        out.append(f"{prefix}{path}: {message}")
    return out


def _structure(conv: cattrs.Converter, data: dict[str, Any], cls: type, prefix: str) -> tuple[Any, list[str]]:
    """Structure one section field by field, so every bad key, type and value is reported, not the first."""
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            guess = did_you_mean(key, list(fields))
            hint = f"; did you mean {guess!r}?" if guess else f" (known keys: {', '.join(fields) or 'none'})"
            problems.append(f"{prefix}.{key}: unknown key{hint}")
            continue
        try:
            values[key] = conv.structure(value, field.type)
        except Exception as exc:
            problems += _messages(exc, f"{prefix}.{key}")
            continue
        if field.validator is not None:
            try:
                field.validator(None, field, values[key])
            except (ValueError, TypeError) as exc:
                problems.append(f"{prefix}.{exc}")
    if problems:
        return None, problems
    try:
        return cls(**values), []
    except (ValueError, TypeError) as exc:  # cross-field checks in __attrs_post_init__ ("key: message")
        return None, [f"{prefix}.{exc}"]


# ------------------------------------------------------------------------------------------------ reading


def read_recipe(path: str | Path, registry: Registry, sets: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe file, after the command line's `--set section.key=value` overrides; raises
    RecipeError listing every problem (one that a --set caused names it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) reads like none
    except FileNotFoundError:
        raise RecipeError(str(path), [path_not_found("file", path, "check the path (recipes live in recipes/)")]
                          ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(str(path), [f"cannot read the file: {exc}"]) from None
    return parse_recipe(text, registry, source=str(path), sets=sets)


def parse_recipe(text: str, registry: Registry, source: str = "<recipe>", sets: Sequence[str] = ()) -> Recipe:
    """Validate recipe text (TOML), with `sets` applied (see apply_overrides), against the core sections and the
    registry's components. With overrides the recipe's source reads `FILE --set k=v ...`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(source, [f"invalid TOML: {exc}"]) from None
    except RecursionError:
        raise RecipeError(source, ["invalid TOML: arrays or tables nested too deeply"]) from None
    if not sets:
        return _validate(data, registry, source)
    overrides, notes = apply_overrides(data, sets)
    try:
        recipe = _validate(data, registry, source)
    except RecipeError as exc:
        raise RecipeError(source, [_blame(p, overrides) for p in exc.problems]) from None
    return attrs.evolve(recipe, source=" ".join([source, *(f"--set {shlex.quote(s)}" for s in sets)]),
                        notes=tuple(notes))


# ---------------------------------------------------------------------------------- command-line overrides


def parse_set(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value): the value read as a TOML value (`2e-4`, `true`, `[0.9, 0.99]`,
    `"a b"`), anything that is not one (`pseudo-huber`, an empty value) as the string itself. UsageError otherwise."""
    where, eq, raw = text.partition("=")
    section, dot, key = where.strip().partition(".")
    if not eq or not dot or not section or not key:
        raise UsageError(f"--set {_printable(text)}: expected section.key=value, e.g. --set training.lr=2e-4")
    return section, key, parse_set_value(raw)


def parse_set_value(raw: str) -> Any:
    """One --set value: a TOML value when it is exactly one, else the text itself (a bare word)."""
    try:
        doc = tomllib.loads(f"v = {raw.strip()}")
    except (tomllib.TOMLDecodeError, RecursionError):
        return raw.strip()
    return doc["v"] if list(doc) == ["v"] else raw.strip()  # `1\nx = 2` is text, not a second key


def apply_overrides(data: dict[str, Any], sets: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Set each `section.key=value` of `sets` in a parsed recipe document (in place), before it is validated like
    the file; returns ({"section.key": the --set text} for naming a --set in errors, notes for the user). A key
    given twice is refused.

    A --set that changes a component's name (`--set curriculum.name=ct`) first resets that section to the new
    component's defaults: the file's options belong to the component it named (exponential's s0 = 10 is no value
    for ct), so they are dropped, and a note names them; the section's other --set keys then apply."""
    given: dict[str, str] = {}
    parsed = []
    for text in sets:
        section, key, value = parse_set(text)
        path = f"{section}.{key}"
        if path in given:
            raise UsageError(f"--set {_printable(text)}: {_printable(path)} is already set by --set "
                             f"{_printable(given[path])}; give each key once")
        given[path] = text
        parsed.append((section, key, value))
    notes = []
    for (section, key, value), text in zip(parsed, sets, strict=True):
        table = data.get(section)
        if key != "name" or section not in KINDS or not isinstance(table, dict) or table.get("name") == value:
            continue
        dropped = [k for k in table if k != "name" and f"{section}.{k}" not in given]
        data[section] = {}
        if dropped:
            old = f" of {_printable(repr(table['name']))}" if isinstance(table.get("name"), str) else ""
            shown = ", ".join(f"{_printable(k)} = {_shown_value(table[k])}" for k in dropped)
            notes.append(f"--set {_printable(text)}: [{section}] takes the new component's defaults; dropped the "
                         f"file's options{old}: {shown} (set any of them again with --set {section}.KEY=VALUE)")
    for section, key, value in parsed:
        table = data.setdefault(section, {})
        if isinstance(table, dict):  # otherwise the file's own `section = value` is the problem reported
            table[key] = value
    return given, notes


def _shown_value(value: Any) -> str:
    """A dropped option's value as the recipe wrote it (TOML), shortened for a one-line note."""
    try:
        text = _toml_value(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = _printable(text)
    return text if len(text) <= 40 else text[:37] + "..."


def _blame(problem: str, overrides: dict[str, str]) -> str:
    """`--set k=v: problem` when a --set caused `problem` (its key, a part of it, its section, or the component
    section whose name it set), else `problem` as it is."""
    where, _, message = problem.partition(": ")
    for path, text in overrides.items():
        section = path.split(".", 1)[0]
        if (where in (path, section) or where.startswith((f"{path}.", f"{path}["))
                or (path == f"{section}.name" and section in KINDS and where.startswith(f"{section}."))):
            return f"--set {_printable(text)}: {problem}"
    for path, text in overrides.items():  # a check across keys that names the key (`... x sigma_min = ...`)
        if re.search(rf"(?<![\w.]){re.escape(path.split('.', 1)[1])}(?!\w)", message):
            return f"--set {_printable(text)}: {problem}"
    return problem


def _validate(data: dict[str, Any], registry: Registry, source: str) -> Recipe:
    """A parsed recipe document -> Recipe; RecipeError listing every problem."""
    conv = _strict_converter()
    problems: list[str] = []
    for key, value in data.items():
        if key not in ALL_SECTIONS:
            guess = did_you_mean(key, ALL_SECTIONS)
            hint = f"; did you mean [{guess}]?" if guess else f" (sections: {', '.join(ALL_SECTIONS)})"
            problems.append(f"{key}: unknown section{hint}")
        elif not isinstance(value, dict):
            problems.append(f"{key}: expected a table [{key}], got {_type_word(value)}")
    sections: dict[str, Any] = {}
    logger_tables: dict[str, Any] = {}
    for name, cls in CORE_SECTIONS.items():
        raw = data.get(name, {})
        if name == "logging" and isinstance(raw, dict):  # [logging.<name>] tables hold a logger's options
            logger_tables = {k: v for k, v in raw.items() if isinstance(v, dict)}
            raw = {k: v for k, v in raw.items() if k not in logger_tables}
        if isinstance(raw, dict):
            sections[name], found = _structure(conv, raw, cls, name)
            problems += found
    components, found = _components(conv, data, registry)
    problems += found
    loggers, found = _loggers(conv, sections.get("logging"), logger_tables, registry)
    problems += found
    problems += _cross_checks(sections)
    problems += _sampler_checks(sections, components, registry)
    if problems:
        raise RecipeError(source, problems)
    return Recipe(components=components, source=source, loggers=loggers, **sections)


def _component(conv: cattrs.Converter, kind: str, raw: Any, registry: Registry,
               default: str | None = None) -> tuple[ComponentSpec | None, list[str]]:
    """One component section -> its spec; a missing section takes `default` (with default options) if given."""
    if raw is None:
        if default is not None and default in registry.names(kind):
            return ComponentSpec(default, registry.get(kind, default).Options()), []
        choices = ", ".join(registry.names(kind)) or "none installed"
        return None, [f"{kind}: missing section; add [{kind}] with name = one of: {choices}"]
    if not isinstance(raw, dict):
        return None, []  # reported with the sections
    raw = dict(raw)
    name = raw.pop("name", None)
    if name is None:
        return None, [f"{kind}.name: missing; one of: {', '.join(registry.names(kind))}"]
    if not isinstance(name, str):
        return None, [f"{kind}.name: expected a string, got {name!r} ({_type_word(name)})"]
    if name not in registry.names(kind):
        return None, [f"{kind}.name: {unknown_name_message(kind.replace('_', ' '), name, registry.names(kind))}"]
    options, found = _structure(conv, raw, registry.get(kind, name).Options, kind)
    return (ComponentSpec(name, options) if not found else None), found


def _continuous_schedule(raw: Any, registry: Registry) -> str | None:
    """The name of a recipe's noise schedule when it draws continuous pairs (grid = False: no curriculum); read
    from the section's name, so that a bad option of the schedule does not also ask for a curriculum."""
    name = raw.get("name") if isinstance(raw, dict) else None
    if name not in registry.names("noise_schedule") or getattr(registry.get("noise_schedule", name), "grid", True):
        return None
    return name


def _components(conv: cattrs.Converter, data: dict[str, Any],
                registry: Registry) -> tuple[dict[str, ComponentSpec], list[str]]:
    """The component sections: a network; an objective (DEFAULT_OBJECTIVE when the section is absent) and
    exactly the OBJECTIVE_PARTS it uses (a curriculum only with a grid noise schedule); a sampler (the
    objective's default_sampler when absent) for the kind of model the objective trains."""
    components: dict[str, ComponentSpec] = {}
    problems: list[str] = []
    for kind, default in (("network", None), ("objective", DEFAULT_OBJECTIVE)):
        spec, found = _component(conv, kind, data.get(kind), registry, default)
        problems += found
        if spec is not None:
            components[kind] = spec
    raw = data.get("objective")
    named = raw.get("name") if isinstance(raw, dict) else DEFAULT_OBJECTIVE if raw is None else None
    # the objective's class even when its options have problems: which parts the recipe needs still follows
    objective = registry.get("objective", named) if named in registry.names("objective") else None
    uses = tuple(getattr(objective, "uses", OBJECTIVE_PARTS)) if objective is not None else OBJECTIVE_PARTS
    continuous = _continuous_schedule(data.get("noise_schedule"), registry)
    for kind in OBJECTIVE_PARTS:
        if kind == "curriculum" and kind in uses and continuous is not None:
            if kind in data:
                problems.append(f"curriculum: noise schedule {continuous!r} draws continuous noise levels, without "
                                f"the sigma grid a curriculum sizes; delete the section [curriculum]")
        elif kind in uses:
            spec, found = _component(conv, kind, data.get(kind), registry)
            problems += found
            if spec is not None:
                components[kind] = spec
        elif kind in data and objective is not None:
            problems.append(f"{kind}: objective {objective.name!r} trains without a {kind.replace('_', ' ')}; "
                            f"delete the section [{kind}]")
    if objective is not None or "sampler" in data:
        default = getattr(objective, "default_sampler", None) if objective is not None else None
        spec, found = _component(conv, "sampler", data.get("sampler"), registry, default)
        problems += found
        if spec is not None:
            components["sampler"] = spec
    sampler = components.get("sampler")
    if objective is not None and sampler is not None:
        model = registry.get("sampler", sampler.name).model
        if model != objective.model:
            problems.append(f"sampler.name: sampler {sampler.name!r} samples {model} models, but objective "
                            f"{objective.name!r} trains a {objective.model} model; use one of: "
                            f"{', '.join(samplers_for(registry, objective.model)) or 'none installed'}")
    return components, problems


def _loggers(conv: cattrs.Converter, section: LoggingSection | None, tables: dict[str, Any],
             registry: Registry) -> tuple[dict[str, Any], list[str]]:
    """The options of every listed logger (from its [logging.<name>] table, or the defaults), and the problems."""
    installed = registry.names(LOGGER)
    problems: list[str] = []
    backends = section.backends if section is not None else ()
    for name in backends:
        if name not in installed:
            problems.append(f"logging.backends: {unknown_name_message('logger', name, installed)}")
    for name in tables:
        if name not in installed:
            problems.append(f"logging.{name}: {unknown_name_message('logger', name, installed)}")
        elif section is not None and name not in backends:
            problems.append(f"logging.{name}: options of a logger that logging.backends does not list; add "
                            f"{name!r} to logging.backends or delete the table [logging.{name}]")
    loggers = {}
    for name in backends:
        if name in installed:
            loggers[name], found = _structure(conv, tables.get(name, {}), registry.get(LOGGER, name).Options,
                                              f"logging.{name}")
            problems += found
    return loggers, problems


def _sampler_checks(s: dict[str, Any], components: dict[str, ComponentSpec], registry: Registry) -> list[str]:
    """evaluation.fid_steps must be a plan the recipe's sampler can make (consistency sampling: enough
    sampling.sigma_mid values); runs when the sections it reads parsed cleanly."""
    c, sampling, e, spec = s.get("consistency"), s.get("sampling"), s.get("evaluation"), components.get("sampler")
    if None in (c, sampling, e, spec):
        return []
    try:
        sampler = registry.get("sampler", spec.name)(spec.options, BuildContext())
        sampler.plan(e.fid_steps, None, noise_levels(c, sampling))
    except ValueError as exc:
        return [f"evaluation.fid_steps: sampler {spec.name!r} cannot make a {e.fid_steps}-step plan: {exc}"]
    return []


def divisors(n: int) -> list[int]:
    """The positive divisors of n >= 1, increasing."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def micro_batch_problem(batch_size: int, world_size: int, micro_batch_size: int) -> str | None:
    """`training.micro_batch_size: ...` when the micro-batch does not divide the batch of each process (the
    global batch_size over world_size processes, which must divide it already), naming the nearest sizes that
    do; None when it does or is 0."""
    share = batch_size // world_size
    if micro_batch_size == 0 or share % micro_batch_size == 0:
        return None
    below = [d for d in divisors(share) if d < micro_batch_size]
    above = [d for d in divisors(share) if d > micro_batch_size]
    fix = f"{show(below[-1])} or {show(above[0])}" if above else show(below[-1])
    split = f" over {world_size} processes" if world_size > 1 else ""
    return (f"training.micro_batch_size: must divide the batch of each process, {show(share)} (training.batch_size "
            f"{show(batch_size)}{split}), got {show(micro_batch_size)}; use {fix}, or 0 for the whole batch in one "
            "pass")


def _cross_checks(s: dict[str, Any]) -> list[str]:
    """Checks across keys and sections; each runs when the sections it reads parsed cleanly."""
    problems = []
    c, sampling, training, data = (s.get(k) for k in ("consistency", "sampling", "training", "data"))
    if c is not None and c.sigma_max < MAX_SIGMA_RATIO * c.sigma_min:
        problems.append(f"consistency.sigma_max: must be at least {show(MAX_SIGMA_RATIO)} x sigma_min = "
                        f"{show(MAX_SIGMA_RATIO * c.sigma_min)} (a finer grid between them has equal neighbours in "
                        f"float32), got {show(c.sigma_max)}; lower sigma_min or raise sigma_max")
    if c is not None and sampling is not None:
        mids = sampling.sigma_mid
        outside = [i for i, m in enumerate(mids) if not c.sigma_min < m < c.sigma_max]
        if outside:
            i = outside[0]
            problems.append(f"sampling.sigma_mid[{i}]: every value must lie in (sigma_min, sigma_max) = "
                            f"({show(c.sigma_min)}, {show(c.sigma_max)}), got {show(mids[i])}")
        rising = [i for i in range(1, len(mids)) if mids[i] >= mids[i - 1]]
        if rising:
            i = rising[0]
            problems.append(f"sampling.sigma_mid[{i}]: values must decrease, got {show(mids[i])} after "
                            f"{show(mids[i - 1])}")
    e = s.get("evaluation")
    if e is not None and e.fid_every > 0:
        for key, what in (("inception", "the Inception-v3 FID weights file"),
                          ("fid_reference", "reference statistics (.npz from `ctcore eval-ref-stats`)")):
            if not getattr(e, key):
                problems.append(f"evaluation.{key}: required when fid_every > 0 ({what})")
    if training is not None:
        problem = micro_batch_problem(training.batch_size, 1, training.micro_batch_size)
        if problem is not None:
            problems.append(problem)
    if data is not None and data.source == "hdf5" and not data.path:
        problems.append('data.path: required when data.source = "hdf5" (the HDF5 file to train on)')
    if data is not None and data.source == "synthetic":
        if data.channels != 3:
            problems.append(f"data.channels: the synthetic set is RGB, so it must be 3, got {data.channels}")
        if data.num_classes not in (0, 8):
            problems.append(f"data.num_classes: the synthetic set has 8 classes (glyph shapes): use 0 or 8, "
                            f"got {data.num_classes}")
    return problems


# ----------------------------------------------------------------------------------------------- writing


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:_}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def _toml_string(v: str) -> str:
    """A TOML basic string: escape backslash, quote and control characters; everything else stays literal
    (TOML forbids surrogate escapes, so characters above U+FFFF are written as themselves)."""
    out = []
    for ch in v:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _printable(text: str) -> str:
    """`text` with non-printable characters escaped, for a one-line comment."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _section_lines(header: str, items: list[tuple[str, Any]], computed: dict[str, tuple[Any, str]]) -> list[str]:
    lines = [f"[{header}]"]
    for key, value in items:
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
        elif key in computed:
            lines.append(f"# {key} = {_toml_value(computed[key][0])}  (computed: {_printable(computed[key][1])}; "
                         "omitted from the recipe)")
        else:
            lines.append(f"# {key} = (not set: the component's computed default)")
    return lines


def build_context(recipe: Recipe) -> BuildContext:
    """The context the recipe's components are built with: its declared (C, H, W), classes and total steps."""
    d = recipe.data
    return BuildContext(data_shape=(d.channels, d.resolution, d.resolution), num_classes=d.num_classes,
                        total_steps=recipe.training.total_steps)


def computed_defaults(options: Any, context: BuildContext) -> dict[str, tuple[Any, str]]:
    """What a component computes for its options left at None: `Options.computed_defaults(context)`, an optional
    method returning {option: (value, how it was computed)}; entries that are not such pairs are ignored."""
    method = getattr(options, "computed_defaults", None)
    found = method(context) if callable(method) else None
    if not isinstance(found, dict):
        return {}
    return {key: (v[0], v[1]) for key, v in found.items()
            if getattr(options, str(key), 0) is None and isinstance(v, tuple) and len(v) == 2
            and isinstance(v[1], str) and isinstance(v[0], int | float | str) and not isinstance(v[0], bool)
            and (not isinstance(v[0], float) or math.isfinite(v[0]))}


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as TOML, every default filled in; reading it back gives the same recipe.

    An option a component computes when it is omitted (Pseudo-Huber's c) is a comment with its value: the
    recipe read back leaves it out again, so it keeps following the data shape.
    """
    blocks = [f"# resolved from {_printable(recipe.source)}"]
    context = build_context(recipe)
    for name in ALL_SECTIONS:
        computed: dict[str, tuple[Any, str]] = {}
        if name in KINDS:
            if name not in recipe.components:  # a kind the recipe's objective does not use
                continue
            spec = recipe.components[name]
            items = [("name", spec.name), *attrs.asdict(spec.options, recurse=False).items()]
            computed = computed_defaults(spec.options, context)
        else:
            items = list(attrs.asdict(getattr(recipe, name), recurse=False).items())
        blocks.append("\n".join(_section_lines(name, items, computed)))
        if name == "logging":  # each listed logger's options, when it has any
            for logger, options in recipe.loggers.items():
                fields = attrs.asdict(options, recurse=False)
                if fields:
                    blocks.append("\n".join(_section_lines(f"logging.{logger}", list(fields.items()),
                                                            computed_defaults(options, context))))
    return "\n\n".join(blocks) + "\n"


# -------------------------------------------------------------------------------------------------- sweeps


def split_values(raw: str) -> list[str]:
    """A sweep's `v1,v2,...`: split at commas outside brackets, braces and quotes, so `[0.9,0.99],[0.8,0.9]` is
    two arrays and `"a,b"` one string."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(raw):
        if quote:
            if ch == quote and (quote == "'" or raw[i - 1] != "\\"):
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    values.append(raw[start:])
    return [v.strip() for v in values]


MAX_SWEEP_POINTS = 1000
"""The most points one `ctcore sweep` runs: each point is a whole training run, and every point is checked (about
0.2 s each for the quickstart) before the first starts; the grid's size is checked before it is listed."""


def sweep_grid(sets: Sequence[str]) -> list[list[str]]:
    """The cartesian grid of a sweep's `--set section.key=v1,v2` options, first key slowest: one list of
    `section.key=value` overrides per point; more than MAX_SWEEP_POINTS is a UsageError, before any is made."""
    import itertools

    axes, seen = [], set()
    for text in sets:
        section, key, _ = parse_set(text)
        path = f"{section}.{key}"
        if path in seen:
            raise UsageError(f"--set {_printable(text)}: {_printable(path)} is set twice; give each key once, with "
                             "all its values comma-separated")
        seen.add(path)
        axes.append([f"{path}={v}" for v in split_values(text.partition("=")[2])])
    points = math.prod(len(axis) for axis in axes)
    if points > MAX_SWEEP_POINTS:
        sizes = " x ".join(f"{len(axis):,} ({axis[0].partition('=')[0]})" for axis in axes)
        raise UsageError(f"--set: the sweep's grid has {points:,} points ({sizes}), more than the "
                         f"{MAX_SWEEP_POINTS:,} a sweep runs (each point is a whole run, and all are checked before "
                         "the first starts); sweep fewer values, or split the sweep")
    return [list(point) for point in itertools.product(*axes)]


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")


def point_name(point: Sequence[str]) -> str:
    """A sweep point's directory name: its `section.key=value` overrides joined by commas, every character other
    than letters, digits and `._+=,-` replaced by `_` (`training.lr=1e-4,metric.name=l2`)."""
    return _UNSAFE.sub("_", ",".join(s.strip() for s in point))
