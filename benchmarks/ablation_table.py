"""The README's toy ablation table: the quickstart with one iCT change switched back at a time, several seeds each.

    python benchmarks/ablation_table.py                      # every row, seeds 0, 1, 2 (about 10 min on 2 cores)
    python benchmarks/ablation_table.py --rows none,l2_metric --seeds 0,1,2,3,4 --json

Each run trains recipes/quickstart.toml as it is (its total_steps, eval_ema_decay and run.threads) with run.seed
set to the seed, which also generates the synthetic data, so each seed is another dataset, initialisation and
noise. It prints, per row, the final sliced Wasserstein distance of every seed, their mean and standard deviation
and the mean gain over the untrained model: differences between rows smaller than the spread of one row are seed
noise. Not a test: it prints numbers and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from ctcore.build import start_run
from ctcore.recipe import parse_recipe
from ctcore.registry import load_registry
from ctcore.training import train

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
QUICKSTART = RECIPES / "quickstart.toml"

ROWS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    # row: (the README's description, {section: keys to set}; a section holding `name` is replaced whole)
    "none": ("none (iCT)", {}),
    "fourier16": ("`[network] fourier_scale = 16.0`", {"network": {"fourier_scale": 16.0}}),
    "ema_teacher": ('`[teacher] name = "ema"`, `mu0 = 0.9`', {"teacher": {"name": "ema", "mu0": 0.9}}),
    "ct_curriculum": ('`[curriculum] name = "ct"`, `s0 = 2`, `s1 = 150`',
                      {"curriculum": {"name": "ct", "s0": 2, "s1": 150}}),
    "uniform_weighting": ('`[consistency] weighting = "uniform"`', {"consistency": {"weighting": "uniform"}}),
    "uniform_pairs": ('`[noise_schedule] name = "uniform"`', {"noise_schedule": {"name": "uniform"}}),
    "l2_metric": ('`[metric] name = "l2"`', {"metric": {"name": "l2"}}),
    # other methods on the same toy data, each from its own quickstart recipe, its total_steps set so that a run
    # takes about the iCT quickstart's 1000 steps' time (measured with one thread: iCT 0.030 s a step, sCT's JVP
    # 0.056 s, MeanFlow's 0.092 s, sCD's with its teacher's evaluation about 0.066 s). sCD first trains its diffusion
    # teacher (quickstart_diffusion) on the same seed's data, which its time does not count.
    "sct": ("sCT (`quickstart_sct`, 540 steps: iCT's time)", {"training": {"total_steps": 540}}),
    "scd": ("sCD (`quickstart_scd`, 450 steps: iCT's time, after its diffusion teacher)",
            {"training": {"total_steps": 450}}),
    "meanflow": ("MeanFlow (`quickstart_meanflow`, 330 steps: iCT's time)", {"training": {"total_steps": 330}}),
}
BASES = {"sct": RECIPES / "quickstart_sct.toml", "scd": RECIPES / "quickstart_scd.toml",
         "meanflow": RECIPES / "quickstart_meanflow.toml"}
"""Rows trained from another recipe than --recipe (the quickstart)."""
TEACHERS = {"scd": RECIPES / "quickstart_diffusion.toml"}
"""Rows whose [teacher] checkpoint is a diffusion run of this recipe, trained first on the same seed."""


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def recipe_text(base: dict[str, dict[str, Any]], row: str, seed: int, out: Path) -> str:
    """The quickstart with the row's change and the seed, as TOML."""
    doc = {section: dict(table) for section, table in base.items()}
    for section, keys in ROWS[row][1].items():
        doc[section] = dict(keys) if "name" in keys else {**doc[section], **keys}
    doc["run"] |= {"seed": seed, "output_dir": str(out)}
    return toml_text(doc)


def toml_text(doc: dict[str, dict[str, Any]]) -> str:
    """A recipe's sections as TOML."""
    return "".join(f"[{s}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in t.items()) for s, t in doc.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--recipe", type=Path, default=QUICKSTART)
    parser.add_argument("--json", action="store_true", help="one JSON line per run instead of the table")
    args = parser.parse_args()
    rows, seeds = args.rows.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    registry = load_registry()
    bases = {row: tomllib.loads(BASES.get(row, args.recipe).read_text(encoding="utf-8")) for row in rows}
    results: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                out, base = Path(tmp) / "run", bases[row]
                if row in TEACHERS:  # the diffusion model this row distils, on the same seed's data
                    teacher = tomllib.loads(TEACHERS[row].read_text(encoding="utf-8"))
                    teacher_out = Path(tmp) / "teacher"
                    teacher["run"] |= {"seed": seed, "output_dir": str(teacher_out)}
                    teacher_recipe = parse_recipe(toml_text(teacher), registry, source=f"{row} teacher seed {seed}")
                    train(start_run(teacher_recipe, registry, teacher_out), progress=False)
                    base = {**base, "teacher": {**base["teacher"], "checkpoint": str(teacher_out)}}
                recipe = parse_recipe(recipe_text(base, row, seed, out), registry, source=f"{row} seed {seed}")
                start = time.perf_counter()
                summary = train(start_run(recipe, registry, out), progress=False)
                seconds = time.perf_counter() - start
            initial, final = summary["initial_distance"], summary["final_distance"]
            results.setdefault(row, []).append((initial, final))
            if args.json:
                print(json.dumps({"row": row, "seed": seed, "initial": initial, "final": final,
                                  "seconds": round(seconds, 1)}), flush=True)
            else:
                print(f"{row} seed {seed}: {initial:.4f} -> {final:.4f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        return
    print(f"| change from the iCT quickstart | trained, seeds {', '.join(map(str, seeds))} | mean ± sd | mean gain |")
    print("|---|---|---|---|")
    for row, pairs in results.items():
        finals = [f for _, f in pairs]
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        gain = statistics.mean(i / f for i, f in pairs)
        print(f"| {ROWS[row][0]} | {', '.join(f'{f:.4f}' for f in finals)} | {statistics.mean(finals):.4f} ± "
              f"{spread:.4f} | {gain:.1f}x |")


if __name__ == "__main__":
    main()
