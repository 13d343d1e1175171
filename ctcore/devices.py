"""The machine a run uses: which device, whether to compile, which optimizer kernels."""

from __future__ import annotations

import inspect

import torch

from ctcore.errors import UsageError


def resolve_device(choice: str) -> torch.device:
    """run.device resolved: "auto" is CUDA when available, else CPU; "cuda" without CUDA is a usage error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError('run.device is "cuda" but no CUDA device is available; use "auto" or "cpu"')
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


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
