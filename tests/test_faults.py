"""Runs survive signals: SIGTERM stops cleanly with a checkpoint; SIGKILL at a random step loses nothing; a
checkpoint write that fails part-way leaves the previous checkpoint as it was."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_recipe
from typer.testing import CliRunner

from ctcore.build import start_run
from ctcore.checkpoints import list_checkpoints, load_checkpoint, save_checkpoint, validate_checkpoint
from ctcore.cli import app
from ctcore.errors import RunError
from ctcore.recipe import read_recipe
from ctcore.training import train, train_step

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("CTCORE_DISABLE_PLUGINS", None)


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ctcore", "run", *args, "--no-progress"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    recipe = write_tiny_recipe(tmp_path / "r.toml", run_dir, training={
        "total_steps": 1_000_000, "checkpoint_every": 1_000_000, "sample_every": 1_000_000, "log_every": 5})
    proc = _start(str(recipe))
    stats = run_dir / "stats.jsonl"
    _wait_for(lambda: stats.exists() and '"loss"' in stats.read_text())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    (ckpt,) = list_checkpoints(run_dir)
    step = load_checkpoint(ckpt)["step"]
    assert err.strip().endswith(f"SIGTERM: stopped after step {step:,} and wrote {ckpt}. Continue with: "
                                f"ctcore run {run_dir} --resume")
    assert '"event": "stopped"' in stats.read_text() and "Traceback" not in err


@pytest.mark.slow
def test_a_run_killed_at_a_random_step_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """The killed run and its resume are processes of their own; the uninterrupted run, the reference, trains in
    this one (the same `ctcore run`, one thread) while the resume runs."""
    def recipe(name: str) -> Path:
        return write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name, training={
            "total_steps": 400, "checkpoint_every": 10, "sample_every": 1_000_000, "log_every": 10,
            "keep_checkpoints": 2}, evaluation={"distance": "none"})

    kill_after = random.randint(20, 250)
    killed = _start(str(recipe("killed")))
    _wait_for(lambda: any(load_step(p) >= kill_after for p in list_checkpoints(tmp_path / "killed")))
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert load_step(list_checkpoints(tmp_path / "killed")[-1]) < 400, "the run finished before the kill"
    resumed = _start(str(tmp_path / "killed"), "--resume")
    whole = CliRunner().invoke(app, ["run", str(recipe("whole")), "--no-progress"])
    assert whole.exit_code == 0, whole.output
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = load_checkpoint(list_checkpoints(tmp_path / "whole")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "killed")[-1])
    assert a["step"] == b["step"] == 400
    for key in ("student", "eval_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), f"{key} differs (killed after {kill_after})"
    for pid, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][pid][k])), (pid, k)


def load_step(path: Path) -> int:
    """The step of a checkpoint file, from its name (the file may be replaced while we look)."""
    return int(path.stem.split("-")[1])


HANG_IN_SECOND_CHECKPOINT = """
import os, sys, time
from pathlib import Path
import torch
real_save, calls = torch.save, []

def save_then_hang(obj, f):
    calls.append(f)
    real_save(obj, f)
    if len(calls) == 2:  # the second checkpoint: half written when the kill comes
        os.truncate(f, Path(f).stat().st_size // 2)
        MARKER.write_text(str(f))
        time.sleep(600)

MARKER = Path(sys.argv[2])
torch.save = save_then_hang
from ctcore.cli import main
sys.argv = ["ctcore", "run", sys.argv[1], "--no-progress"]
main()
"""


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path: Path) -> None:
    training = {"total_steps": 12, "checkpoint_every": 6, "sample_every": 1_000_000}
    write_tiny_recipe(tmp_path / "whole.toml", tmp_path / "whole", training=training)
    killed_recipe = write_tiny_recipe(tmp_path / "killed.toml", tmp_path / "killed", training=training)
    marker = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", HANG_IN_SECOND_CHECKPOINT, str(killed_recipe), str(marker)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: marker.exists() or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    folder = tmp_path / "killed" / "checkpoints"
    partial = Path(marker.read_text())
    assert partial.parent == folder and partial.exists()  # the half-written temporary file is still there
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["ckpt-000000006.pt"]
    assert load_checkpoint(folder / "ckpt-000000006.pt")["step"] == 6  # the latest checkpoint loads

    resumed = _start(str(tmp_path / "killed"), "--resume")
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-000000006.pt", "ckpt-000000012.pt"]  # debris gone
    whole = CliRunner().invoke(app, ["run", str(tmp_path / "whole.toml"), "--no-progress"])  # the reference: here
    assert whole.exit_code == 0, whole.output
    a = load_checkpoint(list_checkpoints(tmp_path / "whole")[-1])
    b = load_checkpoint(folder / "ckpt-000000012.pt")
    for key in ("student", "eval_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def _torch_writer_failure() -> RuntimeError:
    """What torch's zip writer raises when a write fails (a full disk): an enforce failure after the iostream error."""
    exc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    exc.__context__ = RuntimeError("basic_ios::clear: iostream error")
    return exc


@pytest.mark.parametrize("kind", ["write-failed", "crash", "ctrl-c"])
def test_a_checkpoint_write_that_fails_part_way_leaves_the_previous_checkpoint_loadable(
        tmp_path: Path, registry, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """torch.save writes half a checkpoint into the temporary file and fails: the previous checkpoint (at the same
    step, as a stop right after a checkpoint rewrites it, or at an earlier one) is byte-identical and still loads
    and validates, no temporary or partial file is left, and the error is a one-line RunError for a failed write
    and the exception itself otherwise."""
    run = start_run(read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run"), registry), registry)
    train(run, stop_at=6, progress=False)
    folder = tmp_path / "run" / "checkpoints"
    previous = folder / "ckpt-000000006.pt"
    good = previous.read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("ctcore.files.shutil.disk_usage", lambda _: usage(1 << 30, (1 << 30) - 12 * 1024, 12 * 1024))
    written: list[Path] = []

    def save_half_then_fail(obj: object, f: Path) -> None:
        written.append(Path(f))
        Path(f).write_bytes(good[: len(good) // 2])
        raise {"write-failed": _torch_writer_failure(), "crash": RuntimeError("the machine broke down"),
               "ctrl-c": KeyboardInterrupt()}[kind]

    with monkeypatch.context() as m:
        m.setattr(torch, "save", save_half_then_fail)
        for target, kept in ((previous, "the previous file is unchanged"),
                             (folder / "ckpt-000000007.pt", "nothing was left half-written")):
            if target != previous:
                train_step(run)
            expected = {"write-failed": RunError, "crash": RuntimeError, "ctrl-c": KeyboardInterrupt}[kind]
            with pytest.raises(expected) as info:
                save_checkpoint(run)
            if kind == "write-failed":
                assert str(info.value) == (f"could not write {str(target)!r}: the write failed (12.0 KiB free on that "
                                           f"filesystem); {kept} — free some space and run again")
            elif kind == "crash":
                assert str(info.value) == "the machine broke down"
            assert sorted(p.name for p in folder.iterdir()) == ["ckpt-000000006.pt"]
            assert previous.read_bytes() == good
            assert written[-1].parent == folder and written[-1].name.startswith(f".{target.name}.")  # a temporary
    run.close()
    state = load_checkpoint(previous)
    assert state["step"] == 6 and list_checkpoints(run.out_dir) == [previous]
    assert validate_checkpoint(state, previous, registry, use="resume").components["teacher"].name == "no-ema"
