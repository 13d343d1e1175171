"""`ctcore bench`: the recipe's real training step and one-step sampling on random data, timed.

Reports train and sample img/s, forward GFLOP per image (torch's flop counter), achieved TFLOP/s and peak
memory. A training step costs about 4 forward passes per image: the student's forward and backward (~3x) plus
the teacher's forward.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ctcore.consistency import c_noise, noise_convention
from ctcore.data import ImageData, data_shape
from ctcore.errors import UsageError
from ctcore.recipe import Recipe, micro_batch_problem
from ctcore.registry import Registry


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_gflop_per_image(network: torch.nn.Module, shape: tuple[int, ...], num_classes: int,
                            device: torch.device, batch: int = 2) -> float:
    """GFLOP of one raw network forward per image, as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    convention = noise_convention(network)
    x = torch.zeros((batch, *shape), device=device)
    sigma = torch.full((batch,), 1.0, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if num_classes > 0 else None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    # count attention as its matmuls: the counter does not see every fused kernel (e.g. CPU flash attention)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        network(x, c_noise(sigma, convention), labels)
    return counter.get_total_flops() / batch / 1e9


def network_passes(run: Any) -> int:
    """Forward-pass equivalents of the network per training image: the objective's, plus the forward passes a
    teacher makes with a model of its own (cd: Heun 2, Euler 1, with the diffusion model, taken as the student's
    size)."""
    return type(run.objective).network_passes + getattr(run.teacher, "network_passes", 0)


def dynamo_mark() -> dict[str, Any]:
    """Where torch._dynamo's own records stand now; `compile_report(mark)` counts what happened after it."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    return {"graph_breaks": dict(counters["graph_break"]), "graphs": counters["stats"]["unique_graphs"],
            "records": get_compilation_metrics()}


def compile_report(mark: dict[str, Any]) -> dict[str, Any]:
    """What torch.compile did since `mark`, read from torch._dynamo's own records (torch 2.13).

    graph_breaks: the sum of `counters["graph_break"]` (break message -> how many times dynamo split a graph there;
    counted when traced). compiled_graphs: `counters["stats"]["unique_graphs"]`. `counters` has no recompile count,
    so recompiles come from `get_compilation_metrics()`, one record per frame compiled (and per AOT backward):
    dynamo sets its `recompile_reason` (the failed guard) when the frame already had a cache entry whose guards
    failed, which is its definition of a recompile (a first compile of a new pass or module is none).
    compile_seconds: the records' `duration_us`, dynamo, AOT autograd and the backend, forward and backward.
    The records are a deque of the last 64, plenty for one bench.
    """
    from torch._dynamo.utils import counters, get_compilation_metrics

    seen = {id(m) for m in mark["records"]}  # the mark holds the records, so no id is reused
    new = [m for m in get_compilation_metrics() if id(m) not in seen]
    breaks = {msg: n - mark["graph_breaks"].get(msg, 0) for msg, n in counters["graph_break"].items()}
    return {
        "graph_breaks": sum(breaks.values()),
        "recompiles": sum(m.recompile_reason is not None for m in new),
        "compiled_graphs": counters["stats"]["unique_graphs"] - mark["graphs"],
        "compile_seconds": sum(m.duration_us or 0 for m in new) / 1e6,
        "graph_break_reasons": sorted(msg for msg, n in breaks.items() if n > 0),
        "recompile_reasons": [m.recompile_reason for m in new if m.recompile_reason is not None],
    }


NOT_COMPILED: dict[str, Any] = {"eager_train_img_per_s": None, "graph_breaks": None, "recompiles": None,
                                "compiled_graphs": None, "compile_seconds": None, "graph_break_reasons": None,
                                "recompile_reasons": None}
"""The compile fields of a bench without training.compile (train_img_per_s is the eager figure then)."""


def _time_steps(run: Any, warmup: int, steps: int) -> float:
    """Seconds of `steps` training steps after `warmup` untimed ones."""
    from ctcore.training import train_step

    for _ in range(warmup):
        train_step(run)
    _sync(run.device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(run)
    _sync(run.device)
    return time.perf_counter() - start


def run_bench(recipe: Recipe, registry: Registry, *, batch: int | None = None, steps: int = 10,
              warmup: int = 2, profile: Path | None = None) -> dict[str, Any]:
    """Time `steps` training steps and `steps` one-step sampling batches after `warmup` of each.

    With training.compile the same steps run eagerly first (eager_train_img_per_s), then compiled: the first
    compiled step compiles (keep warmup >= 1), and compile_report says what torch.compile did over all compiled
    steps. With `profile` (a trace file's path, from profile_trace_path), a few more of each are then traced
    (profile_run)."""
    import dataclasses
    import math

    from ctcore.build import build_run
    from ctcore.preflight import preflight, require_buffers

    batch = batch or recipe.training.batch_size
    recipe = _with_batch(recipe, batch)
    micro = recipe.training.micro_batch_size  # train_step runs the batch in micro-batches of this size
    problem = micro_batch_problem(batch, 1, micro)
    if problem is not None:  # only a --batch can cause it: the recipe's own batch_size was checked
        raise UsageError(f"bench --batch {batch:,}: {problem}")
    shape = data_shape(recipe.data)
    num_classes = recipe.data.num_classes
    device_probe = torch.device("cuda" if torch.cuda.is_available() and recipe.run.device != "cpu" else "cpu")
    # the random images and one step at --batch must fit before either is allocated (estimated at batch 1, so
    # that an absurd --batch is refused here, naming --batch)
    memory = preflight(_with_batch(recipe, 1), registry).memory
    memory = dataclasses.replace(memory, batch=micro or batch, share=batch, data=0, host_staging=0,
                                 rollback=0)  # no train(): no rollback copy
    on_cpu = device_probe.type == "cpu"
    require_buffers({"training": memory.peak(on_cpu), "images": max(2 * batch, 16) * (math.prod(shape) + 8)},
                    device_probe, f"bench --batch {batch:,}", "choose a smaller --batch")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(2 * batch, 16), *shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, max(num_classes, 1), (images.shape[0],), generator=g)
    data = ImageData(images, labels if num_classes else None, num_classes=num_classes, device=device_probe)
    run = build_run(recipe, registry, data=data)
    device = run.device
    if recipe.training.max_nonfinite_steps > 0:  # as train() runs its steps: the finite flag stays on the device
        run.nonfinite_flag = torch.zeros((), dtype=torch.bool, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    compiled = run.student_forward is not run.student
    eager_seconds, compiled_report = 0.0, {}
    if compiled:  # the eager step first, on the same run: the compiled passes are set aside, then put back
        passes = run.student_forward, run.teacher_forward
        run.student_forward, run.teacher_forward = run.student, None
        eager_seconds = _time_steps(run, warmup, steps)
        run.student_forward, run.teacher_forward = passes
        mark = dynamo_mark()
    train_seconds = _time_steps(run, warmup, steps)
    if compiled:
        compiled_report = compile_report(mark)

    denoise = run.denoiser(run.eval_ema)
    sigma = torch.full((batch,), recipe.consistency.sigma_max, device=device)
    z = torch.randn((batch, *shape), device=device)
    y = torch.randint(0, num_classes, (batch,), device=device) if num_classes else None
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16"):
        for _ in range(warmup):
            denoise(sigma[:, None, None, None] * z, sigma, y)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            denoise(sigma[:, None, None, None] * z, sigma, y)
        _sync(device)
    sample_seconds = time.perf_counter() - start

    gflop = forward_gflop_per_image(run.eval_ema, shape, num_classes, device)
    train_ips = steps * batch / train_seconds
    sample_ips = steps * batch / sample_seconds
    result = {
        "network": recipe.components["network"].name,
        "parameters": sum(p.numel() for p in run.student.parameters()),
        "device": run.provenance["device"],
        "precision": run.precision,
        "compile": compiled,
        "batch": batch,
        "steps": steps,
        "train_img_per_s": train_ips,
        **({"eager_train_img_per_s": steps * batch / eager_seconds, **compiled_report} if compiled else
           NOT_COMPILED),
        "sample_img_per_s": sample_ips,
        "forward_gflop_per_image": gflop,
        "train_tflop_per_s": train_ips * network_passes(run) * gflop / 1e3,
        "sample_tflop_per_s": sample_ips * gflop / 1e3,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_host_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if profile is not None:
        result["profile"] = profile_run(run, batch, profile)
    return result


def _with_batch(recipe: Recipe, batch: int) -> Recipe:
    import attrs

    return attrs.evolve(recipe, training=attrs.evolve(recipe.training, batch_size=batch))


# ------------------------------------------------------------------------------------- ctcore bench --profile

PROFILE_STEPS = 3
"""Training steps `ctcore bench --profile` traces (after the timed ones, so all are warm), then one one-step
sampling batch."""

TOP_OPS = 15
"""Operators listed by self time."""


def profile_trace_path(folder: Path, recipe_path: Path) -> Path:
    """The new trace file `ctcore bench --profile FOLDER` will write: FOLDER/bench-<recipe>-<YYYYmmdd-HHMMSS>-<pid>
    .pt.trace.json (-2, -3, ... when this process wrote one in the same second), so an earlier trace is never
    replaced. Refuses (UsageError, before any work) a FOLDER that is a file, lies under a file, or would be made
    in a folder this process cannot write; nothing is created until the trace is written."""
    from ctcore.errors import UsageError

    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--profile {str(folder)!r} is a file; give a folder for the trace (it is created if "
                         "missing)")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--profile {str(folder)!r}: {str(existing)!r} is a file, not a folder; give another "
                         "folder for the trace")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--profile {str(folder)!r}: cannot write in {str(existing)!r} (permission denied); give "
                         "another folder for the trace")
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in recipe_path.stem) or "recipe"
    base = f"bench-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    trace, n = folder / f"{base}.pt.trace.json", 1
    while trace.exists():  # only this process can have written this name (its pid), one at a time
        n += 1
        trace = folder / f"{base}-{n}.pt.trace.json"
    return trace


def profiler_activities(device: torch.device) -> list[Any]:
    """What torch.profiler records: CPU operators always, CUDA kernels on a CUDA device."""
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def profile_run(run: Any, batch: int, trace: Path, steps: int = PROFILE_STEPS, top: int = TOP_OPS) -> dict[str, Any]:
    """Trace `steps` training steps and one one-step sampling batch of a built (warm) run with torch.profiler,
    write the Chrome trace (TensorBoard's profiler plugin and Perfetto open it) to `trace` atomically, and
    return the `top` operators by self time: device time on CUDA, CPU time otherwise. User annotations
    (ctcore::train_step, ctcore::sample) mark the steps in the trace and are not listed."""
    from torch.autograd import DeviceType
    from torch.profiler import profile, record_function

    from ctcore.files import atomic_write
    from ctcore.training import train_step

    device = run.device
    sample = _one_step_sampling(run, batch)
    with profile(activities=profiler_activities(device), record_shapes=True) as prof:
        for _ in range(steps):
            with record_function("ctcore::train_step"):
                train_step(run)
        with record_function("ctcore::sample"):
            sample()
        _sync(device)
    with atomic_write(trace) as tmp:
        prof.export_chrome_trace(str(tmp))
    on_device = device.type == "cuda"
    ops = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU and not e.is_user_annotation]

    def self_time(e: Any) -> float:
        return e.self_device_time_total if on_device else e.self_cpu_time_total

    total = sum(self_time(e) for e in ops) or 1.0
    rows = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "self_device_ms": e.self_device_time_total / 1e3 if on_device else None,
             "self_percent": 100 * self_time(e) / total}
            for e in sorted(ops, key=self_time, reverse=True)[:top]]
    return {"trace": str(trace), "steps": steps, "sample_batches": 1,
            "sorted_by": "self device time" if on_device else "self CPU time", "top_ops": rows}


def _one_step_sampling(run: Any, batch: int) -> Callable[[], torch.Tensor]:
    """One batch of one-step sampling from the eval EMA at sigma_max, as the benchmark times it."""
    shape, num_classes, device = run.data.shape, run.data.num_classes, run.device
    denoise = run.denoiser(run.eval_ema)
    sigma = torch.full((batch,), run.recipe.consistency.sigma_max, device=device)
    z = torch.randn((batch, *shape), device=device)
    y = torch.randint(0, num_classes, (batch,), device=device) if num_classes else None

    def sample() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16"):
            return denoise(sigma[:, None, None, None] * z, sigma, y)

    return sample


# ------------------------------------------------------------------------------- memory of a training step


def measure_step_memory(build: Callable[[], Any], steps: int = 3) -> dict[str, int]:
    """Bytes the tensors of a training step hold, measured on the last of `steps` steps of the run `build()`
    makes (the first steps create the gradients and the optimizer moments): `before` the step and its `peak`.

    On CUDA: torch.cuda.memory_allocated and max_memory_allocated. Elsewhere: torch.profiler's record of every
    allocation and free of torch's CPU allocator (profile_memory), summed in time order from before the build.
    Both count what tensors hold, not the allocator's rounding and caching nor what libraries allocate outside
    torch's allocator (a process's RSS is higher: docs/performance.md). On CPU an allocation made by a worker
    thread is not recorded: measure with run.threads = 1.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from ctcore.training import train_step

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run = build()
        for step in range(steps):
            if step == steps - 1 and run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
                torch.cuda.reset_peak_memory_stats(run.device)
                before = torch.cuda.memory_allocated(run.device)
            with record_function("ctcore::measured_step" if step == steps - 1 else "ctcore::step"):
                train_step(run)
        _sync(run.device)
    if run.device.type == "cuda":
        return {"before": before, "peak": torch.cuda.max_memory_allocated(run.device)}
    events = prof.profiler.kineto_results.events()  # the raw records: one per allocation and free
    [(start, end)] = [(e.start_ns(), e.end_ns()) for e in events if e.name() == "ctcore::measured_step"]
    changes = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live, before, peak = 0, None, 0
    for time_ns, nbytes in changes:
        if time_ns >= start and before is None:
            before = peak = live
        live += nbytes
        if start <= time_ns <= end:
            peak = max(peak, live)
    return {"before": before if before is not None else live, "peak": max(peak, before or live)}
