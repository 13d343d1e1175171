"""The first GPU campaign in one command: environment, `pytest -m gpu`, `ctcore bench`, FID feature and data loader
throughput, and two time-boxed CIFAR-10 runs (iCT and CT-L2), written to DIR/campaign.json and a few files beside it.

    python benchmarks/gpu_campaign.py --out DIR               # on the GPU machine: everything within --budget (480 s)
    python benchmarks/gpu_campaign.py --out DIR --plan-only   # print the time plan and stop
    python benchmarks/gpu_campaign.py --out DIR --smoke       # every section on CPU at toy size (a test runs it)

Before the GPU call, `python benchmarks/prepare_gpu_campaign.py` fills .campaign/ (wheels the GPU machine lacks,
the CIFAR-10 JPEG archive, the commit) and prints the one-line device command; docs/performance.md has the steps.

Every part gets a share of the wall-clock budget, planned from its FLOP count (counted on the meta device) and
the rates below, and printed before anything runs; subprocesses are killed at their share and each training run
is stopped by SIGTERM (ctcore run then writes a checkpoint). Without --minutes the two runs share what the other
parts leave. A section that raises records its error (type, message, traceback tail) and the others still run;
campaign.json is rewritten after every section, so a campaign killed midway keeps what it measured.

DIR holds what the device tool brings back from $OUT (at most 8 files of 16 MiB): campaign.json, one tar per run
(stats.jsonl, the sample grids at the fixed wall-clock points, the final grids, its log) and each run's 10,000
one-step samples of the final eval EMA as two 5,000-sample stores (seeds 0-4999 and 5000-9999: one store would
be 30 MB); the device command's `tee` adds campaign.log. Checkpoints stay in the work folder, deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "data", "tests", "bench", "fid_features", "loader", "runs")
DEFAULT_ARCHIVE = REPO / ".campaign" / "cifar10-jpeg.tar.gz"
PREPARED_COMMIT = REPO / ".campaign" / "commit.json"

# What the device tool brings back from $OUT (/work/.library/device/README.md).
OUT_MAX_FILES, OUT_MAX_FILE_MIB, OUT_MAX_TOTAL_MIB = 8, 16, 64

# Rates the plan assumes on an H100 (leads, not measurements; the campaign measures them).
EAGER_TFLOPS = 145.0
"""bf16 eager training: the issue's ~850 img/s of a plain NCSN++ iCT step x 4 passes x 42.5 GFLOP."""
COMPILED_TFLOPS = 250.0
"""bf16 compiled training: the issue's ~1460 img/s of the same step, compiled."""
FP32_TFLOPS = 25.0
"""The FID Inception in true fp32 (TF32 off): about 40 % of the H100's ~67 TFLOP/s fp32 peak."""
MARGIN = 1.15
"""Computed shares are this much longer than their estimate."""
COMPILE_SECONDS = 90.0
"""A cold torch.compile of NCSN++ (student grad pass and teacher no-grad pass): an assumption the bench measures."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One `ctcore bench` measurement."""

    label: str
    recipe: str
    batch: int
    sets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One time-boxed training run."""

    label: str
    recipe: str


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes and times of one kind of campaign: the real one (GPU) or the smoke run (CPU, toy size)."""

    name: str
    budget_s: float
    startup_s: float  # python, torch, ctcore and the FLOP counts before the plan prints
    environment_s: float
    data_s: float
    data_why: str
    tests_s: float
    tests_why: str
    process_s: float  # a `python -m ctcore ...` subprocess: imports, device start-up, building the run
    bench: tuple[Variant, ...]
    bench_steps: int
    bench_warmup: int
    test_paths: tuple[str, ...]
    fid_images: int
    fid_batch: int
    fid_tflops: float
    train_tflops: float
    loader_batches: tuple[int, ...]
    loader_steps: int
    loader_s: float
    runs: tuple[RunSpec, ...]
    run_sets: tuple[str, ...]  # toy overrides of the run recipes (smoke)
    run_minutes: float | None  # default --minutes (None: what the budget leaves)
    min_train_s: float
    run_startup_s: float  # launch to the first training step (imports, data, the step-0 distance)
    run_stop_s: float  # SIGTERM to exit: the step in flight and the checkpoint
    checkpoint_eval_s: float  # loading one checkpoint and its distance
    points: int  # sample grids and distances at this many wall-clock points per run (plus the stop)
    store_samples: int  # final one-step samples per run, written as two stores
    margin_s: float


REAL = Sizes(
    name="gpu", budget_s=480.0, startup_s=8.0, environment_s=5.0, process_s=12.0,
    data_s=20.0, data_why="ctcore data import of 50,000 JPEGs (9.4 s on 2 busy CPU cores; one core decodes), start",
    tests_s=35.0, tests_why="pytest -m gpu tests: collection (11 s on 2 CPU cores), 6 GPU tests, one tiny compile",
    bench=(
        Variant("ict_cifar10 b512 compile off", "recipes/ict_cifar10.toml", 512, ("training.compile=off",)),
        Variant("ict_cifar10 b512 compile on", "recipes/ict_cifar10.toml", 512, ("training.compile=on",)),
        # eager: a cold compile of the 296M ADM does not fit the 8-minute plan beside the NCSN++ compile
        Variant("ict_imagenet64 b128 compile off", "recipes/ict_imagenet64.toml", 128, ("training.compile=off",)),
        Variant("ict_imagenet64 b64 compile off", "recipes/ict_imagenet64.toml", 64, ("training.compile=off",)),
    ),
    bench_steps=10, bench_warmup=2, test_paths=("tests",),
    fid_images=50_000, fid_batch=256, fid_tflops=FP32_TFLOPS, train_tflops=EAGER_TFLOPS,
    loader_batches=(1024, 512), loader_steps=200, loader_s=8.0,
    runs=(RunSpec("ict-cifar10", "recipes/ict_cifar10.toml"), RunSpec("ct-l2-cifar10", "recipes/ct_l2_cifar10.toml")),
    run_sets=(), run_minutes=None, min_train_s=30.0, run_startup_s=15.0, run_stop_s=15.0, checkpoint_eval_s=2.5,
    points=4, store_samples=10_000, margin_s=10.0,
)

SMOKE = Sizes(
    name="smoke", budget_s=120.0, startup_s=5.0, environment_s=3.0, process_s=15.0,
    data_s=15.0, data_why="ctcore data import of 16 generated 8x8 PNGs (1 s on 2 busy CPU cores)",
    tests_s=25.0, tests_why="pytest -m gpu tests/test_gpu.py: every test skips on CPU (3 to 7 s on 2 busy cores)",
    bench=(Variant("quickstart b32 compile off", "recipes/quickstart.toml", 32, ("training.compile=off",)),),
    bench_steps=3, bench_warmup=1, test_paths=("tests/test_gpu.py",),
    fid_images=2, fid_batch=1, fid_tflops=0.01, train_tflops=0.05,
    loader_batches=(32,), loader_steps=5, loader_s=3.0,
    runs=(RunSpec("quickstart", "recipes/quickstart.toml"), RunSpec("quickstart-ct", "recipes/quickstart_ct.toml")),
    run_sets=("evaluation.num_samples=64", "sampling.num_samples=16"), run_minutes=0.1, min_train_s=5.0,
    run_startup_s=4.0, run_stop_s=10.0, checkpoint_eval_s=0.5, points=3, store_samples=32, margin_s=5.0,
)


@dataclasses.dataclass(frozen=True)
class Part:
    """One row of the plan: a part of the campaign, its share of the budget in seconds, and why."""

    name: str
    seconds: float
    why: str


class PlanError(ValueError):
    """The options ask for more than the budget holds (exit 2, like ctcore's usage errors)."""


class CommandFailed(RuntimeError):
    """A subprocess of the campaign exited non-zero or ran past its share."""


# ------------------------------------------------------------------------------------------------ the plan


def network_flops(recipe_path: Path, registry: Any, sets: Sequence[str] = ()) -> dict[str, Any]:
    """Forward GFLOP per image of a recipe's network, counted on the meta device (no memory, no data), its
    forward passes per training image and its batch size."""
    import torch

    from ctcore.bench import forward_gflop_per_image
    from ctcore.data import data_shape
    from ctcore.preflight import build_components
    from ctcore.recipe import read_recipe

    recipe = read_recipe(recipe_path, registry, sets)
    net = build_components(recipe, registry, "meta", kinds=("network",))["network"]
    gflop = forward_gflop_per_image(net, data_shape(recipe.data), recipe.data.num_classes, torch.device("meta"))
    passes = registry.get("objective", recipe.components["objective"].name).network_passes
    return {"gflop": gflop, "passes": passes, "batch": recipe.training.batch_size}


def inception_gflop() -> float:
    """Forward GFLOP per image of the FID Inception at its 299 x 299 input, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ctcore.inception import INPUT_SIZE, FIDInceptionV3

    with torch.device("meta"):
        net = FIDInceptionV3()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE, device="meta"))
    return counter.get_total_flops() / 2 / 1e9


def count_flops(sizes: Sizes, registry: Any) -> dict[str, Any]:
    """The FLOP counts the plan needs: each bench and run recipe's network, and the FID Inception."""
    recipes = {v.recipe for v in sizes.bench} | {r.recipe for r in sizes.runs}
    flops: dict[str, Any] = {r: network_flops(REPO / r, registry) for r in sorted(recipes)}
    flops["inception"] = inception_gflop()
    return flops


def run_post_s(sizes: Sizes, flops: dict[str, Any], spec: RunSpec) -> float:
    """After a run stops: the distance of each checkpoint, the final stores and grids."""
    sample_s = sizes.store_samples * flops[spec.recipe]["gflop"] / (sizes.train_tflops * 1e3)
    return (sizes.points + 3) * sizes.checkpoint_eval_s + sample_s


def make_plan(sizes: Sizes, flops: dict[str, Any], minutes: float | None, budget: float,
              only: Sequence[str] = SECTIONS) -> tuple[list[Part], float]:
    """The plan's rows and each run's training seconds (--minutes, or what the budget leaves)."""
    parts = [Part("startup", sizes.startup_s, "imports and the FLOP counts on the meta device (6.5 s on 2 CPU cores)")]
    if "environment" in only:
        parts.append(Part("environment", sizes.environment_s, "CUDA start-up, nvidia-smi, package versions"))
    if "data" in only:
        parts.append(Part("data", sizes.data_s, sizes.data_why))
    if "tests" in only:
        parts.append(Part("tests", sizes.tests_s, sizes.tests_why))
    if "bench" in only:
        for v in sizes.bench:
            f = flops[v.recipe]
            images = (sizes.bench_steps + sizes.bench_warmup) * v.batch
            compiled = "training.compile=on" in v.sets
            rate = (COMPILED_TFLOPS if compiled else EAGER_TFLOPS) if sizes is REAL else sizes.train_tflops
            train = images * f["passes"] * f["gflop"] / (rate * 1e3)
            sample = images * f["gflop"] / (rate * 1e3)
            compile_s = COMPILE_SECONDS if compiled and sizes is REAL else 0.0
            seconds = MARGIN * (sizes.process_s + compile_s + train + sample)
            parts.append(Part(f"bench: {v.label}", seconds,
                              f"{images:,} img x {f['passes']} passes x {f['gflop']:.1f} GFLOP at {rate:g} TFLOP/s "
                              f"= {train + sample:.1f} s, process start {sizes.process_s:g} s"
                              + (f", compile {compile_s:g} s (assumed)" if compile_s else "") + f", x{MARGIN:g}"))
    if "fid_features" in only:
        compute = sizes.fid_images * flops["inception"] / (sizes.fid_tflops * 1e3)
        parts.append(Part("fid_features", MARGIN * (compute + 3.0),
                          f"{sizes.fid_images:,} img x {flops['inception']:.1f} GFLOP at {sizes.fid_tflops:g} "
                          f"TFLOP/s = {compute:.1f} s, model 3 s, x{MARGIN:g}; stopped at its share"))
    if "loader" in only:
        parts.append(Part("loader", sizes.loader_s, f"ImageData.batch at {sizes.loader_batches}, "
                                                    f"{sizes.loader_steps} batches each; memory-bound, ~1 s"))
    parts.append(Part("margin", sizes.margin_s, "stopping processes, writing campaign.json and the tars"))
    fixed = sum(p.seconds for p in parts)
    runs = sizes.runs if "runs" in only else ()
    post = {r.label: run_post_s(sizes, flops, r) for r in runs}
    overhead = sum(sizes.run_stop_s + post[r.label] for r in runs)
    if not runs:
        train_s = 0.0
    elif minutes is not None:
        train_s = minutes * 60.0
    else:
        train_s = (budget - fixed - overhead) / len(runs)
        if train_s < sizes.min_train_s:
            raise PlanError(f"--budget {budget:g} leaves {max(train_s, 0):.0f} s of training per run, under "
                             f"the {sizes.min_train_s:g} s minimum: raise --budget or leave sections out with --only")
    for r in runs:
        f = flops[r.recipe]
        parts.append(Part(f"run: {r.label}", train_s + sizes.run_stop_s + post[r.label],
                          f"{train_s:.0f} s training (batch {f['batch']}), SIGTERM and checkpoint "
                          f"{sizes.run_stop_s:g} s, distances at {sizes.points + 1} checkpoints and "
                          f"{sizes.store_samples:,} samples {post[r.label]:.0f} s"))
    total = sum(p.seconds for p in parts)
    if total > budget + 1e-6:
        raise PlanError(f"the plan needs {total:.0f} s, more than --budget {budget:g} s: lower --minutes "
                         f"(each run's training) or raise --budget")
    return parts, train_s


def plan_table(parts: Sequence[Part], budget: float) -> str:
    """The plan as a table: part, seconds, why; the total against the budget last."""
    width = max(len(p.name) for p in parts)
    lines = [f"{'part':<{width}}  {'seconds':>7}  why", f"{'-' * width}  {'-' * 7}  {'-' * 3}"]
    lines += [f"{p.name:<{width}}  {p.seconds:>7.0f}  {p.why}" for p in parts]
    lines.append(f"{'total':<{width}}  {sum(p.seconds for p in parts):>7.0f}  of a {budget:g} s budget")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- helpers


def error_record(exc: BaseException) -> dict[str, Any]:
    """What campaign.json keeps of a failure: type, message, the traceback's last lines."""
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).splitlines()[-12:]
    return {"type": type(exc).__name__, "message": str(exc), "traceback": "\n".join(tail)}


def _text(data: Any) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_command(cmd: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a subprocess in the repository root in its own process group; at `timeout` the group is killed."""
    started = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1.0))
        timed_out = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return {"command": shlex.join(str(c) for c in cmd), "returncode": proc.returncode, "timed_out": timed_out,
            "wall_s": time.perf_counter() - started, "stdout": _text(out), "stderr": _text(err)}


def require_ok(result: dict[str, Any], what: str, share: float) -> None:
    """Raise CommandFailed, with the end of stderr, unless the command exited 0 within its share."""
    if result["timed_out"]:
        raise CommandFailed(f"{what} ran past its share of {share:.0f} s and was killed")
    if result["returncode"] != 0:
        raise CommandFailed(f"{what} exited {result['returncode']}: {result['stderr'][-1500:].strip()}")


def ctcore_command(*args: Any) -> list[str]:
    """`python -m ctcore ...` with this interpreter (the GPU machine may have no `ctcore` on its PATH)."""
    return [sys.executable, "-m", "ctcore", *map(str, args)]


def set_args(sets: Sequence[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compute_device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def commit_info() -> dict[str, Any]:
    """The checkout's commit from git, else from .campaign/commit.json (the GPU machine's copy has no .git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return {"commit": commit, "modified_files": len(dirty.splitlines()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        if PREPARED_COMMIT.is_file():
            return {**json.loads(PREPARED_COMMIT.read_text(encoding="utf-8")), "source": str(PREPARED_COMMIT)}
        return {"commit": None, "source": "neither git nor .campaign/commit.json"}


def make_toy_archive(path: Path, resolution: int = 8) -> Path:
    """A tar.gz of 16 small PNGs in two class folders under train/, the layout of the CIFAR-10 JPEG archive."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for cls in ("circle", "square"):
            for i in range(8):
                pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                info = tarfile.TarInfo(f"train/{cls}/{i:04d}.png")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
    return path


# ------------------------------------------------------------------------------------------- campaign


class Campaign:
    """The state the sections share: options, sizes, the plan's shares, the work folder, results so far."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, parts: Sequence[Part], train_s: float,
                 flops: dict[str, Any], registry: Any, work: Path) -> None:
        self.args, self.sizes, self.flops, self.registry, self.work = args, sizes, flops, registry, work
        self.shares = {p.name: p.seconds for p in parts}
        self.train_s = train_s
        self.deadline = STARTED + args.budget
        self.out = Path(args.out)
        self.dataset = work / "cifar10-train.h5"
        self.record: dict[str, Any] = {
            "campaign": {"mode": sizes.name, "budget_s": args.budget, "minutes": args.minutes,
                         "only": list(args.only), "plan": [dataclasses.asdict(p) for p in parts],
                         "flops": flops, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        }

    def save(self) -> None:
        """Write campaign.json atomically (after every section: a killed campaign keeps what it measured)."""
        self.record["campaign"]["elapsed_s"] = time.perf_counter() - STARTED
        tmp = self.out / ".campaign.json.tmp"
        tmp.write_text(json.dumps(self.record, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.out / "campaign.json")

    def section_share(self, name: str) -> float:
        """A section's seconds in the plan: its row, or the sum of its rows (bench: one per variant, runs: one per
        run)."""
        prefix = {"bench": "bench: ", "runs": "run: "}.get(name)
        return sum(s for p, s in self.shares.items() if p.startswith(prefix)) if prefix else self.shares[name]

    def section(self, name: str, fn: Callable[[Campaign], dict[str, Any]]) -> None:
        """Run one section; record its result, or its error, with its time and share."""
        started = time.perf_counter()
        share = self.section_share(name)
        print(f"[{started - STARTED:6.1f} s] {name} (share {share:.0f} s)", flush=True)
        try:
            if self.args.fail == name:
                raise RuntimeError(f"--fail {name}: this section raised on purpose")
            result = {"ok": True, **fn(self)}
        except Exception as exc:  # fail soft: record it, run the other sections
            result = {"ok": False, "error": error_record(exc)}
            print(f"  {name} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        result["seconds"] = time.perf_counter() - started
        result["share_s"] = share
        self.record[name] = result
        self.save()
        with contextlib.suppress(Exception):
            free_gpu_memory()


# ------------------------------------------------------------------------------------------- sections


def section_environment(c: Campaign) -> dict[str, Any]:
    """GPU, driver, torch, CUDA and Python versions, the ctcore commit, the versions ctcore's needs resolved to."""
    import importlib.metadata as md
    import platform

    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(), "ctcore": commit_info(), "gpu": None, "nvidia_smi": None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30,
                      "multiprocessors": p.multi_processor_count, "count": torch.cuda.device_count()}
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                                               capture_output=True, text=True, timeout=15).stdout.strip()
    packages = {}
    for name in ("ctcore", "torch", "triton", "numpy", "scipy", "h5py", "pillow", "pluggy", "attrs", "cattrs",
                 "rich", "typer", "pydantic", "pydantic-core", "typing-extensions", "pytest", "pytest-xdist"):
        try:
            dist = md.distribution(name)
            packages[name] = {"version": dist.version, "location": str(dist.locate_file(""))}
        except md.PackageNotFoundError:
            packages[name] = None
    env["packages"] = packages
    return env


def section_data(c: Campaign) -> dict[str, Any]:
    """`ctcore data import` of the CIFAR-10 JPEG archive into the work folder (timed)."""
    archive = Path(c.args.archive) if c.args.archive else None
    if archive is None:
        archive = make_toy_archive(c.work / "toy-images.tar.gz") if c.sizes is SMOKE else DEFAULT_ARCHIVE
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: no image archive; run `python benchmarks/prepare_gpu_campaign.py` "
                                "first (it copies ../shared/data/cifar10-jpeg.tar.gz there), or pass --archive")
    share = c.shares["data"]
    result = run_command(ctcore_command("data", "import", archive, c.dataset, "--no-progress", "--json"), share)
    require_ok(result, "ctcore data import", share)
    return {"archive": str(archive), "archive_bytes": archive.stat().st_size, "dataset": str(c.dataset),
            "command": result["command"], "wall_s": result["wall_s"], "import": json.loads(result["stdout"])}


def parse_junit(path: Path) -> dict[str, dict[str, Any]]:
    """nodeid -> outcome, seconds and message, from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    tests = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        nodeid = f"{module}.py::{case.get('name')}"
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (child.get("message") or child.text or "")[:500]
        tests[nodeid] = {"outcome": outcome, "seconds": float(case.get("time", 0)), "message": message}
    return tests


def parse_verbose(stdout: str) -> dict[str, dict[str, Any]]:
    """nodeid -> outcome from `pytest -v` lines (what is left when pytest was killed before its JUnit XML)."""
    tests = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL",
                                                                  "XPASS"):
            tests[parts[0]] = {"outcome": parts[1].lower(), "seconds": None, "message": None}
    return tests


def section_tests(c: Campaign) -> dict[str, Any]:
    """`pytest -m gpu` in one process; pass, fail or skip per test."""
    xml = c.work / "junit-gpu.xml"
    share = c.shares["tests"]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-n", "0", "-p", "no:cacheprovider", "-v",
           f"--junitxml={xml}", *c.sizes.test_paths]
    result = run_command(cmd, share)
    tests = parse_junit(xml) if xml.is_file() else parse_verbose(result["stdout"])
    counts: dict[str, int] = {}
    for t in tests.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    summary = {"command": result["command"], "returncode": result["returncode"], "timed_out": result["timed_out"],
               "wall_s": result["wall_s"], "counts": counts, "tests": tests}
    if result["returncode"] not in (0, 5) or result["timed_out"]:  # 5: no test collected
        summary["output_tail"] = (result["stdout"] + result["stderr"])[-4000:]
    return summary


def bench_takes_set() -> bool:
    """Whether this checkout's `ctcore bench` has --set (else the campaign writes a recipe copy per variant)."""
    import typer.main

    from ctcore.cli import app

    command = typer.main.get_command(app).commands["bench"]
    return any("--set" in p.opts for p in command.params)


def bench_variant(c: Campaign, index: int, v: Variant, takes_set: bool, share: float) -> dict[str, Any]:
    """One `ctcore bench --json` run; its JSON, the command and its wall time."""
    from ctcore.recipe import dump_recipe, read_recipe

    if takes_set:
        recipe, sets = v.recipe, set_args(v.sets)
    else:
        recipe = c.work / f"bench-{index}.toml"
        recipe.write_text(dump_recipe(read_recipe(REPO / v.recipe, c.registry, v.sets)), encoding="utf-8")
        sets = []
    cmd = ctcore_command("bench", recipe, "--batch", v.batch, "--steps", c.sizes.bench_steps,
                         "--warmup", c.sizes.bench_warmup, "--json", *sets)
    result = run_command(cmd, share)
    record = {"recipe": v.recipe, "batch": v.batch, "sets": list(v.sets), "command": result["command"],
              "reproduce": shlex.join(["ctcore", "bench", v.recipe, "--batch", str(v.batch), *set_args(v.sets),
                                       "--json"]),
              "wall_s": result["wall_s"], "share_s": share}
    require_ok(result, f"ctcore bench ({v.label})", share)
    record["result"] = json.loads(result["stdout"][result["stdout"].index("{"):])
    return record


def section_bench(c: Campaign) -> dict[str, Any]:
    """`ctcore bench --json` for each variant; a variant that fails is recorded and the next one runs."""
    takes_set = bench_takes_set()
    variants: dict[str, Any] = {}
    for index, v in enumerate(c.sizes.bench):
        share = c.shares[f"bench: {v.label}"]
        print(f"  bench {v.label} (share {share:.0f} s)", flush=True)
        try:
            variants[v.label] = {"ok": True, **bench_variant(c, index, v, takes_set, share)}
        except Exception as exc:
            variants[v.label] = {"ok": False, "recipe": v.recipe, "batch": v.batch, "sets": list(v.sets),
                                 "error": error_record(exc)}
        c.record["bench"] = {"set_supported": takes_set, "variants": variants}  # partial results survive a kill
        c.save()
    return {"set_supported": takes_set, "variants": variants}


def section_fid_features(c: Campaign) -> dict[str, Any]:
    """Inception features and logits of random uint8 32 x 32 images through the FID pipeline (resize, true fp32,
    running statistics), with random Inception weights; stopped at the share, with the time projected to all."""
    import torch

    from ctcore.fid import FeatureAccumulator, inception_outputs
    from ctcore.inception import DEFAULT_FID_PROTOCOL, FIDInceptionV3

    started = time.perf_counter()
    device = compute_device()
    torch.manual_seed(0)
    net = FIDInceptionV3().to(device)
    n, batch = c.sizes.fid_images, c.sizes.fid_batch
    g = torch.Generator(device=device).manual_seed(0)

    def images(k: int) -> torch.Tensor:
        return torch.randint(0, 256, (k, 3, 32, 32), generator=g, dtype=torch.uint8, device=device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm = time.perf_counter()
    if device.type == "cuda":  # untimed: cuDNN's algorithm choice, allocations
        inception_outputs(net, images(batch), device)
        sync()
    warmup_s = time.perf_counter() - warm
    acc = FeatureAccumulator(device=device if device.type == "cuda" else "cpu")
    stop_at = started + c.shares["fid_features"] - 1.0
    start, done = time.perf_counter(), 0
    while done < n and (done == 0 or time.perf_counter() < stop_at):
        k = min(batch, n - done)
        features, logits = inception_outputs(net, images(k), device)
        acc.update(features, logits)
        done += k
    sync()
    seconds = time.perf_counter() - start
    ips = done / seconds
    return {"device": str(device), "images": done, "target_images": n, "complete": done == n, "batch": batch,
            "warmup_s": warmup_s, "seconds": seconds, "img_per_s": ips, "projected_target_s": n / ips,
            "gflop_per_image": c.flops["inception"], "tflop_per_s": ips * c.flops["inception"] / 1e3,
            "protocol": DEFAULT_FID_PROTOCOL, "weights": "random (torch.manual_seed(0))",
            "features_finite": bool(torch.isfinite(features).all()),
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def section_loader(c: Campaign) -> dict[str, Any]:
    """ImageData.batch throughput on the training device (the imported dataset, else random images), and the
    time to read the dataset and move it there."""
    import torch
    from bench_loader import measure  # benchmarks/, beside this file

    from ctcore.data import read_hdf5_images

    device = compute_device()
    start = time.perf_counter()
    if c.dataset.is_file():
        images, _, _ = read_hdf5_images(c.dataset)
        source = str(c.dataset)
    else:
        images = torch.randint(0, 256, (50_000 if c.sizes is REAL else 512, 3, 32, 32), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        source = f"random uint8 images {tuple(images.shape)} (no imported dataset)"
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    on_device = images.to(device)
    sync()
    to_device_s = time.perf_counter() - start
    del on_device
    results = [measure(images, None, device, batch=b, steps=c.sizes.loader_steps, warmup=5, flip=flip)
               for b in c.sizes.loader_batches for flip in (True, False)]
    return {"source": source, "images": int(images.shape[0]), "read_s": read_s, "to_device_s": to_device_s,
            "device": str(device), "results": results}


# ------------------------------------------------------------------------------------------- runs


def read_stats(path: Path) -> list[dict[str, Any]]:
    """stats.jsonl's records (a torn last line, from a kill, is skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def bench_figures(c: Campaign, recipe: str) -> dict[str, dict[str, Any]]:
    """The successful bench variants of `recipe` by their training.compile setting ("on" / "off")."""
    found = {}
    for v in c.record.get("bench", {}).get("variants", {}).values():
        if v.get("ok") and v["recipe"] == recipe:
            for s in v["sets"]:
                if s.startswith("training.compile="):
                    found[s.split("=", 1)[1]] = v
    return found


def choose_compile(c: Campaign, recipe: str, train_s: float) -> tuple[str | None, str]:
    """training.compile for the time-boxed runs: whichever trains more images in `train_s` by the bench's figures
    (compiling costs its compile time first); None (the recipe's own setting) without both figures."""
    figures = bench_figures(c, recipe)
    if "on" not in figures or "off" not in figures:
        return None, "no bench figures for compile on and off: the recipe's own training.compile"
    on, off = figures["on"], figures["off"]
    compile_s = on["result"].get("compile_seconds") or max(on["wall_s"] - off["wall_s"], 0.0)
    usable = max(train_s - c.sizes.run_startup_s, 0.0)
    images_on = on["result"]["train_img_per_s"] * max(usable - compile_s, 0.0)
    images_off = off["result"]["train_img_per_s"] * usable
    choice = "on" if images_on > images_off else "off"
    return choice, (f"compile {choice}: in {usable:.0f} s of training, compiled {images_on:,.0f} images (after "
                    f"{compile_s:.0f} s of compiling) against eager {images_off:,.0f} (ctcore bench figures)")


def expected_img_per_s(c: Campaign, recipe: str, compile_choice: str | None) -> tuple[float, str]:
    """The training speed that places the wall-clock points: the bench's figure, else the FLOP model."""
    figures = bench_figures(c, recipe)
    key = compile_choice or ("on" if c.sizes is REAL else "off")
    if key in figures:
        return figures[key]["result"]["train_img_per_s"], f"ctcore bench ({figures[key]['batch']} batch)"
    f = c.flops[recipe]
    rate = COMPILED_TFLOPS if key == "on" and c.sizes is REAL else c.sizes.train_tflops
    return rate * 1e3 / (f["passes"] * f["gflop"]), f"FLOP model at {rate:g} TFLOP/s"


def stop_run(proc: subprocess.Popen, stats: Path, train_s: float, stop_s: float, launched: float) -> dict[str, Any]:
    """Wait until `train_s` after launch and the first logged step (the SIGTERM handler is installed by then),
    send SIGTERM, and wait `stop_s` for the checkpoint; kill the process group after that."""
    grace = max(30.0, train_s)  # a slow start (compilation) may delay the first step
    signalled = None
    while proc.poll() is None:
        now = time.time()
        started_training = any("loss" in r for r in read_stats(stats))
        if now >= launched + train_s and (started_training or now >= launched + train_s + grace):
            signalled = now - launched
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    killed = False
    try:
        proc.wait(timeout=stop_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = True
    return {"sigterm_at_s": signalled, "exit_code": proc.returncode, "exit_s": time.time() - launched,
            "killed_after_sigterm": killed}


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def one_run(c: Campaign, spec: RunSpec, train_s: float, compile_choice: str | None) -> dict[str, Any]:
    """Train `spec` for `train_s` seconds of wall clock, stop it by SIGTERM, then score its checkpoints (the
    in-run distance at each wall-clock point) and write the final stores and grids into DIR."""
    from ctcore.evaluation import evaluate_checkpoint_distance
    from ctcore.recipe import read_recipe
    from ctcore.sampling import sample_from_checkpoint

    if not c.dataset.is_file():
        raise FileNotFoundError(f"{c.dataset}: no imported dataset (the data section failed or did not run)")
    run_dir = c.work / "runs" / spec.label
    base = ["data.source=hdf5", f"data.path={c.dataset}", *c.sizes.run_sets]
    if compile_choice is not None:
        base.append(f"training.compile={compile_choice}")
    recipe = read_recipe(REPO / spec.recipe, c.registry, [*base, *c.args.run_set])
    batch = recipe.training.batch_size
    ips, ips_source = expected_img_per_s(c, spec.recipe, compile_choice)
    interval_s = max(train_s - c.sizes.run_startup_s, 1.0) / c.sizes.points
    every = max(1, round(interval_s * ips / batch))
    sets = [*base, f"training.sample_every={every}", f"training.checkpoint_every={every}",
            "training.keep_checkpoints=1000", f"training.log_every={max(1, min(every, 5))}", *c.args.run_set]
    cmd = ctcore_command("run", REPO / spec.recipe, "-o", run_dir, "--no-progress", *set_args(sets))
    log_path = c.work / f"{spec.label}.log"
    print(f"  run {spec.label}: {train_s:.0f} s, every {every} steps (~{interval_s:.0f} s at {ips:,.0f} img/s, "
          f"{ips_source})", flush=True)
    with open(log_path, "wb") as log:
        launched = time.time()
        proc = subprocess.Popen([str(a) for a in cmd], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        stop = stop_run(proc, run_dir / "stats.jsonl", train_s, c.sizes.run_stop_s, launched)
    records = read_stats(run_dir / "stats.jsonl")
    log_tail = log_path.read_bytes()[-1_000_000:]
    result: dict[str, Any] = {
        "recipe": spec.recipe, "command": shlex.join(str(a) for a in cmd), "batch": batch, "train_s": train_s,
        "every_steps": every, "expected_img_per_s": ips, "expected_from": ips_source, **stop,
        "steps": max((r.get("step", 0) for r in records), default=0),
        "nonfinite_steps": sum(r.get("event") == "nonfinite" for r in records),
        "diverged": any(r.get("event") == "diverged" for r in records),
        "img_per_s": [r["img_per_s"] for r in records if "img_per_s" in r],
        "initial_distance": next((r["sliced_wasserstein"] for r in records
                                  if r.get("event") == "distance" and r.get("step") == 0), None),
    }
    if stop["exit_code"] != 143:
        result["log_tail"] = log_tail[-3000:].decode(errors="replace")
    saved = {r["step"]: r["time"] - launched for r in records if r.get("event") in ("checkpoint", "stopped")}
    points = []
    for ckpt in sorted((run_dir / "checkpoints").glob("*.pt")):
        d = evaluate_checkpoint_distance(ckpt, c.registry)
        grids = sorted(p.name for p in (run_dir / "samples").glob(f"step-{d['step']:07d}-*.png"))
        points.append({"step": d["step"], "seconds": saved.get(d["step"]), "sliced_wasserstein": d["value"],
                       "grids": grids})
    result["points"] = points
    if not points:
        raise RuntimeError(f"{spec.label}: no checkpoint was written (exit {stop['exit_code']}); log: "
                           f"{log_tail[-1500:].decode(errors='replace')}")
    final = sorted((run_dir / "checkpoints").glob("*.pt"))[-1]
    half = c.sizes.store_samples // 2
    stores = []
    for seed in (0, half):
        store = c.out / f"{spec.label}-samples-{seed}.h5"
        made = sample_from_checkpoint(final, c.registry, num_samples=half, seed=seed, out=store,
                                      grid=c.work / f"{spec.label}-final-1step-{seed}.png", overwrite=True)
        stores.append({"file": store.name, "seeds": [seed, seed + half - 1], "step": made["step"],
                       "plan": made["plan"], "bytes": store.stat().st_size})
    result["stores"] = stores
    two = sample_from_checkpoint(final, c.registry, num_samples=64, steps=2, out=c.work / f"{spec.label}-2step.h5",
                                 grid=c.work / f"{spec.label}-final-2step.png", overwrite=True)
    result["final_two_step_plan"] = two["plan"]
    tar_path = c.out / f"{spec.label}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in ("stats.jsonl", "recipe.toml", "provenance.json"):
            if (run_dir / name).is_file():
                tar.add(run_dir / name, arcname=f"{spec.label}/{name}")
        for png in sorted((run_dir / "samples").glob("*.png")):
            tar.add(png, arcname=f"{spec.label}/samples/{png.name}")
        tar.add(c.work / f"{spec.label}-final-1step-0.png", arcname=f"{spec.label}/final-1step.png")
        tar.add(c.work / f"{spec.label}-final-2step.png", arcname=f"{spec.label}/final-2step.png")
        add_bytes(tar, f"{spec.label}/run.log", log_tail)
    result["tar"] = tar_path.name
    return result


def section_runs(c: Campaign) -> dict[str, Any]:
    """The time-boxed runs, the same training seconds each: --minutes, or what the budget leaves now."""
    runs = c.sizes.runs
    if c.args.minutes is not None:
        train_s = c.args.minutes * 60.0
    else:  # parts that finished early leave their time to the runs
        post = sum(c.sizes.run_stop_s + run_post_s(c.sizes, c.flops, r) for r in runs)
        left = c.deadline - time.perf_counter() - c.shares["margin"] - post
        train_s = max(left / len(runs), c.sizes.min_train_s)
    compile_choice, why = choose_compile(c, runs[0].recipe, train_s)
    results: dict[str, Any] = {"train_s": train_s, "compile": compile_choice, "compile_reason": why,
                               "run_sets": list(c.args.run_set), "runs": {}}
    for spec in runs:
        try:
            results["runs"][spec.label] = {"ok": True, **one_run(c, spec, train_s, compile_choice)}
        except Exception as exc:
            results["runs"][spec.label] = {"ok": False, "error": error_record(exc)}
        c.record["runs"] = results
        c.save()
    return results


SECTION_FUNCTIONS: dict[str, Callable[[Campaign], dict[str, Any]]] = {
    "environment": section_environment, "data": section_data, "tests": section_tests, "bench": section_bench,
    "fid_features": section_fid_features, "loader": section_loader, "runs": section_runs,
}


# ------------------------------------------------------------------------------------------- the end


def check_out_files(out: Path) -> dict[str, Any]:
    """The files in DIR against what the device tool brings back from $OUT."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    mib = {str(p.relative_to(out)): p.stat().st_size / 2**20 for p in files}
    problems = []
    if len(files) > OUT_MAX_FILES:
        problems.append(f"{len(files)} files, more than {OUT_MAX_FILES}")
    problems += [f"{name}: {size:.1f} MiB, over {OUT_MAX_FILE_MIB}" for name, size in mib.items()
                 if size > OUT_MAX_FILE_MIB]
    if sum(mib.values()) > OUT_MAX_TOTAL_MIB:
        problems.append(f"{sum(mib.values()):.1f} MiB in all, over {OUT_MAX_TOTAL_MIB}")
    return {"files_mib": mib, "within_limits": not problems, "problems": problems}


def summary_table(record: dict[str, Any]) -> str:
    """A short table of the figures, printed last (the device tool's reply shows the end of the output)."""
    rows = []
    for name in SECTIONS:
        r = record.get(name)
        if r is None:
            continue
        if not r["ok"]:
            rows.append((name, f"FAILED {r['error']['type']}: {r['error']['message'][:80]}"))
        elif name == "environment":
            gpu = r["gpu"]["name"] if r["gpu"] else "no GPU"
            rows.append((name, f"{gpu}, torch {r['torch']}, CUDA {r['cuda']}, python {r['python']}"))
        elif name == "data":
            rows.append((name, f"{r['import'].get('count', '?')} images imported in {r['wall_s']:.1f} s"))
        elif name == "tests":
            rows.append((name, ", ".join(f"{n} {k}" for k, n in sorted(r["counts"].items())) or "none ran"))
        elif name == "bench":
            for label, v in r["variants"].items():
                if v["ok"]:
                    b = v["result"]
                    peak = b.get("peak_gpu_memory_gib")
                    rows.append((f"bench {label}", f"train {b['train_img_per_s']:,.0f} img/s, sample "
                                 f"{b['sample_img_per_s']:,.0f} img/s, {b['train_tflop_per_s']:.1f} TFLOP/s"
                                 + (f", peak {peak:.1f} GiB" if peak is not None else "")))
                else:
                    rows.append((f"bench {label}", f"FAILED {v['error']['message'][:80]}"))
        elif name == "fid_features":
            rows.append((name, f"{r['img_per_s']:,.0f} img/s ({r['images']:,} images); {r['target_images']:,} "
                               f"in {r['projected_target_s']:.1f} s"))
        elif name == "loader":
            rows += [(f"loader b{x['batch']} flip {x['flip']}", f"{x['images_per_s']:,.0f} img/s")
                     for x in r["results"]]
        elif name == "runs":
            for label, run in r["runs"].items():
                if run["ok"]:
                    last = run["points"][-1]
                    first = run["initial_distance"]
                    rows.append((f"run {label}", f"{run['steps']} steps in {run['train_s']:.0f} s, sliced W "
                                 f"{'?' if first is None else f'{first:.4f}'} -> {last['sliced_wasserstein']:.4f}, "
                                 f"{run['nonfinite_steps']} non-finite, exit {run['exit_code']}"))
                else:
                    rows.append((f"run {label}", f"FAILED {run['error']['message'][:80]}"))
    width = max((len(k) for k, _ in rows), default=4)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for campaign.json, the tars and stores")
    parser.add_argument("--smoke", action="store_true", help="every section on CPU at toy size")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training minutes of each time-boxed run (default: what the budget leaves; smoke 0.1)")
    parser.add_argument("--budget", type=float, default=None,
                        help="wall-clock seconds for the whole campaign (default 480; smoke 120)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)}); runs adds data")
    parser.add_argument("--archive", default=None,
                        help=f"the image archive to import (default {DEFAULT_ARCHIVE.relative_to(REPO)}; "
                             "smoke: a generated toy archive)")
    parser.add_argument("--run-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an override for both time-boxed runs (repeatable), e.g. training.compile=on")
    parser.add_argument("--work", type=Path, default=None,
                        help="work folder for the dataset, run directories and checkpoints (default: a temporary "
                             "folder, deleted at the end)")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    parser.add_argument("--fail", choices=SECTIONS, default=None,
                        help="make this section raise at its start (to check that the others still run)")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if "runs" in only and "data" not in only:
        only.append("data")
    args.only = [s for s in SECTIONS if s in only]
    sizes = SMOKE if args.smoke else REAL
    args.budget = sizes.budget_s if args.budget is None else args.budget
    args.minutes = sizes.run_minutes if args.minutes is None else args.minutes
    if args.budget <= 0 or (args.minutes is not None and args.minutes <= 0):
        parser.error("--budget and --minutes must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Plan, print the plan, run the sections, write campaign.json; exit 1 when a section failed."""
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else REAL
    out = Path(args.out)
    if (out / "campaign.json").exists():
        print(f"error: {out / 'campaign.json'} exists; choose another --out or delete it", file=sys.stderr)
        return 2
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU, also where a GPU is present (this process and its children)
        import torch

        torch.set_num_threads(1)  # as ctcore runs on a shared 2-core machine: 2 threads spin when a core is busy
    from ctcore.registry import load_registry

    registry = load_registry()
    flops = count_flops(sizes, registry)
    try:
        parts, train_s = make_plan(sizes, flops, args.minutes, args.budget, args.only)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"GPU campaign plan ({sizes.name}; {time.perf_counter() - STARTED:.1f} s spent planning)", flush=True)
    print(plan_table(parts, args.budget), flush=True)
    if args.plan_only:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="ctcore-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    c = Campaign(args, sizes, parts, train_s, flops, registry, work)
    try:
        for name in args.only:
            c.section(name, SECTION_FUNCTIONS[name])
    finally:
        c.record["out_files"] = check_out_files(out)
        c.save()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - STARTED
    print(f"\ncampaign done in {elapsed:.0f} s of a {args.budget:g} s budget; {out / 'campaign.json'}")
    print(summary_table(c.record))
    if not c.record["out_files"]["within_limits"]:
        print(f"warning: {'; '.join(c.record['out_files']['problems'])}")
    failed = [name for name in args.only if not c.record[name]["ok"]]
    if failed:
        print(f"failed sections: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
