"""Small recipes for tests (a few training steps of a tiny MLP on tiny synthetic data, in seconds on CPU), and
`tree_state`, which the suite uses to prove it leaves the checkout's data/ and runs/ alone, `snapshot`, the
content of a folder for tests that prove a command left it unchanged, `bomb_png`, a decompression bomb, and the
texts of FID's missing-input messages."""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctcore.components import KINDS, OBJECTIVE_PARTS
from ctcore.recipe import ALL_SECTIONS, _toml_value

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY: dict[str, dict[str, Any]] = {
    "run": {"name": "tiny", "seed": 0, "device": "cpu", "threads": 1},
    "data": {"source": "synthetic", "resolution": 4, "num_images": 256},
    "network": {"name": "mlp", "width": 32, "num_blocks": 1, "embedding_features": 8, "dropout": 0.1},
    "metric": {"name": "pseudo-huber"},
    "noise_schedule": {"name": "lognormal"},
    "curriculum": {"name": "exponential", "s0": 2, "s1": 8},
    "teacher": {"name": "no-ema"},
    "consistency": {"weighting": "inverse-delta"},
    "training": {"total_steps": 12, "batch_size": 8, "lr": 1e-3, "eval_ema_decay": 0.9, "log_every": 2,
                 "checkpoint_every": 6, "sample_every": 6, "keep_checkpoints": 5},
    "sampling": {"num_samples": 4, "sigma_mid": [0.821]},
    "evaluation": {"num_samples": 32, "num_projections": 16, "distance_every": 1_000_000},
}
"""The tiny recipe measures the distance at step 0 and at the end only (distance_every beyond any tiny run): the
tests that count a run's events or the steps its non-finite check settles keep their numbers; the periodic
distance has tests of its own (tests/test_training.py), which set distance_every."""


def tiny_recipe_text(output_dir: str | Path, **overrides: dict[str, Any]) -> str:
    """TOML for the tiny recipe writing to `output_dir`; overrides update sections, e.g. teacher={"name": "ema"}."""
    sections = {k: dict(v) for k, v in TINY.items()}
    sections["run"]["output_dir"] = str(output_dir)
    for name, values in overrides.items():
        if values is None:  # e.g. teacher=None: a section the recipe leaves out
            sections.pop(name, None)
        elif name in KINDS and "name" in values:
            sections[name] = dict(values)  # a different component: its own options only
        else:
            sections.setdefault(name, {}).update(values)
    lines = []
    for name in ALL_SECTIONS:
        if name in sections:
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in sections[name].items()]
            lines.append("")
    return "\n".join(lines)


DIFFUSION: dict[str, Any] = {"objective": {"name": "edm"}, "sampler": {"name": "heun", "steps": 4},
                             **dict.fromkeys(OBJECTIVE_PARTS)}
"""Overrides that make the tiny recipe an EDM diffusion run: the edm objective, a 4-level Heun sampler, no
teacher, curriculum, noise schedule or metric (tiny_recipe_text(dir, **DIFFUSION))."""


def tiny_cd(checkpoint: str | Path) -> dict[str, Any]:
    """Overrides that make the tiny recipe consistency distillation of the diffusion run at `checkpoint`: the cd
    teacher, uniform pairs of a fixed 5-point grid, uniform weighting (tiny_recipe_text(dir, **tiny_cd(path)))."""
    return {"teacher": {"name": "cd", "checkpoint": str(checkpoint)}, "noise_schedule": {"name": "uniform"},
            "curriculum": {"name": "constant", "num_scales": 5}, "consistency": {"weighting": "uniform"}}


SCT: dict[str, Any] = {"objective": {"name": "sct", "warmup_steps": 4}, "sampler": {"name": "scm"},
                       "network": {"logvar_head": True}, **dict.fromkeys(OBJECTIVE_PARTS)}
"""Overrides that make the tiny recipe sCT: the sct objective (warm-up over 4 steps), the scm sampler, the network's
log-variance head, no teacher, curriculum, noise schedule or metric."""

MEANFLOW: dict[str, Any] = {"objective": {"name": "meanflow"}, "sampler": {"name": "meanflow"},
                            "network": {"time_inputs": 2}, **dict.fromkeys(OBJECTIVE_PARTS)}
"""Overrides that make the tiny recipe MeanFlow: the meanflow objective and sampler, a network of two times."""


def tiny_scd(checkpoint: str | Path) -> dict[str, Any]:
    """Overrides that make the tiny recipe sCD of the diffusion run at `checkpoint` (the cd teacher holds it)."""
    return {**SCT, "objective": {"name": "scd", "warmup_steps": 4},
            "teacher": {"name": "cd", "checkpoint": str(checkpoint)}}


ECT: dict[str, Any] = {"objective": {"name": "consistency", "parameterization": "edm"},
                       "noise_schedule": {"name": "ect", "d": 4}, "curriculum": None, "metric": {"name": "l2-norm"}}
"""Overrides that make the tiny recipe Easy Consistency Tuning: continuous pairs, no curriculum."""


def train_tiny_diffusion(run_dir: str | Path) -> Path:
    """Train the tiny recipe as an EDM diffusion run (12 steps, well under a second) in `run_dir`; returns it."""
    from ctcore.build import start_run
    from ctcore.recipe import read_recipe
    from ctcore.registry import load_registry
    from ctcore.training import train

    run_dir = Path(run_dir)
    registry = load_registry()
    recipe_path = write_tiny_recipe(run_dir.parent / f"{run_dir.name}.toml", run_dir, **DIFFUSION)
    run = start_run(read_recipe(recipe_path, registry), registry)
    try:
        train(run, progress=False)
    finally:
        run.close()
    return run_dir


def write_tiny_recipe(path: str | Path, output_dir: str | Path, **overrides: dict[str, Any]) -> Path:
    """Write the tiny recipe to `path` and return it."""
    path = Path(path)
    path.write_text(tiny_recipe_text(output_dir, **overrides), encoding="utf-8")
    return path


def finished_tiny_run(root: Path, name: str = "run") -> Path:
    """Train the tiny recipe through `ctcore run` into `root / name` (checkpoints at steps 6 and 12); the run
    directory. Module fixtures share one such run; tests copy it before writing into it."""
    from typer.testing import CliRunner

    from ctcore.cli import app

    recipe = write_tiny_recipe(root / f"{name}.toml", root / name)
    result = CliRunner().invoke(app, ["run", str(recipe), "--no-progress"])
    assert result.exit_code == 0, result.output
    return root / name


def made_once_per_session(tmp_path_factory: Any, name: str, make: Callable[[Path], None]) -> Path:
    """A folder of the session's temporary folder that `make(folder)` fills once per test session: pytest-xdist's
    worker processes share it, the first that needs it making it while the others wait on its lock (what a worker
    that failed left is made again). Tests that write into it copy it first."""
    import fcntl
    import os
    import shutil

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    where, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(where, ignore_errors=True)
            where.mkdir()
            make(where)
            done.touch()
    return where


def one_line_error(result: Any, code: int = 2) -> str:
    """A handled CLI failure (a typer.testing Result): the exit code, no traceback, exactly one `error: ` line on
    stderr; returns the message without `error: `."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` (root included) with its size and mtime in ns; {} when root does not exist."""
    if not root.exists() and not root.is_symlink():
        return {}
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in paths}


@functools.cache
def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit grey PNG of width x height black pixels, built without an image in memory: zlib packs its
    rows of zeros about 230:1 (at its fastest level), so 20000 x 20000 (400 megapixels, 1.2 GB decoded as RGB) is
    218 KB on disk, a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows, block = bytes(1 + (width + 7) // 8), 1000  # each row: filter type 0, then the packed bits
    packer = zlib.compressobj(1)
    data = b"".join(packer.compress(rows * min(block, height - i)) for i in range(0, height, block)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grey, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


NO_REF = ("--metric fid needs --ref STATS.npz, reference statistics of the training data (make them with `ctcore "
          "eval-ref-stats DATASET.h5 OUT.npz`); --metric sliced-wasserstein needs no file")
"""What `ctcore eval` and `search-sigmas --metric fid` say without --ref."""


def cache_lacks_the_weights(cache: Path) -> str:
    """The entry, in a list of missing FID inputs, for Inception weights missing from the cache folder `cache`."""
    from ctcore.inception import FID_WEIGHTS_URL, WEIGHTS_FILENAME

    weights = cache / WEIGHTS_FILENAME
    return (f"  Inception weights for FID not found in the cache: {str(weights)!r}. Download {FID_WEIGHTS_URL} "
            f"(pytorch-fid's port of the TensorFlow FID Inception, ~96 MB) and save it there:\n"
            f"      mkdir -p '{cache}' && curl -L -o '{weights}' {FID_WEIGHTS_URL}\n"
            f"    or pass --inception PATH to use a copy elsewhere, or let ctcore fetch it with --download-inception; "
            f"$CTCORE_CACHE moves the cache folder\n")
