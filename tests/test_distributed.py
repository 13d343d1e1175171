"""torchrun + DDP on CPU (gloo): two processes train like one, only rank 0 writes, SIGTERM stops every rank
after the same step, and a resumed two-process run is bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import DIFFUSION, SCT, write_tiny_recipe

import ctcore
from ctcore.build import build_run
from ctcore.checkpoints import list_checkpoints, load_checkpoint
from ctcore.distributed import World, rank_seed, world_from_env
from ctcore.errors import UsageError
from ctcore.recipe import read_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for name in ("CTCORE_DISABLE_PLUGINS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(name, None)
NO_DROPOUT = {"name": "mlp", "width": 32, "num_blocks": 1, "embedding_features": 8, "dropout": 0.0}


def _ctcore(*args: str, nproc: int = 1) -> subprocess.Popen:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    return subprocess.Popen([sys.executable, *launcher, "-m", "ctcore", "run", *args, "--no-progress"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _in_this_process(recipe: Path, code: int = 0) -> tuple[str, str]:
    """`ctcore run` of the one-process reference in the test's process (one thread, as the torchrun workers): a
    process of its own would cost seconds of startup and prove nothing more; its (stdout, stderr)."""
    from typer.testing import CliRunner  # here: the processes mp.spawn starts below import this module

    from ctcore.cli import app

    result = CliRunner().invoke(app, ["run", str(recipe), "--no-progress"])
    assert result.exit_code == code, result.output[-3000:]
    return result.stdout, result.stderr


def _finish(proc: subprocess.Popen, code: int = 0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err[-3000:]
    return out, err


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("objective", [{}, DIFFUSION, SCT], ids=["consistency", "edm", "sct"])
def test_two_gloo_processes_train_like_one_process_with_the_same_global_batch(tmp_path: Path, objective) -> None:
    """The objective draws the global batch's randomness and keeps its share: iCT, EDM and sCT alike (sCT's JVP
    runs on the unwrapped student and its log-variance head outside the DDP forward; DDP still averages every
    gradient)."""
    training = {"total_steps": 20, "checkpoint_every": 10, "sample_every": 10, "log_every": 5}
    objective = dict(objective)
    network = {**NO_DROPOUT, **objective.pop("network", {})}
    for name in ("one", "two"):  # logging never changes what a run computes; under torchrun rank 0 alone logs
        logging = {"backends": ["tensorboard"] if name == "two" else []}
        write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name, network=network, training=training,
                          logging=logging, **objective)
    two = _ctcore(str(tmp_path / "two.toml"), nproc=2)
    _in_this_process(tmp_path / "one.toml")
    out, _ = _finish(two)
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "ckpt-000000020.pt")
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "ckpt-000000020.pt")
    for key in ("student", "eval_ema"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(torch.as_tensor(b["optimizer"]["state"][pid][name]), torch.as_tensor(value),
                                       rtol=1e-5, atol=1e-7)
    assert b["world_size"] == 2 and len(b["rng"]["ranks"]) == 2
    # the global batch was split, not repeated: the logged loss (mean over ranks) is the one-process loss
    loss_a = [r["loss"] for r in _events(tmp_path / "one") if "event" not in r]
    loss_b = [r["loss"] for r in _events(tmp_path / "two") if "event" not in r]
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    # evaluation sampling split over ranks gives the same images and distances; rank 0 alone wrote files
    for png in sorted((tmp_path / "one" / "samples").iterdir()):
        assert (tmp_path / "two" / "samples" / png.name).read_bytes() == png.read_bytes(), png.name
    dist_a = [r["sliced_wasserstein"] for r in _events(tmp_path / "one") if r.get("event") == "distance"]
    dist_b = [r["sliced_wasserstein"] for r in _events(tmp_path / "two") if r.get("event") == "distance"]
    assert dist_b == pytest.approx(dist_a, rel=1e-5)
    assert [r["step"] for r in _events(tmp_path / "two") if r.get("event") == "checkpoint"] == [10, 20]
    assert out.count("run directory:") == 1
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_sigterm_stops_every_rank_after_one_step_and_the_resumed_run_is_bit_identical(tmp_path: Path) -> None:
    """Dropout on: each rank's own dropout stream is checkpointed and restored, so nothing differs."""
    training = {"total_steps": 200, "checkpoint_every": 100_000, "sample_every": 100_000, "log_every": 10}
    for name in ("whole", "stopped"):
        write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name, training=training,
                          evaluation={"distance": "none"})
    stopped = _ctcore(str(tmp_path / "stopped.toml"), nproc=2)
    stats = tmp_path / "stopped" / "stats.jsonl"
    deadline = time.monotonic() + 120
    while not (stats.exists() and '"loss"' in stats.read_text()):
        assert time.monotonic() < deadline and stopped.poll() is None, "no training step logged"
        time.sleep(0.01)
    stopped.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both workers
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode != 0
    (ckpt,) = list_checkpoints(tmp_path / "stopped")
    step = load_checkpoint(ckpt)["step"]
    assert step < 200, "the run finished before the signal"
    assert f"SIGTERM: stopped after step {step:,} and wrote {ckpt}." in err
    assert err.count("SIGTERM: stopped after step") == 1  # rank 0 alone reports
    assert [r["step"] for r in _events(tmp_path / "stopped") if r.get("event") == "stopped"] == [step]

    whole = _ctcore(str(tmp_path / "whole.toml"), nproc=2)
    resumed = _ctcore(str(tmp_path / "stopped"), "--resume", nproc=2)  # alongside: two cores where there are
    _finish(whole)
    _finish(resumed)
    a = load_checkpoint(list_checkpoints(tmp_path / "whole")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "stopped")[-1])
    assert a["step"] == b["step"] == 200
    for key in ("student", "eval_ema"):
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), f"{key}.{name} differs"
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(b["optimizer"]["state"][pid][name]), torch.as_tensor(value))


@pytest.mark.slow
def test_a_diverging_two_process_run_goes_back_and_stops_where_one_process_does(tmp_path: Path) -> None:
    """The non-finite check under torchrun: the flag comes from the global gradient norm, so every rank reads the
    same one, goes back to the same point, redoes the same steps and stops after the same step with the same
    checkpoint of the last good weights as one process (the diverging settings of tests/test_nonfinite.py)."""
    training = {"total_steps": 40, "optimizer": "adam", "lr": 1.0, "betas": [0.9, 0.0], "eps": 1e-30,
                "weight_decay": 1.0, "max_nonfinite_steps": 3, "log_every": 4}
    for name in ("one", "two"):
        write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name, network=NO_DROPOUT, training=training,
                          evaluation={"distance": "none"})
    two = _ctcore(str(tmp_path / "two.toml"), nproc=2)
    _, err_one = _in_this_process(tmp_path / "one.toml", 1)
    _, err_two = _finish(two, 1)
    states = {}
    for name, err in (("one", err_one), ("two", err_two)):
        (ckpt,) = list_checkpoints(tmp_path / name)
        states[name] = load_checkpoint(ckpt)
        assert err.count("error: training stopped at step") == 1, err[-2000:]  # rank 0 alone reports
        assert f"{ckpt} holds the weights of the last good step" in err
    a, b = states["one"], states["two"]
    assert (b["step"], b["last_good_step"], b["nonfinite_run"]) == (a["step"], a["last_good_step"], 3)
    for key in ("student", "eval_ema"):
        for name, value in a[key].items():
            assert torch.isfinite(b[key][name]).all()
            torch.testing.assert_close(b[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    bad = [[(r["step"], r["consecutive"]) for r in _events(tmp_path / n) if r.get("event") == "nonfinite"]
           for n in ("one", "two")]
    assert bad[0] == bad[1] and [c for _, c in bad[0]] == [1, 2, 3]


def test_shares_partition_a_batch_in_rank_order() -> None:
    world = World(rank=0, world_size=3)
    shares = [world.share(10, r) for r in range(3)]
    assert [(s.start, s.stop) for s in shares] == [(0, 3), (3, 6), (6, 10)]
    assert World(rank=2, world_size=3).share(10) == shares[2]
    assert World().share(7) == slice(0, 7) and not World().distributed and World().is_main


def test_the_global_batch_must_split_evenly(tmp_path: Path) -> None:
    registry = ctcore.load_registry()
    recipe = read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run"), registry)  # batch 8
    with pytest.raises(UsageError) as info:
        build_run(recipe, registry, world=World(rank=0, world_size=3))
    assert info.value.message == (f"{tmp_path / 'r.toml'}: training.batch_size 8 is the global batch and must "
                                  "split evenly over 3 processes; change one of them")


def test_the_torchrun_environment_is_read_or_refused(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world_from_env() == World()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_from_env() == World(rank=3, world_size=4, local_rank=1)
    monkeypatch.delenv("RANK")
    with pytest.raises(UsageError, match=r"incomplete torchrun environment .*'RANK': None"):
        world_from_env()


def test_ranks_draw_distinct_dropout_masks() -> None:
    seeds = {rank_seed(0, r) for r in range(64)} | {rank_seed(1, r) for r in range(64)}
    assert len(seeds) == 128


def test_resume_restores_each_ranks_dropout_stream_or_starts_fresh_ones(tmp_path: Path) -> None:
    """restore() under another World: the same number of processes gets its own saved state back, another
    number gets fresh per-rank streams seeded from the seed and step (restore needs no process group)."""
    from ctcore.build import start_run
    from ctcore.checkpoints import restore, save_checkpoint
    from ctcore.training import train

    registry = ctcore.load_registry()
    run = start_run(read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run"), registry), registry)
    train(run, stop_at=4, progress=False)
    state = load_checkpoint(save_checkpoint(run))
    saved = [torch.Generator().manual_seed(r).get_state() for r in (11, 22)]
    state["rng"]["ranks"] = [{"torch": saved[0], "cuda": None}, {"torch": saved[1], "cuda": None}]
    run.world = World(rank=1, world_size=2)
    restore(run, state)
    assert torch.equal(torch.get_rng_state(), saved[1])
    run.world = World(rank=1, world_size=3)
    restore(run, state)
    assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(rank_seed(0 + 4, 1)).get_state())
    run.world = World()  # one process resuming a torchrun checkpoint: rank 0's stream
    restore(run, state)
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])


def _features_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One of two gloo processes: its share of 5 samples' Inception features, gathered (see the test below)."""
    import torch.distributed as dist
    from test_fid import randomised_inception

    from ctcore.fid import sample_features

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        acc = sample_features(lambda x, s, y: torch.tanh(x), (3, 8, 8), [80.0], inception=randomised_inception(),
                              num_samples=5, seed=3, batch_size=2, world=World(rank, world_size))
        mu, sigma = acc.statistics()
        torch.save({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma), "logits": acc.logits()},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fid_features_split_over_two_processes_equal_one_process(tmp_path: Path) -> None:
    """Uneven shares (2 and 3 of 5 seeds) gathered in seed order give the one-process statistics and logits."""
    import socket

    import torch.multiprocessing as mp
    from test_fid import randomised_inception

    from ctcore.fid import sample_features

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_features_worker, args=(2, port, str(tmp_path / "stats")), nprocs=2, join=True)
    one = sample_features(lambda x, s, y: torch.tanh(x), (3, 8, 8), [80.0], inception=randomised_inception(),
                          num_samples=5, seed=3, batch_size=2)
    mu, sigma = one.statistics()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"stats.{rank}", weights_only=True)
        torch.testing.assert_close(got["mu"], torch.from_numpy(mu), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["sigma"], torch.from_numpy(sigma), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["logits"], one.logits(), rtol=1e-5, atol=1e-5)
