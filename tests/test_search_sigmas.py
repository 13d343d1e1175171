"""`ctcore search-sigmas`: the golden-section routine finds known minima to the tolerance in the predicted number of
evaluations; the greedy coordinate search keeps the sigmas decreasing; on a tiny run the command is deterministic,
prints the paste line, and every value it reports is what `ctcore eval --sigmas` reports; bad input is one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import NO_REF, cache_lacks_the_weights, tree_state, write_tiny_recipe
from PIL import Image
from typer.testing import CliRunner

import ctcore
from ctcore.build import start_run
from ctcore.cli import app
from ctcore.sigma_search import golden_section, golden_section_evaluations, paste_line, search_sigmas
from ctcore.training import train


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------------------- golden-section routine


@pytest.mark.parametrize(("f", "lo", "hi", "tolerance", "minimum", "evaluations"), [
    (lambda x: (x - 0.3) ** 2, 0.0, 1.0, 1e-3, 0.3, 16),  # ceil(log(1000) / log(phi)) = 15 steps
    (lambda x: abs(x + 2.0), -5.0, 3.0, 0.01, -2.0, 15),  # not smooth at the minimum
    (lambda x: math.cos(x), 0.0, 2 * math.pi, 0.05, math.pi, 12),
    (lambda x: x, 0.0, 1.0, 0.01, 0.0, 11),  # monotone: the minimum is at the lower end
    (lambda x: -x, 0.0, 1.0, 0.01, 1.0, 11),  # and at the upper end
])
def test_golden_section_finds_the_minimum_to_the_tolerance(f, lo, hi, tolerance, minimum, evaluations) -> None:
    best, value, seen = golden_section(f, lo, hi, tolerance)
    assert abs(best - minimum) <= tolerance
    assert value == f(best) == min(v for _, v in seen)
    assert len(seen) == evaluations == golden_section_evaluations(hi - lo, tolerance)
    assert all(lo < x < hi for x, _ in seen)  # never an end of the open interval
    assert golden_section(f, lo, hi, tolerance) == (best, value, seen)  # deterministic


def test_golden_section_refuses_an_empty_bracket() -> None:
    with pytest.raises(ValueError, match=r"need lo < hi and tolerance > 0, got \(1.0, 1.0\) and 0.1"):
        golden_section(abs, 1.0, 1.0, 0.1)


def test_three_steps_search_one_coordinate_then_the_next_below_it() -> None:
    calls = []

    def distance(plan: list[float]) -> float:  # minimum at [80, 2.0, 0.05]
        calls.append(plan)
        return sum((math.log(s) - math.log(t)) ** 2 for s, t in zip(plan[1:], [2.0, 0.05], strict=False))

    r = search_sigmas(distance, 0.002, 80.0, 3, tolerance=0.05)
    first = [e for e in r["evaluations"] if e["coordinate"] == 1]
    second = [e for e in r["evaluations"] if e["coordinate"] == 2]
    assert len(first) == golden_section_evaluations(math.log(80 / 0.002), 0.05) == 13
    assert all(len(e["sigmas"]) == 2 for e in first) and all(len(e["sigmas"]) == 3 for e in second)
    s1, s2 = r["sigma_mid"]
    assert abs(math.log(s1 / 2.0)) <= 0.05 and abs(math.log(s2 / 0.05)) <= 0.05
    assert all(e["sigmas"][:2] == [80.0, s1] and 0.002 < e["sigma"] < s1 for e in second)
    assert len(second) == golden_section_evaluations(math.log(s1 / 0.002), 0.05)
    assert calls == [e["sigmas"] for e in r["evaluations"]]  # each plan scored once, in table order
    assert r["value"] == distance([80.0, s1, s2])
    assert paste_line(r["sigma_mid"]) == f"sigma_mid = [{s1!r}, {s2!r}]"


def test_the_plot_marks_the_recipes_sigma_and_the_one_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each coordinate's panel: its evaluations (a marker each) on a log sigma axis with 1, 2, 5 ticks per decade, a
    grey dashed line at the recipe's sigma_mid and a red one at the sigma found, named in a legend; the lines are in
    the picture at their x."""
    import ctcore.images
    from ctcore.images import PANEL_SIZE, chart_pixel, panel_layout
    from ctcore.sigma_search import FOUND_MARK, RECIPE_MARK, save_search_plot

    def distance(plan: list[float]) -> float:  # minimum at [80, 2.0, 0.05]
        return 0.1 + sum((math.log(s) - math.log(t)) ** 2 for s, t in zip(plan[1:], [2.0, 0.05], strict=False))

    result = {**search_sigmas(distance, 0.002, 80.0, 3, tolerance=0.05), "recipe_sigma_mid": [0.821, 0.1]}
    calls = []
    real = ctcore.images.save_curves

    def spy(panels: list, *args: object, **kwargs: object) -> Path:
        calls.append(panels)
        return real(panels, *args, **kwargs)

    monkeypatch.setattr(ctcore.images, "save_curves", spy)
    save_search_plot(result, tmp_path / "p.png", "sliced-wasserstein")
    [panels] = calls
    s1, s2 = result["sigma_mid"]
    assert [[(m.x, m.label, m.colour) for m in p.marks] for p in panels] == [
        [(0.821, "recipe 0.821", RECIPE_MARK), (s1, f"found {s1:g}", FOUND_MARK)],
        [(0.1, "recipe 0.1", RECIPE_MARK), (s2, f"found {s2:g}", FOUND_MARK)]]
    for k, panel in enumerate(panels, start=1):
        assert panel.series == [sorted((e["sigma"], e["value"]) for e in result["evaluations"]
                                       if e["coordinate"] == k)]
        assert panel.log_x and panel.markers
    layout = panel_layout(panels[0])
    assert layout.x is not None and [label for _, label in layout.x.ticks] == ["0.2", "0.5", "1", "2", "5"]
    with Image.open(tmp_path / "p.png") as image:
        rgb = image.convert("RGB")
        for k, panel in enumerate(panels):
            layout = panel_layout(panel)
            assert layout.y is not None
            for mark in panel.marks:
                x, _ = chart_pixel(layout, mark.x, layout.y.lo, (PANEL_SIZE[0] * k, 16 + 12))
                column = {rgb.getpixel((round(x), y)) for y in range(16 + 12 + 28, 16 + 12 + 264)}
                assert mark.colour in column, (k, mark)

    result["recipe_sigma_mid"] = None  # the recipe has no usable sigma_mid: only the one found is marked
    calls.clear()
    save_search_plot(result, tmp_path / "p.png", "sliced-wasserstein")
    assert [[m.label for m in p.marks] for p in calls[0]] == [[f"found {s1:g}"], [f"found {s2:g}"]]


# ------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search")
    registry = ctcore.load_registry()
    run = start_run(ctcore.read_recipe(write_tiny_recipe(root / "r.toml", root / "run"), registry), registry)
    try:
        train(run, progress=False)
    finally:
        run.close()
    return run.out_dir


def test_the_search_is_deterministic_and_scores_what_eval_scores(run_dir: Path, tmp_path: Path) -> None:
    first = invoke("search-sigmas", run_dir, "--steps", "2", "--tolerance", "0.3", "--plot", tmp_path / "a.png",
                   "--json")
    assert first.exit_code == 0, first.output
    again = invoke("search-sigmas", run_dir, "--steps", "2", "--tolerance", "0.3", "--plot", tmp_path / "b.png",
                   "--json")
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert a["evaluations"] == b["evaluations"] and a["sigma_mid"] == b["sigma_mid"]
    assert len(a["evaluations"]) == golden_section_evaluations(math.log(80 / 0.002), 0.3) == 9
    assert (a["metric"], a["num_samples"], a["seed"], a["step"]) == ("sliced-wasserstein", 32, 10_000_000, 12)
    best = a["sigma_mid"][0]
    assert a["paste"] == f"sigma_mid = [{best!r}]"
    assert a["value"] == min(e["value"] for e in a["evaluations"])
    for e in [a["evaluations"][0], next(e for e in a["evaluations"] if e["sigma"] == best)]:
        sigmas = ",".join(repr(s) for s in e["sigmas"])
        out = invoke("eval", run_dir, "--metric", "sliced-wasserstein", "--sigmas", sigmas, "--json")
        assert json.loads(out.stdout)["value"] == e["value"]
    recipe = json.loads(invoke("eval", run_dir, "--metric", "sliced-wasserstein", "--steps", "2", "--json").stdout)
    assert (a["recipe_sigma_mid"], a["recipe_value"]) == ([0.821], recipe["value"])
    with Image.open(tmp_path / "a.png") as image:
        assert image.format == "PNG" and image.size == (480, 300 + 16 + 12)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_the_table_ends_with_the_paste_line_and_three_steps_plot_two_panels(run_dir: Path, tmp_path: Path) -> None:
    result = invoke("search-sigmas", run_dir, "--steps", "3", "--tolerance", "0.5", "--plot", tmp_path / "p.png",
                    "-n", "16")
    assert result.exit_code == 0, result.output
    r = json.loads(invoke("search-sigmas", run_dir, "--steps", "3", "--tolerance", "0.5", "-n", "16",
                          "--plot", tmp_path / "q.png", "--json", "--no-progress").stdout)
    lines = result.stdout.splitlines()
    assert lines[-1] == r["paste"] == f"sigma_mid = [{r['sigma_mid'][0]!r}, {r['sigma_mid'][1]!r}]"
    assert lines[-2] == f"wrote the plot to {tmp_path / 'p.png'}"
    assert lines[-3] == f"best: sigmas {[80.0, *r['sigma_mid']]}, sliced-wasserstein {r['value']:.5g}"
    progress = result.stderr.splitlines()
    assert len(progress) == len(r["evaluations"])
    e = r["evaluations"][0]
    assert progress[0] == (f"evaluation 1/{golden_section_evaluations(math.log(80 / 0.002), 0.5)}: sigma_mid[0] = "
                           f"{e['sigma']:g} (sigmas {e['sigmas']}) -> sliced-wasserstein {e['value']:.5g}")
    with Image.open(tmp_path / "p.png") as image:
        assert image.size == (960, 300 + 16 + 12)  # one panel per coordinate


def test_by_default_the_plot_goes_to_the_runs_samples_folder(run_dir: Path) -> None:
    result = invoke("search-sigmas", run_dir / "checkpoints" / "ckpt-000000012.pt", "--steps", "2", "--tolerance",
                    "1", "-n", "4", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (run_dir / "samples" / "search-sigmas-2step.png").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "4"], "Invalid value for '--steps': Input should be less than or equal to 3 (see `ctcore "
                       "search-sigmas --help`)"),
    (["--steps", "1"], "Invalid value for '--steps': Input should be greater than or equal to 2 (see `ctcore "
                       "search-sigmas --help`)"),
    ([], "Missing option '--steps' (see `ctcore search-sigmas --help`)"),
    (["--steps", "2", "-n", "0"], "Invalid value for '--num-samples' / '-n': Input should be greater than or equal "
                                  "to 1 (see `ctcore search-sigmas --help`)"),
    (["--steps", "2", "-n", "100001"], "--num-samples for the sliced Wasserstein distance must be 1 to 100,000 (the "
                                       "range of evaluation.num_samples), got 100,001"),
    (["--steps", "2", "--tolerance", "0"], "Invalid value for '--tolerance': Input should be greater than or equal "
                                           "to 0.01 (see `ctcore search-sigmas --help`)"),
    (["--steps", "2", "--plot", "out.txt"], "--plot 'out.txt': give an image file name ending in .png (or .jpg, "
                                            ".webp)"),
    (["--steps", "2", "--metric", "fid", "--download-inception"],  # the weights would be fetched: only --ref lacks
     "--metric fid needs --ref STATS.npz, reference statistics of the training data (make them with `ctcore "
     "eval-ref-stats DATASET.h5 OUT.npz`); --metric sliced-wasserstein needs no file"),
    (["--steps", "2", "--ref", "r.npz"], "--ref is for --metric fid; --metric sliced-wasserstein compares the samples "
                                         "with the recipe's training data and needs no file: drop --ref"),
])
def test_bad_requests_are_one_line_exit_2_and_write_nothing(run_dir: Path, args: list[str], message: str,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = tree_state(run_dir)
    result = invoke("search-sigmas", run_dir, *args)
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", f"error: {message}\n")
    assert tree_state(run_dir) == before and list(tmp_path.iterdir()) == []


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "x.pt"
    bad.write_text("not a checkpoint")
    result = invoke("search-sigmas", bad, "--steps", "2", "--plot", tmp_path / "p.png")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.startswith(f"error: checkpoint {str(bad)!r} is corrupt or not a ctcore checkpoint (")
    assert len(result.stderr.splitlines()) == 1 and sorted(tmp_path.iterdir()) == [bad]


def test_fid_without_weights_says_so_as_eval_does(run_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    (tmp_path / "r.npz").write_bytes(b"")  # present: the weights are all that is missing (never read)
    result = invoke("search-sigmas", run_dir, "--steps", "2", "--metric", "fid", "--ref", tmp_path / "r.npz",
                    "--inception", missing)
    assert (result.exit_code, result.stdout) == (1, "")
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"error: Inception weights file {str(missing)!r} (--inception) not found.")
    assert lines[-1] == (f"or search without any weights file: ctcore search-sigmas {run_dir} --steps 2 --metric "
                         f"sliced-wasserstein")
    assert list(tmp_path.iterdir()) == [tmp_path / "r.npz"]


def test_fid_search_lists_every_missing_input_at_once(run_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTCORE_CACHE", str(tmp_path / "cache"))
    result = invoke("search-sigmas", run_dir, "--steps", "2", "--metric", "fid")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == ("error: ctcore search-sigmas --metric fid is missing 2 inputs:\n"
                             f"  {NO_REF}\n" + cache_lacks_the_weights(tmp_path / "cache")
                             + f"or search without any weights file: ctcore search-sigmas {run_dir} --steps 2 "
                             "--metric sliced-wasserstein\n")
    assert list(tmp_path.iterdir()) == []


def test_fid_search_scores_what_eval_scores(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FID through eval's code: random Inception weights, and a cheap stand-in for the Frechet distance that
    depends on the features (scipy's sqrtm of 2048 x 2048 takes seconds; the distance itself is tested in
    test_fid.py)."""
    import numpy as np
    import torch
    from test_fid import randomised_inception

    import ctcore.fid
    from ctcore.fid import save_statistics

    weights = tmp_path / "w.pth"
    torch.save(randomised_inception().state_dict(), weights)
    ref = save_statistics(tmp_path / "ref.npz", {"mu": np.zeros(2048), "sigma": np.eye(2048)}, "edm")
    monkeypatch.setattr(ctcore.fid, "frechet_distance", lambda mu1, sigma1, mu2, sigma2: float(np.abs(mu1).sum()))
    # EDM's layout records no protocol: --ref-protocol declares it
    common = ["--metric", "fid", "--ref", ref, "--ref-protocol", "tensorflow", "--inception", weights, "-n", "2",
              "--json"]
    result = invoke("search-sigmas", run_dir, "--steps", "2", "--tolerance", "1", "--plot", tmp_path / "p.png",
                    "--no-progress", *common)
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert (r["metric"], r["num_samples"], r["seed"], len(r["evaluations"])) == ("fid", 2, 0, 6)
    assert len({e["value"] for e in r["evaluations"]}) == 6  # the sigmas change the features
    e = next(e for e in r["evaluations"] if e["sigma"] == r["sigma_mid"][0])
    out = invoke("eval", run_dir, "--sigmas", ",".join(repr(s) for s in e["sigmas"]), *common)
    assert json.loads(out.stdout)["fid"] == e["value"] == r["value"]
