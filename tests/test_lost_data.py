"""Commands never destroy their own inputs, and the next writer of a file removes what a killed writer left.

Any command whose output is one of its inputs (the same file after resolving links: the path itself, a symbolic or a
hard link) refuses before any work, with or without --overwrite. A writer killed mid-write leaves its temporary
file (`.<name>.<8 characters>.tmp`) beside the target; the next writer of that target removes it once it holds the
target's lock.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import finished_tiny_run, one_line_error, snapshot
from PIL import Image
from typer.testing import CliRunner

from ctcore.cli import app
from ctcore.files import stale_temporaries
from ctcore.importers import write_dataset


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (RGB 4x4 images, a checkpoint at steps 6 and 12)."""
    return finished_tiny_run(tmp_path_factory.mktemp("lost-data-run"))


LAST = "checkpoints/ckpt-000000012.pt"


def _dataset(path: Path) -> Path:
    images = np.full((3, 3, 4, 4), 200, dtype=np.uint8)
    return write_dataset(path, images, None, {"source": "test"})


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4), (10, 200, 30)).save(path / name)
    return path


def _link(target: Path, link: Path, kind: str) -> Path:
    """`link` naming `target`: the same path ("same"), a symbolic link or a hard link to it."""
    if kind == "same":
        return target
    if kind == "symlink":
        link.symlink_to(target)
    else:
        os.link(target, link)
    return link


# (name, builder(tmp, run_dir, kind) -> (argv, expected message)); the output comes first in each message
Case = Callable[[Path, Path, str], tuple[list[object], str]]


def _edit_images(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    source = _dataset(tmp / "x.h5")
    out = _link(source, tmp / "out.h5", kind)
    return (["edit", "colorize", run, "--images", source, "-o", out],
            f"-o {str(out)!r} is the same file as --images {str(source)!r}")


def _edit_folder_grid(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    folder = _folder(tmp / "paintings")
    grid = _link(folder / "b.png", tmp / "grid.png", kind)
    return (["edit", "stroke", run, "--images", folder, "-o", tmp / "e.h5", "--grid", grid],
            f"--grid {str(grid)!r} is the same file as --images {str(folder / 'b.png')!r}")


def _edit_mask_grid(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    mask = tmp / "mask.png"
    Image.new("L", (4, 4), 255).save(mask)
    grid = _link(mask, tmp / "grid.png", kind)
    return (["edit", "inpaint", run, "--images", _dataset(tmp / "x.h5"), "--mask", mask, "-o", tmp / "e.h5",
             "--grid", grid], f"--grid {str(grid)!r} is the same file as --mask {str(mask)!r}")


def _edit_checkpoint(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    out = _link(run / LAST, tmp / "out.h5", "symlink" if kind == "same" else kind)
    return (["edit", "interpolate", run, "--seeds", "0,1", "-o", out],
            f"-o {str(out)!r} is the same file as CHECKPOINT {str(run / LAST)!r}")


def _sample_out(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    out = _link(run / LAST, tmp / "out.h5", "symlink" if kind == "same" else kind)
    return (["sample", run / LAST, "-n", 2, "-o", out],
            f"--out {str(out)!r} is the same file as CHECKPOINT {str(run / LAST)!r}")


def _sample_grid(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    grid = _link(run / LAST, tmp / "grid.png", "symlink" if kind == "same" else kind)
    return (["sample", run, "-n", 2, "-o", tmp / "s.h5", "--grid", grid],
            f"--grid {str(grid)!r} is the same file as CHECKPOINT {str(run / LAST)!r}")


def _import(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    source = _dataset(tmp / "src.h5")  # not a source format: the refusal comes before the format is read
    out = _link(source, tmp / "out.h5", kind)
    return (["data", "import", source, out], f"OUT.h5 {str(out)!r} is the same file as SOURCE {str(source)!r}")


def _info_grid(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    dataset = _dataset(tmp / "d.h5")
    grid = _link(dataset, tmp / "grid.png", "symlink" if kind == "same" else kind)
    return (["data", "info", dataset, "--grid", grid],
            f"--grid {str(grid)!r} is the same file as DATASET.h5 {str(dataset)!r}")


def _ref_stats(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    dataset = _dataset(tmp / "d.h5")
    out = _link(dataset, tmp / "ref.npz", "symlink" if kind == "same" else kind)
    return (["eval-ref-stats", dataset, out],
            f"OUT.npz {str(out)!r} is the same file as DATASET.h5 {str(dataset)!r}")


def _convert(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    source = tmp / "released.pt"
    torch.save({"w": torch.zeros(2)}, source)
    out = _link(source, tmp / "out.pt", kind)
    return (["convert", "openai-cm", source, out], f"OUT.pt {str(out)!r} is the same file as SOURCE {str(source)!r}")


def _convert_edm(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    source = tmp / "edm.pkl"
    source.write_bytes(b"not read: the refusal comes first")
    out = _link(source, tmp / "out.pt", kind)
    return (["convert", "edm", source, out], f"OUT.pt {str(out)!r} is the same file as SOURCE {str(source)!r}")


def _search_plot(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    plot = _link(run / LAST, tmp / "plot.png", "symlink" if kind == "same" else kind)
    return (["search-sigmas", run, "--steps", 2, "--plot", plot],
            f"--plot {str(plot)!r} is the same file as CHECKPOINT {str(run / LAST)!r}")


def _report(tmp: Path, run: Path, kind: str) -> tuple[list[object], str]:
    figure = _link(run / "stats.jsonl", tmp / "report.png", "symlink" if kind == "same" else kind)
    return (["report", run, "--output", figure],
            f"--output {str(figure)!r} is the same file as the run's {str(run / 'stats.jsonl')!r}")


CASES: dict[str, Case] = {
    "edit -o = --images": _edit_images, "edit --grid = an image of the --images folder": _edit_folder_grid,
    "edit --grid = --mask": _edit_mask_grid, "edit -o = the checkpoint": _edit_checkpoint,
    "sample --out = the checkpoint": _sample_out, "sample --grid = the checkpoint": _sample_grid,
    "data import OUT = SOURCE": _import, "data info --grid = DATASET": _info_grid,
    "eval-ref-stats OUT = DATASET": _ref_stats, "convert OUT = SOURCE": _convert,
    "convert edm OUT = SOURCE": _convert_edm,
    "search-sigmas --plot = the checkpoint": _search_plot, "report --output = stats.jsonl": _report,
}
HAS_OVERWRITE = {"edit", "sample", "import", "eval-ref-stats", "openai-cm", "edm"}


@pytest.mark.parametrize("kind", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("case", list(CASES))
def test_an_output_that_is_one_of_the_commands_inputs_is_refused_before_any_work(case: str, kind: str,
                                                                                 run_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """Each command whose output names one of its inputs (by its own path, a symbolic or a hard link) exits 2 with
    one line and leaves every file as it was, also with --overwrite (the example that lost data: `ctcore edit -o
    X.h5 --overwrite --images X.h5` replaced the source dataset with its results)."""
    argv, start = CASES[case](tmp_path, run_dir, kind)
    before, run_before = snapshot(tmp_path), snapshot(run_dir)
    variants = [argv, [*argv, "--overwrite"]] if argv[0] in HAS_OVERWRITE or argv[1] in HAS_OVERWRITE else [argv]
    for args in variants:
        message = one_line_error(invoke(*args))
        output = message.split(" ", 2)[:2]
        assert message == (f"{start}: writing it would destroy what this command reads, with or without "
                           f"--overwrite; choose another {output[0]}"), args
        assert snapshot(tmp_path) == before and snapshot(run_dir) == run_before, args


def test_a_dangling_link_or_a_new_file_is_no_input(run_dir: Path, tmp_path: Path) -> None:
    """An output that does not exist yet, or a link to nothing, is written as usual."""
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    result = invoke("sample", run_dir, "-n", 2, "-o", tmp_path / "new.h5", "--grid", tmp_path / "fresh.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new.h5").is_file() and (tmp_path / "fresh.png").is_file()


# ------------------------------------------------------------------- what a killed writer leaves behind


def _killed_writer_debris(target: Path) -> Path:
    """The temporary file `atomic_write` makes for `target`, as a writer SIGKILLed in the middle of writing it leaves
    it (same folder, name and shape), 1 MiB of partial content."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.write(fd, os.urandom(1 << 20))
    os.close(fd)
    return Path(name)


def test_the_next_writer_of_a_target_removes_a_killed_writers_temporary_file(run_dir: Path, tmp_path: Path) -> None:
    """data import, sample, edit and convert: the next writer of the same target (with --overwrite, or once the
    target is gone) removes the killed writer's temporary file; temporaries of other targets and other files
    beside it are left alone."""
    folder = _folder(tmp_path / "images" / "class_a").parent
    data = tmp_path / "data.h5"
    store, edited = tmp_path / "s.h5", tmp_path / "e.h5"
    other = _killed_writer_debris(tmp_path / "unrelated.h5")
    (tmp_path / ".data.h5.notes.txt").write_text("mine")
    runs = [
        (data, ["data", "import", folder, data, "--overwrite", "--no-progress"]),
        (data, ["data", "import", folder, data, "--overwrite", "--no-progress"]),  # over an existing dataset
        (store, ["sample", run_dir, "-n", 2, "-o", store]),
        (store, ["sample", run_dir, "-n", 2, "-o", store, "--overwrite"]),
        (edited, ["edit", "colorize", run_dir, "--images", folder / "class_a", "-o", edited]),
    ]
    for target, args in runs:
        debris = _killed_writer_debris(target)
        assert stale_temporaries(target) == [debris]
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert not debris.exists() and stale_temporaries(target) == [], args
    assert other.exists() and (tmp_path / ".data.h5.notes.txt").read_text() == "mine"


def test_a_live_writers_temporary_file_is_not_touched(run_dir: Path, tmp_path: Path) -> None:
    """While another process holds the target's lock (it may be writing that temporary file right now), a second
    writer is refused and removes nothing."""
    import subprocess
    import sys

    store = tmp_path / "s.h5"
    live = _killed_writer_debris(store)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ctcore.files import acquire_lock, lock_path_for; "
         f"acquire_lock(lock_path_for({str(store)!r}), 'sample store', 'ctcore sample'); print('locked', flush=True); "
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        result = invoke("sample", run_dir, "-n", 2, "-o", store)
        assert one_line_error(result, code=1) == (
            f"sample store {str(store)!r} is in use by process {holder.pid} (ctcore sample); wait for it to finish, "
            "or stop it first")
        assert live.exists() and not store.exists()
    finally:
        holder.communicate("", timeout=30)
