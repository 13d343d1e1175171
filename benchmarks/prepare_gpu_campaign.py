"""Fill .campaign/ with what the GPU campaign's one device call needs and the GPU machine lacks, then print that call.

    python benchmarks/prepare_gpu_campaign.py                      # pip download the wheels, copy the archive
    python benchmarks/prepare_gpu_campaign.py --wheels-from DIR    # take the wheels from DIR (offline)

.campaign/ (ignored by git, carried by the device tool) receives:
- wheels/: Python 3.12 manylinux x86_64 wheels of ctcore's requirements (followed through their own), at the
  versions installed here, except torch and the compiled numpy, scipy, h5py and Pillow, which the GPU machine has
  (its torch is its own CUDA build and must stay). cattrs, pydantic and their kin are missing there; the rest are
  carried because ctcore needs minimum versions the machine may not have (typer >= 0.29, ...). setuptools comes
  too: `pip install --no-build-isolation -e .` builds with it (ctcore's pyproject needs setuptools >= 77).
- cifar10-jpeg.tar.gz: the CIFAR-10 JPEG archive (19 MB; the imported HDF5, 153 MB, is over the 64 MiB that can
  travel), which the campaign imports on the device first.
- commit.json: the commit the campaign records (the device's copy of the checkout has no .git).

It checks that everything that travels (the checkout's tracked and untracked files that git does not ignore, plus
.campaign/) stays within the device tool's 64 MiB, and prints the device command and the `carry` list.
docs/performance.md has the whole procedure.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMPAIGN_DIR = ".campaign"
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
TRAVEL_LIMIT_MIB = 64.0

DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
DEVICE_KEEPS = frozenset({"torch", "numpy", "scipy", "h5py", "pillow"})
"""The GPU machine's own builds: never carried, and their requirements not followed."""
BUILD_NEEDS = ("setuptools",)
"""What `pip install --no-build-isolation -e .` needs besides ctcore's requirements."""
MARKER_ENVIRONMENT = {"python_version": DEVICE_PYTHON, "python_full_version": f"{DEVICE_PYTHON}.3",
                      "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                      "platform_machine": "x86_64", "implementation_name": "cpython",
                      "platform_python_implementation": "CPython", "extra": ""}


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_distributions(root: str = "ctcore") -> dict[str, str]:
    """normalized name -> installed version of every distribution to carry: `root`'s requirements followed through
    their own (markers evaluated for Python 3.12 on Linux, extras left out), without DEVICE_KEEPS, plus
    BUILD_NEEDS."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(MARKER_ENVIRONMENT):
                continue
            key = normalize(req.name)
            if key in DEVICE_KEEPS or key in found:
                continue
            found[key] = md.version(req.name)
            todo.append(req.name)
    for name in BUILD_NEEDS:
        found[normalize(name)] = md.version(name)
    return dict(sorted(found.items()))


def wheel_key(path: Path) -> tuple[str, str]:
    """(normalized name, version) of a wheel file name (name-version-tags.whl)."""
    name, version = path.name.split("-")[:2]
    return normalize(name), version


def download_wheels(wanted: dict[str, str], dest: Path) -> None:
    """`pip download` the exact versions for the GPU machine (README of the device tool: no deps, binary only,
    Python 3.12, manylinux x86_64)."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", DEVICE_PYTHON, "--implementation", "cp",
           *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest),
           *[f"{name}=={version}" for name, version in wanted.items()]]
    subprocess.run(cmd, check=True)


def collect_wheels(wanted: dict[str, str], dest: Path, wheels_from: Path | None) -> list[Path]:
    """Make `dest` hold exactly one wheel per wanted distribution, at its version: download (or copy from
    `wheels_from`) what is missing and delete every other wheel (two versions of one package stop the install)."""
    dest.mkdir(parents=True, exist_ok=True)
    present = {wheel_key(p): p for p in dest.glob("*.whl")}
    missing = {n: v for n, v in wanted.items() if (n, v) not in present}
    if missing and wheels_from is not None:
        for p in wheels_from.glob("*.whl"):
            if wheel_key(p) in missing.items():
                shutil.copyfile(p, dest / p.name)
    elif missing:
        download_wheels(missing, dest)
    kept = []
    for p in sorted(dest.glob("*.whl")):
        name, version = wheel_key(p)
        if wanted.get(name) == version and all(wheel_key(k) != (name, version) for k in kept):
            kept.append(p)
        else:
            p.unlink()
    have = {wheel_key(p) for p in kept}
    absent = [f"{n}=={v}" for n, v in wanted.items() if (n, v) not in have]
    if absent:
        where = f"in {wheels_from}" if wheels_from is not None else "from pip download"
        raise SystemExit(f"error: no wheel {where} for {', '.join(absent)} (Python {DEVICE_PYTHON}, manylinux "
                         "x86_64); download it by hand into that folder, or install another version here")
    return kept


def copy_archive(source: Path, dest: Path) -> Path:
    """Copy the image archive into .campaign/ after checking that it opens as a tar file."""
    if not source.is_file():
        raise SystemExit(f"error: {source}: no such archive; pass --archive PATH (the CIFAR-10 JPEG archive, "
                         "../shared/data/cifar10-jpeg.tar.gz beside the checkout)")
    try:
        with tarfile.open(source) as tar:
            tar.next()
    except (tarfile.TarError, OSError) as exc:
        raise SystemExit(f"error: {source}: not a readable tar archive ({exc})") from None
    target = dest / ARCHIVE_NAME
    shutil.copyfile(source, target)
    return target


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)


def is_git_checkout(repo: Path) -> bool:
    return (repo / ".git").exists() and git(repo, "rev-parse", "--show-toplevel").returncode == 0


def write_commit(repo: Path, dest: Path) -> dict:
    """commit.json: the checkout's commit and how many tracked files differ from it (unknown outside git)."""
    info: dict = {"commit": None, "modified_files": None, "prepared": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if is_git_checkout(repo):
        info["commit"] = git(repo, "rev-parse", "HEAD").stdout.strip() or None
        info["modified_files"] = len(git(repo, "status", "--porcelain", "--untracked-files=no").stdout.splitlines())
    (dest / "commit.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def tree_mib(repo: Path) -> float:
    """What travels of the checkout itself: tracked and untracked-not-ignored files (0 outside git)."""
    if not is_git_checkout(repo):
        return 0.0
    listed = git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout.split("\0")
    return sum((repo / p).stat().st_size for p in listed if p and (repo / p).is_file()) / 2**20


def device_command(campaign: str = CAMPAIGN_DIR) -> str:
    """The one-line command for the device tool's `run`, from the repository root."""
    return (f"set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
            f"--upgrade --target /tmp/site {campaign}/wheels/*.whl && export PYTHONPATH=/tmp/site || exit; "
            f"python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit; "
            f"PYTHONUNBUFFERED=1 python3 benchmarks/gpu_campaign.py --out $OUT 2>&1 | tee $OUT/campaign.log")


def prepare(repo: Path, archive: Path, wheels_from: Path | None = None,
            wanted: dict[str, str] | None = None) -> dict:
    """Fill repo/.campaign and check what travels; returns what to print (sizes, carry, command)."""
    dest = repo / CAMPAIGN_DIR
    dest.mkdir(parents=True, exist_ok=True)  # first: a pattern such as `.campaign/` matches folders only
    if is_git_checkout(repo) and git(repo, "check-ignore", "-q", CAMPAIGN_DIR).returncode != 0:
        raise SystemExit(f"error: {dest} is not ignored by git; add `{CAMPAIGN_DIR}/` to .gitignore (else it "
                         "travels twice: once as untracked files, once carried)")
    wanted = carried_distributions() if wanted is None else wanted
    wheels = collect_wheels(wanted, dest / "wheels", wheels_from)
    copied = copy_archive(archive, dest)
    commit = write_commit(repo, dest)
    carried, tree = folder_mib(dest), tree_mib(repo)
    if carried + tree > TRAVEL_LIMIT_MIB:
        raise SystemExit(f"error: {carried:.1f} MiB in {dest} and {tree:.1f} MiB of the checkout are over the "
                         f"{TRAVEL_LIMIT_MIB:g} MiB the device tool carries; remove large untracked files")
    return {"dest": dest, "wheels": wheels, "archive": copied, "commit": commit, "carry": [CAMPAIGN_DIR],
            "carried_mib": carried, "tree_mib": tree, "command": device_command()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE,
                        help="the CIFAR-10 JPEG archive (default: ../shared/data/cifar10-jpeg.tar.gz)")
    parser.add_argument("--wheels-from", type=Path, default=None,
                        help="a folder of wheels to copy instead of running pip download")
    args = parser.parse_args(argv)
    r = prepare(REPO, args.archive, args.wheels_from)
    print(f"{r['dest']}:")
    for p in r["wheels"]:
        print(f"  wheels/{p.name}  ({p.stat().st_size / 2**20:.2f} MiB)")
    print(f"  {r['archive'].name}  ({r['archive'].stat().st_size / 2**20:.1f} MiB)")
    print(f"  commit.json  (commit {r['commit']['commit']}, {r['commit']['modified_files']} modified files)")
    print(f"carry: {json.dumps(r['carry'])}  ({r['carried_mib']:.1f} MiB; with the checkout's "
          f"{r['tree_mib']:.1f} MiB, {r['carried_mib'] + r['tree_mib']:.1f} of {TRAVEL_LIMIT_MIB:g} MiB travel)")
    print("device command (timeout_s 600):")
    print(r["command"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
