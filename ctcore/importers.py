"""Dataset importers: turn the CIFAR-10 python archive, image folders (.zip, .tar, .tar.gz) and the downsampled
ImageNet .npz batches into ctcore's one training format, and inspect or download such data.

The training format is an HDF5 file holding `images` uint8 (N, C, H, W) stored in chunks of whole images, `labels`
int64 (N,), and attrs naming where the data came from (see `write_dataset`). `ctcore.data.read_hdf5_images`
reads it. Nothing here executes code from a dataset: pickles go through an unpickler that only rebuilds numpy
arrays, .npz files are loaded with allow_pickle=False, and archives are read in memory, never extracted.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import io
import json
import lzma
import os
import pickle
import re
import shutil
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ctcore.errors import RunError, UsageError, path_not_found, unknown_name_message
from ctcore.files import atomic_write, file_digest, human_bytes, refuse_writing_inputs

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})
SPLIT_FOLDERS = frozenset({"train", "test", "val", "valid", "validation"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
CIFAR_MEMBER = re.compile(r"^(data_batch_\d+|test_batch|batches\.meta)$")
IN_MEMORY_BYTES = 2 << 30  # datasets up to this size are built in memory, then written (see write_dataset)
CHUNK_BYTES = 1 << 20  # images per chunk: about 1 MiB (h5py's default chunk cache), at most 256 images

DOWNLOADS: dict[str, tuple[str, str, str]] = {
    # (url, sha256, file name). The SHA-256 is the one Keras pins for this file (170,498,071 bytes); the CIFAR
    # page itself publishes only the md5, c58f30108f718f92721af3b95e74349a.
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        "cifar-10-python.tar.gz",
    ),
}
RECIPE_PATHS: dict[str, str] = {"cifar10": "data/cifar10-train.h5"}
"""Where the shipped recipes (recipes/*.toml, data.path) read each downloadable dataset once it is imported."""


class Imported(NamedTuple):
    """What every importer returns: images (N, C, H, W) uint8, labels (N,) int64, class names, split info."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    info: dict[str, Any]


# ----------------------------------------------------------------------------------------------------------------
# the training format


def _chunk_rows(n: int, image_bytes: int) -> int:
    """Images per HDF5 chunk: whole images, about CHUNK_BYTES per chunk, between 1 and 256."""
    return max(1, min(n, 256, CHUNK_BYTES // max(1, image_bytes)))


def _attr_value(value: Any) -> Any:
    """An attribute value HDF5 can hold: numbers and strings as they are, anything else as JSON."""
    if isinstance(value, (str, bool, int, float, np.integer, np.floating)):
        return value
    if isinstance(value, Path):
        return str(value)
    return json.dumps(value)


def write_dataset(path: str | Path, images_uint8_nchw: np.ndarray, labels: np.ndarray | None, attrs: dict,
                  *, overwrite: bool = False) -> Path:
    """Write the training format atomically: chunked uint8 `images` (N, C, H, W), int64 `labels`, attrs."""
    import h5py

    from ctcore import __version__

    path = Path(path)
    images = images_uint8_nchw
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise UsageError(f"{path}: images must be a uint8 numpy array shaped (N, C, H, W), got {got}")
    n, c, h, w = images.shape
    if n == 0:
        raise RunError(f"{path}: no images to write; the source held none for this split")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise UsageError(f"{path}: labels must be {n} integers (N,), got {labels.dtype} {labels.shape}")
    if path.is_dir():
        raise UsageError(f"{str(path)!r} is a directory; give a file name for the dataset, e.g. {path / 'data.h5'}")
    if path.exists() and not overwrite:
        raise UsageError(f"{str(path)!r} already exists; pass --overwrite to replace it, or choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)

    meta = {k: v for k, v in attrs.items() if v is not None}
    meta.setdefault("source", "")
    meta.setdefault("source_sha256", "")
    meta["class_names"] = meta.get("class_names") or []
    if not isinstance(meta["class_names"], str):
        meta["class_names"] = json.dumps([str(x) for x in meta["class_names"]])
    meta.update(resolution=h if h == w else 0, height=h, width=w, channels=c, count=n, layout="NCHW",
                created=datetime.now(UTC).isoformat(timespec="seconds"), ctcore_version=__version__)

    # HDF5 2.0 can crash the process when a write fails mid-file (a full disk), so: refuse up front when the
    # filesystem cannot hold the file, and build datasets up to IN_MEMORY_BYTES in memory (written out on close,
    # where a failure is a clean error); larger ones (ImageNet 64: 15.7 GB) go straight to disk
    needed = images.nbytes + (n * 8 if labels is not None else 0) + (1 << 20)
    free = shutil.disk_usage(path.parent).free  # an old file stays until the new one is complete
    if free < needed:
        raise RunError(f"could not write {str(path)!r}: the dataset needs {human_bytes(needed)} but only "
                       f"{human_bytes(free)} are free on that filesystem; free some space or write it elsewhere")
    in_memory = {"driver": "core", "backing_store": True, "block_size": 1 << 20} if needed <= IN_MEMORY_BYTES else {}
    with atomic_write(path) as tmp, h5py.File(tmp, "w", **in_memory) as f:
        f.create_dataset("images", data=images, chunks=(_chunk_rows(n, c * h * w), c, h, w))
        if labels is not None:
            f.create_dataset("labels", data=labels.astype(np.int64))
        _write_attrs(f, meta)
    return path


def _write_attrs(f: Any, attrs: dict) -> None:
    """Store each attr on an open HDF5 file."""
    for key, value in attrs.items():
        f.attrs[key] = _attr_value(value)


# ----------------------------------------------------------------------------------------------------------------
# progress, hashing, archives


class _Bar:
    """One task of a rich progress bar (or nothing): `update(done)` every so often."""

    def __init__(self, progress: Any, task: Any) -> None:
        self._progress, self._task = progress, task

    def update(self, completed: float, total: float | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, total=total)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, float | None], _Bar]]:
    """Yield `bar(description, total)` making progress-bar tasks on stderr (plain lines every 30 s where stderr
    cannot redraw a bar: logs, SLURM files); no output when not enabled."""
    if not enabled:
        yield lambda description, total: _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ctcore.reporting import LineProgress, is_live

    console = Console(stderr=True)
    progress = (Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                         console=console, transient=True) if is_live(console) else LineProgress(console))
    with progress:
        yield lambda description, total: _Bar(progress, progress.add_task(description, total=total))


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts every byte read through it."""

    def __init__(self, raw: io.BufferedReader) -> None:
        self.raw, self.sha, self.count = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        self.sha.update(memoryview(buffer)[:n])
        self.count += n
        return n


def _open_decompressed(reader: _HashingReader, head: bytes) -> io.IOBase:
    """The archive's bytes, gunzipped / bunzipped / unxz-ed by its magic number (plain tar as is)."""
    buffered = io.BufferedReader(reader, 1 << 20)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=buffered, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(buffered)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(buffered)
    return buffered


def _skip_member(parts: Sequence[str]) -> bool:
    """Hidden files and folders, and macOS resource forks."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image_name(name: str) -> bool:
    """A file name with a known image suffix, not hidden."""
    parts = name.split("/")
    return Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES and not _skip_member(parts)


class _TarScan(NamedTuple):
    cifar: dict[str, bytes]  # CIFAR-10 python members by base name
    images: list[tuple[str, bytes]]  # (path in the archive, encoded image)
    sha256: str


def _scan_tar(path: Path, bar: Callable[[str, float | None], _Bar], *, want_cifar: bool = True,
              want_images: bool = True, cifar_split: str = "train") -> _TarScan:
    """Read a (compressed) tar archive in one streaming pass: CIFAR-10 batches and encoded images, in memory."""
    where = f"archive {str(path)!r}"
    size = path.stat().st_size
    task = bar(f"reading {path.name}", size)
    cifar: dict[str, bytes] = {}
    images: list[tuple[str, bytes]] = []
    wanted = {"batches.meta"} | ({"test_batch"} if cifar_split == "test" else set())
    try:
        with open(path, "rb") as raw:
            head = raw.read(8)
            raw.seek(0)
            reader = _HashingReader(raw)
            stream = _open_decompressed(reader, head)
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                for k, member in enumerate(tf):
                    if k % 256 == 0:
                        task.update(reader.count)
                    if not member.isfile():
                        continue
                    name = member.name.replace("\\", "/").lstrip("/")
                    base = name.rsplit("/", 1)[-1]
                    if want_cifar and CIFAR_MEMBER.match(base) and not _skip_member(name.split("/")):
                        if base in wanted or (cifar_split == "train" and base.startswith("data_batch_")):
                            cifar[base] = tf.extractfile(member).read()
                        else:
                            cifar.setdefault(base, b"")  # present, not needed for this split
                    elif want_images and _is_image_name(name):
                        images.append((name, tf.extractfile(member).read()))
            while stream.read(1 << 20):  # to the end: a truncated compressed archive fails here
                pass
            while reader.read(1 << 20):
                pass
            task.update(size)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise RunError(f"{where} cannot be read as a tar archive ({type(exc).__name__}: {exc}); it is truncated "
                       "or corrupt: download or pack it again") from None
    return _TarScan(cifar, images, reader.sha.hexdigest())


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10 python batches (pickles)


class _RefusedPickle(pickle.UnpicklingError):
    """A pickle that asks for something other than numpy arrays."""


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array-rebuilding function, whatever its module
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 1 (and the official archive)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 at protocol 2
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds dicts, lists, bytes and numpy arrays and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedPickle(f"{module}.{name}") from None


def _safe_unpickle(data: bytes, where: str) -> Any:
    """Unpickle data that may only hold containers and numpy arrays; anything else is refused, never run."""
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedPickle as exc:
        raise RunError(f"{where}: refused to unpickle it: it asks for {exc}, which could run code; a genuine "
                       "CIFAR-10 batch holds only numpy arrays and lists. Get the official archive again "
                       "(ctcore data download cifar10)") from None
    except Exception as exc:  # a malformed pickle can fail in many ways; all mean "not a CIFAR-10 batch"
        raise RunError(f"{where} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}); the archive is "
                       "corrupt: download it again") from None


def _field(d: Any, key: str, where: str) -> Any:
    """d[b"key"] (or d["key"]) from an unpickled batch, with a clear error when missing."""
    if isinstance(d, dict):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
    raise RunError(f"{where} has no {key!r} entry; it is not a CIFAR-10 python batch")


def _cifar_from_members(members: dict[str, bytes], split: str, where: str) -> Imported:
    """Decode CIFAR-10 python batches (base name -> pickle bytes) for one split."""
    if split not in ("train", "test"):
        raise UsageError(f"{where} has the splits train and test; --split {split} is neither")
    names = (sorted((m for m in members if m.startswith("data_batch_")), key=lambda m: int(m.rsplit("_", 1)[1]))
             if split == "train" else ["test_batch"])
    missing = [m for m in ["batches.meta", *names] if not members.get(m)]
    if not names or missing:
        wanted = ", ".join(missing) or "data_batch_1 .. data_batch_5"
        raise RunError(f"{where} lacks {wanted} (cifar-10-batches-py/); it is incomplete: download it again")
    meta = _safe_unpickle(members["batches.meta"], f"{where}: batches.meta")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in _field(meta, "label_names", where)]
    datas, labels = [], []
    for m in names:
        batch = _safe_unpickle(members[m], f"{where}: {m}")
        data = _field(batch, "data", f"{where}: {m}")
        lab = np.asarray(_field(batch, "labels", f"{where}: {m}"))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise RunError(f"{where}: {m} holds data {got}, not uint8 rows of 3072 pixels; not a CIFAR-10 batch")
        if lab.shape != (data.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
            raise RunError(f"{where}: {m} has labels {lab.dtype} {lab.shape} for {data.shape[0]} images")
        if lab.size and (lab.min() < 0 or lab.max() >= len(class_names)):
            raise RunError(f"{where}: {m} has labels outside 0..{len(class_names) - 1} (batches.meta label_names)")
        datas.append(data)
        labels.append(lab.astype(np.int64))
    images = np.concatenate(datas).reshape(-1, 3, 32, 32)  # rows are R plane, G plane, B plane: CHW already
    return Imported(images, np.concatenate(labels), class_names, {"format": "cifar10-python", "split": split,
                                                                  "members": names})


def import_cifar10_python(source: str | Path, split: str = "train", *, progress: bool = False) -> Imported:
    """The official cifar-10-python.tar.gz (or its extracted cifar-10-batches-py folder): train 50,000, test 10,000."""
    source = Path(source)
    where = f"CIFAR-10 archive {str(source)!r}"
    if source.is_dir():
        folder = source / "cifar-10-batches-py" if (source / "cifar-10-batches-py").is_dir() else source
        members = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
                   if p.is_file() and CIFAR_MEMBER.match(p.name)}
        result = _cifar_from_members(members, split, where)
        digest = hashlib.sha256()
        for m in ["batches.meta", *result.info["members"]]:
            digest.update(m.encode() + b"\0" + hashlib.sha256(members[m]).digest())
        result.info["source_sha256"] = digest.hexdigest()
        return result
    with _progress(progress) as bar:
        scan = _scan_tar(source, bar, want_images=False, cifar_split=split)
    if not scan.cifar:
        raise RunError(f"{where} holds no cifar-10-batches-py/ batches; is it the CIFAR-10 python version "
                       "(cifar-10-python.tar.gz)?")
    result = _cifar_from_members(scan.cifar, split, where)
    result.info["source_sha256"] = scan.sha256
    return result


# ----------------------------------------------------------------------------------------------------------------
# image folders, zips and tars: one subfolder per class


def _class_layout(paths: Sequence[str], split: str, where: str) -> tuple[list[tuple[int, int]], list[str], dict]:
    """Pick the split and the class folders: [(index into paths, label)] sorted by (label, path), class names."""
    if not paths:
        raise RunError(f"{where} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); put them in "
                       "one subfolder per class, e.g. cat/0001.png, dog/0002.png")
    parts = [p.split("/") for p in paths]
    prefix: list[str] = []
    while all(len(p) >= 3 for p in parts) and len({p[0] for p in parts}) == 1 and parts[0][0] not in SPLIT_FOLDERS:
        prefix.append(parts[0][0])  # a wrapper folder around everything (e.g. a zip of the dataset's folder)
        parts = [p[1:] for p in parts]
    tops = sorted({p[0] for p in parts if len(p) >= 2})
    splits = [t for t in tops if t in SPLIT_FOLDERS]
    if splits:
        if split not in tops:
            raise UsageError(f"{where} has no {split}/ folder; its split folders are {', '.join(splits)}: pass "
                             f"--split {splits[0]}")
        selected = [(i, p[1:]) for i, p in enumerate(parts) if p[0] == split]
        prefix.append(split)
    else:
        if split != "train":
            raise UsageError(f"{where} has no split folders (train/, test/), only class folders; --split {split} "
                             "does not apply: leave --split at train")
        selected = list(enumerate(parts))
    in_class = [(i, p) for i, p in selected if len(p) >= 2]
    inside = "/".join(prefix) + "/" if prefix else ""
    if not in_class:
        raise RunError(f"{where} has images directly in {inside or 'its top folder'} but no class subfolders; "
                       f"move them into one subfolder per class ({inside}<class>/image.png), or into a single "
                       "subfolder for unlabeled data")
    class_names = sorted({p[0] for _, p in in_class})
    index = {name: k for k, name in enumerate(class_names)}
    items = sorted(((i, index[p[0]]) for i, p in in_class), key=lambda t: (t[1], paths[t[0]]))
    info = {"split": split if splits else "all", "folder": inside, "skipped_loose_files": len(selected) - len(in_class)}
    return items, class_names, info


def _fit(img: Any, target: int) -> Any:
    """Resize a PIL image so its short side is `target` (bicubic, antialiased), then center-crop it square."""
    from PIL import Image

    w, h = img.size
    scale = target / min(w, h)
    nw, nh = max(target, round(w * scale)), max(target, round(h * scale))
    if (w, h) != (nw, nh):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if (nw, nh) != (target, target):
        left, top = (nw - target) // 2, (nh - target) // 2
        img = img.crop((left, top, left + target, top + target))
    return img


IMAGE_FIX = "delete or replace that file and import again"


def _decode(data: bytes, target: int | None, where: str) -> np.ndarray:
    """Encoded image bytes to an RGB (H, W, 3) uint8 array, fitted to target x target when given (read_image:
    one RunError naming `where` for an image too large, truncated or no image)."""
    from ctcore.images import read_image

    rgb = read_image(data, where, RunError, IMAGE_FIX, mode="RGB", reduce_to=target)
    if target is not None:
        rgb = _fit(rgb, target)
    return np.asarray(rgb)


class _SizesDiffer(Exception):
    """Images of different sizes and no resolution to bring them to."""


def _decode_all(names: Sequence[str], read: Callable[[int], bytes], target: int | None, shown: Sequence[str],
                bar: Callable[[str, float | None], _Bar], digest: Any = None) -> np.ndarray:
    """Decode every image into one (N, 3, H, W) uint8 array; raises _SizesDiffer when target is None and sizes vary.
    `shown` names each image in messages."""
    n = len(names)
    task = bar("decoding images", n)
    out: np.ndarray | None = None
    for i in range(n):
        data = read(i)
        if digest is not None:
            digest.update(names[i].encode() + b"\0" + hashlib.sha256(data).digest())
        arr = _decode(data, target, shown[i])
        if out is None:
            out = np.empty((n, 3, arr.shape[0], arr.shape[1]), np.uint8)
        elif arr.shape[:2] != out.shape[2:]:
            raise _SizesDiffer
        out[i] = arr.transpose(2, 0, 1)
        if i % 512 == 0:
            task.update(i)
    task.update(n)
    assert out is not None
    return out


def _smallest_side(names: Sequence[str], read: Callable[[int], bytes], shown: Sequence[str]) -> int:
    """The smallest short side over all images, read from their headers."""
    from ctcore.images import read_image

    smallest = None
    for i in range(len(names)):
        side = min(read_image(read(i), shown[i], RunError, IMAGE_FIX, header_only=True))
        smallest = side if smallest is None else min(smallest, side)
    return int(smallest or 1)


def _images_from_entries(paths: Sequence[str], read: Callable[[int], bytes], split: str, resolution: int | None,
                         where: str, bar: Callable[[str, float | None], _Bar], *, tree_digest: bool,
                         fmt: str) -> Imported:
    """Layout, then decoding: the shared part of the folder, zip and tar importers."""
    items, class_names, info = _class_layout(paths, split, where)
    names = [paths[i] for i, _ in items]
    labels = np.fromiter((label for _, label in items), np.int64, len(items))

    def read_selected(k: int) -> bytes:
        return read(items[k][0])

    item = "file" if fmt == "image-folder" else "member"  # `zip archive 'x.zip': member 'cat/1.png'`
    shown = [f"{where}: {item} {name!r}" for name in names]
    digest = hashlib.sha256() if tree_digest else None
    try:
        images = _decode_all(names, read_selected, resolution, shown, bar, digest)
    except _SizesDiffer:
        resolution = _smallest_side(names, read_selected, shown)
        digest = hashlib.sha256() if tree_digest else None
        images = _decode_all(names, read_selected, resolution, shown, bar, digest)
        info["resized_to_smallest_side"] = resolution
    info["format"] = fmt
    if digest is not None:
        info["source_sha256"] = digest.hexdigest()
    return Imported(images, labels, class_names, info)


def import_image_folder(source: str | Path, split: str = "train", resolution: int | None = None, *,
                        progress: bool = False) -> Imported:
    """A folder, .zip or .tar(.gz) with one subfolder per class (optionally under train/, test/): sorted -> 0..K-1."""
    source = Path(source)
    with _progress(progress) as bar:
        if source.is_dir():
            where = f"image folder {str(source)!r}"
            paths = []
            for root, dirs, files in os.walk(source):
                dirs[:] = sorted(d for d in dirs if not _skip_member([d]))
                rel = Path(root).relative_to(source).as_posix()
                paths += [f if rel == "." else f"{rel}/{f}" for f in sorted(files) if _is_image_name(f)]

            def read_file(i: int) -> bytes:
                try:
                    return (source / paths[i]).read_bytes()
                except OSError as exc:
                    raise RunError(f"{where}: cannot read {paths[i]!r} ({exc}); fix or remove it") from None

            return _images_from_entries(paths, read_file, split, resolution, where, bar, tree_digest=True,
                                        fmt="image-folder")
        if source.suffix.lower() == ".zip":
            where = f"zip archive {str(source)!r}"
            try:
                with zipfile.ZipFile(source) as zf:
                    infos = [m for m in zf.infolist()
                             if not m.is_dir() and _is_image_name(m.filename.replace("\\", "/"))]
                    paths = [m.filename.replace("\\", "/") for m in infos]
                    return _images_from_entries(paths, lambda i: zf.read(infos[i]), split, resolution, where, bar,
                                                tree_digest=False, fmt="image-zip")
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                raise RunError(f"{where} cannot be read as a zip archive ({type(exc).__name__}: {exc}); it is "
                               "truncated or corrupt: pack or download it again") from None
        where = f"archive {str(source)!r}"
        scan = _scan_tar(source, bar, want_cifar=False)
        paths = [name for name, _ in scan.images]
        result = _images_from_entries(paths, lambda i: scan.images[i][1], split, resolution, where, bar,
                                      tree_digest=False, fmt="image-tar")
        result.info["source_sha256"] = scan.sha256
        return result


# ----------------------------------------------------------------------------------------------------------------
# downsampled ImageNet .npz batches


def _npz_files(source: Path, split: str) -> list[Path]:
    """The .npz files of a split: train_data_batch_1.. (numeric order) for train, val_data* for test/val."""
    if source.is_file():
        return [source]
    files = sorted(source.glob("*.npz"))
    train = sorted((f for f in files if f.name.startswith("train")),
                   key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f.name)])
    val = [f for f in files if f.name.startswith("val")]
    if split == "train" and train:
        return train
    if split in ("test", "val") and val:
        return val
    if not train and not val and files:
        return files
    found = ", ".join(f.name for f in files[:6]) + (" ..." if len(files) > 6 else "")
    raise UsageError(f"npz folder {str(source)!r} has no {'train_data_batch_*' if split == 'train' else 'val_data'} "
                     f".npz files for --split {split} (found: {found or 'none'}); pass --split train or --split val")


def _npz_header(zf: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an open .npz, from its .npy header (the array is not read)."""
    with zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(f)
    return shape, dtype


def import_imagenet_npz(source: str | Path, split: str = "train", *, progress: bool = False) -> Imported:
    """Downsampled ImageNet batches (`data` (N, 3*R*R) uint8 in CHW order, 1-based `labels`): a file or a folder."""
    source = Path(source)
    files = _npz_files(source, split)
    shapes = []
    for f in files:
        where = f"npz file {str(f)!r}"
        try:
            with zipfile.ZipFile(f) as zf:
                keys = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
                missing = [k for k in ("data", "labels") if k not in keys]
                if missing:
                    raise RunError(f"{where} has no {' or '.join(repr(k) for k in missing)} array (found: "
                                   f"{', '.join(sorted(keys)) or 'none'}); expected downsampled ImageNet batches "
                                   "with `data` (N, 3*R*R) uint8 and `labels` 1..1000")
                (dshape, ddtype), (lshape, _) = _npz_header(zf, "data"), _npz_header(zf, "labels")
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise RunError(f"{where} cannot be read as .npz ({type(exc).__name__}: {exc}); it is truncated or not "
                           "an npz file: download it again") from None
        side = round((dshape[1] / 3) ** 0.5) if len(dshape) == 2 else 0
        if ddtype != np.uint8 or len(dshape) != 2 or side < 1 or 3 * side * side != dshape[1]:
            raise RunError(f"{where}: `data` is {ddtype} {dshape}, not uint8 rows of 3*R*R pixels (R=64: 12288)")
        if lshape != (dshape[0],):
            raise RunError(f"{where}: `labels` shape {lshape} does not match {dshape[0]} rows of `data`")
        shapes.append((dshape[0], side))
    sides = {s for _, s in shapes}
    if len(sides) > 1:
        raise RunError(f"npz files {str(source)!r} mix resolutions {sorted(sides)}; import one resolution at a time")
    side = sides.pop()
    total = sum(n for n, _ in shapes)
    images = np.empty((total, 3, side, side), np.uint8)
    labels = np.empty(total, np.int64)
    digest = hashlib.sha256()
    start = 0
    with _progress(progress) as bar:
        task = bar("reading npz batches", total)
        for f, (n, _) in zip(files, shapes, strict=True):
            where = f"npz file {str(f)!r}"
            try:
                with np.load(f, allow_pickle=False) as z:
                    images[start:start + n] = z["data"].reshape(n, 3, side, side)
                    lab = z["labels"]
            except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as exc:
                raise RunError(f"{where} cannot be read ({type(exc).__name__}: {exc}); download it again") from None
            if not np.issubdtype(lab.dtype, np.integer) or (lab.size and lab.min() < 1):
                low = lab.min() if lab.size else None
                raise RunError(f"{where}: `labels` must be 1-based integers (1..1000, as the downsampled ImageNet "
                               f"release stores them), found {lab.dtype} with minimum {low}")
            labels[start:start + n] = lab.astype(np.int64) - 1
            digest.update(f.name.encode() + b"\0" + bytes.fromhex(file_digest(f)))
            start += n
            task.update(start)
    num_classes = int(labels.max()) + 1 if total else 0
    info = {"format": "imagenet-npz", "split": split, "members": [f.name for f in files],
            "source_sha256": file_digest(files[0]) if source.is_file() else digest.hexdigest()}
    return Imported(images, labels, [str(k) for k in range(num_classes)], info)


# ----------------------------------------------------------------------------------------------------------------
# detection and the one entry point


def detect_format(source: str | Path) -> str:
    """'cifar10-python', 'image-folder', 'image-zip', 'tar' (CIFAR-10 or images, told apart while reading) or 'npz'."""
    source = Path(source)
    if not source.exists():
        raise RunError(path_not_found(f"dataset source {str(source)!r}", source, "give the downloaded archive, an "
                                      "image folder, or .npz batches (get CIFAR-10 with: ctcore data download "
                                      "cifar10)"))
    if source.is_dir():
        for folder in (source, source / "cifar-10-batches-py"):
            if (folder / "batches.meta").is_file() and any(folder.glob("*_batch*")):
                return "cifar10-python"
        has_subfolders = any(p.is_dir() and not p.name.startswith(".") for p in source.iterdir())
        if any(source.glob("*.npz")) and not has_subfolders:
            return "npz"
        return "image-folder"
    name = source.name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".zip"):
        return "image-zip"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if zipfile.is_zipfile(source):
        return "image-zip"
    with open(source, "rb") as f:
        head = f.read(512)
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    raise UsageError(f"cannot tell what {str(source)!r} is; give cifar-10-python.tar.gz, a folder / .zip / .tar(.gz) "
                     "of images in one subfolder per class, or downsampled ImageNet .npz batches")


def _resize_all(images: np.ndarray, resolution: int, bar: Callable[[str, float | None], _Bar]) -> np.ndarray:
    """Fit every (C, H, W) uint8 image to resolution x resolution (short side, bicubic, center crop)."""
    from PIL import Image

    out = np.empty((images.shape[0], 3, resolution, resolution), np.uint8)
    task = bar("resizing", images.shape[0])
    for i, img in enumerate(images):
        out[i] = np.asarray(_fit(Image.fromarray(img.transpose(1, 2, 0)), resolution)).transpose(2, 0, 1)
        if i % 512 == 0:
            task.update(i)
    return out


def import_dataset(source: str | Path, out: str | Path, *, split: str = "train", resolution: int | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Detect the source's format, import one split and write it to `out` in the training format; a summary dict."""
    source, out = Path(source), Path(out)
    if resolution is not None and resolution < 1:
        raise UsageError(f"--resolution must be a positive number of pixels, got {resolution}")
    refuse_writing_inputs([("OUT.h5", out)], [("SOURCE", source)])
    if out.exists() and not overwrite:
        raise UsageError(f"{str(out)!r} already exists; pass --overwrite to replace it, or choose another name")
    if out.is_dir():
        raise UsageError(f"{str(out)!r} is a directory; give a file name for the dataset, e.g. {out / 'data.h5'}")
    start = time.perf_counter()
    kind = detect_format(source)
    if kind == "cifar10-python":
        result = import_cifar10_python(source, split, progress=progress)
    elif kind == "npz":
        result = import_imagenet_npz(source, split, progress=progress)
    elif kind == "tar":
        with _progress(progress) as bar:
            scan = _scan_tar(source, bar, cifar_split=split)
            if scan.cifar:
                result = _cifar_from_members(scan.cifar, split, f"CIFAR-10 archive {str(source)!r}")
            else:
                paths = [name for name, _ in scan.images]
                result = _images_from_entries(paths, lambda i: scan.images[i][1], split, resolution,
                                              f"archive {str(source)!r}", bar, tree_digest=False, fmt="image-tar")
        result.info["source_sha256"] = scan.sha256
    else:
        result = import_image_folder(source, split, resolution, progress=progress)
    images = result.images
    if resolution is not None and images.shape[2:] != (resolution, resolution):
        with _progress(progress) as bar:
            images = _resize_all(images, resolution, bar)
    info = result.info
    sha = info.get("source_sha256") or file_digest(source)
    attrs = {"source": source.name, "source_sha256": sha, "format": info["format"], "split": info["split"],
             "class_names": result.class_names}
    from ctcore.files import output_lock

    with output_lock(out, "dataset", "ctcore data import"):  # one writer at a time; the existence check under it
        write_dataset(out, images, result.labels, attrs, overwrite=overwrite)
    counts = np.bincount(result.labels, minlength=len(result.class_names)) if result.labels.size else np.zeros(0)
    return {
        "out": str(out), "source": str(source), "format": info["format"], "split": info["split"],
        "count": int(images.shape[0]), "shape": [int(s) for s in images.shape[1:]],
        "num_classes": len(result.class_names), "class_names": result.class_names,
        "class_counts": [int(c) for c in counts], "source_sha256": sha,
        "seconds": round(time.perf_counter() - start, 3),
    }


# ----------------------------------------------------------------------------------------------------------------
# inspecting a dataset file


GRID_CLASSES = 64
"""`data info --grid` of a labelled dataset: one row per class, for at most this many classes (the lowest labels)."""
GRID_PER_CLASS = 8
"""Examples per class row, spread over the class's images."""


def dataset_info(path: str | Path, grid: str | Path | None = None) -> dict:
    """Count, shape, classes with per-class counts and attrs of a dataset file; optionally a PNG grid: 64
    examples, or for a labelled file one row of 8 per class labelled with its stored class name (else its label).

    The file is validated from its metadata and refused if it cannot fit in memory before anything is read;
    then only the labels and the grid's images (at most 64 rows of 8) are read.
    """
    from ctcore.data import hdf5_summary, open_hdf5, read_hdf5_labels, require_fits

    path = Path(path)
    where = f"dataset file {str(path)!r}"
    if not path.is_file():
        raise RunError(path_not_found(where, path, f"create one with: ctcore data import SOURCE {path}"))
    refuse_writing_inputs([("--grid", grid)], [("DATASET.h5", path)])
    summary = hdf5_summary(path)  # validates the file with clear errors
    require_fits(path, summary)
    count, (channels, _, _) = summary["count"], summary["shape"]
    if grid is not None and channels == 2:
        raise RunError(f"{where} holds 2-channel images, which a --grid cannot show (it draws 1-channel grey "
                       f"or the first 3 channels as RGB); leave out --grid")
    attrs = dict(summary["attrs"])
    names: list[str] = []
    if isinstance(attrs.get("class_names"), str):
        try:
            decoded = json.loads(attrs["class_names"])
            names = [str(x) for x in decoded] if isinstance(decoded, list) else []
            attrs["class_names"] = names
        except (ValueError, RecursionError):  # not JSON, or nested too deeply: shown as the text it is
            pass
    labels = read_hdf5_labels(path, summary)
    picked, rows = None, None
    with open_hdf5(path) as f:
        images = f["images"]
        chunks = list(images.chunks) if images.chunks else None
        if grid is not None and labels is not None:
            rows = _class_rows(images, labels, names)
        elif grid is not None:  # at most 64 images, spread over the file
            picked = images[np.unique(np.linspace(0, count - 1, min(64, count)).round().astype(np.int64))]
    classes = []
    if labels is not None:
        values, counts = np.unique(labels, return_counts=True)
        seen = dict(zip(values.tolist(), counts.tolist(), strict=True))
        for label in sorted(set(range(len(names))) | set(seen)):
            name = names[label] if 0 <= label < len(names) else str(label)
            classes.append({"label": int(label), "name": name, "count": int(seen.get(label, 0))})
    grid_path = None
    if picked is not None:
        import torch

        from ctcore.images import save_grid

        grid_path = str(save_grid(torch.from_numpy(picked), grid, ncol=8))
    elif rows is not None:
        from ctcore.images import save_rows

        grid_path = str(save_rows(rows, grid, ncol=GRID_PER_CLASS))
    return {"path": str(path), "count": count, "shape": list(summary["shape"]), "has_labels": labels is not None,
            "chunks": chunks, "classes": classes, "attrs": _jsonable(attrs), "grid": grid_path,
            "grid_rows": [caption for caption, _ in rows] if rows is not None else None}


def _class_rows(images: Any, labels: np.ndarray, names: list[str]) -> list[tuple[str, Any]]:
    """(caption, up to GRID_PER_CLASS images spread over the class) for the GRID_CLASSES lowest labels present;
    the caption is the stored class name, or the label when the file names no class."""
    import torch

    order = np.argsort(labels, kind="stable")
    present, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    picks = []
    for start, size in zip(starts[:GRID_CLASSES].tolist(), sizes[:GRID_CLASSES].tolist(), strict=True):
        spread = np.unique(np.linspace(0, size - 1, min(GRID_PER_CLASS, size)).round().astype(np.int64))
        picks.append(np.sort(order[start + spread]))
    wanted = np.unique(np.concatenate(picks))
    block = images[wanted]  # one read of every example, in file order
    where = {int(i): k for k, i in enumerate(wanted.tolist())}
    rows = []
    for label, pick in zip(present[:GRID_CLASSES].tolist(), picks, strict=True):
        caption = names[label] if 0 <= label < len(names) else str(label)
        rows.append((caption, torch.from_numpy(block[[where[int(i)] for i in pick.tolist()]])))
    return rows


def _jsonable(value: Any) -> Any:
    """Attrs as plain JSON types (numpy scalars and arrays become numbers and lists)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


# ----------------------------------------------------------------------------------------------------------------
# downloading


def download(name: str, dest_dir: str | Path, *, url: str | None = None, progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Fetch a registered archive (DOWNLOADS) into dest_dir and verify its SHA-256 before it gets its final name.

    A failed download leaves nothing behind: no partial file, and no folder of dest_dir that it created."""
    if name not in DOWNLOADS:
        raise UsageError(unknown_name_message("dataset", name, list(DOWNLOADS)))
    default_url, expected, filename = DOWNLOADS[name]
    url = url or default_url
    dest_dir = Path(dest_dir)
    final = dest_dir / filename
    by_hand = (f"download {url} by hand (e.g. in a browser) into {dest_dir}/, check that its sha256 is {expected}, "
               f"then run: {import_command(name, final)}")
    if final.exists():
        got = file_digest(final)
        if got == expected:
            return final
        raise RunError(f"{final} already exists but its sha256 is {got}, not {expected}; delete it and download again")
    created = [p for p in (dest_dir, *dest_dir.parents) if not p.exists()]
    try:
        return _fetch(name, url, expected, final, by_hand, progress=progress, timeout=timeout)
    except BaseException:
        for folder in created:  # innermost first; a folder that holds anything stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def import_command(name: str, archive: str | Path) -> str:
    """The `ctcore data import` that turns a downloaded archive into the file the recipes read."""
    return f"ctcore data import {archive} {RECIPE_PATHS[name]} (the path the recipes read)"


def _fetch(name: str, url: str, expected: str, final: Path, by_hand: str, *, progress: bool,
           timeout: float) -> Path:
    """Download `url` to `final` through a temporary file, kept only when its SHA-256 is `expected`."""
    import http.client
    import urllib.error
    import urllib.request

    from ctcore import __version__

    filename = final.name
    sha = hashlib.sha256()
    with atomic_write(final) as tmp:  # kept only if the download completes and its checksum matches
        try:
            with open(tmp, "wb") as out:
                request = urllib.request.Request(url, headers={"User-Agent": f"ctcore/{__version__}"})
                with urllib.request.urlopen(request, timeout=timeout) as response, _progress(progress) as bar:
                    length = response.headers.get("Content-Length")
                    task = bar(f"downloading {filename}", int(length) if length and length.isdigit() else None)
                    done = 0
                    while block := response.read(1 << 20):
                        out.write(block)
                        sha.update(block)
                        done += len(block)
                        task.update(done)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = exc if isinstance(exc, urllib.error.HTTPError) else (getattr(exc, "reason", None) or exc)
            raise RunError(f"could not download {name} from {url} ({reason}); {by_hand}") from None
        got = sha.hexdigest()
        if got != expected:
            raise RunError(f"the file downloaded from {url} has sha256 {got}, expected {expected}: it is corrupt or "
                           f"not the official archive, so it was deleted. Try again, or {by_hand}")
    return final
