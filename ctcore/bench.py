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


def run_bench(recipe: Recipe, registry: Registry, *, batch: int | None = None, steps: int = 10,
              warmup: int = 2) -> dict[str, Any]:
    """Time `steps` training steps and `steps` one-step sampling batches after `warmup` of each."""
    import dataclasses
    import math

    from ctcore.build import build_run
    from ctcore.preflight import preflight, require_buffers
    from ctcore.training import train_step

    batch = batch or recipe.training.batch_size
    recipe = _with_batch(recipe, batch)
    shape = data_shape(recipe.data)
    num_classes = recipe.data.num_classes
    device_probe = torch.device("cuda" if torch.cuda.is_available() and recipe.run.device != "cpu" else "cpu")
    # the random images and one step at --batch must fit before either is allocated (estimated at batch 1, so
    # that an absurd --batch is refused here, naming --batch)
    memory = preflight(_with_batch(recipe, 1), registry).memory
    memory = dataclasses.replace(memory, batch=batch, data=0, host_staging=0, rollback=0)  # no train(): no copy
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

    for _ in range(warmup):
        train_step(run)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(run)
    _sync(device)
    train_seconds = time.perf_counter() - start

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
        "compile": run.student_forward is not run.student,
        "batch": batch,
        "steps": steps,
        "train_img_per_s": train_ips,
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
