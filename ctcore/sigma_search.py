"""`ctcore search-sigmas`: the intermediate sigmas of multistep sampling found by golden-section search on a
distance (sliced Wasserstein or FID), one coordinate at a time, as the consistency models paper did.

Coordinate 1 (sampling.sigma_mid[0]) is searched with two-step sampling [sigma_max, s1] over (sigma_min,
sigma_max); for three steps it is then fixed and coordinate 2 is searched with [sigma_max, s1, s2] over
(sigma_min, s1), so the sigmas always decrease (the reference code's greedy order: its ternary search takes the
fixed time points before and after the one it searches). Every evaluation samples the same seeds, so the search is
deterministic: the same checkpoint and options give the same table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

INV_PHI = (math.sqrt(5) - 1) / 2
"""1/phi = 0.618...: each golden-section step keeps this fraction of the bracket."""
DEFAULT_TOLERANCE = 0.05
"""Width in log(sigma) at which a coordinate's search stops: sigma known to a factor e^0.05 = 1.05. With the
iCT range (0.002, 80) that is 13 evaluations per coordinate."""
MIN_TOLERANCE, MAX_TOLERANCE = 0.01, 1.0
"""--tolerance bounds: below 0.01 the 4-digit sigmas would repeat; above 1.0 sigma is known only to a factor e."""
SIGNIFICANT_DIGITS = 4
"""Every evaluated sigma is rounded to 4 significant digits first, so the table, the paste line and `ctcore eval
--sigmas` all use the very same number."""
DEFAULT_FID_SAMPLES = 10_000
"""FID samples per evaluation by default: the reference code's ternary_search.py default (its launch script: 50,000)."""


def golden_section_evaluations(width: float, tolerance: float) -> int:
    """How many evaluations `golden_section` makes on a bracket of `width`: 2, plus one per step after the first
    until the bracket is at most `tolerance` wide (each step keeps 1/phi of it)."""
    steps = max(1, math.ceil(math.log(width / tolerance) / math.log(1 / INV_PHI) - 1e-12))
    return steps + 1


def golden_section(f: Callable[[float], float], lo: float, hi: float,
                   tolerance: float) -> tuple[float, float, list[tuple[float, float]]]:
    """Minimise a unimodal f on the open interval (lo, hi) by golden-section search: (best x, f there, every
    (x, f(x)) in evaluation order). Stops when the bracket is at most `tolerance` wide; the best is the evaluated
    point of least value (the first one on ties), which lies within `tolerance` of the bracketed minimum."""
    if not lo < hi or not tolerance > 0:
        raise ValueError(f"need lo < hi and tolerance > 0, got ({lo}, {hi}) and {tolerance}")
    seen: list[tuple[float, float]] = []

    def at(x: float) -> float:
        value = float(f(x))
        seen.append((x, value))
        return value

    a, b = lo, hi
    c, d = b - INV_PHI * (b - a), a + INV_PHI * (b - a)
    fc, fd = at(c), at(d)
    while True:
        if fc <= fd:  # the minimum lies in [a, d]; c becomes the new upper probe
            b, d, fd = d, c, fc
            if b - a <= tolerance:
                break
            c = b - INV_PHI * (b - a)
            fc = at(c)
        else:  # in [c, b]; d becomes the new lower probe
            a, c, fc = c, d, fd
            if b - a <= tolerance:
                break
            d = a + INV_PHI * (b - a)
            fd = at(d)
    best = min(range(len(seen)), key=lambda i: (seen[i][1], i))
    return seen[best][0], seen[best][1], seen


def rounded(sigma: float) -> float:
    """sigma to SIGNIFICANT_DIGITS significant digits."""
    return float(f"{sigma:.{SIGNIFICANT_DIGITS}g}")


def paste_line(sigma_mid: list[float]) -> str:
    """The line to paste into a recipe's [sampling], e.g. `sigma_mid = [0.8213]`."""
    return "sigma_mid = [" + ", ".join(repr(float(s)) for s in sigma_mid) + "]"


def search_sigmas(distance: Callable[[list[float]], float], sigma_min: float, sigma_max: float, steps: int,
                  tolerance: float = DEFAULT_TOLERANCE,
                  report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The greedy coordinate search: for each intermediate sigma in turn, golden-section search in log(sigma) of
    distance(sigmas), with the ones found before it fixed. `report` gets each evaluation as it is made.

    Returns {"evaluations": [{"coordinate", "sigma", "sigmas", "value"}, ...] in evaluation order, "sigma_mid",
    "value" (the distance of the best plan), "coordinates": [{"coordinate", "low", "high", "sigma", "value"}]}."""
    if steps not in (2, 3):
        raise ValueError(f"steps must be 2 or 3, got {steps}")
    evaluations: list[dict[str, Any]] = []
    coordinates: list[dict[str, Any]] = []
    found: list[float] = []
    cache: dict[tuple[float, ...], float] = {}
    total = 0
    high = sigma_max
    for k in range(1, steps):
        low = sigma_min
        total += golden_section_evaluations(math.log(high / low), tolerance)

        def f(log_sigma: float, k: int = k, total: int = total) -> float:
            sigma = rounded(math.exp(log_sigma))
            plan = [sigma_max, *found, sigma]
            key = tuple(plan)
            if key not in cache:
                cache[key] = float(distance(plan))
            row = {"coordinate": k, "sigma": sigma, "sigmas": plan, "value": cache[key]}
            evaluations.append(row)
            if report is not None:
                report({**row, "index": len(evaluations), "total": total})
            return cache[key]

        log_best, value, _ = golden_section(f, math.log(low), math.log(high), tolerance)
        best = rounded(math.exp(log_best))
        coordinates.append({"coordinate": k, "low": low, "high": high, "sigma": best, "value": value})
        found.append(best)
        high = best
    return {"evaluations": evaluations, "sigma_mid": found, "value": coordinates[-1]["value"],
            "coordinates": coordinates}


RECIPE_MARK, FOUND_MARK = (127, 127, 127), (214, 39, 40)
"""Colours of the dashed lines of the search plot at the recipe's sigma (grey) and the one found (red)."""


def save_search_plot(result: dict[str, Any], path: str | Path, metric: str) -> Path:
    """Distance against sigma, one panel per coordinate, a point per evaluation, dashed lines at the recipe's
    sigma_mid (when the recipe has a usable one) and at the sigma found; the sigma axis is logarithmic when the
    sigmas span a factor 10 or more (Pillow)."""
    from ctcore.images import Mark, Panel, save_curves

    recipe = result.get("recipe_sigma_mid") or []
    panels = []
    for c in result["coordinates"]:
        k = c["coordinate"]
        points = sorted((e["sigma"], e["value"]) for e in result["evaluations"] if e["coordinate"] == k)
        marks = [Mark(recipe[k - 1], f"recipe {recipe[k - 1]:g}", RECIPE_MARK)] if len(recipe) >= k else []
        marks.append(Mark(c["sigma"], f"found {c['sigma']:g}", FOUND_MARK))
        sigmas = [x for x, _ in points] + [m.x for m in marks]
        fixed = "" if k == 1 else f", sigma_mid[0] = {result['sigma_mid'][0]:g}"
        panels.append(Panel(f"sigma_mid[{k - 1}] ({k + 1}-step{fixed}): best {c['sigma']:g} at {c['value']:.4g}",
                            [points], log_x=max(sigmas) >= 10 * min(sigmas), x_format="number", markers=True,
                            marks=marks))
    return save_curves(panels, [metric], path, xlabel="sigma")


def run_search(checkpoint: str | Path, registry, *, steps: int, metric: str = "sliced-wasserstein",
               num_samples: int | None = None, seed: int | None = None, tolerance: float = DEFAULT_TOLERANCE,
               device: str | None = None, batch_size: int | None = None, ref: str | Path | None = None,
               inception: Any = None, fid_protocol: str = "tensorflow", ref_protocol: str | None = None,
               report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Search the sigmas of a checkpoint with the evaluation code of `ctcore eval` (`distance_evaluator`,
    `fid_evaluator`): the same samples, so each value equals `ctcore eval --sigmas ...` for its plan."""
    from ctcore.errors import UsageError

    if not MIN_TOLERANCE <= tolerance <= MAX_TOLERANCE:
        raise UsageError(f"--tolerance must be {MIN_TOLERANCE} to {MAX_TOLERANCE} (the width in log sigma at which "
                         f"the search stops), got {tolerance:g}")
    started = time.perf_counter()
    if metric == "sliced-wasserstein":
        from ctcore.evaluation import distance_evaluator

        info, recipe, _, distance = distance_evaluator(checkpoint, registry, num_samples=num_samples, seed=seed,
                                                       batch_size=batch_size, device=device)
    else:
        from ctcore.fid import fid_evaluator

        info, recipe, _, fid_of = fid_evaluator(
            checkpoint, registry, inception=inception, ref_stats=ref, device=device, seed=0 if seed is None else seed,
            num_samples=DEFAULT_FID_SAMPLES if num_samples is None else num_samples,
            batch_size=256 if batch_size is None else batch_size, fid_protocol=fid_protocol,
            ref_protocol=ref_protocol)
        info = {"metric": "fid", "num_samples": DEFAULT_FID_SAMPLES if num_samples is None else num_samples,
                "fid_protocol": fid_protocol, "ref": str(ref), **info}

        def distance(plan: list[float]) -> float:
            return fid_of(plan)["fid"]

    from ctcore.sampling import require_consistency_model

    require_consistency_model(recipe, registry, Path(info["checkpoint"]), "ctcore search-sigmas")
    c = recipe.consistency
    result = search_sigmas(distance, c.sigma_min, c.sigma_max, steps, tolerance, report)
    # the recipe's own plan of as many steps, scored on the same samples, for comparison
    mids = list(recipe.sampling.sigma_mid)[: steps - 1]
    plan = [c.sigma_max, *mids]
    usable = len(mids) == steps - 1 and all(c.sigma_min < s < a for a, s in zip(plan, plan[1:], strict=False))
    recipe_value = float(distance(plan)) if usable else None
    return {**info, "metric": metric, "steps": steps, "tolerance": tolerance, "sigma_min": c.sigma_min,
            "sigma_max": c.sigma_max, **result, "paste": paste_line(result["sigma_mid"]),
            "recipe_sigma_mid": mids if usable else None, "recipe_value": recipe_value,
            "seconds": time.perf_counter() - started}
