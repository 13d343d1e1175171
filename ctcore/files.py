"""Writing files so that a crash or an error never leaves a half-written one."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ctcore.errors import RunError

# how torch's zip writer ("basic_ios::clear: iostream error", then "unexpected pos N vs M") and HDF5 ("file write
# failed", "unable to extend file") report a failed write as a RuntimeError; other RuntimeErrors are left alone
_WRITE_FAILED = re.compile(r"fail(ed)? writing|write failed|iostream error|unexpected pos|unable to extend", re.I)
_SPACE_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`, on error delete it.

    Readers see the old file or the complete new one, never a partial write (checkpoints, sample stores,
    datasets, statistics and downloads all go through here). A failed write (a full disk, a quota, a read-only
    filesystem) becomes a one-line RunError naming the file, so the CLI reports it without a traceback.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        code = _failed_write_errno(exc, tmp, path)
        if code is None:
            raise
        tmp.unlink(missing_ok=True)  # before measuring the free space: the partial file no longer counts
        raise RunError(failed_write_message(path, code)) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _failed_write_errno(exc: BaseException, *names: Path) -> int | None:
    """The errno of a failed write of `names` (0 when the writer did not say), or None when `exc` is no such failure.

    An OSError about some other file (an input that cannot be read) is not a failed write of ours.
    """
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if isinstance(exc, OSError):
        if exc.filename is not None and str(exc.filename) not in {str(n) for n in names}:
            return None
    elif not any(_WRITE_FAILED.search(str(e)) for e in chain):
        return None
    for e in chain:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        if found := re.search(r"errno = (\d+)", str(e)):  # HDF5 puts the C errno into its message
            return int(found.group(1))
    return 0


def failed_write_message(path: Path, code: int) -> str:
    """One line: which file, why, how much space is left, that nothing was damaged, and what to do."""
    reason = os.strerror(code) if code else "the write failed"
    try:
        free = f" ({human_bytes(shutil.disk_usage(path.parent).free)} free on that filesystem)"
    except OSError:
        free = ""
    kept = "the previous file is unchanged" if path.exists() else "nothing was left half-written"
    advice = " — free some space and run again" if code in (0, *_SPACE_ERRNOS) else ""
    return f"could not write {str(path)!r}: {reason}{free}; {kept}{advice}"


def human_bytes(n: int) -> str:
    """Bytes as 512 B, 12.0 KiB, 3.4 GiB (up to EiB, for the absurd sizes a recipe can ask for)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            break
    return f"{value:.1f} {unit}"
