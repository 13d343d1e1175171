"""available_memory and require_memory: what ctcore assumes is free, and the one-line refusal with the numbers; and
the estimate of a training step's memory against its measured peak (attention counted as torch runs it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ctcore import memory
from ctcore.errors import RunError, UsageError
from ctcore.memory import LIMIT_ENV, available_memory, require_memory


@pytest.fixture
def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """/proc/meminfo and the cgroup limit files replaced by files in tmp_path (meminfo written by the test)."""
    monkeypatch.setattr(memory, "_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(memory, "_CGROUP_LIMITS", (tmp_path / "memory.max", tmp_path / "limit_in_bytes"))
    return tmp_path


def test_host_memory_is_mem_available_capped_by_a_container_limit(fake_host: Path) -> None:
    (fake_host / "meminfo").write_text("MemTotal:       32000 kB\nMemFree:  100 kB\nMemAvailable:   20000 kB\n")
    assert available_memory("cpu") == 20000 * 1024
    (fake_host / "memory.max").write_text("max\n")  # cgroup v2 without a limit
    assert available_memory() == 20000 * 1024
    (fake_host / "limit_in_bytes").write_text("1000000\n")  # cgroup v1 limit below MemAvailable
    assert available_memory(torch.device("cpu")) == 1_000_000


def test_without_meminfo_the_free_pages_from_sysconf_count(fake_host: Path) -> None:
    if not hasattr(os, "sysconf") or "SC_AVPHYS_PAGES" not in os.sysconf_names:
        pytest.skip("no SC_AVPHYS_PAGES on this system")
    pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    assert abs(available_memory() - pages * size) < 256 * 1024 * 1024  # free memory moves a little in between


def test_the_real_host_memory_is_positive_and_at_most_physical_memory() -> None:
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < available_memory() <= total


def test_cuda_memory_is_the_device_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (asked.append(device) or (123, 456)))
    assert available_memory("cuda:1") == 123 and asked == [torch.device("cuda:1")]
    with pytest.raises(RunError) as info:
        require_memory(124, "cuda:1", "the thing = 3 x 41", "make it smaller")
    assert info.value.message == "the thing = 3 x 41 = 124 B, more than the 123 B free on cuda:1; make it smaller"
    require_memory(123, "cuda:1", "fits exactly", "")


def test_the_environment_overrides_every_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("CUDA was asked"))
    monkeypatch.setenv(LIMIT_ENV, "3_000_000_000")
    assert available_memory("cpu") == available_memory("cuda") == 3_000_000_000
    with pytest.raises(RunError) as info:
        require_memory(5 * 2**40, "cpu", "a dataset", "use less")
    assert info.value.message == ("a dataset = 5.0 TiB, more than the 2.8 GiB of memory available "
                                  "(CTCORE_MEMORY_LIMIT); use less")


@pytest.mark.parametrize("value", ["lots", "-5", "1.5e9", "8G"])
def test_a_bad_override_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(LIMIT_ENV, value)
    with pytest.raises(UsageError) as info:
        available_memory()
    assert info.value.message == (f"CTCORE_MEMORY_LIMIT must be a whole number of bytes (e.g. 8000000000), got "
                                  f"{value!r}; fix it or unset it")


# ------------------------------------------------------------------------ run.threads under a memory limit


def test_threads_that_do_not_fit_an_address_space_limit_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    """`ctcore run --set run.threads=512` in a process limited to 6 GiB of address space (RLIMIT_AS, as `ulimit -v`
    sets it): 512 torch threads take about 9 GiB (two OS threads of 8 MiB stack each, and malloc arenas), so the run
    is refused before any thread starts, exit 2, no run directory. Without the check the threads started and the
    next allocation failed, inside the error handler too: a traceback."""
    import re
    import resource
    import subprocess
    import sys

    from helpers import write_tiny_recipe

    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))

    proc = subprocess.run([sys.executable, "-m", "ctcore", "run", str(recipe), "--set", "run.threads=512",
                           "--no-progress"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          preexec_fn=limit)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert re.fullmatch(r"error: run\.threads 512: 512 CPU threads need about [\d.]+ GiB more address space, more "
                        r"than half the [\d.]+ GiB this process may still use \(its limit, ulimit -v, is 6\.0 GiB; "
                        r"the run needs the rest\); set run\.threads to at most \d+, or raise the limit\n",
                        proc.stderr), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


@pytest.mark.parametrize(("limits", "threads", "message"), [
    ((4 << 30, 1 << 30, None, 8 << 20), 200, "run.threads 200: 200 CPU threads need about 4.1 GiB more address space, "
                                             "more than half the 3.0 GiB this process may still use (its limit, ulimit "
                                             "-v, is 4.0 GiB; the run needs the rest); set run.threads to at most 33, "
                                             "or raise the limit"),
    ((None, 0, 100, 8 << 20), 64, "run.threads 64: 64 CPU threads start about 128 OS threads, more than this user "
                                  "may run (ulimit -u 100); set run.threads to at most 50, or raise the limit"),
], ids=["address-space", "processes"])
def test_a_thread_count_the_limits_refuse_is_one_line_naming_the_largest_that_fits(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, limits: tuple, threads: int, message: str) -> None:
    """The limits as the process reads them (ulimit -v and -u, the address space in use, the stack size), on a
    2-CPU machine; through `ctcore run`: one line, exit 2, nothing written. The count named fits: 33 threads (32
    more than the test's one) take 1.5 GiB, half the 3 GiB left."""
    from helpers import one_line_error, write_tiny_recipe
    from typer.testing import CliRunner

    from ctcore import devices
    from ctcore.cli import app

    monkeypatch.setattr(devices, "_limits", lambda: limits)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert devices._thread_space(32, 8 << 20) == 64 * (8 << 20) + 16 * (64 << 20) == 3 << 29  # 1.5 GiB
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run")
    result = CliRunner().invoke(app, ["run", str(recipe), "--set", f"run.threads={threads}", "--no-progress"])
    assert one_line_error(result) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


def test_torch_refusing_the_thread_count_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from helpers import one_line_error, write_tiny_recipe
    from typer.testing import CliRunner

    from ctcore.cli import app

    def refuse(n: int) -> None:
        raise RuntimeError(f"cannot start {n} threads: Resource temporarily unavailable\nmore detail")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run")
    result = CliRunner().invoke(app, ["run", str(recipe), "--set", "run.threads=3", "--no-progress"])
    assert one_line_error(result) == ("run.threads 3: torch cannot use 3 CPU threads here (cannot start 3 threads: "
                                      "Resource temporarily unavailable); set a smaller run.threads, or 0 (automatic)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 15360000 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["MemoryError", "torch-cpu-allocator"])
def test_running_out_of_memory_is_one_line_even_when_the_error_handler_runs_out_too(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Exception) -> None:
    """Memory ran out (threads took the address space, `ulimit -v`) and the handler's plugin check, which loads the
    registry, runs out as well: one plain line, exit 1, not a traceback of the handler."""
    from helpers import one_line_error, write_tiny_recipe
    from typer.testing import CliRunner

    import ctcore.build
    import ctcore.preflight
    from ctcore.cli import app

    def out_of_memory(*_args: object, **_kwargs: object) -> None:
        raise error

    def handler_out_of_memory(*_args: object, **_kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(ctcore.build, "build_run", out_of_memory)
    monkeypatch.setattr(ctcore.preflight, "plugin_failure", handler_out_of_memory)
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run")
    result = CliRunner().invoke(app, ["run", str(recipe), "--no-progress"])
    assert one_line_error(result, 1) == (
        "out of memory (MemoryError): the process reached the memory it may use; free some memory or raise its limit "
        "(ulimit -v), or ask for less (a smaller batch, fewer samples or images, fewer run.threads)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


# ------------------------------------------------------------------- the estimate against the measured peak

B, H, T, D = 2, 4, 256, 32
"""Batch, heads, tokens and channels per head of the attention the estimate counts below."""


def _attention_kept(half: bool, strided: bool = False, **options: object) -> int:
    """Bytes preflight counts as kept for backward by one scaled_dot_product_attention of meta q, k and v."""
    import torch.nn.functional as F

    from ctcore.preflight import _saved_bytes

    shape = (B, H, D, T) if strided else (B, H, T, D)
    q, k, v = (torch.zeros(shape, device="meta", requires_grad=True) for _ in range(3))
    if strided:  # (B, H, T, D) views whose last dimension is not contiguous, as NCSN++ makes them
        q, k, v = q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
    _, kept, fixed = _saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, **options), torch.nn.Linear(1, 1),
                                  half)
    assert fixed == 0
    return kept


def test_attention_is_counted_as_the_fused_kernels_keep_it_where_they_run() -> None:
    """q, k, v, the output and one float32 log-sum-exp per query (flash attention on CPU and CUDA, memory-efficient
    attention on CUDA); under bf16 autocast every float32 tensor counts as its bfloat16 copy. On the meta device
    torch takes the math path, which keeps the T x T attention weights: the estimate counted those before."""
    qkvo = 4 * B * H * T * D
    assert _attention_kept(half=False) == (qkvo + B * H * T) * 4 == 1_056_768
    assert _attention_kept(half=True) == (qkvo + B * H * T) * 2


@pytest.mark.parametrize("call", [{"strided": True}, {"attn_mask": "mask"}, {"dropout_p": 0.1}, {"math": True}],
                         ids=["last-dim-not-contiguous", "mask", "dropout", "fused-kernels-off"])
def test_attention_no_fused_kernel_takes_keeps_the_math_paths_count_in_float32(call: dict) -> None:
    """The math path keeps the attention weights (T x T per head) and the scaled q and k and v, in float32 even
    under bf16 autocast (torch's math attention computes in float32)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    options = dict(call)
    if options.pop("math", False):
        with sdpa_kernel([SDPBackend.MATH]):
            kept = {half: _attention_kept(half) for half in (False, True)}
    else:
        if options.get("attn_mask") == "mask":
            options["attn_mask"] = torch.ones(T, T, dtype=torch.bool, device="meta")
        kept = {half: _attention_kept(half, **options) for half in (False, True)}
    weights = B * H * T * T * 4
    if "dropout_p" in options:  # and the dropout mask and the weights before dropout
        assert kept[False] == kept[True] > 3 * weights
    else:
        assert kept[False] == kept[True] == weights + 3 * B * H * T * D * 4 == 2_883_584


def test_an_adm_with_attention_at_full_resolution_is_estimated_within_a_quarter_of_its_measured_peak() -> None:
    """The training step of ict_imagenet64's ADM at 32x32 and 16 channels, with attention at 32x32 (1,024
    tokens): the estimate is within 25 % of the peak of its tensors, measured on CPU (torch.profiler's allocation
    records, ctcore.bench.measure_step_memory). Counting the math path's attention weights made it 2.0x."""
    import dataclasses
    import math

    from helpers import REPO_ROOT

    from ctcore.bench import measure_step_memory
    from ctcore.build import build_run
    from ctcore.data import ImageData, data_shape
    from ctcore.preflight import preflight
    from ctcore.recipe import read_recipe
    from ctcore.registry import load_registry

    registry = load_registry()
    recipe = read_recipe(REPO_ROOT / "recipes" / "ict_imagenet64.toml", registry, [
        "run.device=cpu", "run.threads=1", "data.source=synthetic", "data.path=''", "data.resolution=32",
        "data.num_images=16", "data.num_classes=0", "network.model_channels=16", "network.channel_mult=[1,2]",
        "network.num_res_blocks=1", "network.attention_resolutions=[32,16]", "network.num_head_channels=8",
        "network.num_groups=4", "training.batch_size=4"])
    shape = data_shape(recipe.data)
    images = torch.randint(0, 256, (16, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    m = preflight(recipe, registry, device=torch.device("cpu")).memory
    estimate = dataclasses.replace(m, data=16 * (math.prod(shape) + 8), host_staging=0, samples=0, evaluation=0,
                                   host_evaluation=0).peak(True)
    measured = measure_step_memory(lambda: build_run(recipe, registry, data=ImageData(images, None)))
    # before the step the measurement sees the estimate's static parts (the images were made before it began),
    # and RAdam's step counters and the objective's sigma grid (a few hundred bytes)
    assert 0 < measured["before"] - (m.weights + m.eval_ema + m.gradients + m.optimizer) < 1024
    assert 0.75 < estimate / measured["peak"] < 1.25, (estimate, measured)
