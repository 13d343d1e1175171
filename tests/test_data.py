"""Training data: the synthetic glyph set, HDF5 files (good and malformed), batches, flips and labels."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import write_tiny_recipe

import ctcore
from ctcore.build import start_run
from ctcore.data import GLYPH_NAMES, ImageData, _glyph_masks, read_hdf5_images, synthetic_glyphs, to_uint8
from ctcore.errors import RunError
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
