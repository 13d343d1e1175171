"""Before anything real is allocated: build the components on the meta device under a time limit, check each
one's contract with one forward pass, and estimate the memory a run needs; and name the plugin an exception
came from.

`preflight` serves `ctcore check` (absurd sizes and broken contracts are refused, exit 2) and every run before
its data is loaded (the estimate must also fit the memory the training device has, else exit 1).
`plugin_failure` turns an exception raised inside a component's code into one line naming the component and
its distribution; `ctcore.cli` applies it to every command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from ctcore.components import ALL_KINDS, KINDS, NOISE_CONVENTIONS, OBJECTIVE_PARTS, BuildContext
from ctcore.consistency import karras_sigmas
from ctcore.data import data_shape, hdf5_summary
from ctcore.devices import compile_enabled
from ctcore.errors import CtcoreError, RunError, UsageError
from ctcore.files import human_bytes
from ctcore.memory import LIMIT_ENV as MEMORY_LIMIT_ENV
from ctcore.memory import available_memory
from ctcore.testing import (
    ContractViolation,
    check_metric_values,
    check_num_scales,
    check_pairs,
    check_sampler_plans,
    check_schedule_on_grid,
)

if TYPE_CHECKING:
    from types import FrameType

    from ctcore.data import ImageData
    from ctcore.recipe import Recipe
    from ctcore.registry import Registry

BUILD_TIME_LIMIT_S = 30.0
"""How long building one component on the meta device may take. Real networks take well under a second there
(NCSN++ and ADM: ~0.05 s), so 30 s only stops options that ask for millions of modules, or a plugin that hangs."""

ABSURD_BYTES = 2**40
"""1 TiB per process: `ctcore check` refuses recipes that need more. ctcore replicates weights, gradients and
optimizer state in every process (DDP, no sharding), and the largest accelerators hold 141-288 GB (H200, B200,
MI355X), so a run past 1 TiB fits no device and no common host: about 50 billion parameters at 20 bytes each."""

MAX_PROCESSES = 1024
"""For the absurd-size check, training.batch_size (the global batch) is taken as split over this many processes,
more than data-parallel training of these models uses, so only a batch no cluster could hold is refused."""

"""Bytes: replaces the memory found available on the training device (and on the host) in every check."""

SMALL_METRIC_PARAMETERS = 1_000_000
"""A metric up to this size is also checked on 3 random CPU images (values, zero distance to itself)."""

CPU_FALLBACK_PARAMETERS = 20_000_000
"""A network whose forward cannot run on the meta device is tried on CPU up to this size (80 MB in float32)."""

FID_FEATURES, FID_LOGITS, FID_INCEPTION_BYTES = 2048, 1008, 100 * 2**20
PYTHON_INT_BYTES = 40
"""A Python list of seeds: an 8-byte pointer plus a 32-byte int object per entry."""
RECOMPUTE_FACTOR = 1.5
"""With checkpointed blocks, the transient per image on top of what autograd keeps, in units of the most one block
keeps when run plainly: its recomputation in backward keeps that plus the gradients flowing through it, and the
teacher's no-grad pass holds the U-Net's skip activations plus one block's. Measured on CPU (fp32, the peak of a
step's tensors above the estimate's kept activations, per image): 1.10-1.24x in backward, 0.94-1.59x in the
teacher's pass, for NCSN++ and ADM at 32x32 and 64x64 and ict_cifar10's network (docs/performance.md)."""


# ------------------------------------------------------------------------------------------ naming plugins


def describe(registry: Registry, kind: str, name: str) -> str:
    """`network 'mlp' (from distribution 'ctcore 0.1.0')`."""
    p = registry.provider(kind, name)
    return f"{kind} {name!r} (from distribution '{p.distribution} {p.version}')"


def _where(frame: FrameType, lineno: int) -> str:
    """`foo/net.py:42, forward`: the file relative to the folder its top-level package lives in."""
    module = frame.f_globals.get("__name__") or "?"
    path = Path(frame.f_code.co_filename)
    depth = module.count(".") + 1 + (path.name == "__init__.py")
    return f"{'/'.join(path.parts[-depth:])}:{lineno}, {frame.f_code.co_name}"


class PluginFailure(CtcoreError):
    """An exception raised inside a component's code, as one line naming the component and its distribution."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def find_plugin(exc: BaseException, registry: Registry) -> tuple[str, str, str] | None:
    """(kind, name, where) of the component whose code raised `exc`: the innermost traceback frame that runs a
    method of a registered component (or of its Options), or code of a module in a component's package.

    None when no plugin code is on the traceback (a bug of ctcore itself keeps its traceback).
    """
    classes: dict[type, tuple[str, str]] = {}
    packages: dict[str, list[tuple[str, str]]] = {}
    for kind in ALL_KINDS:
        for name in registry.names(kind):
            cls = registry.get(kind, name)
            classes[cls] = classes[getattr(cls, "Options", cls)] = (kind, name)
            for module in (cls.__module__, registry.provider(kind, name).module):
                top = module.split(".")[0]
                if top not in ("ctcore", "torch", "builtins") and (kind, name) not in packages.get(top, []):
                    packages.setdefault(top, []).append((kind, name))

    def owner(frame: FrameType) -> tuple[str, str] | None:
        """The component whose method (or whose base class's method, not torch's) this frame runs."""
        if (frame.f_globals.get("__name__") or "").split(".")[0] == "torch":
            return None
        obj = frame.f_locals.get("self")
        return next((classes[c] for c in type(obj).__mro__ if c in classes), None) if obj is not None else None

    frames = list(traceback.walk_tb(exc.__traceback__))
    owners = [owner(f) for f, _ in frames]
    for i in range(len(frames) - 1, -1, -1):
        frame, lineno = frames[i]
        found = owners[i]
        if found is None:
            candidates = packages.get((frame.f_globals.get("__name__") or "").split(".")[0])
            if not candidates:
                continue
            # a helper in a plugin's module: blame the component whose method called it
            found = next((o for o in reversed(owners[:i]) if o in candidates), candidates[0])
        return (*found, _where(frame, lineno))
    return None


def plugin_failure(exc: BaseException, registry: Registry | None = None, *, exit_code: int = 1,
                   run: Any = None) -> PluginFailure | None:
    """The one-line failure for an exception raised in plugin code, or None for anything else (ctcore's own
    errors, which are already one line, and ctcore's own bugs). With the `run` being trained, the line says
    where the run stopped and how to resume it."""
    if isinstance(exc, CtcoreError) or not isinstance(exc, Exception):
        return None
    if registry is None:
        from ctcore.registry import load_registry

        try:
            registry = load_registry()
        except CtcoreError:  # a broken plugin set: the original exception is the better report
            return None
    found = find_plugin(exc, registry)
    if found is None:
        return None
    kind, name, where = found
    p = registry.provider(kind, name)
    text = next(iter(str(exc).strip().splitlines()), "")[:300]
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    head = f"{kind} {name!r} from distribution '{p.distribution} {p.version}'"
    out_of_memory = isinstance(exc, MemoryError | torch.OutOfMemoryError)
    message = f"{head} {'ran out of memory' if out_of_memory else 'raised'} {what} (in {where})"
    fix = (f"it needs more memory than the device has: lower training.batch_size or the {kind}'s size"
           if out_of_memory else "fix or update the plugin")
    if run is not None:
        from ctcore.checkpoints import list_checkpoints

        ckpts = list_checkpoints(run.out_dir)
        latest = f"its latest checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        smaller = _smaller_micro_batch(run) if out_of_memory else None
        if smaller is not None:  # the same steps in smaller passes: a memory knob a resumed run may change
            message += (f"; the run stopped at step {run.step:,}, {latest}: it needs more memory than the device has; "
                        f"continue in smaller passes (the same steps) with ctcore run {run.out_dir} --resume --set "
                        f"training.micro_batch_size={smaller}, or start again with a smaller {kind}")
        else:
            message += (f"; the run stopped at step {run.step:,}, {latest}: {fix}, then ctcore run {run.out_dir} "
                        "--resume")
    else:
        message += f"; {fix}"
    return PluginFailure(message, exit_code)


def _smaller_micro_batch(run: Any) -> int | None:
    """The largest training.micro_batch_size at most half of the run's current pass that divides the batch of each
    process; None when the pass is one image already."""
    from ctcore.recipe import divisors

    t = run.recipe.training
    share = t.batch_size // run.world.world_size
    current = t.micro_batch_size or share
    fitting = [d for d in divisors(share) if d <= current // 2]
    return fitting[-1] if fitting else None


# ------------------------------------------------------------------------------- building under a time limit


class TimeLimitExceeded(BaseException):
    """Raised where the code was when a `time_limit` ran out; a BaseException, so a plugin's `except Exception`
    cannot swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float | None, message: Callable[[str], str],
               registry: Registry | None = None) -> Iterator[None]:
    """Stop the block after `seconds` with UsageError(message("did not finish within N s (stopped in ...)")),
    where it stopped being the innermost frame of a component's code when a `registry` is given.

    Uses SIGALRM, so it works in the main thread only (elsewhere, or without `seconds`, it does nothing) and
    stops Python code, not a single long call into C. An outer timer (pytest-timeout) is re-armed afterwards.
    """
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: object) -> None:
        # re-armed first: an exception raised inside a finalizer or weakref callback is swallowed by Python
        # ("Exception ignored in ..."), so the alarm keeps firing until the block has really stopped
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        raise TimeLimitExceeded

    from torch.overrides import _get_current_function_mode_stack, _pop_mode, _push_mode

    # the alarm can land inside torch's own context managers (the `no_grad` of nn.init, a device mode's enter
    # or exit) and leave their global state changed: both are put back as they were
    grad, modes = torch.is_grad_enabled(), _get_current_function_mode_stack()
    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    except TimeLimitExceeded as exc:
        signal.setitimer(signal.ITIMER_REAL, 0)
        torch.set_grad_enabled(grad)
        while torch._C._len_torch_function_stack():
            _pop_mode()
        for mode in modes:
            _push_mode(mode)
        frames = [(f, n) for f, n in traceback.walk_tb(exc.__traceback__) if f.f_code is not expire.__code__]
        found = find_plugin(exc, registry) if registry is not None else None
        where = found[2] if found else (_where(*frames[-1]) if frames else None)
        stopped = f" (stopped in {where})" if where else ""
        raise UsageError(message(f"did not finish within {seconds:g} s{stopped}")) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-3))


def build_components(recipe: Recipe, registry: Registry, device: str | torch.device = "cpu",
                     kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """One instance per kind the recipe has (of `kinds`), built for the data shape and classes the recipe declares
    (no data is read).

    `device="meta"` builds shapes only, in no memory, each component within BUILD_TIME_LIMIT_S: `ctcore check`
    and every run build there first, so options asking for an absurd network fail before any allocation.
    """
    context = BuildContext(data_shape=data_shape(recipe.data), num_classes=recipe.data.num_classes,
                           total_steps=recipe.training.total_steps)
    limit = BUILD_TIME_LIMIT_S if torch.device(device).type == "meta" else None
    built = {}
    with torch.device(device):
        for kind in (k for k in kinds if k in recipe.components):
            spec = recipe.components[kind]
            cls = registry.get(kind, spec.name)

            def message(stopped: str, kind: str = kind, name: str = spec.name) -> str:
                return (f"{recipe.source}: building {describe(registry, kind, name)} on the meta device {stopped}; "
                        f"its options ask for too much, or it hangs: change [{kind}] in the recipe or fix the plugin")

            try:
                with time_limit(limit, message, registry):
                    built[kind] = cls(spec.options, context)
            except (ValueError, TypeError) as exc:
                text = str(exc)
                if text.split(":", 1)[0] in attrs.fields_dict(type(spec.options)):  # "option: ..." names its key
                    raise UsageError(f"{recipe.source}: {kind}.{text}") from None
                raise UsageError(f"{recipe.source}: cannot build {kind} {spec.name!r}: {exc}") from None
    return built


# ------------------------------------------------------------------------------------------ the estimate


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process of a run needs, by part. Parts named host_* live in host memory whatever the device;
    the others on the training device. Transient parts (activations, samples, evaluation, fid) never coexist."""

    parameters: int = 0
    """The student's parameter count (a count, not bytes)."""
    batch: int = 0
    """Training images per process in one forward and backward pass: training.micro_batch_size when set, else
    the process's share of training.batch_size."""
    share: int = 0
    """Training images per process and step (training.batch_size over the processes), which micro-batches divide."""
    weights: int = 0
    """The student's parameters and buffers."""
    eval_ema: int = 0
    teacher: int = 0
    """The teacher's own copy; 0 when the teacher is the student."""
    gradients: int = 0
    optimizer: int = 0
    """Adam / RAdam: two moments per trainable parameter."""
    rollback: int = 0
    """The copy of weights, eval EMA, teacher and moments that train() goes back to when a step it did not check
    was non-finite (training.max_nonfinite_steps > 0; 0 without the check). It exists while steps run, not while
    train() samples or evaluates."""
    metric: int = 0
    data: int = 0
    """The training set on the device: uint8 images and int64 labels."""
    activations_fixed: int = 0
    """Kept for backward whatever the batch (autocast's low-precision copies of the weights)."""
    per_image: int = 0
    """Kept for backward per training image by the student and the metric, plus the step's batch tensors."""
    recompute: int = 0
    """Per training image, with checkpointed blocks (`checkpoint_blocks`): the transient of one block on top of
    what is kept, RECOMPUTE_FACTOR x the most a single block keeps when run plainly (its recomputation in backward,
    or the teacher's no-grad pass through it). 0 without checkpointing."""
    samples: int = 0
    evaluation: int = 0
    fid: int = 0
    host_staging: int = 0
    """Host memory while loading the data, beyond what the data holds on a CPU device: the generator's
    temporaries, and for an accelerator also the host copy before it moves."""
    host_evaluation: int = 0
    """The sliced-Wasserstein evaluation's float64 copies and projections, on the host."""

    LABELS = {"weights": "weights", "eval_ema": "eval EMA", "teacher": "teacher copy", "gradients": "gradients",
              "optimizer": "optimizer moments", "rollback": "rollback copy", "metric": "metric", "data": "data",
              "activations": "activations",
              "samples": "sample grids", "evaluation": "evaluation samples", "fid": "FID",
              "host_staging": "data loading", "host_evaluation": "evaluation on the host"}

    @property
    def activations(self) -> int:
        return self.activations_fixed + self.batch * (self.per_image + self.recompute)

    def peak(self, on_cpu: bool) -> int:
        """The most the training device holds at once (on CPU the host parts count too)."""
        static = (self.weights + self.eval_ema + self.teacher + self.gradients + self.optimizer + self.metric
                  + self.data)
        evaluation = self.evaluation + (self.host_evaluation if on_cpu else 0)
        # the rollback copy lives while steps run; train() drops it before it samples or evaluates
        peak = static + max(self.activations + self.rollback, self.samples, evaluation, self.fid)
        if on_cpu:  # while loading the data, before any gradient or optimizer state exists
            peak = max(peak, self.weights + self.eval_ema + self.teacher + self.metric + self.data + self.host_staging)
        return peak

    def host_peak(self) -> int:
        """Host memory a run on an accelerator needs at once: loading the data, or the evaluation."""
        return max(self.host_staging, self.host_evaluation)

    def parts(self, names: tuple[str, ...] | None = None, limit: int = 3) -> str:
        """The largest parts, `activations 1.2 GiB for 256 images, optimizer moments 6.0 MiB, ...`."""
        order = list(self.LABELS)
        ranked = sorted((n for n in names or order if getattr(self, n) > 0), key=lambda n: (-getattr(self, n),
                                                                                          order.index(n)))
        each = f" for {self.batch:,} images at {human_bytes(self.per_image + self.recompute)} each"
        if self.recompute:
            each += f" including {human_bytes(self.recompute)} of recomputation"
        return ", ".join(f"{self.LABELS[n]} {human_bytes(getattr(self, n))}{each * (n == 'activations')}"
                         for n in ranked[:limit])

    def largest(self, names: tuple[str, ...] | None = None) -> str:
        return max(names or self.LABELS, key=lambda n: getattr(self, n))

    @staticmethod
    def names(on_cpu: bool) -> tuple[str, ...]:
        """The parts on the training device (all of them on CPU)."""
        return tuple(n for n in MemoryEstimate.LABELS if on_cpu or not n.startswith("host_"))


HOST_PARTS = ("host_staging", "host_evaluation")
"""The parts in host memory during a run on an accelerator."""


def largest_fitting_micro_batch(estimate: MemoryEstimate, on_cpu: bool, limit: int) -> int | None:
    """The largest training.micro_batch_size (a divisor of estimate.share) whose estimated device peak is at most
    `limit` bytes; None when not even 1 fits (then the activations are not what is too large)."""
    from ctcore.recipe import divisors

    for size in reversed(divisors(max(1, estimate.share))):
        if dataclasses.replace(estimate, batch=size).peak(on_cpu) <= limit:
            return size
    return None


def device_fit(recipe: Recipe, estimate: MemoryEstimate, on_cpu: bool, limit: int) -> tuple[str, bool]:
    """`ctcore check --device-memory`: one line saying whether the estimated device peak fits `limit` bytes and,
    if not, the largest training.micro_batch_size that does (when none does, the parts that are too large); and
    whether it fits."""
    names = MemoryEstimate.names(on_cpu)
    device = "cpu" if on_cpu else "cuda"
    precision = "bf16" if _uses_bf16(recipe, device) else "fp32"
    need = f"about {human_bytes(estimate.peak(on_cpu))} on {device} in {precision}"
    if estimate.peak(on_cpu) <= limit:
        return f"fits in {human_bytes(limit)}: {need} ({estimate.parts(names)})", True
    head = f"does not fit in {human_bytes(limit)}: {need} ({estimate.parts(names)}); "
    micro = largest_fitting_micro_batch(estimate, on_cpu, limit)
    if micro is not None:
        fitted = dataclasses.replace(estimate, batch=micro).peak(on_cpu)
        return (head + f"training.micro_batch_size = {micro} fits (about {human_bytes(fitted)}): --set "
                f"training.micro_batch_size={micro}"), False
    smallest = dataclasses.replace(estimate, batch=1)
    part = smallest.largest(names)
    return (head + f"no training.micro_batch_size fits, not even 1 (about {human_bytes(smallest.peak(on_cpu))}); "
            f"the largest part is {smallest.parts((part,), limit=1)}: lower {_fix_for(part, recipe)}"), False


def _fix_for(part: str, recipe: Recipe) -> str:
    """The recipe setting that shrinks one part of the estimate."""
    data = "data.num_images" if recipe.data.source == "synthetic" else "data.path (a smaller dataset)"
    return {"activations": "training.batch_size", "data": data, "host_staging": data, "teacher": "[teacher]",
            "metric": "[metric]", "samples": "sampling.num_samples", "evaluation": "evaluation.num_samples",
            "host_evaluation": "evaluation.num_samples", "fid": "evaluation.fid_num_samples"
            }.get(part, "the [network] size options")


def _tensor_bytes(tensors: Any, skip: set[int] | None = None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if skip is None or id(t) not in skip)


def _module_bytes(module: Any) -> int:
    if not isinstance(module, nn.Module):
        return 0
    return _tensor_bytes(module.parameters()) + _tensor_bytes(module.buffers())


def _uses_bf16(recipe: Recipe, device_type: str) -> bool:
    p = recipe.training.precision
    return p == "bf16" or (p == "auto" and device_type == "cuda")


def data_parts(recipe: Recipe, device_type: str) -> dict[str, int]:
    """Data, sample and evaluation bytes, from the recipe (and an HDF5 file's metadata) alone."""
    d, e, s = recipe.data, recipe.evaluation, recipe.sampling
    size = math.prod(data_shape(d))
    parts: dict[str, int] = {}
    host_copy = device_type != "cpu"  # on an accelerator the data is first made or read on the host
    if d.source == "synthetic":
        parts["data"] = d.num_images * (size + 8)
        # four float32 temporaries per pixel value and two index tensors while the glyphs are drawn
        parts["host_staging"] = d.num_images * (16 * size + 16) + parts["data"] * host_copy
    elif Path(d.path).is_file():
        info = hdf5_summary(d.path)
        parts["data"] = info["count"] * (size + 8 * info["has_labels"])
        parts["host_staging"] = parts["data"] * host_copy
    chunk = max(64, min(1024, recipe.training.batch_size))
    steps = 1 + len(s.sigma_mid)
    parts["samples"] = s.num_samples * size * 11 + min(chunk, s.num_samples) * size * 4 * (steps + 2)
    if e.distance != "none":
        parts["evaluation"] = e.num_samples * size * 6 + min(chunk, e.num_samples) * size * 12
        parts["host_evaluation"] = e.num_samples * (size * 26 + 48 * e.num_projections) + size * e.num_projections * 8
    if e.fid_every > 0:
        parts["fid"] = (e.fid_num_samples * (FID_LOGITS * 4 + PYTHON_INT_BYTES) + FID_FEATURES**2 * 8
                        + FID_INCEPTION_BYTES + e.fid_batch_size * size * 4 * (e.fid_steps + 2))
    return parts


def _refuse_absurd(recipe: Recipe, estimate: MemoryEstimate, on_cpu: bool) -> None:
    """UsageError when even MAX_PROCESSES processes, each with its share of the batch, could not hold the run."""
    t = recipe.training
    batch = -(-t.batch_size // MAX_PROCESSES)
    split = f"training.batch_size split over {MAX_PROCESSES:,} processes"
    if 0 < t.micro_batch_size < batch:
        batch, split = t.micro_batch_size, f"micro-batches of {t.micro_batch_size:,} (training.micro_batch_size)"
    estimate = dataclasses.replace(estimate, batch=batch)
    need = max(estimate.peak(on_cpu), 0 if on_cpu else estimate.host_peak())
    if need > ABSURD_BYTES:
        names = MemoryEstimate.names(on_cpu) if need == estimate.peak(on_cpu) else HOST_PARTS
        part = estimate.largest(names)
        raise UsageError(
            f"{recipe.source}: the run would need about {human_bytes(need)} in each process even with "
            f"{split} ({estimate.parts(names)}), more than any "
            f"device or machine holds (ctcore refuses more than {human_bytes(ABSURD_BYTES)}); lower "
            f"{_fix_for(part, recipe)}")


# ----------------------------------------------------------------------------------- the forward checks


def _sdpa_arguments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                    enable_gqa: bool = False) -> dict[str, Any]:
    """torch.nn.functional.scaled_dot_product_attention's arguments by name."""
    return dict(locals())


class _AttentionAsRun(torch.overrides.TorchFunctionMode):
    """On the meta device, scaled_dot_product_attention as torch runs it where it trains. On meta torch always
    takes its math path, which keeps the tokens x tokens attention matrix for backward; the fused kernels (flash
    attention on CPU and CUDA, memory-efficient attention on CUDA) keep q, k, v, the output and one log-sum-exp
    per query: counted as math, an ADM with attention at 32x32 was estimated at 1.8-2.4x its measured peak
    (docs/performance.md). A call no fused kernel takes stays on the math path: a mask, dropout, other than 4-D
    inputs, head sizes that differ, a last dimension that is not contiguous (NCSN++'s q, k, v), fused kernels
    switched off (torch.nn.attention.sdpa_kernel). The math path computes in float32 whatever its inputs
    (`math_attention` is true while it runs: under bf16 autocast its tensors are kept in float32)."""

    math_attention = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        try:
            a = _sdpa_arguments(*args, **kwargs)
        except TypeError:  # arguments torch refuses: its own error
            return func(*args, **kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        if not all(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in (q, k, v)):
            return func(*args, **kwargs)  # a network that only runs on CPU (preflight's fallback): torch decides
        if (a["attn_mask"] is None and not a["dropout_p"] and not a["enable_gqa"]
                and q.ndim == k.ndim == v.ndim == 4 and q.shape[-1] == k.shape[-1] == v.shape[-1]
                and all(t.stride(-1) == 1 or t.shape[-1] == 1 for t in (q, k, v))
                and (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled())):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, a["is_causal"], scale=a["scale"])[0]
        self.math_attention = True
        try:
            return func(*args, **kwargs)
        finally:
            self.math_attention = False


def _saved_bytes(forward: Callable[[], Any], module: Any, half: bool,
                 blocks: list[int] | None = None) -> tuple[Any, int, int]:
    """Run `forward` and count the bytes of the tensors autograd keeps for backward (views counted once): those
    that grow with the batch, and the module's own weights and buffers (kept as they are in float32, as cast
    copies under bf16 autocast, where every float32 tensor is kept as its bfloat16 copy, except in torch's math
    attention). Attention counts as torch runs it on the training device (_AttentionAsRun). With a `blocks` list,
    each block the forward checkpoints (ctcore.components.checkpointed) is also run plainly once and what it keeps
    that grows with the batch, besides its inputs, is appended: what its recomputation keeps in its backward."""
    from ctcore import components

    own = {id(t) for t in (*module.parameters(), *module.buffers())} if isinstance(module, nn.Module) else set()
    batch: dict[int, int] = {}
    fixed: dict[int, int] = {}
    attention = _AttentionAsRun()

    def packer(batch: dict[int, int], fixed: dict[int, int], skip: set[int]) -> Callable[[torch.Tensor], Any]:
        def pack(t: torch.Tensor) -> torch.Tensor:
            base = t if t._base is None else t._base
            as_bf16 = half and base.dtype == torch.float32 and not attention.math_attention
            size = base.numel() * (2 if as_bf16 else base.element_size())
            if id(base) in skip:  # a checkpointed block's inputs: its checkpoint keeps them already
                return t
            if id(base) not in own:
                batch[id(base)] = size
            elif half:
                fixed[id(base)] = size
            return t

        return pack

    def probe(function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        inputs = {id(a if a._base is None else a._base) for a in args if isinstance(a, torch.Tensor)}
        inside: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(packer(inside, {}, inputs), lambda t: t):
            function(*args)
        blocks.append(sum(inside.values()))

    previous = components.checkpoint_probe
    components.checkpoint_probe = probe if blocks is not None else None
    try:
        with (torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(packer(batch, fixed, set()), lambda t: t),
              attention):
            out = forward()
    finally:
        components.checkpoint_probe = previous
    return out, sum(batch.values()), sum(fixed.values())


def _meta_cannot(exc: Exception) -> bool:
    """The meta device lacks an operation (or data: `.item()`, data-dependent branches), not a plugin bug."""
    return isinstance(exc, NotImplementedError) or "meta" in str(exc).lower()


class _Checks:
    """The contract checks of one recipe's components, built on the meta device."""

    def __init__(self, recipe: Recipe, registry: Registry, built: dict[str, Any], half: bool) -> None:
        self.recipe, self.registry, self.built, self.half = recipe, registry, built, half
        self.shape = data_shape(recipe.data)

    def refuse(self, kind: str, problem: str) -> UsageError:
        spec = self.recipe.components[kind]
        return UsageError(f"{self.recipe.source}: {describe(self.registry, kind, spec.name)}: {problem}")

    def network(self) -> tuple[int, int, int]:
        """Output shape and noise convention; returns the saved bytes per sample, the fixed saved bytes and the
        transient bytes per sample of its checkpointed blocks (MemoryEstimate.recompute)."""
        net = self.built["network"]
        conv = getattr(net, "noise_conditioning", None)
        if conv not in NOISE_CONVENTIONS:
            got = "declares no noise_conditioning" if conv is None else f"declares noise_conditioning = {conv!r}"
            raise self.refuse("network", f"{got}; its class must declare noise_conditioning = "
                                         f"{' or '.join(map(repr, NOISE_CONVENTIONS))} (how it wants c_noise scaled)")
        if not isinstance(net, nn.Module):
            raise self.refuse("network", f"is a {type(net).__name__}; a network must be a torch.nn.Module")
        try:
            return self._network_on(net, "meta")
        except Exception as exc:
            if not _meta_cannot(exc):
                raise
        if sum(p.numel() for p in net.parameters()) > CPU_FALLBACK_PARAMETERS:
            return 0, 0, 0  # neither meta nor a small CPU copy can run it: its forward is not checked
        with torch.random.fork_rng(devices=[]):
            cpu_net = build_components(self.recipe, self.registry, "cpu", kinds=("network",))["network"]
            return self._network_on(cpu_net, "cpu")

    def _network_on(self, net: nn.Module, device: str) -> tuple[int, int, int]:
        net.train()
        n = 2
        x = torch.zeros((n, *self.shape), device=device)
        c_noise = torch.zeros(n, device=device)  # sigma = 1 in either convention
        labels = torch.zeros(n, dtype=torch.long, device=device) if self.recipe.data.num_classes > 0 else None
        blocks: list[int] = []
        out, kept, fixed = _saved_bytes(lambda: net(x, c_noise, labels), net, self.half, blocks)
        if not isinstance(out, torch.Tensor):
            raise self.refuse("network", f"returns a {type(out).__name__} for input {tuple(x.shape)}; it must "
                                         "return a tensor of the input's shape")
        if out.shape != x.shape:
            raise self.refuse("network", f"returns shape {tuple(out.shape)} for input {tuple(x.shape)}; its "
                                         "output must have the input's shape")
        if not out.is_floating_point():
            raise self.refuse("network", f"returns {out.dtype} values; its output must be floating point")
        return kept // n, fixed, round(RECOMPUTE_FACTOR * max(blocks, default=0) / n)

    def metric(self) -> int:
        """One value per sample on meta, values on a tiny CPU batch when small; returns saved bytes per sample."""
        metric, n = self.built["metric"], 2
        x = torch.zeros((n, *self.shape), device="meta", requires_grad=True)
        y = torch.zeros((n, *self.shape), device="meta")
        try:
            d, kept, _ = _saved_bytes(lambda: metric(x, y), metric, self.half)
        except Exception as exc:
            if not _meta_cannot(exc):
                raise
            d, kept = None, 0
        if d is not None and (not isinstance(d, torch.Tensor) or d.shape != (n,)):
            got = f"shape {tuple(d.shape)}" if isinstance(d, torch.Tensor) else f"a {type(d).__name__}"
            raise self.refuse("metric", f"returns {got} for inputs of shape {tuple(x.shape)}; it must return "
                                        f"one value per sample, shape ({n},)")
        if isinstance(metric, nn.Module) and sum(p.numel() for p in metric.parameters()) < SMALL_METRIC_PARAMETERS:
            self._metric_values()
        return kept // n

    def _metric_values(self) -> None:
        spec = self.recipe.components["metric"]
        cls = self.registry.get("metric", spec.name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                metric = cls(spec.options, BuildContext(self.shape, self.recipe.data.num_classes,
                                                        self.recipe.training.total_steps))
            except Exception:
                return  # it needs what a CPU build lacks (e.g. weights on a device): the meta checks stand
            try:
                check_metric_values(cls, metric, self.shape, f"on 3 random CPU images of shape {self.shape}")
            except ContractViolation as exc:
                raise self.refuse("metric", exc.problem) from None

    def schedules(self) -> tuple[int, int]:
        """Curriculum N(k) at a few steps, the noise schedule on the recipe's grids at N(0) and N(K); a continuous
        schedule's pairs at steps 0 and K (N is 0: no grid)."""
        k = self.recipe.training.total_steps
        schedule = self.built["noise_schedule"]
        if "curriculum" not in self.built:
            for step in (0, k):
                try:
                    check_pairs(type(schedule), schedule, step)
                except ContractViolation as exc:
                    raise self.refuse("noise_schedule", exc.problem) from None
            return 0, 0
        curriculum = self.built["curriculum"]
        cls = type(curriculum)
        try:
            counts = check_num_scales(cls, curriculum, sorted({0, k // 4, k // 2, 3 * k // 4, k - 1, k}))
        except ContractViolation as exc:
            raise self.refuse("curriculum", exc.problem) from None
        c = self.recipe.consistency
        for n in sorted({counts[0], counts[-1]}):
            sigmas = karras_sigmas(n, c.sigma_min, c.sigma_max, c.rho)
            try:
                check_schedule_on_grid(type(schedule), schedule, sigmas)
                check_pairs(type(schedule), schedule, 0, sigmas)
            except ContractViolation as exc:
                raise self.refuse("noise_schedule", f"{exc.problem} (the recipe's grid: sigma_min "
                                                    f"{c.sigma_min}, sigma_max {c.sigma_max}, rho {c.rho})") from None
        return counts[0], counts[-1]

    def objective(self, compiled: bool) -> None:
        """Binds to the meta student and its parts: an objective that needs what the network or teacher lacks (a
        second time input, a log-variance head, a diffusion model) says so here, before anything is allocated. An
        objective that runs the network eagerly besides the student's pass (`eager_passes`, a JVP) cannot share a
        compiled pass's dropout mask (torch.compile draws other random numbers than eager), so it refuses dropout
        under training.compile."""
        objective, student = self.built["objective"], self.built["network"]
        try:
            objective.bind(student, {kind: self.built[kind] for kind in OBJECTIVE_PARTS if kind in self.built})
        except ValueError as exc:
            raise self.refuse("objective", str(exc)) from None
        dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in student.modules())
        if compiled and dropout and getattr(objective, "eager_passes", False):
            raise self.refuse("objective", "runs its JVP eagerly, and the compiled student pass would draw another "
                                           "dropout mask than the JVP (torch.compile's random numbers are not "
                                           "eager's); set training.compile = \"off\" (or [network] dropout = 0)")

    def sampler(self) -> None:
        """The sampler's default plan and its preview plans for the recipe's noise levels."""
        sampler, levels = self.built["sampler"], self.recipe.levels
        try:
            check_sampler_plans(type(sampler), sampler, levels)
        except ContractViolation as exc:
            raise self.refuse("sampler", exc.problem) from None

    def teacher(self, first: int, last: int) -> int:
        """Binds to the meta student with a finite decay in [0, 1); returns the bytes of the networks it holds
        besides the student (its own copy; cd's diffusion model too)."""
        teacher, student = self.built["teacher"], self.built["network"]
        teacher.bind(student)
        network = getattr(teacher, "network", None)
        if not isinstance(network, nn.Module):
            raise self.refuse("teacher", f"bind(student) must set `self.network` to a module, got "
                                         f"{type(network).__name__}")
        k = self.recipe.training.total_steps
        for step, n in ((0, first), (k, last)):
            mu = teacher.decay(step, n)
            if isinstance(mu, bool) or not isinstance(mu, int | float) or not 0.0 <= mu < 1.0:
                raise self.refuse("teacher", f"decay({step}, {n}) must be a number in [0, 1), got {mu!r}")
        shared = {id(t) for t in (*student.parameters(), *student.buffers())}
        # its own copy of the student, and any model it holds besides (cd: the frozen diffusion model)
        modules = {id(m): m for m in vars(teacher).values() if isinstance(m, nn.Module) and m is not student}
        return sum(_tensor_bytes(m.parameters(), shared) + _tensor_bytes(m.buffers(), shared)
                   for m in modules.values())


@dataclasses.dataclass(frozen=True)
class Preflight:
    """What `preflight` found: the meta-built components and the memory estimate."""

    built: dict[str, Any]
    memory: MemoryEstimate
    on_cpu: bool
    """Whether the estimate is for a CPU run (for `check`: where run.device would train on this machine)."""

    @property
    def parameters(self) -> int:
        return self.memory.parameters


def preflight(recipe: Recipe, registry: Registry, *, device: torch.device | None = None, world_size: int = 1,
              data: ImageData | None = None) -> Preflight:
    """Build every component on the meta device, check their contracts and estimate the memory of the run.

    Refuses (UsageError, exit 2) a broken contract or a run past ABSURD_BYTES; with a `device`, also (RunError,
    exit 1) a run that does not fit the memory available there. `data` already in memory is not estimated.
    Nothing real is allocated, and the global RNG is left as it was.
    """
    if device is not None:
        device_type = device.type
    else:  # `check` resolves nothing (the recipe may be meant for another machine): guess as "auto" would here
        cpu = recipe.run.device == "cpu" or (recipe.run.device == "auto" and not torch.cuda.is_available())
        device_type = "cpu" if cpu else "cuda"
    on_cpu = device_type == "cpu"
    half = _uses_bf16(recipe, device_type)
    share = max(1, recipe.training.batch_size // max(1, world_size))
    batch = min(recipe.training.micro_batch_size or share, share)  # one forward and backward pass
    parts = data_parts(recipe, device_type)
    if data is not None:
        parts.pop("data", None)
        parts.pop("host_staging", None)
    _refuse_absurd(recipe, MemoryEstimate(**parts), on_cpu)  # before building meta inputs that large

    built = build_components(recipe, registry, "meta")
    checks = _Checks(recipe, registry, built, half)
    with time_limit(BUILD_TIME_LIMIT_S, lambda stopped: f"{recipe.source}: the checks of the components (one "
                                                        f"forward pass on the meta device) {stopped}", registry):
        per_sample, fixed, recompute = checks.network()
        metric_per_sample = checks.metric() if "metric" in built else 0
        first, last = checks.schedules() if "noise_schedule" in built else (2, 2)
        teacher_bytes = checks.teacher(first, last) if "teacher" in built else 0
        checks.objective(compile_enabled(recipe.training.compile, torch.device(device_type)))
        checks.sampler()
    student = built["network"]
    trainable = _tensor_bytes(p for p in student.parameters() if p.requires_grad)
    size = math.prod(data_shape(recipe.data))
    step_tensors = size * 4 * 8  # x, z, both noisy inputs, both outputs, their float copies
    teacher = built.get("teacher")
    own_copy = _module_bytes(teacher.network) if teacher is not None and teacher.network is not student else 0
    rollback = 2 * _module_bytes(student) + own_copy + 2 * trainable  # weights, eval EMA, teacher, moments
    estimate = MemoryEstimate(
        parameters=sum(p.numel() for p in student.parameters()), batch=batch, share=share,
        weights=_module_bytes(student),
        eval_ema=_module_bytes(student), teacher=teacher_bytes, gradients=trainable, optimizer=2 * trainable,
        rollback=rollback if recipe.training.max_nonfinite_steps > 0 else 0,
        metric=_module_bytes(built["metric"]) if "metric" in built else 0, activations_fixed=fixed,
        per_image=per_sample + metric_per_sample + step_tensors, recompute=recompute, **parts)
    _refuse_absurd(recipe, estimate, on_cpu)
    if device is not None:
        require_run_memory(estimate, device, recipe)
    return Preflight(built, estimate, on_cpu)


# ----------------------------------------------------------------------------------- available memory


def _available_text(available: int) -> str:
    return (f"{MEMORY_LIMIT_ENV} allows {human_bytes(available)}" if os.environ.get(MEMORY_LIMIT_ENV, "").strip()
            else f"{human_bytes(available)} is available")


def require_run_memory(estimate: MemoryEstimate, device: torch.device, recipe: Recipe) -> None:
    """RunError (exit 1) when the run does not fit the memory available on its device (or on the host)."""
    on_cpu = device.type == "cpu"
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)  # torchrun processes on this host share its memory
    needs = [(device, estimate.peak(on_cpu) * (local if on_cpu else 1), MemoryEstimate.names(on_cpu), on_cpu)]
    if not on_cpu:
        needs.append((torch.device("cpu"), estimate.host_peak() * local, HOST_PARTS, True))
    for where, need, names, shared in needs:
        available = available_memory(where)
        if need > available:
            times = f" x {local} processes" if shared and local > 1 else ""
            fix = f"lower {_fix_for(estimate.largest(names), recipe)}"
            micro = (largest_fitting_micro_batch(estimate, on_cpu, available // (local if shared else 1))
                     if names != HOST_PARTS else None)
            if micro is not None:  # the same training in smaller passes
                fix = f"set training.micro_batch_size = {micro} (the same steps in passes that fit), or {fix}"
            raise RunError(
                f"{recipe.source}: the run needs about {human_bytes(need)} of memory on {where} "
                f"({estimate.parts(names)}{times}) but {_available_text(available)}; {fix}, or set "
                f"{MEMORY_LIMIT_ENV}=<bytes> if that figure is wrong")


def require_buffers(parts: dict[str, int], device: torch.device, what: str, fix: str) -> None:
    """UsageError (exit 2) when buffers a command is about to allocate exceed the memory of `device` (or of the
    host for `host_*` parts), before any is allocated: `-n 10^12` is one line, not a MemoryError."""
    groups = {torch.device("cpu"): sum(b for n, b in parts.items() if n.startswith("host_") or device.type == "cpu")}
    if device.type != "cpu":
        groups[device] = sum(b for n, b in parts.items() if not n.startswith("host_"))
    for where, need in groups.items():
        available = available_memory(where)
        limit = min(available, ABSURD_BYTES)
        if need > limit:
            listed = ", ".join(f"{n.removeprefix('host_').replace('_', ' ')} {human_bytes(b)}"
                               for n, b in sorted(parts.items(), key=lambda p: -p[1]) if b)
            have = _available_text(limit) if limit == available else f"ctcore refuses more than {human_bytes(limit)}"
            raise UsageError(f"{what} needs about {human_bytes(need)} of memory on {where} ({listed}) but {have}; "
                             f"{fix}")


def sample_buffers(num_samples: int, shape: tuple[int, ...], steps: int, batch_size: int) -> dict[str, int]:
    """What `ctcore sample` holds: every image twice (chunks, then joined), the HDF5 image, seeds and labels on
    the host; one batch of noise and outputs on the device."""
    size = math.prod(shape)
    return {"host_images": num_samples * size * 3, "host_seeds_and_labels": num_samples * (PYTHON_INT_BYTES + 24),
            "batch": min(batch_size, num_samples) * size * 4 * (steps + 3)}
