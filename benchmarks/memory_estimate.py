"""The memory estimate of a training step (what `ctcore check` and every run compute from the meta build) against
the measured peak, for small MLP, NCSN++ and ADM configurations at two batch sizes each.

    python benchmarks/memory_estimate.py                      # on CUDA when there is one, else on CPU
    python benchmarks/memory_estimate.py --device cpu --json
    python benchmarks/memory_estimate.py --set training.precision=bf16
    python benchmarks/memory_estimate.py --checkpoint-blocks   # NCSN++ and ADM with and without checkpoint_blocks
    python benchmarks/memory_estimate.py --checkpoint-blocks --batches 4,16,32

Each case runs in a fresh process (run.threads = 1) on random images of the recipe's shape, as `ctcore bench`
does. The estimate is the training step's part of `check`'s figure: weights, eval EMA, the teacher's copy,
gradients, optimizer moments, the metric, the random images and the activations kept for backward (check's
figure adds data loading, sample grids and evaluation, which never coexist with a step, and the non-finite
check's rollback copy, which train() makes around its steps and a training step alone, as measured here, does
not). The measured peak is
that of the tensors in the third training step
(ctcore.bench.measure_step_memory: torch.profiler's allocation records on CPU, max_memory_allocated on CUDA).
On CPU the script also reports the rise of the process's peak RSS from just before the build to the end of three
steps, measured first in the same fresh process without the profiler: what the operating system sees (the
allocator's caching, libraries' own buffers). Each case also times TIMED_STEPS training steps after a warm one
(without the profiler; the median; on CPU the process's CPU time, which other processes on a shared machine
leave alone, on CUDA the wall time). `--checkpoint-blocks` runs the NCSN++ and ADM cases with the network option
`checkpoint_blocks` off and on and prints the saving and the step-time ratio. Not a test: it prints numbers and
exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SMALL_DATA = ["data.source=synthetic", "data.path=''", "data.resolution=32", "data.num_images=64", "data.num_classes=0"]
CASES: dict[str, tuple[str, list[str], tuple[int, int]]] = {
    # the quickstart as it is
    "mlp": ("quickstart.toml", [], (64, 256)),
    # ict_cifar10's NCSN++ (ch_mult [2, 2, 2], attention at 16x16, dropout 0.3) at nf 16 with one block a level
    "ncsnpp": ("ict_cifar10.toml", [*SMALL_DATA, "network.nf=16", "network.num_res_blocks=1"], (4, 16)),
    # ict_imagenet64's ADM at 32x32, 32 channels, one block a level: attention at 32x32 (1,024 tokens, as the
    # paper network's attention at 32x32 of 64x64 images), 16x16 and 8x8
    "adm": ("ict_imagenet64.toml", [*SMALL_DATA, "network.model_channels=32", "network.channel_mult=[1,2,2]",
                                    "network.num_res_blocks=1", "network.attention_resolutions=[32,16,8]",
                                    "network.num_head_channels=16", "network.num_groups=8"], (4, 16)),
}
STEPS = 3
TIMED_STEPS = 5


def _peak_rss_reset() -> int | None:
    """Reset the process's peak RSS (Linux: /proc/self/clear_refs) and return its RSS now; None where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")
    except OSError:
        return None


def _status(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def measure_case(name: str, batch: int, device: str, sets: list[str]) -> dict[str, Any]:
    """One case in this process: the estimate, the measured peak, the RSS rise."""
    from ctcore.bench import measure_step_memory
    from ctcore.build import build_run
    from ctcore.data import ImageData, data_shape
    from ctcore.preflight import preflight
    from ctcore.recipe import read_recipe
    from ctcore.registry import load_registry
    from ctcore.training import train_step

    registry = load_registry()
    recipe_file, case_sets, _ = CASES[name]
    keys = {s.split("=", 1)[0] for s in sets}
    recipe = read_recipe(RECIPES / recipe_file, registry, [
        *(s for s in [*case_sets, "run.threads=1"] if s.split("=", 1)[0] not in keys), *sets,
        f"run.device={device}", f"training.batch_size={batch}"])
    shape, classes = data_shape(recipe.data), recipe.data.num_classes
    count = max(2 * batch, 16)

    m = preflight(recipe, registry, device=torch.device(device)).memory
    step = dataclasses.replace(m, data=count * (math.prod(shape) + 8), host_staging=0, samples=0, evaluation=0,
                               fid=0, host_evaluation=0, rollback=0)
    estimate = step.peak(device == "cpu")

    def build() -> Any:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (count, *shape), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, max(classes, 1), (count,), generator=g) if classes else None
        data = ImageData(images, labels, num_classes=classes, device=device)
        return build_run(recipe, registry, data=data)

    rss = None
    if device == "cpu":
        start = _peak_rss_reset()
        if start is not None:
            run = build()
            for _ in range(STEPS):
                train_step(run)
            rss = _status("VmHWM") - start
            del run
            gc.collect()
    measured = measure_step_memory(build, steps=STEPS)
    run = build()
    train_step(run)  # the first step creates the gradients and the optimizer moments
    clock = time.perf_counter if device == "cuda" else time.process_time  # CPU time: what other processes take
    times = []                                                              # from a shared machine does not count
    for _ in range(TIMED_STEPS):
        if device == "cuda":
            torch.cuda.synchronize()
        started = clock()
        train_step(run)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - started)
    return {"case": name, "batch": batch, "parameters": m.parameters, "estimate": estimate,
            "activations": m.activations, "measured": measured["peak"], "measured_before_step": measured["before"],
            "ratio": estimate / measured["peak"], "rss_rise": rss, "step_s": statistics.median(times),
            "sets": sets}


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="Applied to every case (e.g. training.precision=bf16).")
    parser.add_argument("--cases", help="Comma-separated: " + ", ".join(CASES) + " (default: all; with "
                        "--checkpoint-blocks: ncsnpp,adm)")
    parser.add_argument("--checkpoint-blocks", action="store_true",
                        help="Each case with network.checkpoint_blocks=false and =true: the saving and the time cost.")
    parser.add_argument("--batches", help="Comma-separated batch sizes for every case (default: each case's two).")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # NAME:BATCH, run in this process (the child)
    args = parser.parse_args()
    if args.case:
        name, batch = args.case.split(":")
        print(json.dumps(measure_case(name, int(batch), args.device, args.sets)))
        return
    cases = args.cases or ("ncsnpp,adm" if args.checkpoint_blocks else ",".join(CASES))
    variants = ([["network.checkpoint_blocks=false"], ["network.checkpoint_blocks=true"]] if args.checkpoint_blocks
                else [[]])
    rows = []
    for name in cases.split(","):
        for batch in map(int, args.batches.split(",")) if args.batches else CASES[name][2]:
            pair = []
            for variant in variants:
                sets = [*args.sets, *variant]
                command = [sys.executable, __file__, "--case", f"{name}:{batch}", "--device", args.device,
                           *(a for s in sets for a in ("--set", s))]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    sys.exit(f"{name} at batch {batch} {' '.join(variant)} failed:\n{done.stderr}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                pair.append(rows[-1])
                if not args.json:
                    r = rows[-1]
                    checkpointing = f"  checkpoint_blocks {variant[0].split('=')[1]:5}" if variant else ""
                    print(f"{r['case']:7} batch {r['batch']:4}{checkpointing}  {r['parameters']:>10,} parameters  "
                          f"estimate {_mib(r['estimate']):>11}  measured {_mib(r['measured']):>11}  estimate / "
                          f"measured {r['ratio']:.2f}  RSS rise {_mib(r['rss_rise'])}  step {r['step_s']:.3f} s",
                          flush=True)
            if args.checkpoint_blocks and not args.json:
                off, on = pair
                rise = [r["measured"] - r["measured_before_step"] for r in pair]
                print(f"{name:7} batch {batch:4}  checkpoint_blocks on / off: measured peak "
                      f"{on['measured'] / off['measured']:.2f} (its rise in the step {rise[1] / rise[0]:.2f}), "
                      f"estimate {on['estimate'] / off['estimate']:.2f}, step time {on['step_s'] / off['step_s']:.2f}",
                      flush=True)
    if args.json:
        print(json.dumps({"device": args.device, "sets": args.sets, "torch": torch.__version__, "rows": rows},
                         indent=2))


if __name__ == "__main__":
    main()
