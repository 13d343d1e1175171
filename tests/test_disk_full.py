"""A full disk while writing a checkpoint, a sample store, a dataset or FID statistics: one clear line and a
non-zero exit, and the previous good file is never overwritten (ctcore.files.atomic_write and the CLI).

The whole-CLI tests make writes fail for real without root: the child process gets a file-size limit
(RLIMIT_FSIZE) with SIGXFSZ ignored, so a write past the limit fails with EFBIG exactly where a full disk would
fail with ENOSPC (in torch's C++ zip writer, in HDF5, in Python's own file objects).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import finished_tiny_run
from typer.testing import CliRunner, Result

from ctcore.checkpoints import list_checkpoints, load_checkpoint
from ctcore.cli import app
from ctcore.errors import CtcoreError, RunError
from ctcore.files import atomic_write

ENV = {**{k: v for k, v in os.environ.items() if k != "CTCORE_DISABLE_PLUGINS"},
       "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}
FREE = r"\(\d+(\.\d)? (B|KiB|MiB|GiB|TiB) free on that filesystem\)"
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE + SIGXFSZ behave this way on Linux")


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def ctcore_with_file_size_limit(limit: int, *args: object) -> subprocess.CompletedProcess:
    """`python -m ctcore ARGS` where no file may grow past `limit` bytes: such a write fails with EFBIG."""

    import resource  # here, not in the forked child: an import there can deadlock on a lock another thread held

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "ctcore", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=120, preexec_fn=limit_file_size)


def names(folder: Path) -> list[str]:
    """Every entry of `folder`, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------- atomic_write


@pytest.fixture
def twelve_kib_free(monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("ctcore.files.shutil.disk_usage", lambda _: usage(1 << 30, (1 << 30) - 12 * 1024, 12 * 1024))


def _torch_writer_failure() -> RuntimeError:
    """What torch 2.x's zip writer raises when the disk fills: an enforce failure after the iostream error."""
    exc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    exc.__context__ = RuntimeError("basic_ios::clear: iostream error")
    return exc


FAILURES = {
    "enospc": (lambda tmp: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)),
               "No space left on device (12.0 KiB free on that filesystem); {kept} — free some space and run again"),
    "torch": (lambda tmp: _torch_writer_failure(),
              "the write failed (12.0 KiB free on that filesystem); {kept} — free some space and run again"),
    "old-torch": (lambda tmp: RuntimeError("[enforce fail at inline_container.cc:445] . PytorchStreamWriter failed "
                                           "writing file data/0: file write failed"),
                  "the write failed (12.0 KiB free on that filesystem); {kept} — free some space and run again"),
    "hdf5": (lambda tmp: OSError(errno.EFBIG, "Unable to synchronously create file (write to backing store failed: "
                                              "errno = 27, error message = 'File too large')"),
             "File too large (12.0 KiB free on that filesystem); {kept}"),
    "hdf5-runtime": (lambda tmp: RuntimeError("Can't decrement id ref count (unable to extend file properly, "
                                              "errno = 28, error message = 'No space left on device')"),
                     "No space left on device (12.0 KiB free on that filesystem); {kept} — free some space and run "
                     "again"),
    "read-only": (lambda tmp: OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp)),
                  "Read-only file system (12.0 KiB free on that filesystem); {kept}"),
}


@pytest.mark.parametrize("kind", FAILURES)
def test_a_failed_write_over_a_file_keeps_it_byte_identical_and_says_why_in_one_line(
        tmp_path: Path, twelve_kib_free: None, kind: str) -> None:
    make_error, reason = FAILURES[kind]
    target = tmp_path / "ckpt-000000040.pt"
    target.write_bytes(b"the previous good checkpoint")
    with pytest.raises(RunError) as info, atomic_write(target) as tmp:
        tmp.write_bytes(b"half a checkp")
        raise make_error(tmp)
    kept = "the previous file is unchanged"
    assert info.value.message == f"could not write {str(target)!r}: {reason.format(kept=kept)}"
    assert "\n" not in info.value.message
    assert target.read_bytes() == b"the previous good checkpoint"
    assert names(tmp_path) == ["ckpt-000000040.pt"]


def test_a_failed_write_of_a_new_file_leaves_nothing(tmp_path: Path, twelve_kib_free: None) -> None:
    target = tmp_path / "stats" / "ref.npz"
    with pytest.raises(RunError) as info, atomic_write(target) as tmp, open(tmp, "wb") as f:
        f.write(b"x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert info.value.message == (f"could not write {str(target)!r}: No space left on device (12.0 KiB free on that "
                                  "filesystem); nothing was left half-written — free some space and run again")
    assert names(tmp_path / "stats") == []


@pytest.mark.parametrize("error", [
    ValueError("bad data"),
    RuntimeError("CUDA out of memory"),
    CtcoreError("a message of our own"),
    KeyboardInterrupt(),
    FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/some/input.png"),  # reading another file
], ids=type)
def test_other_failures_pass_through_unchanged_and_still_leave_no_temporary_file(
        tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "store.h5"
    target.write_bytes(b"old")
    with pytest.raises(type(error)) as info, atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
        raise error
    assert info.value is error
    assert target.read_bytes() == b"old"
    assert names(tmp_path) == ["store.h5"]


# ----------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run: checkpoints at steps 6 and 12 (tests copy it before writing into it)."""
    return finished_tiny_run(tmp_path_factory.mktemp("trained"))


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def assert_one_error_line(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert re.fullmatch(pattern, proc.stderr.rstrip("\n")), proc.stderr


@linux_only
def test_a_checkpoint_that_does_not_fit_exits_1_and_keeps_the_previous_checkpoint(run_dir: Path,
                                                                                   trained: Path) -> None:
    folder = run_dir / "checkpoints"
    (folder / "ckpt-000000012.pt").unlink()  # as if the run had been killed after step 6
    good = (folder / "ckpt-000000006.pt").read_bytes()
    stats = (run_dir / "stats.jsonl").read_text()
    limit = 64 * 1024  # stats.jsonl and the sample PNGs (a few KiB) fit; a checkpoint (~170 KiB) does not
    assert len(good) > 2 * limit

    proc = ctcore_with_file_size_limit(limit, "run", run_dir, "--resume", "--no-progress")
    ckpt = folder / "ckpt-000000012.pt"
    assert_one_error_line(proc, re.escape(f"error: could not write {str(ckpt)!r}: the write failed ") + FREE
                          + re.escape("; nothing was left half-written — free some space and run again"))
    assert proc.stdout.startswith(f"resuming {run_dir} at step 6")
    assert names(folder) == ["ckpt-000000006.pt"]  # no temporary file, no partial ckpt-000000012.pt
    assert (folder / "ckpt-000000006.pt").read_bytes() == good
    assert load_checkpoint(folder / "ckpt-000000006.pt")["step"] == 6
    appended = (run_dir / "stats.jsonl").read_text().removeprefix(stats)
    assert '"step": 12' in appended and '"event": "checkpoint"' not in appended  # trained on, wrote no checkpoint

    # with room again the same command finishes the run, to the weights the uninterrupted run had
    result = invoke("run", run_dir, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt-000000006.pt", "ckpt-000000012.pt"]
    resumed, whole = load_checkpoint(ckpt), load_checkpoint(trained / "checkpoints" / "ckpt-000000012.pt")
    assert all(torch.equal(resumed["student"][k], whole["student"][k]) for k in whole["student"])


@linux_only
def test_a_sample_store_that_does_not_fit_exits_1_and_keeps_the_previous_store(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / "ckpt-000000012.pt"
    assert invoke("sample", ckpt, "-n", "64").exit_code == 0
    samples = run_dir / "samples"
    store = samples / "ckpt-000000012-1step-64.h5"
    good, before = store.read_bytes(), names(samples)

    proc = ctcore_with_file_size_limit(len(good) // 2, "sample", ckpt, "-n", "64", "--seed", "7", "--overwrite",
                                       "--no-progress")
    assert_one_error_line(proc, re.escape(f"error: could not write {str(store)!r}: File too large ") + FREE
                          + re.escape("; the previous file is unchanged"))
    assert proc.stdout == ""
    assert names(samples) == before  # no temporary file, no grid for samples that were not stored
    assert store.read_bytes() == good


def test_an_os_error_escaping_a_command_is_one_line_and_exit_1(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file written outside atomic_write (here the PNG grid) on a full disk: the error and the file, no traceback."""
    grid = run_dir / "grid.png"

    def full_disk(images: torch.Tensor, path: Path) -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("ctcore.images.save_grid", full_disk)
    result = invoke("sample", run_dir, "-n", "4", "--grid", grid, "--no-progress")
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stderr == f"error: No space left on device: {str(grid)!r}\n"


def test_an_unwritable_path_is_one_line_and_exit_1(run_dir: Path) -> None:
    """A real OSError from the PNG writer: the grid path is an existing directory."""
    grid = run_dir / "grid.png"
    grid.mkdir()
    result = invoke("sample", run_dir, "-n", "4", "--grid", grid, "--out", run_dir / "s.h5", "--no-progress")
    assert result.exit_code == 1, result.output
    assert result.stderr == f"error: Is a directory: {str(grid)!r}\n"


@pytest.mark.parametrize("command", ["sample", "data-info"])
def test_a_grid_name_without_an_image_suffix_is_refused_before_any_work(run_dir: Path, command: str) -> None:
    grid = run_dir / "grids"
    args = ("sample", run_dir, "-n", "4", "--out", run_dir / "s.h5") if command == "sample" else (
        "data", "info", run_dir / "missing.h5")
    result = invoke(*args, "--grid", grid)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: --grid {str(grid)!r}: give an image file name ending in .png (or .jpg, .webp)\n"
    assert not (run_dir / "s.h5").exists()


def _image_folder(root: Path, count: int) -> Path:
    """`count` 32x32 noise PNGs in two class folders (noise: the dataset cannot be smaller than the pixels)."""
    from PIL import Image

    rng = np.random.default_rng(count)
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root


@linux_only
def test_a_dataset_that_does_not_fit_exits_1_and_keeps_the_previous_dataset(tmp_path: Path) -> None:
    """HDF5 can crash the process when a write fails mid-file; small datasets are built in memory, so the
    failure comes at the final write, cleanly."""
    out = tmp_path / "data.h5"
    result = invoke("data", "import", _image_folder(tmp_path / "small", 8), out, "--no-progress")
    assert result.exit_code == 0, result.output
    before = out.read_bytes()
    big = _image_folder(tmp_path / "big", 200)  # 200 x 3 KiB of pixels: over the limit
    proc = ctcore_with_file_size_limit(128 * 1024, "data", "import", big, out, "--overwrite", "--no-progress")
    assert_one_error_line(proc, rf"error: could not write '{re.escape(str(out))}': File too large {FREE}; "
                                r"the previous file is unchanged")
    assert out.read_bytes() == before and names(tmp_path) == ["big", "data.h5", "small"]


def test_a_dataset_larger_than_the_free_space_is_refused_before_writing(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import ctcore.importers

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ctcore.importers.shutil, "disk_usage", lambda _: usage(1 << 30, 1 << 30, 100 * 1024))
    out = tmp_path / "data.h5"
    with pytest.raises(RunError) as info:
        ctcore.importers.write_dataset(out, np.zeros((100, 3, 32, 32), np.uint8), np.zeros(100, np.int64), {})
    assert info.value.message == (f"could not write {str(out)!r}: the dataset needs 1.3 MiB but only 100.0 KiB are "
                                  "free on that filesystem; free some space or write it elsewhere")
    assert names(tmp_path) == []
