"""`ctcore bench`: the recipe's real training step and one-step sampling on random data, timed.

Reports train and sample img/s, forward GFLOP per image (torch's flop counter), achieved TFLOP/s and peak
memory. A training step costs about 4 forward passes per image: the student's forward and backward (~3x) plus
the teacher's forward.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch

from ctcore.consistency import c_noise, noise_convention
from ctcore.data import ImageData, data_shape
from ctcore.recipe import Recipe
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
              warmup: int = 2) -> dict[str, Any]:
    """Time `steps` training steps and `steps` one-step sampling batches after `warmup` of each.

    With training.compile the same steps run eagerly first (eager_train_img_per_s), then compiled: the first
    compiled step compiles (keep warmup >= 1), and compile_report says what torch.compile did over all compiled
    steps."""
    import dataclasses
    import math

    from ctcore.build import build_run
    from ctcore.preflight import preflight, require_buffers

    batch = batch or recipe.training.batch_size
    recipe = _with_batch(recipe, batch)
    shape = data_shape(recipe.data)
    num_classes = recipe.data.num_classes
    device_probe = torch.device("cuda" if torch.cuda.is_available() and recipe.run.device != "cpu" else "cpu")
    # the random images and one step at --batch must fit before either is allocated (estimated at batch 1, so
    # that an absurd --batch is refused here, naming --batch)
    memory = preflight(_with_batch(recipe, 1), registry).memory
    memory = dataclasses.replace(memory, batch=batch, data=0, host_staging=0)
    on_cpu = device_probe.type == "cpu"
    require_buffers({"training": memory.peak(on_cpu), "images": max(2 * batch, 16) * (math.prod(shape) + 8)},
                    device_probe, f"bench --batch {batch:,}", "choose a smaller --batch")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(2 * batch, 16), *shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, max(num_classes, 1), (images.shape[0],), generator=g)
    data = ImageData(images, labels if num_classes else None, num_classes=num_classes, device=device_probe)
    run = build_run(recipe, registry, data=data)
    device = run.device
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
    return result


def _with_batch(recipe: Recipe, batch: int) -> Recipe:
    import attrs

    return attrs.evolve(recipe, training=attrs.evolve(recipe.training, batch_size=batch))
