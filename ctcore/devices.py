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


OS_THREADS_PER_THREAD = 2
"""OS threads per torch CPU thread (measured with torch 2.13, OpenMP, on Linux: 128 in the process after
torch.set_num_threads(64) and a matmul)."""
MALLOC_ARENA = 64 << 20
"""Address space glibc reserves for each malloc arena; a process gets up to 8 per CPU, one per thread that needs
one. With an 8 MiB stack per OS thread this predicts the measured growth of the process (torch 2.13 on 2 CPUs:
1.2 GiB for 16 threads, 2.0 GiB for 64, 9.1 GiB for 512)."""


def _limits() -> tuple[int | None, int, int | None, int]:
    """(the address-space limit (ulimit -v) or None, the address space in use, the process limit (ulimit -u) or
    None, the stack size of a new thread); (None, 0, None, 0) where they cannot be read (off Linux)."""
    try:
        import resource

        space, procs, stack = (resource.getrlimit(r)[0] for r in (resource.RLIMIT_AS, resource.RLIMIT_NPROC,
                                                                   resource.RLIMIT_STACK))
        with open("/proc/self/status", encoding="ascii") as status:
            used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration, ValueError):
        return None, 0, None, 0
    unlimited = resource.RLIM_INFINITY
    return (None if space == unlimited else space, used, None if procs == unlimited else procs,
            8 << 20 if stack == unlimited else stack)


def _thread_space(threads: int, stack: int) -> int:
    """Address space `threads` more torch CPU threads take: their OS threads' stacks and malloc arenas."""
    os_threads = max(0, threads) * OS_THREADS_PER_THREAD
    return os_threads * stack + min(os_threads, 8 * (os.cpu_count() or 1)) * MALLOC_ARENA


def check_threads(setting: int) -> int:
    """The thread count run.threads resolves to, refused (UsageError) where this process cannot start that many
    threads: they would not fit its address-space limit (ulimit -v), or this user may not run that many threads
    (ulimit -u). torch starts its threads at its first parallel operation, where running out fails anywhere (a
    MemoryError in a later allocation, or libgomp ending the process), so this is checked beforehand. The threads
    may take half the address space left: the run needs the rest."""
    from ctcore.files import human_bytes

    n, now = resolve_threads(setting), torch.get_num_threads()
    if n <= now:
        return n
    space, used, procs, stack = _limits()
    what = f"run.threads {setting}" + (f" ({n} here)" if setting == 0 else "")
    if space is not None and _thread_space(n - now, stack) > (space - used) // 2:
        free = max(0, space - used)
        fits = max([k for k in range(1, n) if _thread_space(k - now, stack) <= free // 2], default=1)
        raise UsageError(f"{what}: {n:,} CPU threads need about {human_bytes(_thread_space(n - now, stack))} more "
                         f"address space, more than half the {human_bytes(free)} this process may still use (its "
                         f"limit, ulimit -v, is {human_bytes(space)}; the run needs the rest); set run.threads to at "
                         f"most {fits:,}, or raise the limit")
    if procs is not None and n * OS_THREADS_PER_THREAD > procs:
        raise UsageError(f"{what}: {n:,} CPU threads start about {n * OS_THREADS_PER_THREAD:,} OS threads, more "
                         f"than this user may run (ulimit -u {procs:,}); set run.threads to at most "
                         f"{max(1, procs // OS_THREADS_PER_THREAD):,}, or raise the limit")
    return n


def use_threads(setting: int) -> int:
    """Set torch's CPU thread count (torch.set_num_threads) from run.threads; returns the count. It is
    process-wide: CPU results are deterministic for a given count, not across counts. A count this process
    cannot start (check_threads), or one torch refuses, is one UsageError."""
    n = check_threads(setting)
    if torch.get_num_threads() != n:
        try:
            torch.set_num_threads(n)
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise UsageError(f"run.threads {setting}: torch cannot use {n:,} CPU threads here "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); set a smaller "
                             "run.threads, or 0 (automatic)") from None
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


COMPILE_BACKEND: str = "inductor"
"""The torch.compile backend of training.compile. Graph breaks and recompiles are dynamo's decisions, taken before
any backend runs, so tests that count them switch this to a cheap one ("eager", "aot_eager")."""


def compile_pass(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile of one way the training step calls a network (the student's pass with gradients, the teacher's
    pass under no_grad), with cache entries of its own (`isolate_recompiles`).

    dynamo keys its cache on the code object (every module's `forward`) and guards on the grad mode, so a no-grad
    pass of the student through the student's own wrapper failed that guard and recompiled it in the first step;
    each pass keeps one graph instead, and neither retraces the other.
    """
    return torch.compile(module, backend=COMPILE_BACKEND, isolate_recompiles=True)


def fast_optimizer_options(opt_cls: type, device: torch.device) -> dict[str, bool]:
    """On CUDA: the fused kernel where the optimizer has one (Adam), else multi-tensor foreach (RAdam has no
    fused implementation in torch 2.13). On CPU: torch's defaults."""
    if device.type != "cuda":
        return {}
    return {"fused": True} if "fused" in inspect.signature(opt_cls).parameters else {"foreach": True}
