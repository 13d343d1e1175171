"""CUDA-only checks of the GPU fast path; skipped without a GPU (CI has none). Run on a GPU with `pytest -m gpu`."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_recipe

import ctcore
from ctcore.build import build_run
from ctcore.consistency import consistency_loss, karras_sigmas, shared_rng
from ctcore.recipe import read_recipe
from ctcore.training import train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_run(tmp_path: Path, **overrides):
    registry = ctcore.load_registry()
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "o", run={"device": "cuda"}, **overrides),
                         registry)
    return build_run(recipe, registry)


def test_cuda_defaults_bf16_tf32_and_device_generators(tmp_path: Path) -> None:
    run = _cuda_run(tmp_path)
    assert run.precision == "bf16" and torch.backends.cuda.matmul.allow_tf32
    assert run.index_generator.device.type == run.noise_generator.device.type == "cuda"
    assert run.data.images.device.type == "cuda"  # the whole dataset lives on the GPU


@pytest.mark.parametrize("check", ["off", "deferred"])
def test_a_training_step_never_synchronizes_with_the_host(tmp_path: Path, check: str) -> None:
    """With the non-finite check off, or deferred as train() runs it (the flag stays on the device), nothing in a
    step waits for the GPU."""
    run = _cuda_run(tmp_path, training={"max_nonfinite_steps": 0 if check == "off" else 10})
    if check == "deferred":
        run.nonfinite_flag = torch.zeros((), dtype=torch.bool, device=run.device)
    train_step(run)  # first step: allocations, sigma grid, optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train_step(run)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_non_finite_check_is_the_only_sync_in_a_step(tmp_path: Path) -> None:
    """With the check on (the default) a step reads exactly one scalar back: the finite flag."""
    run = _cuda_run(tmp_path)
    train_step(run)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_step(run)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


class MaskRecorder(torch.nn.Module):
    noise_conditioning = "fourier"

    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)
        self.masks: list[torch.Tensor] = []

    def forward(self, x, c_noise, labels):
        out = self.drop(torch.ones_like(x))
        self.masks.append(out != 0)
        return out * 0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_student_and_teacher_share_the_cuda_dropout_mask(compiled: bool) -> None:
    device = torch.device("cuda")
    net = MaskRecorder().to(device).train()
    fn = torch.compile(net) if compiled else net
    metric = ctcore.load_registry().create("metric", "l2")
    sigmas = karras_sigmas(11).to(device)
    x = torch.zeros(16, 3, 8, 8, device=device)
    pair = torch.randint(0, 10, (16,), device=device)
    if compiled:  # masks cannot be recorded inside a compiled graph: compare the two passes' outputs instead
        with shared_rng(device):
            a = fn(x, torch.zeros(16, device=device), None)
        b = fn(x, torch.zeros(16, device=device), None)
        assert torch.equal(a, b)
        return
    consistency_loss(fn, fn, metric, x, None, sigmas, pair, torch.randn_like(x), weighting="uniform")
    student_mask, teacher_mask = net.masks
    assert torch.equal(student_mask, teacher_mask) and 0 < student_mask.float().mean() < 1


def test_fused_and_foreach_optimizers_step_on_cuda(tmp_path: Path) -> None:
    for optimizer in ("adam", "radam"):
        run = _cuda_run(tmp_path / optimizer, training={"optimizer": optimizer})
        before = [p.detach().clone() for p in run.student.parameters()]
        train_step(run)
        assert any(not torch.equal(a, p) for a, p in zip(before, run.student.parameters(), strict=True))
