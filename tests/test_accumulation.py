"""Gradient accumulation (`training.micro_batch_size`): a step in micro-batches equals the whole-batch step up to
the order of floating-point sums (the same examples, noise, noise levels and normalisation; the generators end
alike), also across gloo processes, where only the last micro-batch all-reduces; sizes that do not divide are one
line; the memory estimate follows the micro-batch, and `ctcore check --device-memory SIZE` says whether a recipe
fits a device and, if not, which micro-batch size does."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import attrs
import pytest
import torch
from helpers import one_line_error, write_tiny_recipe
from typer.testing import CliRunner

import ctcore
import ctcore.preflight as pf
from ctcore.build import build_run, start_run
from ctcore.cli import _parse_size, app
from ctcore.distributed import World
from ctcore.errors import RunError, UsageError
from ctcore.files import human_bytes
from ctcore.recipe import divisors, read_recipe
from ctcore.training import train, train_step

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.toml"
NO_DROPOUT = {"name": "mlp", "width": 32, "num_blocks": 1, "embedding_features": 8, "dropout": 0.0}


def _quickstart_run(tmp_path: Path, registry, micro: int):
    """The quickstart (dropout 0) for 40 steps in `tmp_path / micro`, trained by train() with a log line every 10
    steps; objective.loss records the rows and the share of each call."""
    recipe = read_recipe(QUICKSTART, registry, [
        "training.total_steps=40", "run.threads=1", f"run.output_dir={tmp_path / str(micro)}",
        "evaluation.distance=none", "data.num_images=2048", "training.log_every=10", "training.sample_every=1000",
        "training.checkpoint_every=1000", f"training.micro_batch_size={micro}"])
    run = start_run(recipe, registry)
    calls = []
    loss = run.objective.loss

    def recorded(batch):
        calls.append((batch.x.shape[0], batch.share))
        return loss(batch)

    run.objective.loss = recorded
    try:
        train(run, progress=False)
    finally:
        run.close()
    return run, calls, torch.get_rng_state()


def _logged_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "event" not in r]


def _relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """max |a - b| over every parameter / max |b|."""
    pairs = list(zip(a.parameters(), b.parameters(), strict=True))
    return max((x - y).abs().max().item() for x, y in pairs) / max(y.abs().max().item() for _, y in pairs)


def test_forty_quickstart_steps_in_micro_batches_of_64_equal_the_whole_batch(tmp_path: Path, registry) -> None:
    whole, whole_calls, whole_rng = _quickstart_run(tmp_path, registry, 0)
    micro, micro_calls, micro_rng = _quickstart_run(tmp_path, registry, 64)
    assert whole_calls == [(256, slice(0, 256))] * 40
    assert micro_calls == [(64, slice(i, i + 64)) for i in (0, 64, 128, 192)] * 40
    # measured: 1.2e-7 for the student and the eval EMA (float32 rounding of the summed gradient)
    assert _relative_difference(micro.student, whole.student) < 1e-4
    assert _relative_difference(micro.eval_ema, whole.eval_ema) < 1e-4
    # the same noise streams: every micro-batch started from the state after the data draw, the last left it as
    # the whole step does (and dropout 0 draws nothing from torch's generator)
    for name in ("index_generator", "noise_generator"):
        assert torch.equal(getattr(micro, name).get_state(), getattr(whole, name).get_state()), name
    assert torch.equal(micro_rng, whole_rng)
    assert micro.step == whole.step == 40
    whole_losses, micro_losses = _logged_losses(tmp_path / "0"), _logged_losses(tmp_path / "64")
    assert len(whole_losses) == 4 and micro_losses == pytest.approx(whole_losses, rel=1e-5)


# ------------------------------------------------------------------------------------------ two gloo processes

STEPS = 10


def _accumulating_worker(rank: int, world_size: int, port: int, recipe_path: str, out: str) -> None:
    """One of two gloo processes training the tiny recipe in micro-batches with train_step; saves its student, its
    losses and the step of every all-reduce DDP made (counted by a comm hook that all-reduces as DDP would)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        registry = ctcore.load_registry()
        run = build_run(read_recipe(recipe_path, registry), registry, world=World(rank, world_size))
        reductions = []

        def counted(state, bucket):  # no annotations: DDP compares them with its own types, and these are strings
            reductions.append(run.step)
            return allreduce_hook(None, bucket)

        run.ddp.register_comm_hook(None, counted)
        losses = torch.stack([train_step(run)[0] for _ in range(STEPS)])
        torch.save({"student": run.student.state_dict(), "losses": losses, "reductions": reductions},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_in_micro_batches_equal_one_process_and_all_reduce_once_a_step(
        tmp_path: Path, registry) -> None:
    """Batch 8 over 2 processes in micro-batches of 2 (2 per process) against one process with the whole batch."""
    import torch.multiprocessing as mp

    for name, micro in (("one", 0), ("two", 2)):
        write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name, network=NO_DROPOUT,
                          training={"micro_batch_size": micro})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_accumulating_worker, args=(2, port, str(tmp_path / "two.toml"), str(tmp_path / "two")), nprocs=2,
             join=True)
    one = build_run(read_recipe(tmp_path / "one.toml", registry), registry)
    losses = torch.stack([train_step(one)[0] for _ in range(STEPS)])
    ranks = [torch.load(tmp_path / f"two.{rank}", weights_only=True) for rank in (0, 1)]
    for got in ranks:
        assert got["reductions"] == list(range(STEPS))  # one all-reduce per step: none for the first micro-batch
        for name, value in one.student.state_dict().items():
            torch.testing.assert_close(got["student"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # each process's loss is its share's mean: their mean is the one-process loss
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, losses, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------ sizes that do not divide


@pytest.mark.parametrize(("micro", "message"), [
    (3, "training.micro_batch_size: must divide the batch of each process, 8 (training.batch_size 8), got 3; use 2 "
        "or 4, or 0 for the whole batch in one pass"),
    (16, "training.micro_batch_size: must divide the batch of each process, 8 (training.batch_size 8), got 16; use "
         "8, or 0 for the whole batch in one pass"),
])
def test_a_micro_batch_that_does_not_divide_the_batch_is_one_line_at_check(tmp_path: Path, micro: int,
                                                                           message: str) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", training={"micro_batch_size": micro})
    assert one_line_error(CliRunner().invoke(app, ["check", str(recipe)])) == f"{recipe}: {message}"
    set_ = f"--set training.micro_batch_size={micro}"
    plain = write_tiny_recipe(tmp_path / "plain.toml", tmp_path / "run")
    result = CliRunner().invoke(app, ["check", str(plain), *set_.split(" ", 1)])
    assert one_line_error(result) == f"{plain}: {set_}: {message}"
    assert not (tmp_path / "run").exists()


def test_a_micro_batch_that_does_not_divide_a_process_share_is_refused_when_the_run_is_built(tmp_path: Path,
                                                                                           registry) -> None:
    recipe = read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", training={"micro_batch_size": 8}),
                         registry)  # fine for one process, not for 2 (a share of 4)
    with pytest.raises(UsageError) as info:
        build_run(recipe, registry, world=World(rank=0, world_size=2))
    assert info.value.message == (
        f"{tmp_path / 'r.toml'}: training.micro_batch_size: must divide the batch of each process, 4 "
        "(training.batch_size 8 over 2 processes), got 8; use 4, or 0 for the whole batch in one pass")


def test_bench_runs_a_batch_of_its_own_in_micro_batches_that_divide_it(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", training={"micro_batch_size": 4})
    result = CliRunner().invoke(app, ["bench", str(recipe), "--batch", "6", "--steps", "1", "--warmup", "0"])
    assert one_line_error(result) == (
        "bench --batch 6: training.micro_batch_size: must divide the batch of each process, 6 (training.batch_size "
        "6), got 4; use 3 or 6, or 0 for the whole batch in one pass")


# ---------------------------------------------------------------------------------------------- the estimate


def test_the_estimate_follows_the_micro_batch(registry) -> None:
    full = pf.preflight(read_recipe(QUICKSTART, registry), registry).memory
    micro = pf.preflight(read_recipe(QUICKSTART, registry, ["training.micro_batch_size=64"]), registry).memory
    assert (full.batch, full.share, micro.batch, micro.share) == (256, 256, 64, 256)
    assert (micro.per_image, micro.activations_fixed) == (full.per_image, full.activations_fixed)
    assert micro.activations == micro.activations_fixed + 64 * micro.per_image < full.activations
    two = pf.preflight(read_recipe(QUICKSTART, registry, ["training.micro_batch_size=64"]), registry,
                       world_size=2).memory  # a share of 128 per process, still in passes of 64
    assert (two.batch, two.share) == (64, 128)
    assert f"activations {human_bytes(micro.activations)} for 64 images" in micro.parts(("activations",))


def test_the_absurd_size_check_counts_one_micro_batch(tmp_path: Path, registry) -> None:
    """A batch of 1,000,000 of 2 GiB per image is refused even over 1,024 processes, in micro-batches of 1 not."""
    huge = pf.MemoryEstimate(per_image=2**31)
    recipe = read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run",
                                           training={"batch_size": 1_000_000}), registry)
    with pytest.raises(UsageError, match="even with training.batch_size split over 1,024 processes"):
        pf._refuse_absurd(recipe, huge, on_cpu=False)
    pf._refuse_absurd(attrs.evolve(recipe, training=attrs.evolve(recipe.training, micro_batch_size=1)), huge,
                      on_cpu=False)


def test_a_run_that_does_not_fit_names_the_largest_micro_batch_that_does(tmp_path: Path, registry,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Activations dominate (batch 256 of 8x8 images): the run is refused naming the micro-batch that fits."""
    path = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", training={"batch_size": 256},
                             network=NO_DROPOUT, data={"num_images": 16, "resolution": 8},
                             evaluation={"distance": "none"})
    recipe = read_recipe(path, registry)
    m = pf.preflight(recipe, registry).memory
    assert m.largest(m.names(True)) == "activations"
    limit = dataclasses.replace(m, batch=32).peak(True)  # 32 fits exactly, 64 does not
    assert dataclasses.replace(m, batch=64).peak(True) > limit
    monkeypatch.setenv(pf.MEMORY_LIMIT_ENV, str(limit))
    with pytest.raises(RunError) as info:
        build_run(recipe, registry)
    assert info.value.message == (
        f"{path}: the run needs about {human_bytes(m.peak(True))} of memory on cpu ({m.parts(m.names(True))}) but "
        f"CTCORE_MEMORY_LIMIT allows {human_bytes(limit)}; set training.micro_batch_size = 32 (the same steps in "
        "passes that fit), or lower training.batch_size, or set CTCORE_MEMORY_LIMIT=<bytes> if that figure is wrong")
    build_run(read_recipe(path, registry, ["training.micro_batch_size=32"]), registry)  # and it does fit


# ------------------------------------------------------------------------------------ check --device-memory

CUDA = ["--set", "run.device=cuda"]  # the estimate for a GPU in bf16, also on a machine without one


def _check(*args: str):
    return CliRunner().invoke(app, ["check", str(QUICKSTART), *CUDA, *args])


@pytest.fixture(scope="module")
def cuda_estimate(registry) -> pf.MemoryEstimate:
    report = pf.preflight(read_recipe(QUICKSTART, registry, ["run.device=cuda"]), registry)
    assert not report.on_cpu
    return report.memory


def test_check_device_memory_says_whether_the_recipe_fits(cuda_estimate: pf.MemoryEstimate) -> None:
    m, names = cuda_estimate, cuda_estimate.names(False)
    peak = m.peak(False)
    result = _check("--device-memory", str(peak))
    assert result.exit_code == 0, result.output
    ok, fits = result.stderr.splitlines()
    assert ok.startswith(f"ok: {QUICKSTART} is valid; ")
    assert fits == (f"fits in {human_bytes(peak)}: about {human_bytes(peak)} on cuda in bf16 ({m.parts(names)})")
    assert "\nmicro_batch_size = 0\n" in result.stdout  # the resolved recipe, printed as before


def test_check_device_memory_names_the_largest_micro_batch_that_fits(cuda_estimate: pf.MemoryEstimate) -> None:
    m, names = cuda_estimate, cuda_estimate.names(False)

    def peak(micro: int) -> int:
        return dataclasses.replace(m, batch=micro).peak(False)

    limit = peak(64) + (peak(128) - peak(64)) // 2  # between the peaks of 64 and 128
    result = _check("--device-memory", str(limit))
    assert result.exit_code == 1, result.output
    line = result.stderr.splitlines()[-1]
    assert line == (f"does not fit in {human_bytes(limit)}: about {human_bytes(m.peak(False))} on cuda in bf16 "
                    f"({m.parts(names)}); training.micro_batch_size = 64 fits (about {human_bytes(peak(64))}): --set "
                    "training.micro_batch_size=64")
    sizes = divisors(256)
    assert peak(64) <= limit < peak(sizes[sizes.index(64) + 1])  # the largest divisor that fits, by the estimate
    followed = _check("--device-memory", str(limit), "--set", "training.micro_batch_size=64")
    assert followed.exit_code == 0, followed.output
    micro = dataclasses.replace(m, batch=64)
    assert followed.stderr.splitlines()[-1] == (f"fits in {human_bytes(limit)}: about {human_bytes(peak(64))} on cuda "
                                                f"in bf16 ({micro.parts(names)})")


def test_check_device_memory_when_not_even_one_image_fits(cuda_estimate: pf.MemoryEstimate) -> None:
    m, names = cuda_estimate, cuda_estimate.names(False)
    one = dataclasses.replace(m, batch=1)
    result = _check("--device-memory", "1MiB")
    assert result.exit_code == 1, result.output
    part = one.largest(names)
    assert result.stderr.splitlines()[-1] == (
        f"does not fit in 1.0 MiB: about {human_bytes(m.peak(False))} on cuda in bf16 ({m.parts(names)}); no "
        f"training.micro_batch_size fits, not even 1 (about {human_bytes(one.peak(False))}); the largest part is "
        f"{one.parts((part,), limit=1)}: lower {pf._fix_for(part, read_recipe(QUICKSTART, ctcore.load_registry()))}")


@pytest.mark.parametrize(("text", "size"), [
    ("24GiB", 24 * 2**30), ("24GB", 24 * 10**9), ("80G", 80 * 2**30), ("24000MiB", 24000 * 2**20),
    ("1.5TiB", 3 * 2**39), ("1073741824", 2**30), (" 512 kib ", 512 * 1024), ("7B", 7),
])
def test_device_memory_sizes(text: str, size: int) -> None:
    assert _parse_size(text, "--device-memory") == size


@pytest.mark.parametrize("text", ["24 gigs", "GiB", "-1GiB", "1.5", "1e9", "24GiBs", "", "0x10", "24 Gi B"])
def test_a_bad_device_memory_is_one_line_and_exit_2(text: str) -> None:
    assert one_line_error(_check("--device-memory", text)) == (
        f"--device-memory must be a size like 24GiB, 24GB, 80G (GiB) or 24000MiB, or a whole number of bytes, got "
        f"{text!r}")


def test_device_memory_of_nothing_or_without_the_estimate_is_one_line_and_exit_2() -> None:
    assert one_line_error(_check("--device-memory", "0GiB")) == "--device-memory must be more than 0 bytes, got '0GiB'"
    assert one_line_error(_check("--device-memory", "24GiB", "--no-build")) == (
        "--device-memory needs the memory estimate, which building the components makes: drop --no-build")
