"""Data-parallel training across processes started by torchrun: who this process is, and the few collectives
the training loop needs.

Every rank draws the same global batch, pair indices and noise from generators seeded by the recipe, and keeps
its contiguous share; DDP averages the gradients, so all ranks hold identical weights and agree on N(k) and on
every decision without talking. Only rank 0 writes files and shows progress. A single process (no torchrun)
is a World of size 1, and every helper here is then a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import attrs
import torch
import torch.distributed as dist

from ctcore.errors import CtcoreError, RunError, UsageError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@attrs.frozen
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs and shows progress."""
        return self.rank == 0

    def share(self, n: int, rank: int | None = None) -> slice:
        """The contiguous part of n items (a batch, a list of seeds) that `rank` (default: this one) handles."""
        r = self.rank if rank is None else rank
        return slice(r * n // self.world_size, (r + 1) * n // self.world_size)


SINGLE = World()
_control_group = None  # a gloo group for small host-side flags (the stop signal), also when training on NCCL


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's dropout generator: distinct per rank, so ranks never share masks."""
    return seed + 1_000_003 * (rank + 1)


def world_from_env() -> World:
    """The World torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK, or a single process."""
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    try:
        world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    except (KeyError, ValueError):
        found = {k: os.environ.get(k) for k in TORCHRUN_VARIABLES}
        raise UsageError(f"incomplete torchrun environment {found}: start with `torchrun ... -m ctcore run`") from None
    return world


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU) and pick this rank's device.

    Called once per process before anything is built; a second call returns the same World.
    """
    global _control_group
    world = world_from_env()
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                             "lower --nproc-per-node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
        _control_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return world, device


def shutdown(wait_for_all: bool = True) -> bool:
    """Leave the process group (end of `ctcore run` / `ctcore eval`).

    With `wait_for_all` (every rank got here the same way: finished, or stopped by a signal) the ranks first meet
    at a barrier: a rank that tears down its gloo connections while a peer still uses them can abort the peer.
    The barrier gives up after a minute, so a rank whose peers died still exits. True if there was a group.
    """
    global _control_group
    if not dist.is_initialized():
        return False
    if wait_for_all:
        with contextlib.suppress(RuntimeError):
            dist.monitored_barrier(group=_control_group, timeout=datetime.timedelta(minutes=1))
    dist.destroy_process_group()
    _control_group = None
    return True


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier(group=_control_group)


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a host-side gloo all-reduce; no GPU sync)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(t.item())


def mean_over_ranks(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (the logged loss); unchanged in a single process."""
    if not world.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world.world_size


def gather_rows(world: World, local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's `world.share(total)` rows, in rank order, on every rank.

    Shares may differ by one row, so each is padded to the largest before the all-gather and trimmed after.
    """
    if not world.distributed:
        return local
    sizes = [world.share(total, r).stop - world.share(total, r).start for r in range(world.world_size)]
    comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    padded = local.new_zeros((max(sizes), *local.shape[1:]), device=comm_device)
    padded[: local.shape[0]] = local.to(comm_device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(local.device)


def gather_objects(world: World, obj: object) -> list[object]:
    """Every rank's `obj` (small, picklable: RNG states for a checkpoint), in rank order."""
    if not world.distributed:
        return [obj]
    out: list[object] = [None] * world.world_size
    dist.all_gather_object(out, obj, group=_control_group)
    return out


def raise_together(world: World, failure: CtcoreError | None) -> None:
    """Raise rank 0's `failure` (a refused run directory) on every rank, so all ranks refuse together instead of
    waiting for a rank 0 that left; with no failure on rank 0 it returns on every rank. A single process raises
    its own failure."""
    if world.distributed:
        shared = [None if failure is None else (failure.exit_code, failure.message)]
        dist.broadcast_object_list(shared, src=0, group=_control_group)
        if shared[0] is not None and failure is None:
            code, message = shared[0]
            failure = UsageError(message) if code == UsageError.exit_code else RunError(message)
    if failure is not None:
        raise failure
