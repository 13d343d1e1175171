"""A training step inside `train` reads nothing back from the device: no .item(), float() or bool() of a tensor, no
Python branch on a tensor's value, no shape that depends on values, no tensor made from Python data. Each of these
waits for a GPU; on CPU the profiler still records them as aten ops (READS), so the CPU trace of the steps must hold
none of them outside the allow-list:

- inside `Optimizer.step#...`: torch's single-tensor Adam and RAdam (the CPU default) read their step counter,
  which torch keeps on the host unless the optimizer is capturable or fused; on CUDA, RAdam runs foreach with that
  same host counter and Adam its fused kernel with the counter on the device, so neither waits for the GPU there.

What a CPU trace cannot show (.tolist(), .numpy() and .cpu() of a CPU tensor are no ops; copies between host and
device) is checked on CUDA by tests/test_gpu.py; docs/concepts.md ("One training step") lists what remains and why.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
from helpers import DIFFUSION, ECT, tiny_cd, train_tiny_diffusion, write_tiny_recipe
from torch.profiler import ProfilerActivity, profile, record_function

import ctcore.training
from ctcore.build import build_run
from ctcore.recipe import read_recipe
from ctcore.training import train

READS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::nonzero",
         "aten::masked_select", "aten::unique", "aten::_unique2", "aten::repeat_interleave", "aten::lift_fresh"}
"""Ops that read tensor values into Python, or whose output shape depends on them, or that make a tensor from
Python data (on a GPU: a host-to-device copy that waits)."""
ALLOWED_UNDER = "Optimizer.step#"
"""The optimizers' step counters: host tensors (see the module docstring)."""

LONG = {"total_steps": 1_000_000, "log_every": 1_000_000, "sample_every": 1_000_000,
        "checkpoint_every": 1_000_000}
"""No log line, sample grid or checkpoint falls inside the profiled steps, and the curriculum's N(k) stays put."""

NCSNPP = {"name": "ncsnpp", "nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [2],
          "dropout": 0.1}
ADM = {"name": "adm", "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
       "attention_resolutions": [2], "num_head_channels": 8, "num_groups": 8, "dropout": 0.1}

VARIANTS = {
    "ict": {},  # no-ema teacher, lognormal pairs, exponential curriculum, pseudo-huber, RAdam, dropout
    "ct": {"teacher": {"name": "ema", "mu0": 0.9}, "noise_schedule": {"name": "uniform"},
           "curriculum": {"name": "ct"}, "metric": {"name": "l2"}},
    "ect": ECT,
    "edm": DIFFUSION,
    "adam, clip, warmup, bf16": {"training": {"optimizer": "adam", "grad_clip": 1.0, "warmup_steps": 100,
                                              "precision": "bf16"}},
    "check off": {"training": {"max_nonfinite_steps": 0}},
    "micro-batches": {"training": {"micro_batch_size": 2}},  # 4 passes over the batch of 8, generators reset
    "ncsnpp": {"network": NCSNPP},
    "adm": {"network": ADM},
}


def _reads(prof: profile) -> tuple[list[str], int]:
    """(the reads inside a train_step scope outside the allow-list, each as 'op under scope < scope < ...' (the
    outermost read op of a chain such as is_nonzero > item > _local_scalar_dense), and how many the allow-list
    took)."""
    found, allowed = [], 0
    for event in prof.events():
        if event.name not in READS:
            continue
        scopes, parent = [], event.cpu_parent
        while parent is not None:
            scopes.append(parent.name)
            parent = parent.cpu_parent
        if "train_step" not in scopes or any(s in READS for s in scopes):
            continue
        if any(s.startswith(ALLOWED_UNDER) for s in scopes):
            allowed += 1
        else:
            found.append(f"{event.name} under {' < '.join(scopes[:4])}")
    return found, allowed


def _profiled_train(run, steps: int, monkeypatch: pytest.MonkeyPatch) -> profile:
    """The profile of train(run) over `steps` more steps, each train_step call in a scope named train_step. The
    sample grid and the checkpoint that end every train() call are left out (they read, once per call, and their
    events would only slow the trace down)."""
    real = ctcore.training.train_step

    def scoped(run):
        with record_function("train_step"):
            return real(run)

    with monkeypatch.context() as m:
        m.setattr(ctcore.training, "train_step", scoped)  # train() calls train_step through its module
        m.setattr(ctcore.training, "save_samples", lambda run: None)
        m.setattr(ctcore.training, "save_checkpoint", lambda run: run.out_dir / "checkpoints" / "left-out.pt")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train(run, stop_at=run.step + steps, progress=False)
    return prof


def _outside_optimizer(prof: profile) -> int:
    """Values read anywhere in the trace (aten::_local_scalar_dense ends every read), outside the allow-list."""
    return sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense" and not _under(e, ALLOWED_UNDER))


def _warm_run(tmp_path: Path, registry, overrides: dict):
    """A tiny run (with `overrides`) after its first two steps, which make the optimizer state and the sigma grid."""
    overrides = dict(overrides)
    overrides["training"] = {**LONG, **overrides.get("training", {})}
    recipe = read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", **overrides), registry)
    run = build_run(recipe, registry, tmp_path / "run")
    train(run, stop_at=2, progress=False)
    return run


@pytest.mark.parametrize("name", list(VARIANTS) + ["cd"])
def test_a_step_inside_train_reads_nothing_back_from_the_device(tmp_path: Path, registry, monkeypatch, name):
    overrides = tiny_cd(train_tiny_diffusion(tmp_path / "diffusion")) if name == "cd" else VARIANTS[name]
    run = _warm_run(tmp_path, registry, overrides)
    found, allowed = _reads(_profiled_train(run, 1, monkeypatch))
    assert found == [], collections.Counter(found)
    assert allowed > 0  # the profiler does see reads: the optimizers' host step counters
    assert run.nonfinite_flag is None  # train_step called alone checks each step again


def test_train_reads_from_the_device_per_call_not_per_step(tmp_path: Path, registry, monkeypatch) -> None:
    """Outside the optimizers' host counters, train() reads at its log, sample, checkpoint and stop points only
    (the loss sum, the non-finite flag), never per step: 1 step and 4 steps to the same kind of end read the same
    number of values."""
    run = _warm_run(tmp_path, registry, {})
    one, four = _profiled_train(run, 1, monkeypatch), _profiled_train(run, 4, monkeypatch)
    assert _outside_optimizer(one) == _outside_optimizer(four) > 0
    assert run.step == 7


def _under(event, prefix: str) -> bool:
    """Whether a profiler event ran inside a scope whose name starts with `prefix`."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False
