"""Writing files so that a crash or an error never leaves a half-written one."""

from __future__ import annotations

import contextlib
import errno
import hashlib
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


def check_suffix(path: str | Path | None, option: str, suffixes: tuple[str, ...], what: str) -> None:
    """Refuse, before any work, an output name without one of `suffixes` (`--out x.png` for a sample store would
    otherwise be overwritten by its own grid, and tools that open it by suffix would not find it)."""
    if path is not None and Path(path).suffix.lower() not in suffixes:
        from ctcore.errors import UsageError

        raise UsageError(f"{option} {str(path)!r}: give {what} file name ending in {' or '.join(suffixes)}")


def refuse_writing_inputs(outputs: list[tuple[str, str | Path | None]],
                          inputs: list[tuple[str, str | Path | None]]) -> None:
    """UsageError, before any work and whatever --overwrite says, when an output (option, path) is the same file as
    an input the command reads (after links: a symbolic or hard link to it counts): writing it would destroy the
    input. `inputs` names files; a folder input is given as its files."""
    from ctcore.errors import UsageError

    for out_option, out in outputs:
        if out is None or not os.path.lexists(out):
            continue  # a file that does not exist yet is no input
        for in_option, source in inputs:
            try:
                same = source is not None and os.path.samefile(out, source)
            except OSError:  # a dangling link, an unreadable path: not a file this command can read
                same = False
            if same:
                raise UsageError(f"{out_option} {str(out)!r} is the same file as {in_option} {str(source)!r}: "
                                 f"writing it would destroy what this command reads, with or without --overwrite; "
                                 f"choose another {out_option}")


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


# ------------------------------------------------------------------------------------------------ locks


class FileLock:
    """An advisory OS lock (fcntl.flock) on a lock file that holds its owner's pid and command.

    The OS drops the lock when the process ends in any way (a crash, SIGKILL), so a lock is never stale; a lock
    file left behind by a killed process is simply taken over. `release` deletes the file while still holding
    the lock; `acquire_lock` checks, after locking, that the file it locked is still the one at the path (not
    one deleted meanwhile), so deleting it is race-free. Where no lock can be taken (no flock on the platform or
    filesystem, or a folder nobody can write), the lock holds nothing (`fd` None) and the command goes on.
    """

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd, self._holders = path, fd, 1

    def release(self) -> None:
        """Delete the lock file and unlock it (a process that took the lock twice unlocks on its last release)."""
        self._holders -= 1
        if self._holders > 0 or self._fd is None:
            return
        _HELD.pop(str(self.path), None)
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None


_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HELD: dict[str, FileLock] = {}
"""Locks this process holds, by lock file path: taking one again (a library user resuming, in the same process,
the run it just trained) shares it instead of refusing this process itself."""


def acquire_lock(path: str | Path, what: str, command: str) -> FileLock:
    """Lock `path` (created if needed) for this process, or raise one RunError naming the process that holds it:
    "<what> is in use by process <pid> (<command>); wait for it to finish, or stop it first"."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform (Windows): no locking
        return FileLock(Path(path), None)
    path = Path(os.path.abspath(path))
    held = _HELD.get(str(path))
    if held is not None:
        held._holders += 1
        return held
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in _UNWRITABLE:  # this process cannot write here: its write will fail in one line
                return FileLock(path, None)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            pid, _, cmd = holder.partition(" ")
            by = f"process {pid} ({cmd})" if pid.isdigit() else "another process"
            raise RunError(f"{what} is in use by {by}; wait for it to finish, or stop it first") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_FLOCK:  # a filesystem without flock (Lustre mounted without it): no locking
                return FileLock(path, None)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder deleted this file as it released it: lock the one at the path now
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
    lock = _HELD[str(path)] = FileLock(path, fd)
    return lock


def lock_path_for(output: str | Path) -> Path:
    """The lock file of an output file (a dataset, a sample store): `.<name>.lock` beside it."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


@contextlib.contextmanager
def output_lock(output: str | Path, what: str, command: str) -> Iterator[None]:
    """Hold the lock of an output file while it is checked and written, so two commands never write it at once;
    the lock file is removed afterwards. Holding it, the writer first removes what a writer of the same file that
    was killed mid-write left beside it (`stale_temporaries`): no other writer can be using them."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(lock_path_for(output), f"{what} {str(output)!r}", command)
    try:
        for debris in stale_temporaries(output):
            debris.unlink(missing_ok=True)
        yield
    finally:
        lock.release()


def stale_temporaries(output: str | Path) -> list[Path]:
    """The temporary files `atomic_write` makes for `output` (`.<name>.<8 characters>.tmp` beside it), which only a
    writer killed mid-write leaves behind; call it holding the output's lock."""
    output = Path(output)
    pattern = re.compile(rf"\.{re.escape(output.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    try:
        names = os.listdir(output.parent)
    except OSError:
        return []
    return [output.parent / name for name in names if pattern.fullmatch(name)]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks: what provenance, stores and checksums record of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
