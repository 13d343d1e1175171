"""How much memory a device has free, so that sizes that cannot fit are refused with their numbers before any
allocation (a dataset today; network and sample-buffer estimates can use the same two functions)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from ctcore.errors import RunError, UsageError
from ctcore.files import human_bytes

LIMIT_ENV = "CTCORE_MEMORY_LIMIT"
"""Bytes to assume free on any device instead of asking the system (tests, and shared machines)."""

_MEMINFO = Path("/proc/meminfo")
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def _limit_override() -> int | None:
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text:
        return None
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"{LIMIT_ENV} must be a whole number of bytes (e.g. 8000000000), got {text!r}; "
                         f"fix it or unset it")
    return value


def _host_available() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free pages from os.sysconf; capped by a container's limit."""
    available = None
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024  # reported in kB
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return sys.maxsize  # unknown: refuse nothing
    for limit_file in _CGROUP_LIMITS:  # a container's limit can be far below the host's free memory
        with contextlib.suppress(OSError, ValueError):  # absent, or "max" (no limit)
            available = min(available, int(limit_file.read_text().strip()))
    return available


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free for new allocations on `device`: $CTCORE_MEMORY_LIMIT when set; for CUDA the device's free
    memory (torch.cuda.mem_get_info); for any other device the host's."""
    override = _limit_override()
    if override is not None:
        return override
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return _host_available()


def require_memory(nbytes: int, device: torch.device | str, what: str, fix: str) -> None:
    """Refuse, with the numbers, `nbytes` that exceed the memory available on `device`.

    The message reads "{what} = 2.8 TiB, more than the 21.3 GiB of memory available; {fix}".
    """
    available = available_memory(device)
    if nbytes <= available:
        return
    device = torch.device(device)
    if os.environ.get(LIMIT_ENV, "").strip():
        where = f"of memory available ({LIMIT_ENV})"
    elif device.type == "cuda":
        where = f"free on {device}"
    else:
        where = "of memory available"
    raise RunError(f"{what} = {human_bytes(nbytes)}, more than the {human_bytes(available)} {where}; {fix}")
