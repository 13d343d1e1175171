"""Dataset importers: the CIFAR-10 python archive (and a malicious one), image folders / zips / tars, downsampled
ImageNet npz batches, the HDF5 training format they write, `dataset_info`, and `download` against a local server."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import bomb_png, one_line_error
from PIL import Image

import ctcore
from ctcore import importers
from ctcore.data import ImageData, hdf5_summary, read_hdf5_images
from ctcore.errors import RunError, UsageError
from ctcore.importers import dataset_info, download, import_dataset, write_dataset

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
REQUIRED_ATTRS = {"source", "source_sha256", "resolution", "channels", "count", "class_names", "layout", "created",
                  "ctcore_version"}


def _read(path: Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    images, labels, attrs = read_hdf5_images(path)
    return images.numpy(), (labels.numpy() if labels is not None else None), attrs


# ---------------------------------------------------------------------------------------------------------------
# the training format


def test_write_dataset_round_trips_chunked_with_all_attrs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 3, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 4, 300).astype(np.int32)
    out = write_dataset(tmp_path / "sub" / "d.h5", images, labels,
                        {"source": "x.tar.gz", "source_sha256": "ab" * 32, "class_names": ["a", "b", "c", "d"]})
    got, got_labels, attrs = _read(out)
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
    assert set(attrs) >= REQUIRED_ATTRS
    assert json.loads(attrs["class_names"]) == ["a", "b", "c", "d"]
    assert (attrs["resolution"], attrs["channels"], attrs["count"], attrs["layout"]) == (8, 3, 300, "NCHW")
    assert attrs["ctcore_version"] == ctcore.__version__ and attrs["source"] == "x.tar.gz"
    summary = hdf5_summary(out)
    assert summary["count"] == 300 and summary["shape"] == (3, 8, 8) and summary["has_labels"]
    with h5py.File(out) as f:
        assert f["images"].chunks == (256, 3, 8, 8)  # whole images per chunk, random batches read whole chunks
        assert f["labels"].dtype == np.int64
    assert [p.name for p in out.parent.iterdir()] == ["d.h5"]  # no temporary file left behind


def test_write_dataset_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path: Path, monkeypatch) -> None:
    images = np.zeros((2, 3, 4, 4), np.uint8)
    out = write_dataset(tmp_path / "d.h5", images, None, {})
    with pytest.raises(UsageError, match="--overwrite"):
        write_dataset(out, images, None, {})
    write_dataset(out, images + 7, np.array([0, 1]), {}, overwrite=True)
    assert _read(out)[0].max() == 7

    def broken(f, attrs):  # fail halfway through writing
        raise RuntimeError("disk full")

    monkeypatch.setattr(importers, "_write_attrs", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(out, images, None, {}, overwrite=True)
    assert _read(out)[0].max() == 7  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]
    with pytest.raises(UsageError, match=r"uint8 numpy array shaped \(N, C, H, W\)"):
        write_dataset(tmp_path / "e.h5", images.astype(np.float32), None, {})


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 python archive


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _batch(images: np.ndarray, labels: np.ndarray, name: str) -> bytes:
    """A batch as the official archive has it: bytes keys, `data` (N, 3072) uint8 rows, a list of int labels."""
    batch = {b"batch_label": name.encode(), b"labels": [int(x) for x in labels],
             b"data": images.reshape(len(images), -1), b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}
    data = pickle.dumps(batch, protocol=2)
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # the name the real (numpy 1) file uses


def _tar_bytes(members: dict[str, bytes], mode: str = "w:gz", dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_fake_cifar(path: Path, n: int = 6, overrides: dict[str, bytes] | None = None) -> dict[str, np.ndarray]:
    """A small cifar-10-python.tar.gz: data_batch_1, data_batch_2, test_batch, batches.meta, readme.html."""
    rng = np.random.default_rng(1)
    arrays, members = {}, {}
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        arrays[name] = (images, labels)
        members[name] = _batch(images, labels, name)
    members["batches.meta"] = pickle.dumps({b"num_cases_per_batch": n, b"label_names": [s.encode() for s in
                                                                                          CIFAR_NAMES]}, protocol=2)
    members["readme.html"] = b"<html></html>"
    members.update(overrides or {})
    path.write_bytes(_tar_bytes({f"cifar-10-batches-py/{k}": v for k, v in members.items()},
                                dirs=("cifar-10-batches-py",)))
    return arrays


def test_cifar10_python_archive_train_and_test_splits(tmp_path: Path) -> None:
    source = tmp_path / "cifar-10-python.tar.gz"
    arrays = make_fake_cifar(source)
    result = import_dataset(source, tmp_path / "train.h5", progress=False)
    assert result["format"] == "cifar10-python" and result["count"] == 12 and result["shape"] == [3, 32, 32]
    images, labels, attrs = _read(tmp_path / "train.h5")
    want = np.concatenate([arrays["data_batch_1"][0], arrays["data_batch_2"][0]])
    assert np.array_equal(images, want)  # CHW rows kept as they are
    assert images[7, 1, 4, 9] == want.reshape(12, -1)[7, 1024 + 4 * 32 + 9]
    assert np.array_equal(labels, np.concatenate([arrays["data_batch_1"][1], arrays["data_batch_2"][1]]))
    assert json.loads(attrs["class_names"]) == CIFAR_NAMES
    assert attrs["split"] == "train" and attrs["source"] == source.name
    assert attrs["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()

    import_dataset(source, tmp_path / "test.h5", split="test", progress=False)
    images, labels, attrs = _read(tmp_path / "test.h5")
    assert np.array_equal(images, arrays["test_batch"][0]) and attrs["split"] == "test"
    with pytest.raises(UsageError, match="train and test"):
        import_dataset(source, tmp_path / "val.h5", split="val", progress=False)


def test_cifar10_extracted_folder_is_also_accepted(tmp_path: Path) -> None:
    source = tmp_path / "cifar-10-python.tar.gz"
    arrays = make_fake_cifar(source)
    with tarfile.open(source) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    result = import_dataset(tmp_path / "x", tmp_path / "t.h5", split="test", progress=False)
    assert result["format"] == "cifar10-python"
    assert np.array_equal(_read(tmp_path / "t.h5")[0], arrays["test_batch"][0])


class _Boom:
    """Pickles into a call of `func(arg)` when loaded."""

    def __init__(self, func, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("member", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize("how", ["os.system", "eval"])
def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, member: str, how: str) -> None:
    marker = tmp_path / "pwned"
    payload = (_Boom(os.system, f"touch {marker}") if how == "os.system"
               else _Boom(builtins.eval, f"open({str(marker)!r}, 'w').close()"))
    evil = pickle.dumps({b"data": payload, b"labels": [0], b"label_names": payload}, protocol=2)
    source = tmp_path / "cifar-10-python.tar.gz"
    make_fake_cifar(source, overrides={member: evil})
    with pytest.raises(RunError, match=r"refused to unpickle.*(system|eval).*could run code") as err:
        import_dataset(source, tmp_path / "out.h5", progress=False)
    assert member in str(err.value)
    assert not marker.exists() and not (tmp_path / "out.h5").exists()


def test_cifar_batch_with_wrong_contents_is_refused(tmp_path: Path) -> None:
    bad = pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2)
    make_fake_cifar(tmp_path / "c.tar.gz", overrides={"data_batch_2": bad})
    with pytest.raises(RunError, match="data_batch_2 holds data uint8 \\(2, 100\\)"):
        import_dataset(tmp_path / "c.tar.gz", tmp_path / "o.h5", progress=False)


@pytest.mark.parametrize("cut", [0.25, 0.5, -10])
def test_a_truncated_archive_is_one_clear_error(tmp_path: Path, cut: float) -> None:
    full = tmp_path / "full.tar.gz"
    make_fake_cifar(full)
    data = full.read_bytes()
    end = int(len(data) * cut) if cut > 0 else len(data) + int(cut)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(data[:end])
    with pytest.raises(RunError, match="truncated or corrupt"):
        import_dataset(tmp_path / "cifar-10-python.tar.gz", tmp_path / "o.h5", progress=False)
    assert not (tmp_path / "o.h5").exists()


# ---------------------------------------------------------------------------------------------------------------
# image folders, zips and tars


COLORS = {"cherry": (200, 30, 40), "apple": (30, 180, 60), "banana": (240, 220, 50)}  # listed unsorted on purpose
SIZES = [(12, 10), (20, 16), (9, 14)]


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _image_members(prefix: str = "") -> dict[str, bytes]:
    """Three classes of solid-colour images of different sizes, modes and formats, plus files to ignore."""
    members = {}
    for name, color in COLORS.items():
        img = Image.new("RGB", SIZES[0], color)
        members[f"{prefix}{name}/0.png"] = _encode(img, "PNG")
        members[f"{prefix}{name}/1.png"] = _encode(Image.new("RGB", SIZES[1], color).convert("RGBA"), "PNG")
        members[f"{prefix}{name}/sub/2.jpg"] = _encode(Image.new("RGB", SIZES[2], color), "JPEG")
    members[f"{prefix}README.txt"] = b"not an image"
    members[f"{prefix}apple/.DS_Store"] = b"\0\0"
    members["__MACOSX/apple/._0.png"] = b"resource fork"
    return members


def _write_source(tmp_path: Path, kind: str, members: dict[str, bytes]) -> Path:
    if kind == "folder":
        root = tmp_path / "images"
        for name, data in members.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return root
    if kind == "zip":
        path = tmp_path / "images.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return path
    path = tmp_path / f"images.{kind}"
    path.write_bytes(_tar_bytes(members, mode="w:gz" if kind == "tar.gz" else "w"))
    return path


@pytest.mark.parametrize("kind", ["folder", "zip", "tar", "tar.gz"])
@pytest.mark.parametrize("prefix", ["", "mydata/"])
def test_image_sources_are_resized_cropped_and_labelled_alphabetically(tmp_path: Path, kind: str,
                                                                       prefix: str) -> None:
    source = _write_source(tmp_path, kind, _image_members(prefix))
    result = import_dataset(source, tmp_path / "d.h5", resolution=8, progress=False)
    images, labels, attrs = _read(tmp_path / "d.h5")
    assert images.shape == (9, 3, 8, 8) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert json.loads(attrs["class_names"]) == ["apple", "banana", "cherry"] == result["class_names"]
    assert result["class_counts"] == [3, 3, 3] and attrs["resolution"] == 8
    for label, name in enumerate(["apple", "banana", "cherry"]):
        pixels = images[labels == label].astype(int)
        assert np.abs(pixels - np.array(COLORS[name])[None, :, None, None]).max() <= 6, name
    assert len(attrs["source_sha256"]) == 64


def test_center_crop_keeps_the_middle_and_default_keeps_a_shared_size(tmp_path: Path) -> None:
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, 4:12] = 255  # only the middle 8 columns are white
    members = {"a/wide.png": _encode(Image.fromarray(wide), "PNG"),
               "b/tall.png": _encode(Image.fromarray(np.ascontiguousarray(wide.transpose(1, 0, 2))), "PNG")}
    import_dataset(_write_source(tmp_path, "zip", members), tmp_path / "d.h5", resolution=8, progress=False)
    assert (_read(tmp_path / "d.h5")[0] == 255).all()

    same = {f"{c}/{i}.png": _encode(Image.new("RGB", (10, 6), (i, 0, 0)), "PNG") for c in "xy" for i in range(2)}
    result = import_dataset(_write_source(tmp_path / "s", "folder", same), tmp_path / "s.h5", progress=False)
    assert result["shape"] == [3, 6, 10]  # no resolution and one shared size: kept as it is

    mixed = _write_source(tmp_path / "m", "folder", _image_members())
    result = import_dataset(mixed, tmp_path / "m.h5", progress=False)
    assert result["shape"] == [3, 9, 9]  # sizes differ: the smallest short side


def test_train_and_test_split_folders(tmp_path: Path) -> None:
    members = {f"{split}/{c}/{i}.png": _encode(Image.new("RGB", (4, 4), (i, 9, 9)), "PNG")
               for split, n in (("train", 3), ("test", 2)) for c in ("dog", "cat") for i in range(n)}
    source = _write_source(tmp_path, "tar.gz", members)
    assert import_dataset(source, tmp_path / "tr.h5", progress=False)["count"] == 6
    result = import_dataset(source, tmp_path / "te.h5", split="test", progress=False)
    assert result["count"] == 4 and result["class_names"] == ["cat", "dog"] and result["split"] == "test"
    with pytest.raises(UsageError, match="no val/ folder.*--split test"):
        import_dataset(source, tmp_path / "v.h5", split="val", progress=False)
    plain = _write_source(tmp_path, "folder", _image_members())
    with pytest.raises(UsageError, match="no split folders.*leave --split at train"):
        import_dataset(plain, tmp_path / "p.h5", split="test", progress=False)


def test_bad_image_sources_give_one_clear_error_each(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="holds no images"):
        import_dataset(tmp_path / "empty", tmp_path / "o.h5", progress=False)
    loose = _write_source(tmp_path / "l", "folder", {"a.png": _encode(Image.new("RGB", (4, 4)), "PNG")})
    with pytest.raises(RunError, match="no class subfolders; move them into one subfolder per class"):
        import_dataset(loose, tmp_path / "o.h5", progress=False)
    broken = _write_source(tmp_path / "b", "folder", {**_image_members(), "banana/bad.jpg": b"\xff\xd8 not a jpeg"})
    with pytest.raises(RunError) as refused:
        import_dataset(broken, tmp_path / "o.h5", progress=False)
    assert refused.value.message == (
        f"image folder {str(broken)!r}: file 'banana/bad.jpg' cannot be read as an image (not an image of a format "
        "ctcore reads: PNG, JPEG, WEBP, BMP, GIF, TIFF, PPM); delete or replace that file and import again")
    good_zip = _write_source(tmp_path, "zip", _image_members()).read_bytes()
    (tmp_path / "cut.zip").write_bytes(good_zip[: len(good_zip) // 2])
    with pytest.raises(RunError, match="cannot be read as a zip archive"):
        import_dataset(tmp_path / "cut.zip", tmp_path / "o.h5", progress=False)
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b" + os.urandom(300))
    with pytest.raises(RunError, match="cannot be read as a tar archive"):
        import_dataset(tmp_path / "junk.tar.gz", tmp_path / "o.h5", progress=False)
    with pytest.raises(RunError, match="not found"):
        import_dataset(tmp_path / "nope.tar.gz", tmp_path / "o.h5", progress=False)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UsageError, match="cannot tell what"):
        import_dataset(tmp_path / "notes.txt", tmp_path / "o.h5", progress=False)
    assert not (tmp_path / "o.h5").exists()


def test_import_refuses_to_overwrite_before_doing_any_work(tmp_path: Path) -> None:
    source = _write_source(tmp_path, "folder", _image_members())
    (tmp_path / "d.h5").write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        import_dataset(source, tmp_path / "d.h5", resolution=8, progress=False)
    assert (tmp_path / "d.h5").read_bytes() == b"keep me"
    import_dataset(source, tmp_path / "d.h5", resolution=8, overwrite=True, progress=True)
    assert hdf5_summary(tmp_path / "d.h5")["count"] == 9


# ---------------------------------------------------------------------------------------------------------------
# downsampled ImageNet npz


def _npz(path: Path, n: int, side: int = 4, seed: int = 0, compressed: bool = False, **arrays) -> dict:
    rng = np.random.default_rng(seed)
    content = {"data": rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8),
               "labels": rng.integers(1, 6, n), "mean": np.zeros(3 * side * side)}
    content.update(arrays)
    (np.savez_compressed if compressed else np.savez)(path, **content)
    return content


def test_imagenet_npz_labels_become_zero_based_and_chw_is_kept(tmp_path: Path) -> None:
    content = _npz(tmp_path / "val_data.npz", 20)
    result = import_dataset(tmp_path / "val_data.npz", tmp_path / "v.h5", progress=False)
    images, labels, attrs = _read(tmp_path / "v.h5")
    assert result["format"] == "imagenet-npz" and images.shape == (20, 3, 4, 4)
    assert np.array_equal(labels, content["labels"] - 1)
    assert images[3, 2, 1, 3] == content["data"][3, 2 * 16 + 1 * 4 + 3]  # channel 2, row 1, column 3
    assert attrs["format"] == "imagenet-npz"

    folder = tmp_path / "Imagenet64_train"
    folder.mkdir()
    parts = [_npz(folder / f"train_data_batch_{k}.npz", 5 + k, seed=k, compressed=k == 2) for k in (1, 2, 10)]
    _npz(folder / "val_data.npz", 7, seed=99)
    import_dataset(folder, tmp_path / "t.h5", progress=False)
    images, labels, _ = _read(tmp_path / "t.h5")
    assert np.array_equal(labels, np.concatenate([p["labels"] for p in parts]) - 1)  # batches 1, 2, 10 in order
    assert np.array_equal(images.reshape(len(images), -1), np.concatenate([p["data"] for p in parts]))
    assert import_dataset(folder, tmp_path / "val.h5", split="val", progress=False)["count"] == 7


@pytest.mark.parametrize(("arrays", "message"), [
    ({"data": None}, "has no 'data' array"),
    ({"labels": np.arange(6)}, "1-based"),
    ({"data": np.zeros((6, 50), np.uint8)}, r"not uint8 rows of 3\*R\*R"),
    ({"data": np.zeros((6, 48), np.float32)}, r"not uint8 rows of 3\*R\*R"),
    ({"labels": np.ones(4, np.int64)}, "does not match 6 rows"),
])
def test_a_wrong_npz_is_one_clear_error(tmp_path: Path, arrays: dict, message: str) -> None:
    content = {"data": np.zeros((6, 48), np.uint8), "labels": np.ones(6, np.int64), **arrays}
    np.savez(tmp_path / "x.npz", **{k: v for k, v in content.items() if v is not None})
    with pytest.raises(RunError, match=message):
        import_dataset(tmp_path / "x.npz", tmp_path / "o.h5", progress=False)


def test_a_file_that_is_not_npz_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RunError, match="cannot be read as .npz"):
        import_dataset(tmp_path / "x.npz", tmp_path / "o.h5", progress=False)



@pytest.mark.parametrize(("kind", "resolution", "sizes"), [
    ("folder", None, "same"), ("zip", None, "same"), ("tar", None, "same"), ("tar.gz", 4, "same"),
    ("folder", None, "mixed"), ("zip", 4, "just-over"),
], ids=["folder", "zip", "tar", "tar.gz-resolution", "folder-mixed-sizes", "zip-just-over"])
def test_an_image_too_large_in_a_source_is_one_line_naming_the_member(tmp_path: Path, kind: str,
                                                                      resolution: int | None, sizes: str) -> None:
    """A decompression bomb (a 218 KB PNG of 400 megapixels) among good images, refused from its header through
    `ctcore data import` (also where mixed sizes make the import read every header first), and an image just over
    64 megapixels: exit 1, one line naming the source and the member, nothing written."""
    from typer.testing import CliRunner

    from ctcore.cli import app

    size = (8001, 8000) if sizes == "just-over" else (20000, 20000)
    members = {"cat/a.png": _encode(Image.new("RGB", (4, 4), "red"), "PNG"), "cat/c.png": bomb_png(*size),
               "dog/d.png": _encode(Image.new("RGB", (4, 4), "blue"), "PNG")}
    if sizes == "mixed":
        members["cat/b.png"] = _encode(Image.new("RGB", (5, 5), "red"), "PNG")
    (tmp_path / "src").mkdir()
    source = _write_source(tmp_path / "src", kind, members)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["data", "import", str(source), str(tmp_path / "d.h5"), "--no-progress"]
    result = CliRunner().invoke(app, args + (["--resolution", str(resolution)] if resolution else []))
    where = {"folder": "image folder", "zip": "zip archive"}.get(kind, "archive")
    item = "file" if kind == "folder" else "member"
    megapixels = size[0] * size[1] / 1e6
    assert one_line_error(result, 1) == (
        f"{where} {str(source)!r}: {item} 'cat/c.png' is {size[0]}x{size[1]} pixels ({megapixels:.1f} megapixels), "
        "more than the 64 megapixels ctcore reads from an image file; delete or replace that file and import again")
    assert sorted(p.name for p in tmp_path.iterdir()) == before

# ---------------------------------------------------------------------------------------------------------------
# info, training use


def test_info_counts_classes_and_writes_a_png_grid(tmp_path: Path) -> None:
    import_dataset(_write_source(tmp_path, "folder", _image_members()), tmp_path / "d.h5", resolution=8,
                   progress=False)
    info = dataset_info(tmp_path / "d.h5", tmp_path / "grid" / "g.png")
    assert info["count"] == 9 and info["shape"] == [3, 8, 8] and info["chunks"] == [9, 3, 8, 8]
    assert info["classes"] == [{"label": 0, "name": "apple", "count": 3}, {"label": 1, "name": "banana", "count": 3},
                               {"label": 2, "name": "cherry", "count": 3}]
    assert info["attrs"]["class_names"] == ["apple", "banana", "cherry"] and info["attrs"]["format"] == "image-folder"
    with Image.open(info["grid"]) as png:
        assert png.format == "PNG" and png.width > 8 * 8
    json.dumps(info)  # ready for --json
    assert dataset_info(tmp_path / "d.h5")["grid"] is None
    with pytest.raises(RunError, match="not found"):
        dataset_info(tmp_path / "missing.h5")



@pytest.mark.parametrize("class_names", ["[" * 10_000 + "]" * 10_000, '["a", ' + "9" * 5000 + "]"])
def test_data_info_shows_class_names_it_cannot_decode_as_text(tmp_path: Path, class_names: str) -> None:
    """A dataset's class_names attr is JSON; nested too deeply or holding a 5000-digit number, the file's classes
    are named by their labels and the attr is shown as the text it is (exit 0, no traceback)."""
    from typer.testing import CliRunner

    from ctcore.cli import app

    images = np.zeros((3, 3, 4, 4), np.uint8)
    write_dataset(tmp_path / "d.h5", images, np.array([0, 1, 1]), {"class_names": class_names})
    result = CliRunner().invoke(app, ["data", "info", str(tmp_path / "d.h5"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["classes"] == [{"label": 0, "name": "0", "count": 1}, {"label": 1, "name": "1", "count": 2}]
    assert info["attrs"]["class_names"] == class_names

def test_an_imported_file_trains_through_imagedata(tmp_path: Path) -> None:
    import_dataset(_write_source(tmp_path, "zip", _image_members()), tmp_path / "d.h5", resolution=4,
                   progress=False)
    images, labels, _ = read_hdf5_images(tmp_path / "d.h5")
    x, y = ImageData(images, labels, num_classes=3).batch(16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 3, 4, 4) and x.min() >= -1 and x.max() <= 1 and y.max() <= 2


def test_importing_the_module_does_not_load_torch() -> None:
    code = "import sys, ctcore.importers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------------------------------------------
# download (a local server only; never the internet)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


def test_download_verifies_the_checksum(tmp_path: Path, file_server, monkeypatch) -> None:
    base, root = file_server
    payload = os.urandom(300_000)
    (root / "archive.tar.gz").write_bytes(payload)
    monkeypatch.setitem(importers.DOWNLOADS, "cifar10",
                        ("http://unused.invalid/", hashlib.sha256(payload).hexdigest(), "cifar-10-python.tar.gz"))
    dest = tmp_path / "dl"
    path = download("cifar10", dest, url=f"{base}/archive.tar.gz", progress=False, timeout=10)
    assert path == dest / "cifar-10-python.tar.gz" and path.read_bytes() == payload
    assert [p.name for p in dest.iterdir()] == ["cifar-10-python.tar.gz"]
    assert download("cifar10", dest, url=_closed_port_url(), progress=False) == path  # already there: no network


def test_download_deletes_a_file_with_the_wrong_checksum(tmp_path: Path, file_server, monkeypatch) -> None:
    base, root = file_server
    (root / "archive.tar.gz").write_bytes(b"tampered")
    monkeypatch.setitem(importers.DOWNLOADS, "cifar10", ("http://unused.invalid/", "0" * 64, "c.tar.gz"))
    with pytest.raises(RunError, match="has sha256 .* expected 0{64}.*deleted"):
        download("cifar10", tmp_path / "dl", url=f"{base}/archive.tar.gz", progress=False, timeout=10)
    assert not (tmp_path / "dl").exists()  # the folder it created went with the file
    with pytest.raises(RunError, match="HTTP Error 404.*by hand.*ctcore data import"):
        download("cifar10", tmp_path / "dl", url=f"{base}/missing.tar.gz", progress=False, timeout=10)


def test_download_failure_says_how_to_do_it_by_hand(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(RunError, match="could not download cifar10.*by hand.*ctcore data import") as err:
        download("cifar10", tmp_path / "dl", url=_closed_port_url(), progress=False, timeout=10)
    assert importers.DOWNLOADS["cifar10"][1] in str(err.value)  # the checksum to compare against
    assert not (tmp_path / "dl").exists() and time.perf_counter() - start < 10
    with pytest.raises(UsageError, match="unknown dataset 'cifar-10'; did you mean 'cifar10'"):
        download("cifar-10", tmp_path / "dl")


def test_a_failed_download_names_the_recipes_path_and_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from ctcore.cli import app

    url, sha, filename = importers.DOWNLOADS["cifar10"]
    unreachable = _closed_port_url()
    monkeypatch.setitem(importers.DOWNLOADS, "cifar10", (unreachable, sha, filename))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["data", "download", "cifar10", "--no-progress"])  # --dest data, the default
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"error: could not download cifar10 from {unreachable} ([Errno {errno.ECONNREFUSED}] "
        f"{os.strerror(errno.ECONNREFUSED)}); download "
        f"{unreachable} by hand (e.g. in a browser) into data/, check that its sha256 is {sha}, then run: ctcore "
        "data import data/cifar-10-python.tar.gz data/cifar10-train.h5 (the path the recipes read)\n")
    assert list(tmp_path.iterdir()) == []  # data/ was created for the download and removed with it
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    assert 'path = "data/cifar10-train.h5"' in (recipes / "ict_cifar10.toml").read_text()

    (tmp_path / "keep").mkdir()  # only folders the download created go: an existing one stays, empty or not
    with pytest.raises(RunError, match=r"into keep/a/b/, .* ctcore data import keep/a/b/cifar-10-python.tar.gz "
                                       r"data/cifar10-train.h5 \(the path the recipes read\)$"):
        download("cifar10", Path("keep/a/b"), progress=False, timeout=10)
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*")] == [Path("keep")]


def test_the_registry_names_the_official_archive() -> None:
    url, sha, filename = importers.DOWNLOADS["cifar10"]
    assert url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" and filename == "cifar-10-python.tar.gz"
    assert len(sha) == 64 and int(sha, 16)


# ---------------------------------------------------------------------------------------------------------------
# the shared CIFAR-10 JPEG archive


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"{SHARED_CIFAR} not present")
def test_the_shared_cifar10_jpeg_archive(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = import_dataset(SHARED_CIFAR, tmp_path / "cifar10.h5", progress=False)
    seconds = time.perf_counter() - start
    print(f"imported {result['count']:,} images from {SHARED_CIFAR.name} in {seconds:.1f} s")
    images, labels, attrs = _read(tmp_path / "cifar10.h5")
    assert images.shape == (50_000, 3, 32, 32) and result["format"] == "image-tar"
    assert np.bincount(labels).tolist() == [5000] * 10
    names = json.loads(attrs["class_names"])
    assert names == sorted(names) == CIFAR_NAMES  # airplane = 0 ... truck = 9, as in the official labels
    sample = images[::97].astype(np.float32)
    assert 40 < sample.mean() < 200 and sample.std() > 30  # real pictures, not blank


def test_data_commands_through_the_cli(tmp_path: Path) -> None:
    """`ctcore data import` and `ctcore data info` on a tiny image folder, and their exit codes."""
    from PIL import Image
    from typer.testing import CliRunner

    from ctcore.cli import app

    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (6, 6), (40 * i, 100, 200)).save(tmp_path / "imgs" / cls / f"{i}.png")
    out = tmp_path / "d.h5"
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, ["data", "import", str(tmp_path / "imgs"), str(out), "--resolution", "4",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("wrote 6 images of shape (3, 4, 4) in 2 classes")
    again = runner.invoke(app, ["data", "import", str(tmp_path / "imgs"), str(out), "--no-progress"])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    info = runner.invoke(app, ["data", "info", str(out), "--json", "--grid", str(tmp_path / "g.png")])
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["count"] == 6 and [c["count"] for c in data["classes"]] == [3, 3]
    assert (tmp_path / "g.png").is_file()
    missing = runner.invoke(app, ["data", "info", str(tmp_path / "nope.h5")])
    assert missing.exit_code == 1 and "Traceback" not in missing.output


# ------------------------------------------------------------------------------ data info --grid by class


def _tile(image: np.ndarray, scale: int) -> np.ndarray:
    """One (C, H, W) uint8 image as the grid draws it: (H*scale, W*scale, 3)."""
    return image.transpose(1, 2, 0).repeat(scale, axis=0).repeat(scale, axis=1)


def test_data_info_grid_has_one_row_per_class_labelled_with_its_name(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctcore.cli import app

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 3, 4, 4), dtype=np.uint8)
    labels = np.array([2, 0] * 5 + [1] * 20)  # class 0: 5 images, 1: 20, 2: 5
    named = write_dataset(tmp_path / "named.h5", images, labels, {"class_names": ["cat", "dog", "frog"]})
    unnamed = write_dataset(tmp_path / "unnamed.h5", images, labels, {})
    info = dataset_info(named, tmp_path / "named.png")
    assert info["grid_rows"] == ["cat", "dog", "frog"]
    assert dataset_info(unnamed, tmp_path / "unnamed.png")["grid_rows"] == ["0", "1", "2"]
    grid = np.asarray(Image.open(tmp_path / "named.png").convert("RGB"))
    margin = grid.shape[1] - (8 * 65 + 1)  # 8 images of 4x4 shown at 64x64, 1 pixel apart, after the names
    assert grid.shape[0] == 3 * 66 and margin > 20
    for row, label in enumerate((0, 1, 2)):
        members = np.flatnonzero(labels == label)
        shown = members[np.unique(np.linspace(0, len(members) - 1, min(8, len(members))).round().astype(int))]
        for col, index in enumerate(shown):  # the class's examples, spread over it, in file order
            y, x = row * 66 + 1, margin + 1 + col * 65
            assert np.array_equal(grid[y : y + 64, x : x + 64], _tile(images[index], 16)), (row, col)
        assert (grid[row * 66 : row * 66 + 66, margin + 1 + len(shown) * 65 :] == 255).all()  # the rest blank
        assert grid[row * 66 : (row + 1) * 66, :margin].min() < 100  # the caption in dark text
    assert Image.open(tmp_path / "unnamed.png").size[0] < grid.shape[1]  # "0", "1", "2" need a narrower margin
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["data", "info", str(named), "--grid",
                                                            str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    assert f"grid           │ {tmp_path / 'g.png'} (one row per class)" in result.stdout


def test_data_info_grid_shows_the_first_64_classes_and_an_unlabelled_file_as_before(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctcore.cli import app

    images = np.arange(70 * 3 * 2 * 2, dtype=np.int64).reshape(70, 3, 2, 2).astype(np.uint8)
    many = write_dataset(tmp_path / "many.h5", images, np.arange(70)[::-1].copy(), {})
    info = dataset_info(many, tmp_path / "many.png")
    assert info["grid_rows"] == [str(k) for k in range(64)]
    assert Image.open(tmp_path / "many.png").size[1] == 64 * 66
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["data", "info", str(many), "--grid",
                                                            str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    assert "(one row per class, for the first 64 of 70 classes)" in result.stdout
    plain = write_dataset(tmp_path / "plain.h5", images, None, {})
    info = dataset_info(plain, tmp_path / "plain.png")
    assert info["grid_rows"] is None
    grid = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))
    assert grid.shape == (8 * 65 + 1, 8 * 65 + 1, 3)  # 64 of the 70 images, 8 per row, no captions
    picked = np.unique(np.linspace(0, 69, 64).round().astype(int))
    assert np.array_equal(grid[1:65, 1:65], _tile(images[picked[0]], 32))
