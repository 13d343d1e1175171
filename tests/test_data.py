"""Training data: the synthetic glyph set, HDF5 files (good and malformed), batches, flips and labels."""

from __future__ import annotations

import re
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import write_tiny_recipe

import ctcore
from ctcore.build import start_run
from ctcore.data import GLYPH_NAMES, ImageData, _glyph_masks, hdf5_summary, read_hdf5_images, synthetic_glyphs, to_uint8
from ctcore.errors import RunError
from ctcore.importers import dataset_info
from ctcore.recipe import read_recipe
from ctcore.training import train


def _write_h5(path: Path, images: np.ndarray | None, labels: np.ndarray | None = None) -> Path:
    with h5py.File(path, "w") as f:
        if images is not None:
            f.create_dataset("images", data=images)
        if labels is not None:
            f.create_dataset("labels", data=labels)
        f.attrs["source"] = "test"
    return path


def test_synthetic_glyphs_are_deterministic_uint8_with_labels() -> None:
    images, labels = synthetic_glyphs(64, resolution=8, seed=3)
    again, _ = synthetic_glyphs(64, resolution=8, seed=3)
    other, _ = synthetic_glyphs(64, resolution=8, seed=4)
    assert images.shape == (64, 3, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images, again) and not torch.equal(images, other)
    assert labels.min() >= 0 and labels.max() < len(GLYPH_NAMES)
    masks = _glyph_masks(8)
    assert masks.shape == (len(GLYPH_NAMES), 8, 8)
    assert len({tuple(m.flatten().tolist()) for m in masks}) == len(GLYPH_NAMES)  # 8 distinct shapes


def test_batches_are_in_range_and_flips_mirror_images() -> None:
    images = (torch.arange(2 * 3 * 2 * 4).reshape(2, 3, 2, 4) * 5).to(torch.uint8)  # no image is symmetric
    originals = {tuple(img.flatten().tolist()) for img in images}
    mirrored = {tuple(img.flip(-1).flatten().tolist()) for img in images}
    assert not originals & mirrored

    x, labels = ImageData(images, None).batch(64, torch.Generator().manual_seed(0))
    assert labels is None and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert {tuple(v.flatten().tolist()) for v in to_uint8(x)} == originals  # exact round trip, no flips

    y, _ = ImageData(images, None, random_flip=True).batch(64, torch.Generator().manual_seed(0))
    seen = {tuple(v.flatten().tolist()) for v in to_uint8(y)}
    assert seen <= originals | mirrored and seen & mirrored and seen & originals  # both orientations occur


def test_labels_are_served_only_for_class_conditional_data() -> None:
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    _, none = ImageData(images, labels, num_classes=0).batch(8, torch.Generator().manual_seed(0))
    _, got = ImageData(images, labels, num_classes=4).batch(8, torch.Generator().manual_seed(0))
    assert none is None and got.shape == (8,) and set(got.tolist()) <= {0, 1, 2, 3}


def test_a_class_conditional_run_trains_from_an_hdf5_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = _write_h5(tmp_path / "data.h5", rng.integers(0, 256, (40, 3, 4, 4), dtype=np.uint8),
                     rng.integers(0, 5, 40).astype(np.int64))
    registry = ctcore.load_registry()
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run",
                               data={"source": "hdf5", "path": str(data), "num_classes": 5})
    run = start_run(read_recipe(recipe, registry), registry)
    assert run.data.num_classes == 5
    assert run.student.label_embed is not None and run.student.label_embed.num_embeddings == run.data.num_classes
    summary = train(run, progress=False)
    assert summary["step"] == 12 and run.provenance["num_classes"] == run.data.num_classes


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _write_h5(p, None, np.zeros(3, np.int64)), "has no `images` dataset (found: labels)"),
        (lambda p: _write_h5(p, np.zeros((2, 3, 4, 4), np.float32)),
         "`images` must be uint8 (N, C, H, W), got float32 (2, 3, 4, 4)"),
        (lambda p: _write_h5(p, np.zeros((2, 4, 4), np.uint8)),
         "`images` must be uint8 (N, C, H, W), got uint8 (2, 4, 4)"),
        (lambda p: _write_h5(p, np.zeros((2, 3, 4, 4), np.uint8), np.zeros(5, np.int64)),
         "`labels` shape (5,) does not match 2 images"),
        (lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 20), "cannot be read as HDF5"),
    ],
    ids=["no-images", "float-images", "3d-images", "label-count", "truncated"],
)
def test_malformed_hdf5_files_give_one_clear_error(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.h5"
    make(path)
    with pytest.raises(RunError) as info:
        read_hdf5_images(path)
    assert info.value.message.startswith(f"dataset file {str(path)!r}")
    assert message in info.value.message


def test_class_conditional_without_labels_is_refused(tmp_path: Path) -> None:
    data = _write_h5(tmp_path / "nolabels.h5", np.zeros((4, 3, 4, 4), np.uint8))
    registry = ctcore.load_registry()
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run",
                               data={"source": "hdf5", "path": str(data), "num_classes": 3})
    with pytest.raises(RunError, match="data.num_classes is 3 but .* has no `labels` dataset"):
        start_run(read_recipe(recipe, registry), registry)


@pytest.mark.parametrize(
    ("data", "message"),
    [({"num_classes": 2}, "has labels in [0, 4], outside 0..1 (data.num_classes = 2)"),
     ({"resolution": 8}, "holds images of shape (3, 4, 4), but the recipe's [data] declares channels = 3, "
                         "resolution = 8; make them agree")],
    ids=["label-out-of-range", "shape-mismatch"],
)
def test_a_file_that_disagrees_with_the_recipe_is_refused(tmp_path: Path, data: dict, message: str) -> None:
    path = _write_h5(tmp_path / "d.h5", np.zeros((5, 3, 4, 4), np.uint8), np.arange(5, dtype=np.int64))
    registry = ctcore.load_registry()
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run",
                               data={"source": "hdf5", "path": str(path), **data})
    with pytest.raises(RunError) as info:
        start_run(read_recipe(recipe, registry), registry)
    assert message in info.value.message


def test_rank_shares_concatenate_to_the_single_process_batch() -> None:
    images = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    data = ImageData(images, torch.arange(50) % 5, random_flip=True, num_classes=5)
    whole, whole_labels = data.batch(12, torch.Generator().manual_seed(7))
    shares = [data.batch(12, torch.Generator().manual_seed(7), rank=r, world_size=3) for r in range(3)]
    assert all(x.shape[0] == 4 for x, _ in shares)
    assert torch.equal(torch.cat([x for x, _ in shares]), whole)
    assert torch.equal(torch.cat([y for _, y in shares]), whole_labels)
    with pytest.raises(ValueError, match="must split evenly"):
        data.batch(10, torch.Generator(), rank=0, world_size=3)


# ------------------------------------------------------------------------- hostile files through every command

GIB = 1 << 30  # CTCORE_MEMORY_LIMIT in these tests, so that the size messages are exact on any machine
TOO_BIG = ("use a smaller file (fewer images, or `ctcore data import --resolution`) or a machine with more memory")


def _with_images(images_shape: tuple[int, ...] = (5, 3, 4, 4), dtype=np.uint8, **labels):
    """A builder: `images` of this shape (zeros) and, with `data=` or `shape=`/`dtype=`, a `labels` dataset."""
    def build(f: h5py.File) -> None:
        f.create_dataset("images", data=np.zeros(images_shape, dtype))
        if labels:
            f.create_dataset("labels", **labels)
    return build


def _half_written(f: h5py.File) -> None:
    images = f.create_dataset("images", shape=(2048, 3, 4, 4), dtype=np.uint8, chunks=(1024, 3, 4, 4))
    images[:1024] = 7  # a writer killed half way


def _huge(f: h5py.File, labels: bool = False) -> None:
    """10^9 images claimed, none written: HDF5 allocates chunks lazily, so the file stays a few KiB."""
    f.create_dataset("images", shape=(10**9, 3, 4, 4), dtype=np.uint8, chunks=(4096, 3, 4, 4))
    if labels:
        f.create_dataset("labels", shape=(10**9,), dtype=np.int64, chunks=(65536,))


def _labelled(f: h5py.File) -> None:
    _with_images(data=np.arange(5, dtype=np.int64))(f)


HOSTILE = {  # name: (builder, message after "dataset file '<path>'", data.num_classes of the recipe)
    "images-group": (lambda f: f.create_group("images"), ": `images` must be uint8 (N, C, H, W), got a group", 0),
    "zero-images": (_with_images((0, 3, 4, 4)),
                    " holds no images (`images` has shape (0, 3, 4, 4)); import the data again", 0),
    "5-dim-images": (_with_images((5, 1, 3, 4, 4)), ": `images` must be uint8 (N, C, H, W), got uint8 (5, 1, 3, 4, 4)",
                     0),
    "int16-images": (_with_images(dtype=np.int16), ": `images` must be uint8 (N, C, H, W), got int16 (5, 3, 4, 4)", 0),
    "channels-last": (_with_images((5, 32, 32, 3)),
                      ": `images` has shape (5, 32, 32, 3), which looks like (N, H, W, C): store images as "
                      "(N, C, H, W)", 0),
    "too-many-channels": (_with_images((1, 2000, 2, 2)),
                          ": `images` has shape (1, 2000, 2, 2), outside (N, 1..1024 channels, 1..16,384, 1..16,384 "
                          "pixels)", 0),
    "string-labels": (_with_images(data=np.array([b"cat", b"dog", b"cat", b"dog", b"cat"])),
                      ": `labels` must be integers (N,), got strings of shape (5,); store class indices 0, 1, ... "
                      "as integers", 0),
    "float-labels": (_with_images(data=np.array([0.0, 1.5, 2.0, 0.0, 1.0])),
                     ": `labels` must be integers (N,), got float64 values of shape (5,); store class indices 0, 1, "
                     "... as integers", 0),
    "bool-labels": (_with_images(data=np.array([True, False, True, False, True])),
                    ": `labels` must be integers (N,), got bool values of shape (5,); store class indices 0, 1, ... "
                    "as integers", 0),
    "compound-labels": (_with_images(data=np.zeros(5, [("label", "i8"), ("weight", "f4")])),
                        ": `labels` must be integers (N,), got compound records (label, weight) of shape (5,); store "
                        "class indices 0, 1, ... as integers", 0),
    "group-labels": (lambda f: (_with_images()(f), f.create_group("labels")),
                     ": `labels` must be integers (N,), got a group; store class indices 0, 1, ... as integers", 0),
    "labels-too-few": (_with_images(data=np.arange(3, dtype=np.int64)),
                       ": `labels` shape (3,) does not match 5 images", 0),
    "labels-2d": (_with_images(data=np.zeros((5, 1), np.int64)), ": `labels` shape (5, 1) does not match 5 images", 0),
    "10^9-images": (_huge, f" holds 1,000,000,000 images of 3x4x4 = 44.7 GiB, more than the 1.0 GiB of memory "
                           f"available (CTCORE_MEMORY_LIMIT); {TOO_BIG}", 0),
    "10^9-labelled": (lambda f: _huge(f, labels=True),
                      f" holds 1,000,000,000 images of 3x4x4 with labels = 52.2 GiB, more than the 1.0 GiB of memory "
                      f"available (CTCORE_MEMORY_LIMIT); {TOO_BIG}", 3),
    "unwritten-images": (lambda f: f.create_dataset("images", shape=(10**6, 3, 4, 4), dtype=np.uint8,
                                                    chunks=(4096, 3, 4, 4)),
                         " claims 1,000,000 images but only 0 of its 245 storage chunks were ever written (an "
                         "interrupted or damaged file); import it again", 0),
    "half-written-images": (_half_written, " claims 2,048 images but only 1 of its 2 storage chunks were ever "
                                           "written (an interrupted or damaged file); import it again", 0),
}
DATA_COMMANDS = {  # how each command is invoked on a data file `d` and a recipe `r` that points at it
    "check": lambda d, r, tmp: ["check", str(r)],
    "run": lambda d, r, tmp: ["run", str(r), "--no-progress"],
    "data-info": lambda d, r, tmp: ["data", "info", str(d)],
    "data-info-grid": lambda d, r, tmp: ["data", "info", str(d), "--grid", str(tmp / "grid.png")],
}


def _invoke_on_file(tmp_path: Path, command: str, data: Path, num_classes: int = 0):
    from typer.testing import CliRunner

    from ctcore.cli import app

    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run",
                               data={"source": "hdf5", "path": str(data), "num_classes": num_classes})
    before = data.read_bytes()
    start = time.perf_counter()
    result = CliRunner(env={"CTCORE_MEMORY_LIMIT": str(GIB)}).invoke(app, DATA_COMMANDS[command](data, recipe,
                                                                                                 tmp_path))
    seconds = time.perf_counter() - start
    assert data.read_bytes() == before  # every command only reads the file
    assert not (tmp_path / "run").exists() and not (tmp_path / "grid.png").exists()
    return result, seconds


@pytest.mark.parametrize("command", list(DATA_COMMANDS))
@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_data_file_is_one_line_and_exit_1_in_every_command(tmp_path: Path, case: str, command: str) -> None:
    build, message, num_classes = HOSTILE[case]
    data = tmp_path / "bad.h5"
    with h5py.File(data, "w") as f:
        build(f)
    assert data.stat().st_size < 64 * 1024  # the 10^9-image files too: nothing was written
    result, seconds = _invoke_on_file(tmp_path, command, data, num_classes)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert result.stderr == f"error: dataset file {str(data)!r}{message}\n"
    assert seconds < 2.0  # no array was read: the 10^9-image files answer at once (well under 0.1 s here)


def _truncated(path: Path) -> None:
    _with_images((300, 3, 4, 4))(h5py.File(path, "w"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_chunk(path: Path) -> None:
    """A file whose metadata is intact but one compressed chunk of `images` is garbage."""
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.random.default_rng(0).integers(0, 256, (64, 3, 4, 4), dtype=np.uint8),
                         chunks=(8, 3, 4, 4), compression="gzip")
        chunk = f["images"].id.get_chunk_info(3)
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset: chunk.byte_offset + chunk.size] = b"\xab" * chunk.size
    path.write_bytes(bytes(data))


UNREADABLE = {
    "empty": (lambda p: p.write_bytes(b""), ["check", "run", "data-info", "data-info-grid"]),
    "random-bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
                     ["check", "run", "data-info", "data-info-grid"]),
    "truncated": (_truncated, ["check", "run", "data-info", "data-info-grid"]),
    "corrupt-chunk": (_corrupt_chunk, ["run", "data-info-grid"]),  # only what reads images can notice it
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_a_file_that_is_not_readable_hdf5_is_one_line_and_exit_1(tmp_path: Path, case: str) -> None:
    make, commands = UNREADABLE[case]
    data = tmp_path / "bad.h5"
    make(data)
    for command in commands:
        result, _ = _invoke_on_file(tmp_path, command, data)
        assert result.exit_code == 1, (command, result.output)
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
        assert re.fullmatch(rf"error: dataset file {re.escape(repr(str(data)))} cannot be read as HDF5 \([^\n]+\); "
                            r"is it truncated\? Import it again\n", result.stderr), (command, result.stderr)


def test_a_file_claiming_10_to_the_9_images_is_refused_at_once_with_the_real_memory(tmp_path: Path) -> None:
    data = tmp_path / "huge.h5"
    with h5py.File(data, "w") as f:
        f.create_dataset("images", shape=(10**9, 3, 32, 32), dtype=np.uint8, chunks=(64, 3, 32, 32))
    assert data.stat().st_size < 64 * 1024
    start = time.perf_counter()
    with pytest.raises(RunError) as info:
        dataset_info(data, tmp_path / "grid.png")
    assert time.perf_counter() - start < 0.5
    assert re.fullmatch(rf"dataset file {re.escape(repr(str(data)))} holds 1,000,000,000 images of 3x32x32 = 2\.8 "
                        rf"TiB, more than the \d+\.\d [KMG]iB of memory available; {re.escape(TOO_BIG)}",
                        info.value.message), info.value.message
    assert hdf5_summary(data)["count"] == 10**9  # the summary itself reads metadata only: no refusal there


def test_a_dataset_that_does_not_fit_on_the_cuda_device_is_refused(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = _write_h5(tmp_path / "d.h5", np.zeros((5, 3, 4, 4), np.uint8), np.arange(5, dtype=np.int64))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100, 1000))
    with pytest.raises(RunError) as info:
        read_hdf5_images(data, "cuda:0")
    assert info.value.message == (f"dataset file {str(data)!r} holds 5 images of 3x4x4 with labels = 280 B, more than "
                                  f"the 100 B free on cuda:0; {TOO_BIG}")
    images, labels, _ = read_hdf5_images(data, "cpu")
    assert images.shape == (5, 3, 4, 4) and labels.dtype == torch.int64


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32, np.int64, np.uint64])
def test_integer_labels_of_any_width_are_read_as_int64(tmp_path: Path, dtype) -> None:
    data = _write_h5(tmp_path / "d.h5", np.zeros((4, 3, 4, 4), np.uint8), np.array([0, 2, 1, 2], dtype))
    _, labels, _ = read_hdf5_images(data)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 2, 1, 2]
    assert [c["count"] for c in dataset_info(data)["classes"]] == [1, 1, 2]


def test_a_uint64_label_beyond_int64_is_reported_exactly(tmp_path: Path) -> None:
    data = _write_h5(tmp_path / "d.h5", np.zeros((2, 3, 4, 4), np.uint8), np.array([0, 2**64 - 1], np.uint64))
    registry = ctcore.load_registry()
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run",
                               data={"source": "hdf5", "path": str(data), "num_classes": 2})
    with pytest.raises(RunError) as info:
        start_run(read_recipe(recipe, registry), registry)
    assert info.value.message == (f"dataset file {str(data)!r} has labels in [0, {2**64 - 1}], outside 0..1 "
                                  "(data.num_classes = 2)")


def test_data_info_grid_refuses_two_channel_images_that_no_grid_can_show(tmp_path: Path) -> None:
    data = _write_h5(tmp_path / "d.h5", np.zeros((5, 2, 4, 4), np.uint8))
    result, _ = _invoke_on_file(tmp_path, "data-info-grid", data)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr == (f"error: dataset file {str(data)!r} holds 2-channel images, which a --grid cannot show "
                             "(it draws 1-channel grey or the first 3 channels as RGB); leave out --grid\n")
    assert dataset_info(data)["shape"] == [2, 4, 4]


def test_reference_statistics_refuse_a_file_that_was_never_completely_written(tmp_path: Path) -> None:
    """eval-ref-stats reads in chunks (a real dataset may exceed memory), so without this check a file claiming
    10^9 images would be fed to Inception as a billion black images."""
    from ctcore.fid import reference_statistics

    data = tmp_path / "claims.h5"
    with h5py.File(data, "w") as f:
        f.create_dataset("images", shape=(10**9, 3, 32, 32), dtype=np.uint8, chunks=(64, 3, 32, 32))
    start = time.perf_counter()
    with pytest.raises(RunError) as err:
        reference_statistics(data, None, progress=False)
    assert time.perf_counter() - start < 2.0
    assert err.value.message == (f"dataset file {str(data)!r} claims 1,000,000,000 images but only 0 of its "
                                 "15,625,000 storage chunks were ever written (an interrupted or damaged file); "
                                 "import it again")
