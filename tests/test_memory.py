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
