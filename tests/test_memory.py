"""available_memory and require_memory: what ctcore assumes is free, and the one-line refusal with the numbers."""

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
