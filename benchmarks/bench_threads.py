"""How torch's CPU thread count (run.threads) changes the quickstart's speed, idle and on a loaded machine,
and the result a short fixed run reaches at each count.

    python benchmarks/bench_threads.py                    # threads 1, 2 and auto (run.threads = 0)
    python benchmarks/bench_threads.py --steps 20 --run-steps 50 --json

For each thread count: training img/s of the quickstart recipe (its real step, on CPU, `--steps` timed steps
after `--warmup`) with the machine as it is, then with one busy process per other CPU started by this script
(a `while True: pass` loop, killed afterwards), and the sliced-Wasserstein distance a `--run-steps` run of the
quickstart reaches and a digest of its weights, trained twice: the same thread count gives the same weights,
another count may not.
os.getloadavg() is printed before and after, since a shared machine is rarely idle. Not a test: it prints
numbers and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import torch

from ctcore.bench import run_bench
from ctcore.build import build_run
from ctcore.devices import resolve_threads
from ctcore.recipe import Recipe, read_recipe
from ctcore.registry import load_registry
from ctcore.training import train

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"


def with_threads(recipe: Recipe, threads: int, **training: int) -> Recipe:
    """The recipe on CPU with run.threads = `threads` (and training overrides such as total_steps)."""
    run = attrs.evolve(recipe.run, threads=threads, device="cpu")
    return attrs.evolve(recipe, run=run, training=attrs.evolve(recipe.training, **training))


@contextlib.contextmanager
def busy_cpus(count: int) -> Iterator[None]:
    """`count` processes spinning on a CPU each while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let them reach their loops
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def train_speed(recipe: Recipe, registry, steps: int, warmup: int) -> float:
    """Quickstart training img/s (ctcore bench's timing of the real training step)."""
    return run_bench(recipe, registry, steps=steps, warmup=warmup)["train_img_per_s"]


def short_run(recipe: Recipe, registry) -> tuple[float, str]:
    """After a fresh run of `recipe` (in a temporary directory): the sliced-Wasserstein distance to the data and
    a digest of the student's weights (equal digests: bit-identical weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(recipe, registry, Path(tmp) / "run")
        summary = train(run, progress=False)
    digest = hashlib.sha256()
    for tensor in run.student.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return summary["final_distance"], digest.hexdigest()[:12]


def main() -> None:
    """Measure each thread count; print one table (or one JSON object)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--run-steps", type=int, default=100, help="length of the fixed run whose distance is shown")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    registry = load_registry()
    base = read_recipe(QUICKSTART, registry)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load_before = os.getloadavg()
    rows = []
    for setting in (1, 2, 0):
        recipe = with_threads(base, setting)
        row = {"setting": "auto" if setting == 0 else setting, "threads": resolve_threads(setting)}
        row["idle_img_per_s"] = train_speed(recipe, registry, args.steps, args.warmup)
        with busy_cpus(max(1, cpus - 1)):
            row["loaded_img_per_s"] = train_speed(recipe, registry, args.steps, args.warmup)
        short = with_threads(base, setting, total_steps=args.run_steps, checkpoint_every=999_999_999,
                             sample_every=999_999_999, log_every=args.run_steps)
        runs = [short_run(short, registry) for _ in range(2)]
        row["sliced_wasserstein"] = [r[0] for r in runs]
        row["weights_sha256"] = [r[1] for r in runs]
        rows.append(row)
    load_after = os.getloadavg()
    result = {"cpus": cpus, "busy_processes": max(1, cpus - 1), "loadavg_before": load_before,
              "loadavg_after": load_after, "torch": str(torch.__version__), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{cpus} CPUs; load average (1, 5, 15 min) before {load_before}, after {load_after}")
    print(f"quickstart training, {args.steps} timed steps; loaded = {max(1, cpus - 1)} busy process(es) started here; "
          f"distance after a {args.run_steps}-step run, trained twice")
    print(f"{'threads':>10} {'idle img/s':>11} {'loaded img/s':>13}  sliced Wasserstein (run 1, run 2)  "
          f"weights sha256 (run 1, run 2)")
    for r in rows:
        name = f"{r['setting']}" + (f" ({r['threads']})" if r["setting"] == "auto" else "")
        sw = ", ".join(f"{v!r}" for v in r["sliced_wasserstein"])
        print(f"{name:>10} {r['idle_img_per_s']:>11,.0f} {r['loaded_img_per_s']:>13,.0f}  {sw}  "
              f"{', '.join(r['weights_sha256'])}")


if __name__ == "__main__":
    main()
