"""One writer at a time: a run directory, a sample store and a dataset are locked (fcntl.flock) while written; a
second writer gets one line naming the holder's pid, and a SIGKILLed holder leaves nothing stale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_tiny_recipe
from PIL import Image
from typer.testing import CliRunner, Result

import ctcore
from ctcore.build import resume_run
from ctcore.checkpoints import list_checkpoints
from ctcore.cli import app
from ctcore.files import acquire_lock, lock_path_for

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for name in ("CTCORE_DISABLE_PLUGINS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(name, None)

# takes the locks of the given paths (lock file, command, lock file, command, ...) and sleeps; no torch import
HOLD_LOCKS = """
import sys, time
from ctcore.files import acquire_lock
locks = [acquire_lock(path, "unused", command) for path, command in zip(sys.argv[1::2], sys.argv[2::2])]
print("locked", flush=True)
time.sleep(600)
"""


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def clean_failure(result: Result) -> list[str]:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and result.stdout == ""
    return result.stderr.splitlines()


def in_use(what: str, pid: int, command: str) -> list[str]:
    return [f"error: {what} is in use by process {pid} ({command}); wait for it to finish, or stop it first"]


def hold(*paths_and_commands: object) -> subprocess.Popen:
    """A process holding the locks of (lock file, command) pairs until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCKS, *map(str, paths_and_commands)], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_a_lock_is_shared_within_a_process_taken_over_from_a_dead_one_and_removed_on_release(tmp_path: Path) -> None:
    path = tmp_path / ".out.h5.lock"
    assert lock_path_for(tmp_path / "out.h5") == path
    path.write_text("999999999 ctcore sample\n", encoding="utf-8")  # left by a process that died: not held
    first = acquire_lock(path, "sample store 'out.h5'", "ctcore sample")
    assert path.read_text(encoding="utf-8") == f"{os.getpid()} ctcore sample\n"
    again = acquire_lock(path, "sample store 'out.h5'", "ctcore sample")  # the same process may take it again
    assert again is first
    again.release()
    assert path.exists()
    first.release()
    assert not path.exists()


def test_a_second_writer_of_a_run_directory_is_refused_and_a_sigkilled_run_leaves_it_resumable(tmp_path: Path) -> None:
    """A real `ctcore run` holds the directory; a second run, `--resume` of the directory and `--resume` with the
    recipe are each refused in one line. SIGKILLed before its first checkpoint, the run restarts with --resume."""
    run_dir = tmp_path / "run"
    recipe = write_tiny_recipe(tmp_path / "r.toml", run_dir, evaluation={"distance": "none"}, training={
        "total_steps": 1_000_000, "checkpoint_every": 1_000_000, "sample_every": 1_000_000, "log_every": 5})
    holder = subprocess.Popen([sys.executable, "-m", "ctcore", "run", str(recipe), "--no-progress"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stats = run_dir / "stats.jsonl"
        deadline = time.monotonic() + 120
        while not (stats.exists() and '"loss"' in stats.read_text(encoding="utf-8")):
            assert time.monotonic() < deadline and holder.poll() is None, "the run logged no step"
            time.sleep(0.02)
        expected = in_use(f"run directory {str(run_dir)!r}", holder.pid, "ctcore run")
        for args in ([recipe], [run_dir, "--resume"], [recipe, "--resume"]):
            assert clean_failure(invoke("run", *args, "--no-progress")) == expected, args
    finally:
        kill(holder)
    assert (run_dir / ".lock").exists() and not list_checkpoints(run_dir)  # the file is left, the lock is not
    registry = ctcore.load_registry()
    run = resume_run(None, registry, run_dir)
    try:
        assert run.restarted and run.step == 0 and not (run_dir / "stats.jsonl").exists()
        assert (run_dir / ".lock").read_text(encoding="utf-8") == f"{os.getpid()} ctcore run\n"
    finally:
        run.close()
    assert sorted(p.name for p in run_dir.iterdir()) == ["provenance.json", "recipe.toml"]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    result = invoke("run", write_tiny_recipe(tmp_path / "tiny.toml", tmp_path / "run"), "--no-progress")
    assert result.exit_code == 0, result.output
    return list_checkpoints(tmp_path / "run")[-1]


def test_sample_stores_and_datasets_have_one_writer_at_a_time(checkpoint: Path, tmp_path: Path) -> None:
    source = tmp_path / "images"
    for label, color in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (source / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4), color).save(source / label / f"{i}.png")
    store, dataset = tmp_path / "out" / "samples.h5", tmp_path / "out" / "data.h5"
    store.parent.mkdir()
    holder = hold(lock_path_for(store), "ctcore sample", lock_path_for(dataset), "ctcore data import")
    try:
        assert clean_failure(invoke("sample", checkpoint, "-n", "2", "--out", store)) == in_use(
            f"sample store {str(store)!r}", holder.pid, "ctcore sample")
        assert clean_failure(invoke("data", "import", source, dataset, "--no-progress")) == in_use(
            f"dataset {str(dataset)!r}", holder.pid, "ctcore data import")
        assert sorted(p.name for p in store.parent.iterdir()) == [".data.h5.lock", ".samples.h5.lock"]
    finally:
        kill(holder)
    assert invoke("sample", checkpoint, "-n", "2", "--out", store).exit_code == 0
    assert invoke("data", "import", source, dataset, "--no-progress").exit_code == 0
    assert sorted(p.name for p in store.parent.iterdir()) == ["data.h5", "samples.h5", "samples.png"]


def _torchrun(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "ctcore", "run", *args, "--no-progress"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_under_torchrun_every_rank_refuses_a_run_directory_in_use(checkpoint: Path, tmp_path: Path) -> None:
    """Rank 0 alone takes the lock; when it is refused, both ranks stop at once, with one message, writing nothing:
    for a new run and for --resume (started together, to keep the test short)."""
    run_dir, fresh = checkpoint.parent.parent, tmp_path / "fresh"
    fresh.mkdir()
    holder = hold(run_dir / ".lock", "ctcore run", fresh / ".lock", "ctcore run")
    try:
        before = sorted(str(p) for p in run_dir.rglob("*"))
        started = _torchrun(str(tmp_path / "tiny.toml"), "--output-dir", str(fresh))
        resumed = _torchrun(str(run_dir), "--resume")
        for proc, folder in ((started, fresh), (resumed, run_dir)):
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 1, err[-3000:]
            line = in_use(f"run directory {str(folder)!r}", holder.pid, "ctcore run")[0]
            assert err.count(line) == 1, err[-3000:]  # rank 0 says it; rank 1 stops quietly
            assert "Traceback" not in err.split(line)[0]
        assert sorted(str(p) for p in run_dir.rglob("*")) == before
        assert [p.name for p in fresh.iterdir()] == [".lock"]
    finally:
        kill(holder)
