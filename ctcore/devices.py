"""The machine a run uses: which device, whether to compile, which optimizer kernels."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator

import torch

from ctcore.errors import UsageError


def resolve_device(choice: str) -> torch.device:
    """run.device (or --device) resolved: "auto" is CUDA when available, else CPU; "cuda" or "cuda:N" without
    that device is a usage error."""
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f'device "{choice}" (--device, else the recipe\'s run.device) needs CUDA, and this machine '
                         'has no CUDA device; use "auto" or "cpu"')
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {choice!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_threads(setting: int) -> int:
    """run.threads resolved: a positive setting as given; 0 (automatic) is half the CPUs this process may run on,
    split among the processes torchrun started on this machine, between 1 and 8.

    Half, because a busy machine is the common case (other sessions, data loading, SMT siblings counted as
    CPUs): a torch thread that has to wait for a core makes every other one spin, and on a loaded 2-core
    machine 2 threads trained the quickstart many times slower than 1 (benchmarks/bench_threads.py).
    """
    if setting > 0:
        return setting
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, min(8, cpus // (2 * processes)))


def use_threads(setting: int) -> int:
    """Set torch's CPU thread count (torch.set_num_threads) from run.threads; returns the count. It is
    process-wide: CPU results are deterministic for a given count, not across counts."""
    n = resolve_threads(setting)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def threads_restored() -> Iterator[None]:
    """Around a command run in-process: torch's thread count afterwards is what it was before."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def compile_enabled(setting: str, device: torch.device) -> bool:
    """training.compile resolved: "auto" compiles on CUDA, where it pays (NCSN++ on an H100, bf16, batch 512:
    about 850 img/s eager vs 1460 compiled, the issue's reference figures), and not on CPU, where compiling
    costs more than short runs gain."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def fast_optimizer_options(opt_cls: type, device: torch.device) -> dict[str, bool]:
    """On CUDA: the fused kernel where the optimizer has one (Adam), else multi-tensor foreach (RAdam has no
    fused implementation in torch 2.13). On CPU: torch's defaults."""
    if device.type != "cuda":
        return {}
    return {"fused": True} if "fused" in inspect.signature(opt_cls).parameters else {"foreach": True}
